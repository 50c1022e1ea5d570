"""Pre-flight: what CRIU cannot dump is found before it is asked, with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from activator import preflight


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_plain_process_of_ours_can_be_checkpointed(child: subprocess.Popen[bytes]) -> None:
    assert preflight.problems(child.pid) == []


def test_a_gone_process_is_reported() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert preflight.problems(proc.pid) == [f"process {proc.pid} is gone"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a task of another user")
@pytest.mark.skipif(
    preflight.has_capability(preflight.CAP_SYS_RESOURCE), reason="this host has CAP_SYS_RESOURCE"
)
def test_a_task_of_another_user_is_reported_without_cap_sys_resource() -> None:
    proc = subprocess.Popen(["sleep", "60"], user=65534, group=65534, cwd="/")
    try:
        (problem,) = preflight.problems(proc.pid)
        assert "1 process(es) (sleep; pid" in problem and "run as uid 65534" in problem
        assert "CAP_SYS_RESOURCE" in problem
    finally:
        proc.kill()
        proc.wait()


IO_URING = """
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
params = (ctypes.c_ubyte * 120)()
fd = libc.syscall(425, 4, params)  # io_uring_setup
print(fd, flush=True)
time.sleep(60)
"""


# Runs the rest of its command line as its child.
PARENT = "import subprocess, sys; subprocess.run(sys.argv[1:])"


@pytest.mark.parametrize("depth", [0, 2])  # the app's root itself, its grandchild
def test_io_uring_is_reported(depth: int) -> None:
    parents = [sys.executable, "-c", PARENT] * depth
    proc = subprocess.Popen(
        [*parents, sys.executable, "-c", IO_URING],
        stdout=subprocess.PIPE,
        start_new_session=True,  # its own process group: the whole tree is ended below
    )
    try:
        assert proc.stdout is not None
        fd = int(proc.stdout.readline())
        if fd < 0:
            pytest.skip("io_uring is not available to this process")
        (problem,) = preflight.problems(proc.pid)
        assert "io_uring" in problem
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_capability_bits_are_read_from_status(tmp_path: object) -> None:
    from pathlib import Path

    status = Path(str(tmp_path)) / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000001000000\n")
    assert preflight.has_capability(24, status)
    status.write_text("Name:\tx\nCapEff:\t0000000000ffffff\n")
    assert not preflight.has_capability(24, status)
