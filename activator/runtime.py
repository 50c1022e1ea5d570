"""The local runtime: an agent with its control socket, local pods, until a signal."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TextIO

from activator import kdat
from activator.agent import Agent, serving, stop_signal
from activator.config import PodConfig
from activator.criu import Criu, CriuOptions, find_criu
from activator.localpod import LocalSandbox
from activator.report import EventLog
from netns.pod import become_subreaper

log = logging.getLogger(__name__)


def local_agent(
    state_root: Path, events: TextIO | None, criu_options: CriuOptions | None = None
) -> Agent:
    # Restored apps and the apps we start become our children (see netns.pod).
    become_subreaper()
    criu = find_criu()
    kdat.ensure_cache(criu)  # start-up work off the wake path
    return Agent(state_root, Criu(criu, criu_options), EventLog(events), LocalSandbox)


async def serve(
    configs: list[PodConfig],
    state_root: Path,
    events: TextIO | None,
    criu_options: CriuOptions | None = None,
) -> int:
    """Run `configs` as local pods until SIGINT or SIGTERM; then remove them all."""
    stop = stop_signal()
    async with serving(local_agent(state_root, events, criu_options)) as agent:
        for config in configs:
            try:
                await agent.add(config)
            except Exception as exc:
                log.error("pod %s could not be created: %s", config.name, exc)
                return 1
        await stop.wait()
        return 0
