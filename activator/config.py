"""A pod's configuration: one frozen dataclass, parsed and checked once at the edge.

Parsing reports every bad field at once, each with the fix, and has no side
effects: nothing is created until the whole configuration is valid.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import TypeVar

DEFAULT_SCALEDOWN_AFTER = 60.0
DEFAULT_PROBE_WAIT = 0.1
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
# Go's duration syntax (zeropod's annotations use it): "10s", "1m30s", "500ms".
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_DIGITS = re.compile(r"[0-9]+")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
T = TypeVar("T")


@dataclass(frozen=True)
class FieldError:
    field: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}; {self.fix}"


class ConfigError(ValueError):
    """One or more fields are invalid; `errors` names each with its fix."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = tuple(errors)
        super().__init__("; ".join(str(err) for err in self.errors))


@dataclass(frozen=True)
class PodConfig:
    name: str
    ports: tuple[int, ...]
    command: tuple[str, ...]
    scaledown_after: float = DEFAULT_SCALEDOWN_AFTER
    # Close client connections that carried nothing for this long (and wait
    # for no answer), so that pods behind keep-alive clients can scale down.
    close_idle_after: float | None = None
    probe_detection: bool = True
    # Where probes come from; empty means the node's own address.
    probe_sources: tuple[IPv4Network, ...] = ()
    probe_wait: float = DEFAULT_PROBE_WAIT
    probe_default_status: int = 200
    # With a key, images are sealed at rest (see sealed.py); never printed.
    image_key: bytes | None = field(default=None, repr=False)
    # Restore without copying the memory first: pages are served on first touch.
    lazy_restore: bool = False
    # While running, new connections go to the app directly (lifecycle.py).
    fast_path: bool = False


def parse_duration(text: str, field: str) -> float | FieldError:
    """Seconds from a Go-style duration ("30s", "1m30s", "250ms") or plain seconds."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return FieldError(
                field, f"{text!r} is not a duration", "write it like 30s, 5m or 1m30s"
            )
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not seconds >= 0 or seconds == float("inf"):
        return FieldError(
            field, f"{text!r} is not a duration >= 0", "write it like 30s, 5m or 1m30s"
        )
    return seconds


def parse_int(text: str, low: int, high: int) -> int | None:
    """An integer from low to high written in ASCII digits (not "¹" or "٣"), or None."""
    text = text.strip()
    if not _DIGITS.fullmatch(text) or not low <= int(text) <= high:
        return None
    return int(text)


def parse_port(text: str, field: str) -> int | FieldError:
    if (port := parse_int(text, 1, 65535)) is None:
        return FieldError(field, f"{text!r} is not a TCP port", "give a number from 1 to 65535")
    return port


def parse_http_status(text: str, field: str) -> int | FieldError:
    if (status := parse_int(text, 100, 599)) is None:
        return FieldError(field, f"{text!r} is not an HTTP status", "give a number from 100 to 599")
    return status


def parse_network(text: str, field: str) -> IPv4Network | FieldError:
    try:
        return IPv4Network(text.strip(), strict=False)
    except ValueError:
        return FieldError(
            field,
            f"{text!r} is not an IPv4 address or network",
            "write it like 10.0.0.1 or 10.0.0.0/24",
        )


def pod_config(
    *,
    name: str,
    ports: Sequence[str],
    command: Sequence[str],
    scaledown_after: str | None,
    close_idle_after: str | None = None,
    probe_detection: bool = True,
    probe_sources: Sequence[str] = (),
    probe_wait: str | None = None,
    probe_default_status: str | None = None,
    image_key: str | None = None,
    lazy_restore: bool = False,
    fast_path: bool = False,
) -> PodConfig:
    """Check every field; raise one ConfigError listing all that are wrong."""
    errors: list[FieldError] = []

    def checked(value: T | FieldError) -> T | None:
        if isinstance(value, FieldError):
            errors.append(value)
            return None
        return value

    if not _NAME.match(name):
        errors.append(
            FieldError(
                "--name",
                f"{name!r} is not a valid pod name",
                "use 1-40 lowercase letters, digits and '-', starting and ending alphanumeric",
            )
        )
    parsed_ports: list[int] = []
    for text in ports:
        port = checked(parse_port(text, "--port"))
        if port is not None and port in parsed_ports:
            errors.append(FieldError("--port", f"{port} is given twice", "give each port once"))
        elif port is not None:
            parsed_ports.append(port)
    if not ports:
        errors.append(FieldError("--port", "no port given", "give the app's port: --port 8080"))
    if not command:
        errors.append(FieldError("COMMAND", "no command given", "put the app's command after --"))
    seconds = DEFAULT_SCALEDOWN_AFTER
    if scaledown_after is not None:
        seconds = checked(parse_duration(scaledown_after, "--scaledown-after")) or 0.0
    close_idle = None
    if close_idle_after is not None:
        close_idle = checked(parse_duration(close_idle_after, "--close-idle-after"))
    sources = [checked(parse_network(text, "--probe-source")) for text in probe_sources]
    wait = DEFAULT_PROBE_WAIT
    if probe_wait is not None:
        wait = checked(parse_duration(probe_wait, "--probe-wait")) or 0.0
    status = 200
    if probe_default_status is not None:
        status = checked(parse_http_status(probe_default_status, "--probe-default-status")) or 200
    key = None
    if image_key is not None:
        from activator.sealed import read_key  # cryptography only when asked for

        key = checked(read_key(Path(image_key), "--image-key"))
    if lazy_restore and image_key is not None:
        errors.append(
            FieldError(
                "--lazy-restore",
                "cannot be combined with --image-key (the pages would be served from "
                "plaintext images while the app runs)",
                "drop one of the two",
            )
        )
    if errors:
        raise ConfigError(errors)
    return PodConfig(
        name=name,
        ports=tuple(parsed_ports),
        command=tuple(command),
        scaledown_after=seconds,
        close_idle_after=close_idle,
        probe_detection=probe_detection,
        probe_sources=tuple(s for s in sources if s is not None),
        probe_wait=wait,
        probe_default_status=status,
        image_key=key,
        lazy_restore=lazy_restore,
        fast_path=fast_path,
    )
