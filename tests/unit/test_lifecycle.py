"""The lifecycle told as playbooks, plus its invariants under random events."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activator import commands as c
from activator import events as e
from activator.lifecycle import (
    TRANSITIONS,
    DirectPath,
    Lifecycle,
    LifecycleError,
    Phase,
    Policy,
    state_diagram,
)

from .playbook import Playbook, Reported

IDLE = 10.0


def running(now: float = 0.0) -> Lifecycle:
    m = Lifecycle(Policy(scaledown_after=IDLE))
    m.handle(e.Boot(now))
    m.handle(e.AppStarted(now))
    return m


def scaled_down() -> Lifecycle:
    m = running()
    m.handle(e.IdleTimerFired(IDLE))
    m.handle(e.CheckpointDone(IDLE + 1, duration_ms=80.0, image_bytes=1000))
    assert m.phase is Phase.SCALED_DOWN
    return m


def test_boot_starts_the_app_and_arms_the_idle_timer() -> None:
    m = Lifecycle(Policy(scaledown_after=IDLE))
    assert (
        Playbook(m, reports=True)
        >> e.Boot(0)
        << Reported("starting")
        << c.StartApp("first start")
        >> e.AppStarted(0.5)
        << Reported("running")
        << c.SetIdleDeadline(0.5 + IDLE)
    )


def test_idle_app_is_checkpointed_and_woken_by_the_next_connection() -> None:
    m = running()
    assert (
        Playbook(m)
        >> e.IdleTimerFired(IDLE)
        << c.Checkpoint()
        >> e.AppExited(IDLE + 0.05, "killed by CRIU")
        >> e.CheckpointDone(IDLE + 0.1, duration_ms=100.0, image_bytes=4096)
        >> e.ConnectionOpened(50, conn=1, port=80)
        << c.Restore()
        >> e.ConnectionOpened(50.01, conn=2, port=80)
        >> e.RestoreDone(50.1, duration_ms=90.0)
        << c.Forward((1, 2))
        >> e.ConnectionClosed(51, conn=1)
        >> e.ConnectionClosed(52, conn=2)
        << c.SetIdleDeadline(52 + IDLE)
    )
    assert (m.phase, m.last_checkpoint_ms, m.image_bytes, m.last_restore_ms) == (
        Phase.RUNNING,
        100.0,
        4096,
        90.0,
    )


def test_open_connection_blocks_scale_down_until_it_closes() -> None:
    m = running()
    assert (
        Playbook(m)
        >> e.ConnectionOpened(1, conn=7, port=80)
        << c.SetIdleDeadline(None)
        << c.Forward((7,))
        >> e.IdleTimerFired(IDLE)  # stale: armed before the connection came
        >> e.ConnectionClosed(30, conn=7)
        << c.SetIdleDeadline(30 + IDLE)
        >> e.IdleTimerFired(30 + IDLE - 0.001)  # early (timers round): armed again
        << c.SetIdleDeadline(30 + IDLE)
        >> e.IdleTimerFired(30 + IDLE)
        << c.Checkpoint()
    )


def test_connection_during_checkpoint_is_held_and_served_after_restore() -> None:
    m = running()
    assert (
        Playbook(m)
        >> e.IdleTimerFired(IDLE)
        << c.Checkpoint()
        >> e.ConnectionOpened(IDLE + 0.01, conn=3, port=80)
        >> e.CheckpointDone(IDLE + 0.1, duration_ms=90.0, image_bytes=1)
        << c.Restore()
        >> e.RestoreDone(IDLE + 0.2, duration_ms=50.0)
        << c.Forward((3,))
    )


def test_connection_during_failed_checkpoint_is_forwarded_to_the_still_running_app() -> None:
    m = running()
    assert (
        Playbook(m, reports=True)
        >> e.IdleTimerFired(IDLE)
        << Reported("checkpointing")
        << c.Checkpoint()
        >> e.ConnectionOpened(IDLE + 0.01, conn=3, port=80)
        >> e.CheckpointFailed(IDLE + 0.1, "dump failed")
        << Reported("running")
        << Reported("checkpoint-failed")
        << c.Forward((3,))
    )


def test_failed_restore_starts_the_app_cold_and_serves_held_connections() -> None:
    m = scaled_down()
    assert (
        Playbook(m, reports=True)
        >> e.ConnectionOpened(100, conn=1, port=80)
        << Reported("restoring")
        << c.Restore()
        >> e.RestoreFailed(100.1, "corrupted image")
        << Reported("starting")
        << Reported("restore-failed")
        << c.StartApp("restore failed: corrupted image")
        >> e.AppStarted(100.2)
        << Reported("running")
        << c.Forward((1,))
    )


def test_app_that_exits_is_restarted_and_a_crash_loop_marks_the_pod_failed() -> None:
    m = running()
    pb = Playbook(m)
    for i in range(5):
        t = 1.0 + i
        pb >> e.AppExited(t, "exit status 1") << c.SetIdleDeadline(None)
        pb << c.StartApp("the app exited (exit status 1)")
        pb >> e.AppStarted(t + 0.1) << c.SetIdleDeadline(t + 0.1 + IDLE)
    pb >> e.AppExited(7, "exit status 1") << c.SetIdleDeadline(None)
    pb >> e.ConnectionOpened(8, conn=9, port=80) << c.Refuse((9,), "pod is failed")
    pb >> e.WakeRequested(9) << c.StartApp("asked to wake after failure")
    assert pb
    assert m.phase is Phase.STARTING


def test_scale_down_by_hand_is_refused_while_a_connection_is_open() -> None:
    m = running()
    assert (
        Playbook(m, reports=True)
        >> e.ConnectionOpened(1, conn=1, port=80)
        << c.SetIdleDeadline(None)
        << c.Forward((1,))
        >> e.ScaleDownRequested(2)
        << Reported("scale-down-refused")
    )
    assert m.phase is Phase.RUNNING


def test_wake_by_hand_during_checkpoint_restores_right_after_it() -> None:
    m = running()
    assert (
        Playbook(m)
        >> e.ScaleDownRequested(1)
        << c.SetIdleDeadline(None)
        << c.Checkpoint()
        >> e.WakeRequested(1.01)
        >> e.CheckpointDone(1.1, duration_ms=90.0, image_bytes=1)
        << c.Restore()
    )


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (running, [c.SetIdleDeadline(None), c.Teardown()]),
        (scaled_down, [c.Teardown()]),
    ],
)
def test_stop_when_nothing_is_in_flight_tears_down_at_once(setup, expected) -> None:  # type: ignore[no-untyped-def]
    m = setup()
    out = [x for x in m.handle(e.StopRequested(99)) if not isinstance(x, c.Report)]
    assert out == expected
    assert m.phase is Phase.STOPPED


def test_stop_during_restore_waits_for_it_then_refuses_held_connections() -> None:
    m = scaled_down()
    assert (
        Playbook(m)
        >> e.ConnectionOpened(100, conn=1, port=80)
        << c.Restore()
        >> e.StopRequested(100.05)
        >> e.ConnectionOpened(100.06, conn=2, port=80)
        << c.Refuse((2,), "pod is stopping")
        >> e.RestoreDone(100.1, duration_ms=50)
        << c.Refuse((1,), "pod is stopping")
        << c.Teardown()
    )


def test_an_event_the_phase_cannot_take_is_a_driver_bug() -> None:
    m = running()
    with pytest.raises(LifecycleError, match="RestoreDone cannot happen while running"):
        m.handle(e.RestoreDone(1, duration_ms=1))
    assert m.phase is Phase.RUNNING


def test_every_phase_takes_every_connection_event_and_stop() -> None:
    for phase in Phase:
        if phase is Phase.CREATED:
            continue
        for event in (e.ConnectionOpened, e.ConnectionClosed, e.IdleTimerFired, e.StopRequested):
            assert (phase, event) in TRANSITIONS, (phase, event)


def test_state_diagram_lists_the_main_cycle() -> None:
    diagram = state_diagram()
    assert (
        "RUNNING --> CHECKPOINTING: "
        "ConnectionClosed, IdleTimerFired, DirectPathClosed, ScaleDownRequested" in diagram
    )
    assert "SCALED_DOWN --> RESTORING: ConnectionOpened, WakeRequested" in diagram


# -- invariants -------------------------------------------------------------------


def answers(command: c.Command, now: float) -> list[e.Event]:
    """What a driver could answer to a command that does I/O."""
    match command:
        case c.StartApp():
            return [e.AppStarted(now), e.AppStartFailed(now, "no such file")]
        case c.Checkpoint():
            return [e.CheckpointDone(now, 1.0, 1), e.CheckpointFailed(now, "dump failed")]
        case c.Restore():
            return [e.RestoreDone(now, 1.0), e.RestoreFailed(now, "bad image")]
    return []


traffic = st.integers(0, 2)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_invariants_hold_for_any_sequence_of_events(data: st.DataObject) -> None:
    """Never checkpoint with a connection open or held, or with the fast path
    open; every held connection ends forwarded or refused; at most one I/O
    operation is in flight; a running pod with nothing open always has its
    idle timer armed (or is closing its fast path to see)."""
    m = Lifecycle(Policy(scaledown_after=IDLE, fast_path=data.draw(st.booleans())))
    now = 0.0
    pending: list[c.Command] = []  # I/O in flight, answered later
    closing = 0  # CloseDirectPath commands not answered yet
    next_conn = 1
    held_ever: set[int] = set()
    resolved: set[int] = set()
    closed_by_client: set[int] = set()

    armed: list[float | None] = [None]  # the driver's idle timer

    def feed(event: e.Event) -> None:
        nonlocal closing
        if isinstance(event, e.IdleTimerFired):
            armed[0] = None  # a timer fires once
        for command in m.handle(event):
            match command:
                case c.SetIdleDeadline(at):
                    armed[0] = at
                case c.Checkpoint():
                    assert m.quiet, "checkpoint with a connection or probe open or held"
                    assert m.direct_path is DirectPath.CLOSED and not closing, (
                        "checkpoint before the fast path was closed and looked at"
                    )
                case c.CloseDirectPath():
                    closing += 1
                case c.Forward(conns) | c.Refuse(conns, _):
                    resolved.update(conns)
            if isinstance(command, c.StartApp | c.Checkpoint | c.Restore):
                assert not pending, f"{command} while {pending} in flight"
                pending.append(command)
        held_ever.update(m.held_connections)
        if m.phase is Phase.RUNNING and m.quiet and not closing:
            assert armed[0] is not None, "running, nothing open, and no idle timer: stuck"

    feed(e.Boot(now))
    for _ in range(data.draw(st.integers(0, 60))):
        now += data.draw(st.floats(0, 2 * IDLE))
        choice = data.draw(
            st.sampled_from(
                ["open", "close", "timer", "answer", "down", "wake", "exit", "direct", "closed"]
            )
        )
        if choice == "open":
            feed(e.ConnectionOpened(now, conn=next_conn, port=80))
            next_conn += 1
        elif choice == "close":
            live = sorted(m.open_connections | set(m.held_connections) | m.open_probes)
            if live:
                conn = data.draw(st.sampled_from(live))
                if conn in m.held_connections:
                    closed_by_client.add(conn)
                feed(e.ConnectionClosed(now, conn=conn))
        elif choice == "timer":
            feed(e.IdleTimerFired(now))
        elif choice == "answer" and pending:
            feed(data.draw(st.sampled_from(answers(pending.pop(), now))))
        elif choice == "down":
            feed(e.ScaleDownRequested(now))
        elif choice == "wake":
            feed(e.WakeRequested(now))
        elif choice == "exit" and m.phase in (Phase.RUNNING, Phase.CHECKPOINTING):
            feed(e.AppExited(now, "exit status 1"))
        elif choice == "direct":
            feed(e.DirectTraffic(now, opened=data.draw(traffic)))
        elif choice == "closed" and closing:
            closing -= 1
            feed(e.DirectPathClosed(now, open=data.draw(traffic), opened=data.draw(traffic)))
    feed(e.StopRequested(now))
    while closing:
        closing -= 1
        feed(e.DirectPathClosed(now, open=0, opened=0))
    while pending:
        feed(answers(pending.pop(), now)[0])
    assert m.phase is Phase.STOPPED
    assert not m.held_connections
    assert held_ever - closed_by_client <= resolved


def test_readme_draws_the_current_transition_table() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert f"```mermaid\n{state_diagram()}\n```" in readme


def test_probe_while_scaled_down_is_answered_without_a_wake() -> None:
    m = scaled_down()
    assert (
        Playbook(m)
        >> e.ProbeOpened(100, conn=1, port=80)
        << c.AnswerProbe(1)
        >> e.ConnectionClosed(100.01, conn=1)
    )
    assert m.phase is Phase.SCALED_DOWN


def test_probes_pass_through_to_the_running_app_but_do_not_postpone_scale_down() -> None:
    m = running()
    assert (
        Playbook(m)
        >> e.ProbeOpened(IDLE - 1, conn=1, port=80)
        << c.Forward((1,))
        >> e.ConnectionClosed(IDLE - 0.9, conn=1)
        << c.SetIdleDeadline(IDLE)  # the same deadline: a probe does not postpone it
        >> e.ProbeOpened(IDLE - 0.1, conn=2, port=80)
        << c.Forward((2,))
        # The deadline passes while a probe is open: it must not be cut...
        >> e.IdleTimerFired(IDLE)
        # ...and its close checkpoints at once.
        >> e.ConnectionClosed(IDLE + 0.05, conn=2)
        << c.Checkpoint()
    )


def test_probe_during_checkpoint_or_restore_is_answered_in_the_apps_place() -> None:
    m = running()
    assert (
        Playbook(m)
        >> e.IdleTimerFired(IDLE)
        << c.Checkpoint()
        >> e.ProbeOpened(IDLE + 0.01, conn=1, port=80)
        << c.AnswerProbe(1)
        >> e.CheckpointDone(IDLE + 0.1, duration_ms=90.0, image_bytes=1)
    )
    assert m.phase is Phase.SCALED_DOWN


def test_failed_checkpoints_back_off_until_one_succeeds() -> None:
    m = running()
    assert (
        Playbook(m)
        >> e.IdleTimerFired(IDLE)
        << c.Checkpoint()
        >> e.CheckpointFailed(IDLE + 0.1, "io_uring")
        << c.SetIdleDeadline(IDLE + 0.1 + 2 * IDLE)
        >> e.IdleTimerFired(IDLE + 0.1 + 2 * IDLE)
        << c.Checkpoint()
        >> e.CheckpointFailed(40, "io_uring")
        << c.SetIdleDeadline(40 + 4 * IDLE)
        >> e.ConnectionOpened(41, conn=1, port=80)
        << c.SetIdleDeadline(None)
        << c.Forward((1,))
        >> e.ConnectionClosed(42, conn=1)
        << c.SetIdleDeadline(42 + 4 * IDLE)  # still backed off
        >> e.IdleTimerFired(42 + 4 * IDLE)
        << c.Checkpoint()
        >> e.CheckpointDone(83, duration_ms=80.0, image_bytes=1)
        >> e.ConnectionOpened(90, conn=2, port=80)
        << c.Restore()
        >> e.RestoreDone(90.1, duration_ms=40.0)
        << c.Forward((2,))
        >> e.ConnectionClosed(91, conn=2)
        << c.SetIdleDeadline(91 + IDLE)  # back to normal
    )


# -- the fast path -------------------------------------------------------------------


def running_with_fast_path() -> Lifecycle:
    m = Lifecycle(Policy(scaledown_after=IDLE, fast_path=True))
    assert (
        Playbook(m)
        >> e.Boot(0)
        << c.StartApp("first start")
        >> e.AppStarted(0)
        << (c.OpenDirectPath())
        << c.SetIdleDeadline(IDLE)
    )
    return m


def test_fast_path_is_closed_and_looked_at_once_more_before_a_checkpoint() -> None:
    m = running_with_fast_path()
    assert (
        Playbook(m)
        >> e.IdleTimerFired(IDLE)
        << c.CloseDirectPath()
        >> e.DirectPathClosed(IDLE + 0.01, open=0, opened=0)
        << c.Checkpoint()
        >> e.CheckpointDone(IDLE + 0.1, duration_ms=90.0, image_bytes=1)
        >> e.ConnectionOpened(30, conn=1, port=80)
        << c.Restore()
        >> e.RestoreDone(30.1, duration_ms=80.0)
        << c.Forward((1,))
        << c.OpenDirectPath()
    )


def test_traffic_found_when_the_fast_path_closes_keeps_the_app_running() -> None:
    m = running_with_fast_path()
    assert (
        Playbook(m)
        >> e.IdleTimerFired(IDLE)
        << c.CloseDirectPath()
        # A connection slipped through before the redirect was back, and ended.
        >> e.DirectPathClosed(IDLE + 0.01, open=0, opened=1)
        << c.SetIdleDeadline(None)
        << c.SetIdleDeadline(IDLE + 0.01 + IDLE)
        << c.OpenDirectPath()
    )
    assert m.phase is Phase.RUNNING


def test_new_direct_connections_start_the_idle_time_again() -> None:
    m = running_with_fast_path()
    assert (
        Playbook(m)
        >> e.DirectTraffic(4, opened=3)
        << c.SetIdleDeadline(None)
        << c.SetIdleDeadline(4 + IDLE)
        >> e.IdleTimerFired(4 + IDLE)
        << c.CloseDirectPath()
    )


def test_a_direct_connection_open_at_the_deadline_holds_the_pod_up_until_it_closes() -> None:
    m = running_with_fast_path()
    assert (
        Playbook(m, reports=True)
        >> e.IdleTimerFired(IDLE)
        << c.CloseDirectPath()
        >> e.DirectPathClosed(IDLE, open=1, opened=0)  # a keep-alive connection
        << c.SetIdleDeadline(None)
        << c.SetIdleDeadline(2 * IDLE)
        << c.OpenDirectPath()
        >> e.ScaleDownRequested(IDLE + 1)
        << c.SetIdleDeadline(None)
        << c.CloseDirectPath()
        >> e.DirectPathClosed(IDLE + 1, open=1, opened=0)
        << Reported("scale-down-refused")
        << c.SetIdleDeadline(None)
        << c.SetIdleDeadline(2 * IDLE + 1)
        << c.OpenDirectPath()
        # Gone at the next look: it closed since, so the idle time starts over.
        >> e.IdleTimerFired(2 * IDLE + 1)
        << c.CloseDirectPath()
        >> e.DirectPathClosed(2 * IDLE + 1, open=0, opened=0)
        << c.SetIdleDeadline(None)
        << c.SetIdleDeadline(3 * IDLE + 1)
        << c.OpenDirectPath()
        >> e.IdleTimerFired(3 * IDLE + 1)
        << c.CloseDirectPath()
        >> e.DirectPathClosed(3 * IDLE + 1, open=0, opened=0)
        << Reported("checkpointing")
        << c.Checkpoint()
    )


def test_an_app_exit_closes_the_fast_path_until_the_app_runs_again() -> None:
    m = running_with_fast_path()
    assert (
        Playbook(m)
        >> e.AppExited(1, "exit status 1")
        << c.SetIdleDeadline(None)
        << c.CloseDirectPath()
        << c.StartApp("the app exited (exit status 1)")
        >> e.DirectPathClosed(1.01, open=0, opened=0)
        >> e.AppStarted(2)
        << c.OpenDirectPath()
        << c.SetIdleDeadline(2 + IDLE)
    )
