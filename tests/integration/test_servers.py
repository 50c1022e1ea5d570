"""Compatibility matrix: real servers behind the activator, scaled to zero and woken.

Each server (tests/integration/servers.py has the recipes) runs in its own
local pod under `activator run --scaledown-after 1s`, with its own config and
data in a temp dir. The test writes state through the server's own protocol
from the host to the pod's address, then goes through three scale-down/wake
cycles: wait for "scaled-down", check that only the pause is left in the
pod's pid namespace and read the process tree the CRIU image holds, wake the
pod by connecting with the server's protocol, check that every process and
thread of the image came back (same in-pod pids; the same processes as
before the first checkpoint) and that the state is intact.

Servers that run processes as another user (PostgreSQL, Apache's children)
cannot be dumped without CAP_SYS_RESOURCE, which root lacks on the build
machines: there the test checks that the activator says so ("checkpoint-
failed" naming CAP_SYS_RESOURCE) while the pod keeps serving, and skips the
cycles with that reason.

Synchronisation is on the events file, polled with deadlines; a client
connection held open is what keeps a pod from scaling down while the test
looks at its processes.
"""

from __future__ import annotations

import os

import pytest

from tests.integration.harness import NEEDS_ROOT, Event, ns_members, phase_changes
from tests.integration.servers import (
    FAILURES,
    SERVERS,
    PodRun,
    Server,
    StartPod,
    Task,
    has_cap_sys_resource,
    read_image_tree,
)

pytestmark = NEEDS_ROOT

CYCLES = 3


def _describe(tasks: dict[int, Task]) -> str:
    return ", ".join(
        f"{t.name}[{t.pid}]x{len(t.threads)}" for t in sorted(tasks.values(), key=lambda t: t.pid)
    )


@pytest.mark.parametrize("server", SERVERS, ids=[s.name for s in SERVERS])
def test_server_keeps_its_state_across_scale_down_and_wake(server: Server, pod: StartPod) -> None:
    run = pod(server)
    address = run.address()
    token = server.write_state(address)  # waits for the server to serve (held by the activator)
    with run.client():  # open: the pod cannot scale down while we look
        before = run.app()
    assert before, "no process of the app in the pod"
    if server.other_users and not has_cap_sys_resource():
        _refused_while_serving(run, server, token, before)  # skips
    mark = run.mark()
    pause = run.pause()
    pid_ns = run.pid_namespace()
    first_image = None
    for cycle in range(1, CYCLES + 1):
        scaled = run.wait_for(("scaled-down", "checkpoint-failed"), after=mark)
        if scaled["event"] != "scaled-down":
            _known_blocker(server, scaled)
            pytest.fail(f"cycle {cycle}: {scaled['message']}")
        assert scaled["checkpoint_ms"] > 0 and scaled["image_bytes"] > 0, scaled
        image = read_image_tree(run.images)
        assert ns_members("pid", pid_ns) == {pause}, f"cycle {cycle}: app processes left"
        if first_image is None:
            first_image = image
            # The image holds the processes that ran before (a connection's own
            # process, where the server forks one, is gone by now).
            if server.forks_per_connection:
                assert image.pids <= set(before), (image.pids, _describe(before))
            else:
                assert image.pids == set(before), (image.pids, _describe(before))
            if server.processes_exact:
                assert len(image.pids) == server.processes, _describe(before)
            else:
                assert len(image.pids) >= server.processes, _describe(before)
        else:
            assert image.pids == first_image.pids, f"cycle {cycle}: {image} != {first_image}"

        mark = run.mark()
        with run.client():  # wakes it; held open while we look at what came back
            after = run.app()
        missing = image.pids - set(after)
        assert not missing, f"cycle {cycle}: processes {missing} did not come back"
        if not server.forks_per_connection:
            assert set(after) == image.pids, f"cycle {cycle}: {_describe(after)}"
        for pid, threads in image.threads.items():
            lost = threads - after[pid].threads
            assert not lost, f"cycle {cycle}: threads {lost} of process {pid} did not come back"
        woke = run.events()[mark:]
        for failed in (ev for ev in woke if ev["event"] == "restore-failed"):
            _known_blocker(server, failed)
        server.check_state(address, token)
        running = run.wait_for("running", after=mark)
        assert running.get("restore_ms") is not None, f"cycle {cycle}: a cold start: {running}"
        woke = run.events()[mark:]
        assert phase_changes(woke)[:2] == ["restoring", "running"], f"cycle {cycle}: {woke}"
        assert not [ev for ev in woke if ev["event"] in FAILURES], f"cycle {cycle}: {woke}"
        before = after
        mark = run.mark()


def _known_blocker(server: Server, failed: Event) -> None:
    """Skip when a server that needs a product change (`blocker`) fails to cycle."""
    if server.blocker:
        pytest.skip(f"{server.title}: {server.blocker}; {failed['event']}: {failed['message']}")


def _refused_while_serving(
    run: PodRun, server: Server, token: object, before: dict[int, Task]
) -> None:
    """Without CAP_SYS_RESOURCE: a clear checkpoint failure, and the pod keeps serving."""
    others = sorted({t.uid for t in before.values() if t.uid != os.geteuid()})
    assert others, f"{server.name}: expected processes of another user: {_describe(before)}"
    failed = run.wait_for("checkpoint-failed")
    message = failed["message"]
    assert "CAP_SYS_RESOURCE" in message, message
    assert any(f"uid {uid}" in message for uid in others), message
    # Still serving, with its state, from the very same processes: nothing was restarted.
    server.check_state(run.address(), token)
    with run.client():
        now = run.app()
    root = min(before.values(), key=lambda t: t.pid)
    assert root.pid in now and now[root.pid].host_pid == root.host_pid, "the app was restarted"
    events = run.events()
    assert not [ev for ev in events if ev["event"] in ("scaled-down", "app-exited")], events
    assert failed["phase"] == "running", failed
    reason = (
        f"{server.title} runs processes as uid {', '.join(map(str, others))}: without"
        " CAP_SYS_RESOURCE the activator refuses to checkpoint it (checked: it says so"
        " and keeps serving)"
    )
    if server.blocker:
        reason += f"; also: {server.blocker}"
    pytest.skip(reason)
