"""What comes into the lifecycle: facts the drivers observed.

Every event carries `now` (seconds, any monotonic origin): the lifecycle has no
clock of its own, so tests decide what time it is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    now: float


@dataclass(frozen=True)
class Boot(Event):
    """The pod exists; its application has not been started yet."""


@dataclass(frozen=True)
class Adopted(Event):
    """The pod is taken over from an activator that is gone, checkpointed."""


@dataclass(frozen=True)
class ConnectionOpened(Event):
    conn: int
    port: int


@dataclass(frozen=True)
class ProbeOpened(Event):
    """A health probe (kubelet's HTTP probe) came in: answer it, never wake for it."""

    conn: int
    port: int


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """A connection or a probe ended."""

    conn: int


@dataclass(frozen=True)
class IdleTimerFired(Event):
    pass


@dataclass(frozen=True)
class DirectTraffic(Event):
    """The fast path let `opened` new connections through to the app since the
    last look."""

    opened: int


@dataclass(frozen=True)
class DirectPathClosed(Event):
    """The redirect is whole again: the connections the fast path let through
    are `open` now, and `opened` were new since the last look."""

    open: int
    opened: int


@dataclass(frozen=True)
class AppStarted(Event):
    pass


@dataclass(frozen=True)
class AppStartFailed(Event):
    reason: str


@dataclass(frozen=True)
class AppExited(Event):
    """The application's root process ended while nobody asked it to."""

    status: str


@dataclass(frozen=True)
class CheckpointDone(Event):
    duration_ms: float
    image_bytes: int


@dataclass(frozen=True)
class CheckpointFailed(Event):
    reason: str


@dataclass(frozen=True)
class RestoreDone(Event):
    duration_ms: float


@dataclass(frozen=True)
class RestoreFailed(Event):
    reason: str


@dataclass(frozen=True)
class ScaleDownRequested(Event):
    pass


@dataclass(frozen=True)
class WakeRequested(Event):
    pass


@dataclass(frozen=True)
class StopRequested(Event):
    pass


ALL_EVENTS: tuple[type[Event], ...] = (
    Boot,
    Adopted,
    ConnectionOpened,
    ProbeOpened,
    ConnectionClosed,
    IdleTimerFired,
    DirectTraffic,
    DirectPathClosed,
    AppStarted,
    AppStartFailed,
    AppExited,
    CheckpointDone,
    CheckpointFailed,
    RestoreDone,
    RestoreFailed,
    ScaleDownRequested,
    WakeRequested,
    StopRequested,
)
