"""The app as our child (started by us, or restored by our CRIU): its end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

# How long the app gets to exit after SIGTERM before SIGKILL.
STOP_GRACE = 5.0


def child_exit(pid: int) -> asyncio.Future[int]:
    """Reap the child `pid` when it ends: its wait status."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[int] = loop.create_future()
    pidfd = os.pidfd_open(pid)

    def reap() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # reaped by a sandbox's teardown
            status = 0
        ended.set_result(status)

    loop.add_reader(pidfd, reap)
    return ended


async def stop_child(pid: int, ended: asyncio.Future[int]) -> None:
    """SIGTERM the child's process group, SIGKILL it after STOP_GRACE."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)  # the app leads its own session and group
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(ended), STOP_GRACE)
            return
