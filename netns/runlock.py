"""Host-wide locks shared by every activator process on the machine.

Several activator processes may create and delete pods at the same time;
they serialise the few shared-state changes (the bridge, the address leases)
with flock(2) on files under RUN_DIR. flock belongs to the open file, so two
threads of one process exclude each other as well, and the kernel drops the
lock when a holder dies: no stale lock files to clean up.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from netns.errors import LockError

__all__ = ["RUN_DIR", "LockError", "locked"]

RUN_DIR = Path("/run/pod-activator")

# Holders keep these locks for a few netlink calls; waiting longer than this
# means a holder is wedged, which an operator should hear about.
DEFAULT_LOCK_TIMEOUT = 30.0
_POLL_INTERVAL = 0.01


@contextmanager
def locked(
    name: str, *, run_dir: Path = RUN_DIR, timeout: float = DEFAULT_LOCK_TIMEOUT
) -> Iterator[None]:
    """Hold the exclusive host-wide lock `run_dir/name.lock` for the block."""
    run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = run_dir / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        # Polling with LOCK_NB rather than a blocking flock so that a wedged
        # holder turns into an error with a bound instead of a silent hang.
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockError(
                        f"lock {path} is still held after {timeout:.0f}s; "
                        f"find the holder with `fuser -v {path}`"
                    ) from None
                time.sleep(_POLL_INTERVAL)
        yield
    finally:
        os.close(fd)
