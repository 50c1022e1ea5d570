"""zeropod's annotations (and ours) into checked settings, every error named."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from activator import annotations as a
from activator.config import ConfigError


def test_zeropods_manifest_keeps_its_meaning() -> None:
    settings = a.parse(
        {
            a.PORTS_MAP: "wordpress=80",
            a.CONTAINER_NAMES: "wordpress",
            a.SCALEDOWN_DURATION: "10s",
        }
    )
    assert settings.ports == {"wordpress": (80,)}
    assert settings.managed == ("wordpress",)
    assert settings.scaledown_after == 10.0
    assert settings.probe_detection


def test_every_key() -> None:
    settings = a.parse(
        {
            a.PORTS_MAP: "web=80,81; api=8080",
            a.DISABLE_PROBE_DETECTION: "true",
            a.CLOSE_IDLE_AFTER: "5m",
            a.PROBE_SOURCES: "10.0.0.0/8, 192.168.1.5",
            a.PROBE_DEFAULT_STATUS: "503",
        }
    )
    assert settings.ports == {"web": (80, 81), "api": (8080,)}
    assert settings.managed == ("web", "api")
    assert not settings.probe_detection
    assert settings.close_idle_after == 300.0
    assert settings.probe_sources == (IPv4Network("10.0.0.0/8"), IPv4Network("192.168.1.5/32"))
    assert settings.probe_default_status == 503


@pytest.mark.parametrize(
    ("annotations", "named"),
    [
        ({}, [a.PORTS_MAP]),
        ({a.PORTS_MAP: "web"}, [a.PORTS_MAP, a.PORTS_MAP]),
        ({a.PORTS_MAP: "web=http"}, [a.PORTS_MAP]),
        ({a.PORTS_MAP: "web=80", a.CONTAINER_NAMES: "api"}, [a.PORTS_MAP]),
        ({a.PORTS_MAP: "web=80", a.SCALEDOWN_DURATION: "-1s"}, [a.SCALEDOWN_DURATION]),
        ({a.PORTS_MAP: "web=80", a.DISABLE_PROBE_DETECTION: "yes"}, [a.DISABLE_PROBE_DETECTION]),
        ({a.PORTS_MAP: "web=80", a.PROBE_SOURCES: "nowhere"}, [a.PROBE_SOURCES]),
        ({a.PORTS_MAP: "web=80", a.PROBE_DEFAULT_STATUS: "42"}, [a.PROBE_DEFAULT_STATUS]),
        ({a.PORTS_MAP: "web=80", a.RESIZE_WHEN_SCALED_DOWN: "on"}, [a.RESIZE_WHEN_SCALED_DOWN]),
        (
            {a.PORTS_MAP: "web=0", a.SCALEDOWN_DURATION: "soon", a.CLOSE_IDLE_AFTER: "x"},
            [a.PORTS_MAP, a.SCALEDOWN_DURATION, a.CLOSE_IDLE_AFTER],
        ),
    ],
)
def test_bad_annotations_are_all_named(annotations: dict[str, str], named: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        a.parse(annotations)
    assert [err.field for err in info.value.errors] == named


@pytest.mark.parametrize(
    ("text", "resize"), [(None, False), ("true", True), (" True ", True), ("false", False)]
)
def test_resize_when_scaled_down(text: str | None, resize: bool) -> None:
    annotations = {a.PORTS_MAP: "web=80"}
    if text is not None:
        annotations[a.RESIZE_WHEN_SCALED_DOWN] = text
    assert a.parse(annotations).resize_when_scaled_down is resize


def test_resize_when_scaled_down_says_how_to_write_it() -> None:
    with pytest.raises(ConfigError) as info:
        a.parse({a.PORTS_MAP: "web=80", a.RESIZE_WHEN_SCALED_DOWN: "yes"})
    (error,) = info.value.errors
    assert str(error) == (
        "pod-activator.dev/resize-when-scaled-down: 'yes' is not a boolean; "
        'write "true" or "false"'
    )


def test_enabled_only_with_our_keys() -> None:
    assert a.enabled({a.PORTS_MAP: "web=80"})
    assert a.enabled({a.CONTAINER_NAMES: "web"})
    assert not a.enabled({"other.io/x": "1"})


def test_downward_api_file() -> None:
    text = (
        'zeropod.ctrox.dev/ports-map="web=80"\n'
        'kubernetes.io/config.seen="2026-11-29T17:00:00Z"\n'
        'note="say \\"hi\\"\\n"\n'
    )
    assert a.read_downward_api(text) == {
        a.PORTS_MAP: "web=80",
        "kubernetes.io/config.seen": "2026-11-29T17:00:00Z",
        "note": 'say "hi"\n',
    }
    with pytest.raises(ConfigError, match="annotations line 1"):
        a.read_downward_api("garbage\n")


@given(
    st.dictionaries(
        st.sampled_from(a.KEYS),
        st.text(max_size=20),
    )
)
def test_only_typed_errors_escape(annotations: dict[str, str]) -> None:
    try:
        a.parse(annotations)
    except ConfigError as exc:
        assert exc.errors


@given(st.text(max_size=200))
def test_downward_api_reader_only_raises_config_errors(text: str) -> None:
    with contextlib.suppress(ConfigError):
        a.read_downward_api(text)
