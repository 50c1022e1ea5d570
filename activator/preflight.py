"""What makes an app impossible to checkpoint, found before CRIU is asked.

CRIU fails on these after it has frozen the app; asking first turns them into
a clear reason while the app keeps running untouched:

- a task of another user when we lack CAP_SYS_RESOURCE (CRIU's prlimit()
  on it fails: "Can't get rlimit 0: Operation not permitted");
- io_uring, which CRIU cannot dump ("Unknown shit 600 (anon_inode:[io_uring])").
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psutil

from netns.proc import children_of

CAP_SYS_RESOURCE = 24


def has_capability(cap: int, status: Path = Path("/proc/self/status")) -> bool:
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def problems(root_pid: int, criu_like: int | None = None) -> list[str]:
    """Why the process tree at `root_pid` cannot be checkpointed; empty if it can.

    `criu_like`: a process with the user and capabilities CRIU will run with
    (a sidecar's CRIU runs in the app container, as the holder's child); us
    by default."""
    try:
        tree = [psutil.Process(root_pid), *_descendants(root_pid)]
    except psutil.NoSuchProcess:
        return [f"process {root_pid} is gone"]
    found: list[str] = []
    status = Path(f"/proc/{criu_like or os.getpid()}/status")
    if not has_capability(CAP_SYS_RESOURCE, status):
        me = os.geteuid() if criu_like is None else psutil.Process(criu_like).uids().effective
        foreign: dict[int, list[psutil.Process]] = {}
        for proc in tree:
            try:
                uids = proc.uids()
            except psutil.NoSuchProcess:
                continue
            if me not in (uids.real, uids.effective):
                foreign.setdefault(uids.effective, []).append(proc)
        for uid, procs in foreign.items():
            names = sorted({_name(p) for p in procs})
            found.append(
                f"{len(procs)} process(es) ({', '.join(names)}; pid {procs[0].pid} first) run as"
                f" uid {uid}: CRIU can only dump them with CAP_SYS_RESOURCE, which this"
                " CRIU lacks here; run the app as root or give CRIU CAP_SYS_RESOURCE"
            )
    for proc in tree:
        if _uses_io_uring(proc.pid):
            found.append(
                f"process {proc.pid} ({_name(proc)}) uses io_uring, which CRIU cannot dump;"
                " switch it off in the app (MariaDB: innodb_use_native_aio=0;"
                " Node.js: leave UV_USE_IO_URING unset)"
            )
    return found


def _descendants(pid: int) -> list[psutil.Process]:
    """The tree under `pid` by the kernel's lists of children, as CRIU finds
    it: psutil's children() reads every process of the machine (11 ms on a
    VM that was idle, on the checkpoint's path)."""
    found: list[psutil.Process] = []
    todo = children_of(pid)
    while todo:
        child = todo.pop()
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append(psutil.Process(child))
            todo += children_of(child)
    return found


def _uses_io_uring(pid: int) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fds.iterdir())
    except OSError:
        return False
    for fd in entries:
        try:
            if os.readlink(fd) == "anon_inode:[io_uring]":
                return True
        except OSError:
            continue
    return False


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return "?"
