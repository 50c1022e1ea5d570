"""Pod annotations (zeropod's keys, and ours) parsed into checked settings.

A Kubernetes pod enables the activator with annotations; the sidecar reads
them from a Downward API volume. zeropod's keys keep their meaning, so the
manifests people wrote for it keep working:

    zeropod.ctrox.dev/ports-map: "web=80,81;api=8080"   container=ports;...
    zeropod.ctrox.dev/container-names: "web,api"         containers to manage
    zeropod.ctrox.dev/scaledown-duration: "10s"          Go duration
    zeropod.ctrox.dev/disable-probe-detection: "true"

and ours, for what zeropod has no key for:

    pod-activator.dev/close-idle-after: "5m"
    pod-activator.dev/probe-sources: "10.0.0.0/8,192.168.1.5"
    pod-activator.dev/probe-default-status: "503"
    pod-activator.dev/resize-when-scaled-down: "true"   lower requests in place (kube/)
    pod-activator.dev/fast-path: "true"                 local pods only, for now

Every bad annotation is reported at once, named, with its fix; the caller
then leaves the pod unmanaged rather than half-managed.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import TypeVar

from activator.config import (
    DEFAULT_SCALEDOWN_AFTER,
    ConfigError,
    FieldError,
    parse_duration,
    parse_http_status,
    parse_network,
    parse_port,
)

T = TypeVar("T")
ZEROPOD = "zeropod.ctrox.dev/"
PORTS_MAP = ZEROPOD + "ports-map"
CONTAINER_NAMES = ZEROPOD + "container-names"
SCALEDOWN_DURATION = ZEROPOD + "scaledown-duration"
DISABLE_PROBE_DETECTION = ZEROPOD + "disable-probe-detection"
OURS = "pod-activator.dev/"
CLOSE_IDLE_AFTER = OURS + "close-idle-after"
PROBE_SOURCES = OURS + "probe-sources"
PROBE_DEFAULT_STATUS = OURS + "probe-default-status"
RESIZE_WHEN_SCALED_DOWN = OURS + "resize-when-scaled-down"
FAST_PATH = OURS + "fast-path"
# Every key this module reads.
KEYS = (
    PORTS_MAP,
    CONTAINER_NAMES,
    SCALEDOWN_DURATION,
    DISABLE_PROBE_DETECTION,
    CLOSE_IDLE_AFTER,
    PROBE_SOURCES,
    PROBE_DEFAULT_STATUS,
    RESIZE_WHEN_SCALED_DOWN,
    FAST_PATH,
)


@dataclass(frozen=True)
class PodSettings:
    # container name -> its ports; empty when only container-names is given
    # (the sidecar then finds the listening ports itself)
    ports: Mapping[str, tuple[int, ...]]
    container_names: tuple[str, ...]
    scaledown_after: float = DEFAULT_SCALEDOWN_AFTER
    probe_detection: bool = True
    close_idle_after: float | None = None
    probe_sources: tuple[IPv4Network, ...] = ()
    probe_default_status: int = 200
    # Lower the managed containers' requests through pods/resize while they
    # are scaled down (activator/kube/); off unless asked: it frees the
    # node's capacity for other pods, which may then hold it on wake.
    resize_when_scaled_down: bool = False
    # New connections reach the running app directly (activator/lifecycle.py).
    fast_path: bool = False

    @property
    def managed(self) -> tuple[str, ...]:
        """The containers to scale: those named, else those with ports."""
        return self.container_names or tuple(self.ports)


def enabled(annotations: Mapping[str, str]) -> bool:
    """Whether the pod asks for the activator at all."""
    return PORTS_MAP in annotations or CONTAINER_NAMES in annotations


def parse(annotations: Mapping[str, str]) -> PodSettings:
    errors: list[FieldError] = []

    def checked(value: T | FieldError, default: T) -> T:
        if isinstance(value, FieldError):
            errors.append(value)
            return default
        return value

    ports = _ports_map(annotations.get(PORTS_MAP, ""), errors)
    names = tuple(n.strip() for n in annotations.get(CONTAINER_NAMES, "").split(",") if n.strip())
    if not ports and not names:
        errors.append(
            FieldError(
                PORTS_MAP,
                "no container to manage",
                f'set it like "app=8080", or set {CONTAINER_NAMES}',
            )
        )
    if names and (unknown := sorted(set(ports) - set(names))):
        errors.append(
            FieldError(
                PORTS_MAP,
                f"names containers missing from {CONTAINER_NAMES}: {', '.join(unknown)}",
                "use the same container names in both",
            )
        )
    scaledown_after = DEFAULT_SCALEDOWN_AFTER
    if (text := annotations.get(SCALEDOWN_DURATION)) is not None:
        scaledown_after = checked(parse_duration(text, SCALEDOWN_DURATION), scaledown_after)
    close_idle_after: float | None = None
    if (text := annotations.get(CLOSE_IDLE_AFTER)) is not None:
        close_idle_after = checked(parse_duration(text, CLOSE_IDLE_AFTER), None)
    probe_detection = True
    if (text := annotations.get(DISABLE_PROBE_DETECTION)) is not None:
        probe_detection = not checked(_boolean(text, DISABLE_PROBE_DETECTION), False)
    resize = False
    if (text := annotations.get(RESIZE_WHEN_SCALED_DOWN)) is not None:
        resize = checked(_boolean(text, RESIZE_WHEN_SCALED_DOWN), False)
    fast_path = False
    if (text := annotations.get(FAST_PATH)) is not None:
        fast_path = checked(_boolean(text, FAST_PATH), False)
    sources = [
        checked(parse_network(part, PROBE_SOURCES), None)
        for part in annotations.get(PROBE_SOURCES, "").split(",")
        if part.strip()
    ]
    default_status = 200
    if (text := annotations.get(PROBE_DEFAULT_STATUS)) is not None:
        default_status = checked(parse_http_status(text, PROBE_DEFAULT_STATUS), default_status)
    if errors:
        raise ConfigError(errors)
    return PodSettings(
        ports=ports,
        container_names=names,
        scaledown_after=scaledown_after,
        probe_detection=probe_detection,
        close_idle_after=close_idle_after,
        probe_sources=tuple(n for n in sources if n is not None),
        probe_default_status=default_status,
        resize_when_scaled_down=resize,
        fast_path=fast_path,
    )


def _boolean(text: str, key: str) -> bool | FieldError:
    value = text.strip().lower()
    if value not in ("true", "false"):
        return FieldError(key, f"{text!r} is not a boolean", 'write "true" or "false"')
    return value == "true"


def _ports_map(text: str, errors: list[FieldError]) -> dict[str, tuple[int, ...]]:
    ports: dict[str, tuple[int, ...]] = {}
    for mapping in filter(None, (m.strip() for m in text.split(";"))):
        name, sep, port_list = mapping.partition("=")
        if not sep or not name.strip():
            errors.append(
                FieldError(
                    PORTS_MAP,
                    f"{mapping!r} is not container=ports",
                    'write it like "web=80,81;api=8080"',
                )
            )
            continue
        parsed = [parse_port(p, PORTS_MAP) for p in port_list.split(",")]
        errors.extend(p for p in parsed if isinstance(p, FieldError))
        ports[name.strip()] = tuple(p for p in parsed if isinstance(p, int))
    return ports


def read_downward_api(text: str) -> dict[str, str]:
    """Annotations from a Downward API volume file: one `key="value"` a line,
    the value quoted and escaped as a Go string literal."""
    annotations: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, quoted = line.partition("=")
        try:
            value = ast.literal_eval(quoted) if sep else None
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = None
        if not isinstance(value, str):
            raise ConfigError(
                [
                    FieldError(
                        f"annotations line {number}",
                        f'{line!r} is not key="value"',
                        "mount metadata.annotations through the Downward API",
                    )
                ]
            )
        annotations[key] = value
    return annotations
