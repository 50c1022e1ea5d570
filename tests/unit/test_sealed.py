"""Images sealed at rest: round trip, tamper and wrong key refused, key files."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from activator.config import FieldError
from activator.sealed import SealError, read_key, seal, unseal

KEY = bytes(range(32))


def make_image(path: Path) -> None:
    path.mkdir()
    (path / "pages-1.img").write_bytes(b"the app's memory: password=hunter2" * 100)
    (path / "core-2.img").write_bytes(b"registers")


def test_round_trip_and_nothing_readable_at_rest(tmp_path: Path) -> None:
    make_image(tmp_path / "plain")
    seal(tmp_path / "plain", tmp_path / "sealed", KEY)
    for f in (tmp_path / "sealed").iterdir():
        assert b"hunter2" not in f.read_bytes()
        assert f.stat().st_mode & 0o777 == 0o600
    unseal(tmp_path / "sealed", tmp_path / "opened", KEY)
    for name in ("pages-1.img", "core-2.img"):
        assert (tmp_path / "opened" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_a_changed_swapped_or_wrongly_keyed_image_does_not_open(tmp_path: Path) -> None:
    make_image(tmp_path / "plain")
    seal(tmp_path / "plain", tmp_path / "sealed", KEY)
    with pytest.raises(SealError):
        unseal(tmp_path / "sealed", tmp_path / "o1", bytes(32))
    pages = tmp_path / "sealed" / "pages-1.img"
    core = tmp_path / "sealed" / "core-2.img"
    pages_bytes, core_bytes = pages.read_bytes(), core.read_bytes()
    pages.write_bytes(core_bytes)
    core.write_bytes(pages_bytes)
    with pytest.raises(SealError):
        unseal(tmp_path / "sealed", tmp_path / "o2", KEY)
    pages.write_bytes(pages_bytes[:-1] + bytes([pages_bytes[-1] ^ 1]))
    with pytest.raises(SealError):
        unseal(tmp_path / "sealed", tmp_path / "o3", KEY)


def test_key_files(tmp_path: Path) -> None:
    raw, hexed, b64, short = (tmp_path / n for n in ("raw", "hex", "b64", "short"))
    raw.write_bytes(KEY)
    hexed.write_text(KEY.hex() + "\n")
    b64.write_text(base64.b64encode(KEY).decode() + "\n")
    short.write_bytes(b"too short")
    assert read_key(raw, "--image-key") == read_key(hexed, "--image-key") == KEY
    assert read_key(b64, "--image-key") == KEY
    for bad in (short, tmp_path / "missing"):
        err = read_key(bad, "--image-key")
        assert isinstance(err, FieldError) and err.field == "--image-key"
