"""The lifecycle of one pod: a pure, synchronous state machine.

`Lifecycle.handle(event)` returns the commands the drivers must carry out. It
does no I/O and reads no clock: every event says what time it is. All
transitions live in one table, `TRANSITIONS`; an event the table does not list
for the current phase is a driver bug and raises `LifecycleError`.

Two rules shape the table:
- never checkpoint while a connection is open or held: a checkpoint would cut
  it (CRIU closes the app's TCP connections);
- every connection that arrives is either forwarded to the app or refused with
  a reason; connections that arrive while the app is not running are held
  until it is (restore or cold start) and then forwarded;
- probes are not activity: they never wake the app and never postpone a
  scale-down. While the app runs they pass through (so the activator learns
  the app's answers); otherwise the activator answers them.

The fast path (`Policy.fast_path`) lets new connections reach the running app
directly; the activator only counts them as they come (`DirectTraffic`, each a
new start of the idle time). Whether they are still open is looked at when the
idle time is up: the path is closed first and what came through it is looked
at once more (`DirectPathClosed`). With a connection open, or one open at the
last look and gone since, the path opens again and the idle time starts over;
with nothing there, the checkpoint goes on.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from activator import commands as c
from activator import events as e


class DirectPath(enum.Enum):
    CLOSED = "closed"  # every new connection comes to the activator
    OPEN = "open"
    CLOSING = "closing"  # the driver answers with DirectPathClosed


class Phase(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    CHECKPOINTING = "checkpointing"
    SCALED_DOWN = "scaled-down"
    RESTORING = "restoring"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Policy:
    scaledown_after: float
    # More than `max_restarts` exits within `restart_window` seconds is a crash
    # loop: stop restarting and mark the pod failed.
    max_restarts: int = 5
    restart_window: float = 60.0
    # After a failed checkpoint the next try waits twice as long, up to this.
    max_checkpoint_backoff: float = 3600.0
    # While running, new connections go straight to the app (see above).
    fast_path: bool = False


class LifecycleError(Exception):
    """An event arrived that the current phase cannot take: a driver bug."""


class Lifecycle:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.phase = Phase.CREATED
        self.since = 0.0
        self.open_connections: set[int] = set()
        # Probes passing through to the running app: they block a checkpoint
        # while open (it would cut them) but do not count as activity.
        self.open_probes: set[int] = set()
        # Held connections, oldest first, waiting for the app to run.
        self.held_connections: dict[int, int] = {}
        self.idle_deadline: float | None = None
        self.direct_path = DirectPath.CLOSED
        self.direct_connections = 0  # open on the fast path at the last close
        self.scale_down_requested = False  # by hand, while the fast path closes
        self.wake_requested = False
        self.recent_exits: list[float] = []
        self.checkpoint_failures = 0  # in a row
        self.last_checkpoint_ms: float | None = None
        self.last_restore_ms: float | None = None
        self.image_bytes: int | None = None
        self._out: list[c.Command] = []
        self._phase_details: dict[str, object] = {}

    def handle(self, event: e.Event) -> list[c.Command]:
        rule = TRANSITIONS.get((self.phase, type(event)))
        if rule is None:
            raise LifecycleError(f"{type(event).__name__} cannot happen while {self.phase.value}")
        self._out = []
        self._phase_details = {}
        previous = self.phase
        new_phase = rule.handler(self, event)
        if new_phase not in rule.targets:
            raise LifecycleError(
                f"{rule.handler.__name__} went {previous.value} -> {new_phase.value}"
            )
        out = self._out
        if new_phase is not previous:
            self.phase = new_phase
            self.since = event.now
            details = {"previous": previous.value, **self._phase_details}
            out.insert(0, c.Report(new_phase.value, "info", _describe(new_phase, details), details))
        return out

    # -- helpers used by the transition handlers ------------------------------

    @property
    def idle(self) -> bool:
        """No client traffic: the idle deadline may run."""
        return not self.open_connections and not self.held_connections

    @property
    def quiet(self) -> bool:
        """Nothing open at all: a checkpoint would cut nothing."""
        return self.idle and not self.open_probes

    def _emit(self, command: c.Command) -> None:
        self._out.append(command)

    def _report(self, event: str, level: c.Level, message: str, **details: object) -> None:
        self._emit(c.Report(event, level, message, details))

    @property
    def idle_delay(self) -> float:
        """The scale-down duration, doubled for each checkpoint that failed in a row."""
        delay: float = self.policy.scaledown_after * 2.0**self.checkpoint_failures
        return max(self.policy.scaledown_after, min(delay, self.policy.max_checkpoint_backoff))

    def _arm_idle_timer_if_idle(self, now: float) -> None:
        if self.idle:
            self.idle_deadline = now + self.idle_delay
            self._emit(c.SetIdleDeadline(self.idle_deadline))

    def _disarm_idle_timer(self) -> None:
        if self.idle_deadline is not None:
            self.idle_deadline = None
            self._emit(c.SetIdleDeadline(None))

    def _open_direct_path(self) -> None:
        if self.policy.fast_path and self.direct_path is DirectPath.CLOSED:
            self.direct_path = DirectPath.OPEN
            self._emit(c.OpenDirectPath())

    def _close_direct_path(self) -> None:
        if self.direct_path is DirectPath.OPEN:
            self.direct_path = DirectPath.CLOSING
            self._emit(c.CloseDirectPath())

    def _idle_time_starts_again(self, now: float) -> None:
        self._disarm_idle_timer()
        self._arm_idle_timer_if_idle(now)

    def _forward_held(self) -> None:
        if self.held_connections:
            conns = tuple(self.held_connections)
            self.open_connections.update(conns)
            self.held_connections.clear()
            self._emit(c.Forward(conns))

    def _refuse_held(self, reason: str) -> None:
        if self.held_connections:
            self._emit(c.Refuse(tuple(self.held_connections), reason))
            self.held_connections.clear()


def _describe(phase: Phase, details: dict[str, object]) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in details.items() if k != "previous")
    return f"{details['previous']} -> {phase.value}" + (f" ({extra})" if extra else "")


# -- transition handlers: each returns the next phase ---------------------------
# Handlers take `Any` events because the table, not the signature, guarantees
# the event type; mypy cannot express a table keyed by type.


def _boot(m: Lifecycle, ev: Any) -> Phase:
    m._emit(c.StartApp("first start"))
    return Phase.STARTING


def _adopted(m: Lifecycle, ev: Any) -> Phase:
    return Phase.SCALED_DOWN


def _hold(m: Lifecycle, ev: Any) -> Phase:
    m.held_connections[ev.conn] = ev.port
    m._disarm_idle_timer()
    return m.phase


def _hold_and_restore(m: Lifecycle, ev: Any) -> Phase:
    _hold(m, ev)
    m._emit(c.Restore())
    return Phase.RESTORING


def _forward(m: Lifecycle, ev: Any) -> Phase:
    m.open_connections.add(ev.conn)
    m._disarm_idle_timer()
    m._emit(c.Forward((ev.conn,)))
    return m.phase


def _refuse(m: Lifecycle, ev: Any) -> Phase:
    m._emit(c.Refuse((ev.conn,), f"pod is {m.phase.value}"))
    return m.phase


def _closed(m: Lifecycle, ev: Any) -> Phase:
    if ev.conn in m.open_probes:
        m.open_probes.discard(ev.conn)
        # A probe may have held back a checkpoint whose deadline has passed.
        # (and if it closes before the deadline, the timer may have fired
        # early meanwhile: _idle_timer arms it again).
        return _idle_timer(m, ev) if m.phase is Phase.RUNNING else m.phase
    m.open_connections.discard(ev.conn)
    m.held_connections.pop(ev.conn, None)
    if m.phase is Phase.RUNNING:
        m._arm_idle_timer_if_idle(ev.now)
    return m.phase


def _probe_passes_through(m: Lifecycle, ev: Any) -> Phase:
    m.open_probes.add(ev.conn)
    m._emit(c.Forward((ev.conn,)))
    return m.phase


def _answer_probe(m: Lifecycle, ev: Any) -> Phase:
    m._emit(c.AnswerProbe(ev.conn))
    return m.phase


def _ignore(m: Lifecycle, ev: Any) -> Phase:
    """Stale news (a timer armed before a phase change, say): nothing to do."""
    return m.phase


def _idle_timer(m: Lifecycle, ev: Any) -> Phase:
    if m.quiet and m.idle_deadline is not None and ev.now < m.idle_deadline:
        # Timers may fire a little early (uvloop rounds to milliseconds): again.
        m._emit(c.SetIdleDeadline(m.idle_deadline))
        return m.phase
    return _checkpoint_if_due(m, ev.now)


def _checkpoint_if_due(m: Lifecycle, now: float) -> Phase:
    # With a probe open the deadline stays; the probe's close checkpoints.
    if not m.quiet or m.idle_deadline is None or now < m.idle_deadline:
        return m.phase
    if m.direct_path is not DirectPath.CLOSED:
        m._close_direct_path()  # and DirectPathClosed comes back here
        return m.phase
    m.idle_deadline = None
    m._emit(c.Checkpoint())
    return Phase.CHECKPOINTING


def _scale_down(m: Lifecycle, ev: Any) -> Phase:
    if not m.quiet:
        n = len(m.open_connections) + len(m.held_connections) + len(m.open_probes)
        _refuse_scale_down(m, f"{n} connection(s) open")
        return m.phase
    m._disarm_idle_timer()
    m.idle_deadline = ev.now  # due now (no timer: nothing is to fire)
    m.scale_down_requested = m.direct_path is not DirectPath.CLOSED
    return _checkpoint_if_due(m, ev.now)


def _refuse_scale_down(m: Lifecycle, why: str) -> None:
    m._report("scale-down-refused", "warning", f"not scaling down: {why}")


def _direct_traffic(m: Lifecycle, ev: Any) -> Phase:
    if m.direct_path is DirectPath.OPEN and ev.opened:  # else: stale, or nothing
        m._idle_time_starts_again(ev.now)
    return m.phase


def _direct_path_closed(m: Lifecycle, ev: Any) -> Phase:
    if m.direct_path is not DirectPath.CLOSING:
        return m.phase  # closed and opened again since: stale
    m.direct_path = DirectPath.CLOSED
    # Open at the last look and gone now: closed since, which is traffic too.
    traffic = ev.open or ev.opened or m.direct_connections
    m.direct_connections = ev.open
    by_hand, m.scale_down_requested = m.scale_down_requested, False
    if m.phase is not Phase.RUNNING:
        return m.phase  # closed because the app went away
    if traffic:
        if by_hand:
            _refuse_scale_down(m, f"{ev.open} direct connection(s) open, {ev.opened} new")
        m._idle_time_starts_again(ev.now)
        m._open_direct_path()
        return m.phase
    phase = _checkpoint_if_due(m, ev.now)
    if phase is Phase.RUNNING:
        m._open_direct_path()  # a connection came through us meanwhile
    return phase


def _nothing_to_do(m: Lifecycle, ev: Any) -> Phase:
    m._report("ignored", "info", f"{type(ev).__name__}: pod is already {m.phase.value}")
    return m.phase


def _app_started(m: Lifecycle, ev: Any) -> Phase:
    m.checkpoint_failures = 0  # a new app: it may well be checkpointable
    m._forward_held()
    m._open_direct_path()
    m._arm_idle_timer_if_idle(ev.now)
    return Phase.RUNNING


def _app_start_failed(m: Lifecycle, ev: Any) -> Phase:
    m._report("start-failed", "error", f"the app could not be started: {ev.reason}")
    m._refuse_held(f"the app could not be started: {ev.reason}")
    return Phase.FAILED


def _app_exited(m: Lifecycle, ev: Any) -> Phase:
    window_start = ev.now - m.policy.restart_window
    m.recent_exits = [t for t in m.recent_exits if t > window_start] + [ev.now]
    m._disarm_idle_timer()
    m._close_direct_path()  # new connections wait for the new app
    if len(m.recent_exits) > m.policy.max_restarts:
        m._report(
            "app-exited",
            "error",
            f"the app exited ({ev.status}) {len(m.recent_exits)} times in "
            f"{m.policy.restart_window:g}s: not restarting; `activator wake` retries",
            status=ev.status,
        )
        m._refuse_held("the app keeps crashing")
        return Phase.FAILED
    m._report(
        "app-exited", "warning", f"the app exited ({ev.status}): restarting it", status=ev.status
    )
    m._emit(c.StartApp(f"the app exited ({ev.status})"))
    return Phase.STARTING


def _checkpoint_done(m: Lifecycle, ev: Any) -> Phase:
    m.checkpoint_failures = 0
    m.last_checkpoint_ms = ev.duration_ms
    m.image_bytes = ev.image_bytes
    m._phase_details.update(checkpoint_ms=round(ev.duration_ms, 1), image_bytes=ev.image_bytes)
    if m.held_connections or m.wake_requested:
        m.wake_requested = False
        m._emit(c.Restore())
        return Phase.RESTORING
    return Phase.SCALED_DOWN


def _checkpoint_failed(m: Lifecycle, ev: Any) -> Phase:
    m.wake_requested = False
    m.checkpoint_failures += 1
    m._report(
        "checkpoint-failed",
        "error",
        f"checkpoint failed, app kept running (next try after {m.idle_delay:g}s idle): {ev.reason}",
        failures=m.checkpoint_failures,
    )
    m._forward_held()
    m._open_direct_path()
    m._arm_idle_timer_if_idle(ev.now)
    return Phase.RUNNING


def _wake_after_checkpoint(m: Lifecycle, ev: Any) -> Phase:
    m.wake_requested = True
    return m.phase


def _restore(m: Lifecycle, ev: Any) -> Phase:
    m._emit(c.Restore())
    return Phase.RESTORING


def _restore_done(m: Lifecycle, ev: Any) -> Phase:
    m.last_restore_ms = ev.duration_ms
    m._phase_details.update(restore_ms=round(ev.duration_ms, 1))
    m._forward_held()
    m._open_direct_path()
    m._arm_idle_timer_if_idle(ev.now)
    return Phase.RUNNING


def _restore_failed(m: Lifecycle, ev: Any) -> Phase:
    m._report("restore-failed", "error", f"restore failed, starting the app cold: {ev.reason}")
    m._emit(c.StartApp(f"restore failed: {ev.reason}"))
    return Phase.STARTING


def _start_again(m: Lifecycle, ev: Any) -> Phase:
    m.recent_exits = []
    m._emit(c.StartApp("asked to wake after failure"))
    return Phase.STARTING


def _stop_now(m: Lifecycle, ev: Any) -> Phase:
    m._disarm_idle_timer()
    m._refuse_held("pod is stopping")
    m._emit(c.Teardown())
    return Phase.STOPPED


def _stop_after_current_operation(m: Lifecycle, ev: Any) -> Phase:
    # CRIU or the app's start is in flight; its answer finishes the stop.
    m._disarm_idle_timer()
    return Phase.STOPPING


@dataclass(frozen=True)
class Rule:
    handler: Callable[[Lifecycle, Any], Phase]
    targets: frozenset[Phase]


def _rule(handler: Callable[[Lifecycle, Any], Phase], *targets: Phase) -> Rule:
    return Rule(handler, frozenset(targets))


P = Phase
_ACTIVE = (P.STARTING, P.RUNNING, P.CHECKPOINTING, P.SCALED_DOWN, P.RESTORING, P.FAILED)

TRANSITIONS: dict[tuple[Phase, type[e.Event]], Rule] = {
    (P.CREATED, e.Boot): _rule(_boot, P.STARTING),
    (P.CREATED, e.Adopted): _rule(_adopted, P.SCALED_DOWN),
    (P.CREATED, e.StopRequested): _rule(_stop_now, P.STOPPED),
    # Connections: forwarded while running, held while the app is on its way
    # (a connection during a checkpoint wakes the app right after it).
    (P.STARTING, e.ConnectionOpened): _rule(_hold, P.STARTING),
    (P.RUNNING, e.ConnectionOpened): _rule(_forward, P.RUNNING),
    (P.CHECKPOINTING, e.ConnectionOpened): _rule(_hold, P.CHECKPOINTING),
    (P.SCALED_DOWN, e.ConnectionOpened): _rule(_hold_and_restore, P.RESTORING),
    (P.RESTORING, e.ConnectionOpened): _rule(_hold, P.RESTORING),
    (P.FAILED, e.ConnectionOpened): _rule(_refuse, P.FAILED),
    (P.STOPPING, e.ConnectionOpened): _rule(_refuse, P.STOPPING),
    (P.STOPPED, e.ConnectionOpened): _rule(_refuse, P.STOPPED),
    **{(p, e.ConnectionClosed): _rule(_closed, p) for p in (*_ACTIVE, P.STOPPING, P.STOPPED)},
    (P.RUNNING, e.ConnectionClosed): _rule(_closed, P.RUNNING, P.CHECKPOINTING),
    # Probes: through to the running app, else answered in its place.
    (P.RUNNING, e.ProbeOpened): _rule(_probe_passes_through, P.RUNNING),
    **{
        (p, e.ProbeOpened): _rule(_answer_probe, p)
        for p in (P.STARTING, P.CHECKPOINTING, P.SCALED_DOWN, P.RESTORING)
    },
    **{(p, e.ProbeOpened): _rule(_refuse, p) for p in (P.FAILED, P.STOPPING, P.STOPPED)},
    # Idle: only a running app with nothing open is checkpointed.
    (P.RUNNING, e.IdleTimerFired): _rule(_idle_timer, P.RUNNING, P.CHECKPOINTING),
    # The fast path: its traffic while running; its close before a checkpoint.
    **{(p, e.DirectTraffic): _rule(_direct_traffic, p) for p in (*_ACTIVE, P.STOPPING, P.STOPPED)},
    **{
        (p, e.DirectPathClosed): _rule(_direct_path_closed, p)
        for p in (*_ACTIVE, P.STOPPING, P.STOPPED)
    },
    (P.RUNNING, e.DirectPathClosed): _rule(_direct_path_closed, P.RUNNING, P.CHECKPOINTING),
    **{
        (p, e.IdleTimerFired): _rule(_ignore, p)
        for p in (*_ACTIVE, P.STOPPING, P.STOPPED)
        if p is not P.RUNNING
    },
    # Starting cold.
    (P.STARTING, e.AppStarted): _rule(_app_started, P.RUNNING),
    (P.STARTING, e.AppStartFailed): _rule(_app_start_failed, P.FAILED),
    (P.STARTING, e.AppExited): _rule(_app_exited, P.STARTING, P.FAILED),
    (P.RUNNING, e.AppExited): _rule(_app_exited, P.STARTING, P.FAILED),
    # CRIU ends the app after a dump; an exit seen after that is expected.
    (P.CHECKPOINTING, e.AppExited): _rule(_ignore, P.CHECKPOINTING),
    (P.SCALED_DOWN, e.AppExited): _rule(_ignore, P.SCALED_DOWN),
    (P.RESTORING, e.AppExited): _rule(_ignore, P.RESTORING),
    (P.FAILED, e.AppExited): _rule(_ignore, P.FAILED),
    (P.STOPPING, e.AppExited): _rule(_ignore, P.STOPPING),
    (P.STOPPED, e.AppExited): _rule(_ignore, P.STOPPED),
    # Checkpoint.
    (P.CHECKPOINTING, e.CheckpointDone): _rule(_checkpoint_done, P.SCALED_DOWN, P.RESTORING),
    (P.CHECKPOINTING, e.CheckpointFailed): _rule(_checkpoint_failed, P.RUNNING),
    # Restore; a failed restore falls back to a cold start.
    (P.RESTORING, e.RestoreDone): _rule(_restore_done, P.RUNNING),
    (P.RESTORING, e.RestoreFailed): _rule(_restore_failed, P.STARTING),
    # By hand.
    (P.RUNNING, e.ScaleDownRequested): _rule(_scale_down, P.RUNNING, P.CHECKPOINTING),
    **{
        (p, e.ScaleDownRequested): _rule(_nothing_to_do, p)
        for p in (*_ACTIVE, P.STOPPING, P.STOPPED)
        if p is not P.RUNNING
    },
    (P.SCALED_DOWN, e.WakeRequested): _rule(_restore, P.RESTORING),
    (P.CHECKPOINTING, e.WakeRequested): _rule(_wake_after_checkpoint, P.CHECKPOINTING),
    (P.FAILED, e.WakeRequested): _rule(_start_again, P.STARTING),
    **{
        (p, e.WakeRequested): _rule(_nothing_to_do, p)
        for p in (P.STARTING, P.RUNNING, P.RESTORING, P.STOPPING, P.STOPPED)
    },
    # Stop: at once where nothing is in flight, else when it answers.
    **{
        (p, e.StopRequested): _rule(_stop_now, P.STOPPED)
        for p in (P.RUNNING, P.SCALED_DOWN, P.FAILED)
    },
    **{
        (p, e.StopRequested): _rule(_stop_after_current_operation, P.STOPPING)
        for p in (P.STARTING, P.CHECKPOINTING, P.RESTORING)
    },
    (P.STOPPING, e.StopRequested): _rule(_ignore, P.STOPPING),
    (P.STOPPED, e.StopRequested): _rule(_ignore, P.STOPPED),
    **{
        (P.STOPPING, ev): _rule(_stop_now, P.STOPPED)
        for ev in (
            e.AppStarted,
            e.AppStartFailed,
            e.CheckpointDone,
            e.CheckpointFailed,
            e.RestoreDone,
            e.RestoreFailed,
        )
    },
}


def state_diagram() -> str:
    """The transition table as a Mermaid diagram (the README embeds it)."""
    lines = ["stateDiagram-v2"]
    edges: dict[tuple[Phase, Phase], list[str]] = {}
    for (source, event), rule in TRANSITIONS.items():
        for target in sorted(rule.targets, key=lambda p: list(Phase).index(p)):
            if target is not source:
                edges.setdefault((source, target), []).append(event.__name__)
    for (source, target), names in edges.items():
        lines.append(f"    {source.name} --> {target.name}: {', '.join(names)}")
    return "\n".join(lines)
