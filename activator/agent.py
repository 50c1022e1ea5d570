"""One activator process: the pods it manages, answering the control socket.

One agent can manage many pods (one per node is the Kubernetes shape); locally
`activator run` starts an agent with one pod and `activator add` gives a
running agent another.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from activator.config import ConfigError, PodConfig, pod_config
from activator.control import ControlServer
from activator.criu import Criu
from activator.pod import PodDriver, Reporter, Sandbox

log = logging.getLogger(__name__)

# How long stopping a pod may take before the agent gives up waiting on it.
STOP_TIMEOUT = 30.0


class AgentError(Exception):
    """A control request that cannot be done; the message says why."""


SandboxFactory = Callable[[PodConfig], Sandbox]


class Agent:
    def __init__(
        self, state_root: Path, criu: Criu, reporter: Reporter, make_sandbox: SandboxFactory
    ) -> None:
        self.state_root = state_root
        self.criu = criu
        self.reporter = reporter
        self.make_sandbox = make_sandbox
        self.pods: dict[str, PodDriver] = {}

    async def add(self, config: PodConfig) -> PodDriver:
        if config.name in self.pods:
            raise AgentError(f"a pod named {config.name!r} exists already: pick another --name")
        pod = PodDriver(
            config,
            self.make_sandbox(config),
            self.criu,
            self.state_root / config.name,
            self.reporter,
        )
        self.pods[config.name] = pod
        try:
            await pod.start()
        except BaseException:
            del self.pods[config.name]
            raise
        return pod

    def pod(self, name: str) -> PodDriver:
        try:
            return self.pods[name]
        except KeyError:
            raise AgentError(f"no pod named {name!r} here: see `activator status`") from None

    async def remove(self, name: str) -> None:
        pod = self.pod(name)
        pod.stop()
        try:
            await asyncio.wait_for(pod.stopped.wait(), STOP_TIMEOUT)
        finally:
            self.pods.pop(name, None)

    async def stop_all(self) -> None:
        results = await asyncio.gather(
            *(self.remove(name) for name in list(self.pods)), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                log.error("stopping a pod failed: %s", result)

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one control request (see control.py for the wire format)."""
        op = request.get("op")
        if op == "status":
            return {"pods": [asdict(pod.status()) for pod in self.pods.values()]}
        if op in ("scale-down", "wake"):
            pod = self.pod(str(request.get("pod")))
            if op == "scale-down":
                pod.scale_down()
            else:
                pod.wake()
            return {"pod": asdict(pod.status())}
        if op == "add":
            try:
                config = pod_config(**request["settings"])
            except (KeyError, TypeError) as exc:
                raise AgentError(f"malformed add request: {exc}") from exc
            except ConfigError as exc:
                raise AgentError(str(exc)) from exc
            pod = await self.add(config)
            return {"pod": asdict(pod.status())}
        if op == "remove":
            await self.remove(str(request.get("pod")))
            return {}
        raise AgentError(f"unknown request {op!r}")


def stop_signal() -> asyncio.Event:
    """Set on SIGINT or SIGTERM (the handlers only set it)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


@asynccontextmanager
async def serving(agent: Agent) -> AsyncIterator[Agent]:
    """`agent` answering its control socket; on the way out, every pod removed."""
    control = ControlServer(agent.handle)
    await control.start()
    try:
        yield agent
    finally:
        log.info("stopping: removing %d pod(s)", len(agent.pods))
        await agent.stop_all()
        await control.close()
