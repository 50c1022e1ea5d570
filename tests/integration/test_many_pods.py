"""Several pods in one activator, scaled down and woken at the same moments."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import pytest

from activator import commands as c
from activator.demo import http_request, wait_for_phase
from activator.lifecycle import Phase
from activator.pod import PodDriver
from activator.runtime import local_agent

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, nftables, CRIU)"),
]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def report(self, pod: PodDriver, report: c.Report) -> None:
        self.events.append((pod.name, report.event, report.message))


def test_simultaneous_checkpoints_of_apps_sharing_a_working_directory(tmp_path: Path) -> None:
    """Apps of one activator share its working directory, and each is pid 2 or
    so in its own pod: CRIU's parasite then makes the same temporary directory
    name there, and concurrent dumps failed with EEXIST now and then."""
    recorder = Recorder()

    async def scenario() -> None:
        agent = local_agent(tmp_path / "state", events=None)
        agent.reporter = recorder
        from activator.config import PodConfig

        command = (sys.executable, "-m", "activator.sampleapp", "--port", "8080")
        try:
            pods = [
                await agent.add(PodConfig(f"m{uuid.uuid4().hex[:8]}", (8080,), command, 3600.0))
                for _ in range(3)
            ]
            for _ in range(8):
                await asyncio.gather(
                    *(http_request(p.sandbox.address, 8080, "GET", "/state") for p in pods)
                )
                for pod in pods:
                    await wait_for_phase(pod, Phase.RUNNING, 30)
                await asyncio.sleep(0.05)  # let the requests' connections close
                for pod in pods:
                    pod.scale_down()
                for pod in pods:
                    await wait_for_phase(pod, Phase.SCALED_DOWN, 30)
        finally:
            await agent.stop_all()

    import uvloop

    uvloop.run(scenario())
    failed = [e for e in recorder.events if e[1] == "checkpoint-failed"]
    assert not failed, failed
    assert sum(1 for e in recorder.events if e[1] == "scaled-down") == 3 * 8
