"""The sidecar's view of the app's end, as the holder reports it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from activator.config import PodConfig
from activator.sidecar import ContainerSandbox


def test_an_end_reported_before_the_watch_is_kept_for_it_once(tmp_path: Path) -> None:
    """The app can end between the holder's reply (its pid) and the driver's
    watch: that end is given to the watch, once; a later app of the same pid
    (CRIU restores pids) is watched afresh."""

    async def scenario() -> None:
        config = PodConfig(name="app", ports=(8080,), command=())
        sandbox = ContainerSandbox(config, tmp_path, None, ("10.0.0.2", "10.0.0.1"))  # type: ignore[arg-type]
        sandbox._app_exited(7, 9)  # before anyone watches pid 7
        ended = sandbox.app_exit(7)
        assert ended.done() and ended.result() == 9
        again = sandbox.app_exit(7)
        assert not again.done()
        sandbox._app_exited(7, 0)
        assert again.result() == 0
        await asyncio.sleep(0)  # the adoption request fails (no holder here), logged only

    asyncio.run(scenario())
