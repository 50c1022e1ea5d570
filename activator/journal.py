"""The pod's journal: which CRIU operation is under way, and which CRIU runs it.

An activator killed while CRIU works leaves that CRIU running: killing it in
turn could leave the app with CRIU's parasite inside or half restored, so it
is left to finish. The next activator reads the journal, waits for that CRIU
(named by pid and start time, so a reused pid is never waited for) and only
then looks at what is left: the app running, or a complete image.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from netns.proc import Process

JOURNAL = "operation.json"


class JournalError(Exception):
    pass


@dataclass(frozen=True)
class Operation:
    kind: str  # "checkpoint" or "restore"
    images: str  # the directory CRIU writes (checkpoint) or reads (restore)
    criu: Process | None = None


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / JOURNAL
        self._current: Operation | None = None

    def begin(self, kind: str, images: Path) -> None:
        # Written only once CRIU runs: before that, nothing is left to decide.
        self._current = Operation(kind, str(images))

    def criu_started(self, pid: int) -> None:
        """Called with CRIU's pid as soon as it runs, before it touches the app."""
        if self._current is not None:
            self._write(replace(self._current, criu=Process.of(pid)))

    def end(self) -> None:
        self._current = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def pending(self) -> Operation | None:
        """The operation a killed activator left unfinished, if any."""
        try:
            record = json.loads(self.path.read_text())
            criu = record.get("criu")
            return Operation(
                kind=str(record["kind"]),
                images=str(record["images"]),
                criu=Process(int(criu["pid"]), int(criu["start"])) if criu else None,
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise JournalError(
                f"unreadable journal {self.path} ({exc}): check what is left in "
                f"{self.path.parent} by hand, then remove the journal"
            ) from exc

    def _write(self, operation: Operation) -> None:
        # No fsync: the journal is for an activator killed, not a machine
        # rebooted (which leaves no CRIU and no app to decide about), and it
        # is on the wake's path.
        self._current = operation
        staging = self.path.with_suffix(".tmp")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as out:
            json.dump(asdict(operation), out)
        staging.rename(self.path)


def wait_for_exit(process: Process, timeout: float) -> bool:
    """Wait for a process that is not our child; True once it is gone."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return True
    try:
        if not process.alive():  # the pid was reused after our CRIU ended
            return True
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            if poller.poll(left * 1000):
                return True
        return False
    finally:
        os.close(pidfd)
