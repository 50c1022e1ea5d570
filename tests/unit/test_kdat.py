"""CRIU's kernel-feature cache: where it is kept, and when it is made again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from activator import kdat
from activator.criu import find_criu


def test_the_longest_mount_point_decides(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\ntmpfs /run/user tmpfs rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\n"
    )
    assert not kdat._on_tmpfs(Path("/run"), mounts)
    assert kdat._on_tmpfs(Path("/run/user/0"), mounts)
    assert not kdat._on_tmpfs(Path("/runner"), mounts)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a private mount namespace")
def test_a_cache_from_another_boot_is_made_again(tmp_path: Path) -> None:
    cache, stamp = tmp_path / "criu.kdat", tmp_path / "boot-id"
    cache.write_bytes(b"from another boot")
    stamp.write_text("another-boot\n")
    assert kdat.ensure_cache(find_criu(), cache, stamp)
    assert cache.read_bytes() != b"from another boot" and cache.stat().st_size > 0
    assert stamp.read_text().strip() == kdat.BOOT_ID.read_text().strip()
    made = cache.stat().st_mtime_ns
    assert kdat.ensure_cache(find_criu(), cache, stamp)  # this boot's: kept
    assert cache.stat().st_mtime_ns == made
