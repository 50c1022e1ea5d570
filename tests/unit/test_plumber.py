"""The netlink helper: errors come back typed, it outlives a failed request and
exits when idle; and the activator's own process never loads pyroute2."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from netns import plumber
from netns.errors import BridgeError, PodError, PodExistsError
from netns.plumber import Plumber


def test_the_local_runtime_never_imports_pyroute2() -> None:
    # pyroute2 costs a long-lived process some 20 MiB it never gives back.
    script = (
        "import sys, activator.cli, activator.runtime, activator.localpod, netns.pod\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('pyroute2'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == ""


@pytest.mark.parametrize("kind", [PodExistsError, BridgeError])
def test_netns_errors_keep_their_type_and_message(kind: type[PodError]) -> None:
    error = plumber._error("create", kind.__name__, "bridge pa0 has address(es) ...")
    assert type(error) is kind
    assert str(error) == "bridge pa0 has address(es) ..."


def test_other_errors_become_pod_errors_naming_the_operation() -> None:
    error = plumber._error("teardown", "KeyError", "'ns'")
    assert type(error) is PodError
    assert str(error) == "teardown failed in the netlink helper: KeyError: 'ns'"


def test_the_helper_serves_on_after_a_failed_request_and_exits_when_idle() -> None:
    helper = Plumber(idle_s=0.2)
    with pytest.raises(PodError, match="no-such-op failed in the netlink helper: KeyError"):
        helper.call("no-such-op")
    first = helper.pid
    assert first is not None
    with pytest.raises(PodError, match="no-such-op"):
        helper.call("no-such-op")
    assert helper.pid == first, "the same helper answered again"
    # Idle, it is told to exit (EOF on its stdin), and does.
    pidfd = os.pidfd_open(first)
    try:
        assert select.select([pidfd], [], [], 60)[0], "the idle helper still runs"
    finally:
        os.close(pidfd)


def test_replies_reach_their_own_callers_when_requests_overlap() -> None:
    helper = Plumber()
    ops = [f"op-{i}" for i in range(20)]

    def ask(op: str) -> str:
        try:
            helper.call(op, value=op)
        except PodError as exc:
            return str(exc)
        return "no error"

    try:
        with ThreadPoolExecutor(len(ops)) as callers:
            answers = list(callers.map(ask, ops))
    finally:
        helper.close()
    assert answers == [f"{op} failed in the netlink helper: KeyError: '{op}'" for op in ops]
