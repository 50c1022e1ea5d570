"""Reading processes from /proc: parents, states, start times, namespaces.

Every function answers None (or nothing) for a process that is gone, since
any process may exit between two reads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on; comm (field 2) may hold spaces
    and parentheses, so the split is after the last ')'."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2 :].split()


def state_of(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def start_time_of(pid: int) -> int | None:
    """Clock ticks after boot (field 22): with the pid, names a process across pid reuse."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def nspid(pid: int) -> list[int]:
    """The pid in each pid namespace, outermost first ([host pid, ..., pid inside])."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return []


def ns_inode_of(pid: int, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def members_of(kind: str, inode: int) -> list[int]:
    """Every process in the namespace of `kind` ("net", "pid") with `inode`."""
    return [pid for pid in pids() if ns_inode_of(pid, kind) == inode]


def descendants_of(pid: int) -> set[int]:
    """Every process below `pid` in the process tree."""
    parents = {p: parent_of(p) for p in pids()}
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@dataclass(frozen=True)
class Process:
    """A process named across pid reuse: its pid and its start time."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> Process | None:
        start = start_time_of(pid)
        return None if start is None else cls(pid, start)

    def alive(self) -> bool:
        """Still there, zombie included."""
        return start_time_of(self.pid) == self.start

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def end(processes: Iterable[Process], timeout: float = 5.0) -> None:
    """SIGKILL `processes`; wait until they are gone, reaping those that are our
    children (as a subreaper, orphans of ours are too)."""
    processes = list(processes)
    for process in processes:
        process.kill()
    deadline = time.monotonic() + timeout
    for process in processes:
        while process.alive() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(process.pid, os.WNOHANG)
            time.sleep(0.01)
