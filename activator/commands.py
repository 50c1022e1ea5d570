"""What goes out of the lifecycle: work for the drivers to carry out.

Drivers dispatch every command exhaustively (`match` + `assert_never`); each
command that does I/O answers later with an event (`Checkpoint` with
`CheckpointDone` or `CheckpointFailed`, and so on).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Level = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True)
class StartApp:
    """Start the application cold from its command."""

    reason: str


@dataclass(frozen=True)
class Checkpoint:
    """Dump the application to disk; its processes are gone afterwards."""


@dataclass(frozen=True)
class Restore:
    """Bring the application back from its last checkpoint."""


@dataclass(frozen=True)
class Forward:
    """Connect these client connections to the application and relay them."""

    conns: tuple[int, ...]


@dataclass(frozen=True)
class AnswerProbe:
    """Answer this probe in the app's place with the status it last gave."""

    conn: int


@dataclass(frozen=True)
class Refuse:
    """Close these client connections: they cannot be served. Log why."""

    conns: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class SetIdleDeadline:
    """Arm the idle timer for `at`, or disarm it when `at` is None."""

    at: float | None


@dataclass(frozen=True)
class OpenDirectPath:
    """Let new connections (probes excepted) reach the app directly, and watch
    them: `DirectTraffic` events, until `CloseDirectPath`."""


@dataclass(frozen=True)
class CloseDirectPath:
    """Redirect every new connection to the activator again; then answer with
    `DirectPathClosed`."""


@dataclass(frozen=True)
class Teardown:
    """End the application if it runs and remove the pod and its images."""


@dataclass(frozen=True)
class Report:
    """One line in the events stream: a phase change or a failure."""

    event: str
    level: Level
    message: str
    details: Mapping[str, object] = field(default_factory=dict)


Command = (
    StartApp
    | Checkpoint
    | Restore
    | Forward
    | AnswerProbe
    | Refuse
    | SetIdleDeadline
    | OpenDirectPath
    | CloseDirectPath
    | Teardown
    | Report
)
