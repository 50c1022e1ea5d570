"""Flags and configuration: every bad field named with its fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from activator.config import (
    ConfigError,
    FieldError,
    parse_duration,
    parse_http_status,
    parse_port,
    pod_config,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("1m30s", 90.0), ("250ms", 0.25), ("2h", 7200.0), ("1.5", 1.5), ("0", 0.0)],
)
def test_durations_in_go_syntax_or_plain_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text, "--scaledown-after") == seconds


@pytest.mark.parametrize("text", ["-5s", "-1", "5 s", "s", "", "10x", "1m-3s", "nan", "inf"])
def test_bad_durations_name_the_field(text: str) -> None:
    err = parse_duration(text, "--scaledown-after")
    assert isinstance(err, FieldError)
    assert err.field == "--scaledown-after"


def test_every_bad_field_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        pod_config(name="Bad_Name", ports=["http", "70000"], command=[], scaledown_after="-3s")
    fields = [err.field for err in info.value.errors]
    assert fields == ["--name", "--port", "--port", "COMMAND", "--scaledown-after"]
    assert "give a number from 1 to 65535" in str(info.value)


def test_a_good_config() -> None:
    config = pod_config(name="web", ports=["80", "443"], command=["nginx"], scaledown_after="1m")
    assert (config.ports, config.scaledown_after, config.command) == ((80, 443), 60.0, ("nginx",))


def test_lazy_restore_and_sealed_images_do_not_go_together(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(bytes(32))
    with pytest.raises(ConfigError) as info:
        pod_config(
            name="web",
            ports=["80"],
            command=["nginx"],
            scaledown_after=None,
            image_key=str(key),
            lazy_restore=True,
        )
    assert [err.field for err in info.value.errors] == ["--lazy-restore"]
    assert pod_config(
        name="web", ports=["80"], command=["nginx"], scaledown_after=None, lazy_restore=True
    ).lazy_restore


@given(st.text(max_size=30))
def test_duration_parser_only_returns_seconds_or_a_field_error(text: str) -> None:
    result = parse_duration(text, "--scaledown-after")
    assert isinstance(result, FieldError) or (isinstance(result, float) and result >= 0)


@given(st.text(max_size=12))
def test_port_and_status_parsers_only_return_numbers_in_range_or_field_errors(text: str) -> None:
    port = parse_port(text, "--port")
    assert isinstance(port, FieldError) or 1 <= port <= 65535
    status = parse_http_status(text, "--probe-default-status")
    assert isinstance(status, FieldError) or 100 <= status <= 599
