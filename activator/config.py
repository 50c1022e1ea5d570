"""A pod's configuration: one frozen dataclass, parsed and checked once at the edge.

Parsing reports every bad field at once, each with the fix, and has no side
effects: nothing is created until the whole configuration is valid.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_SCALEDOWN_AFTER = 60.0
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
# Go's duration syntax (zeropod's annotations use it): "10s", "1m30s", "500ms".
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


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


def parse_port(text: str, field: str) -> int | FieldError:
    if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
        return FieldError(field, f"{text!r} is not a TCP port", "give a number from 1 to 65535")
    return int(text)


def pod_config(
    *, name: str, ports: Sequence[str], command: Sequence[str], scaledown_after: str | None
) -> PodConfig:
    """Check every field; raise one ConfigError listing all that are wrong."""
    errors: list[FieldError] = []
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
        port = parse_port(text, "--port")
        if isinstance(port, FieldError):
            errors.append(port)
        elif port in parsed_ports:
            errors.append(FieldError("--port", f"{port} is given twice", "give each port once"))
        else:
            parsed_ports.append(port)
    if not ports:
        errors.append(FieldError("--port", "no port given", "give the app's port: --port 8080"))
    if not command:
        errors.append(FieldError("COMMAND", "no command given", "put the app's command after --"))
    seconds = DEFAULT_SCALEDOWN_AFTER
    if scaledown_after is not None:
        parsed = parse_duration(scaledown_after, "--scaledown-after")
        if isinstance(parsed, FieldError):
            errors.append(parsed)
        else:
            seconds = parsed
    if errors:
        raise ConfigError(errors)
    return PodConfig(
        name=name, ports=tuple(parsed_ports), command=tuple(command), scaledown_after=seconds
    )
