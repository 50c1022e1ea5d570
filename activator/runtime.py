"""The local runtime: an agent with its control socket, local pods, until a signal."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import TextIO

from activator import kdat
from activator.agent import Agent, serving, stop_signal
from activator.config import PodConfig
from activator.criu import Criu, CriuOptions, find_criu
from activator.localpod import LocalSandbox
from activator.report import EventLog
from netns.pod import become_subreaper, raise_open_files_limit

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # glibc's malloc.h


def few_malloc_arenas() -> None:
    """Have all threads share glibc's malloc arenas: two, not one per thread.

    glibc gives each new thread an arena of its own (up to 8 per core), and an
    arena keeps what it was once given: each pod's namespace thread (where
    libnftables runs) left some 0.7 MiB behind in its own, for the first 16
    pods (100 scaled-down pods: 55-57 MiB, 47 with one or two arenas). The
    GIL serialises nearly every allocation anyway, so sharing costs next to
    no contention. An explicit MALLOC_ARENA_MAX is left to rule.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc only
    if mallopt is not None and "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, 2)


def local_agent(
    state_root: Path, events: TextIO | None, criu_options: CriuOptions | None = None
) -> Agent:
    few_malloc_arenas()  # first: before the threads that would each get an arena
    # Restored apps and the apps we start become our children (see netns.pod).
    become_subreaper()
    raise_open_files_limit()
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
