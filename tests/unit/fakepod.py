"""A pod driver on loopback with a fake sandbox and a fake CRIU; no root needed.

The app is a real process (the sample app, or a server-first banner app) on
127.0.0.1; "checkpoint" kills it and "restore" starts it again (its memory is
not kept: that is CRIU's part, tested in tests/integration). What these fakes
let tests exercise is the driver and the proxy: connections held and
forwarded, probes, timers, reports, failures, teardown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import uvloop

from activator import commands as c
from activator.children import child_exit, stop_child
from activator.config import PodConfig
from activator.criu import CriuError, CriuOptions, Externals, LocalLauncher, OnStart
from activator.pod import PodDriver, SpawnFailed
from netns.proc import Process, end

# A server whose protocol has the server speak first (as MySQL's or SMTP's).
BANNER_APP = """
import socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = srv.accept()
    conn.sendall(b"220 banner\\r\\n")
    conn.close()
"""

# A gRPC server whose health service says NOT_SERVING (a failing probe).
GRPC_APP = """
import sys, time
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
servicer = health.HealthServicer()
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
server.wait_for_termination()
"""
APPS = {"banner": BANNER_APP, "grpc": GRPC_APP}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Every app the fakes started, ended after each scenario even when it failed.
STARTED: list[Process] = []


def spawn_app(app: str, port: int) -> int:
    if app in APPS:
        argv = [sys.executable, "-c", APPS[app], str(port)]
    else:
        argv = [sys.executable, "-m", "activator.sampleapp", "--port", str(port)]
    pid = os.posix_spawn(sys.executable, argv, dict(os.environ), setsid=True)
    if (started := Process.of(pid)) is not None:
        STARTED.append(started)
    return pid


class FakeSandbox:
    address = "127.0.0.1"
    node_address = "127.0.0.1"
    criu_launcher = None

    def __init__(self) -> None:
        self.redirects: dict[int, int] = {}
        self.destroyed = False
        self.spawn_error: str | None = None
        self.left: object | None = None  # what a killed activator left (an app_pid)

    async def leftover(self) -> object | None:
        return self.left

    async def remove_leftover(self, leftover: object) -> None:
        assert leftover is self.left is not None, "no leftover to remove"
        self.left = None

    async def create(self) -> None:
        pass

    async def socket(self) -> socket.socket:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    async def redirect(self, shadow_ports: Mapping[int, int]) -> None:
        self.redirects = dict(shadow_ports)

    async def spawn_app(self, command: tuple[str, ...]) -> int:
        if self.spawn_error:
            raise SpawnFailed(self.spawn_error)
        return spawn_app(command[0], int(command[-1]))

    def app_exit(self, pid: int) -> asyncio.Future[int]:
        return child_exit(pid)

    async def stop_app(self, pid: int, ended: asyncio.Future[int]) -> None:
        await stop_child(pid, ended)

    async def end_remains(self) -> None:
        pass  # the fake CRIU leaves nothing behind

    def externals(self) -> Externals:
        return Externals({})

    async def destroy(self) -> None:
        self.destroyed = True


class FakeCriu:
    launcher = LocalLauncher(Path("criu"))  # only its pre-flight answers are used
    options = CriuOptions()  # no CRIU started ahead: there is none

    def __init__(self, app: str, port: int) -> None:
        self.app = app
        self.port = port
        self.restore_error: str | None = None
        self.dumps = 0

    def close(self) -> None:
        pass

    def dump(self, pid: int, images: Path, externals: Externals, on_start: OnStart) -> int:
        on_start(os.getpid())  # no CRIU process here: the journal names ours
        images.mkdir(parents=True)
        (images / "pages-1.img").write_bytes(b"x" * 100)
        os.kill(pid, signal.SIGKILL)
        self.dumps += 1
        return 100

    async def restore(
        self, images: Path, externals: Externals, on_start: OnStart, lazy: bool = False
    ) -> int:
        on_start(os.getpid())
        if self.restore_error:
            raise CriuError(self.restore_error)
        assert (images / "pages-1.img").exists()
        return spawn_app(self.app, self.port)


class Reports:
    def __init__(self) -> None:
        self.events: list[str] = []

    def report(self, pod: PodDriver, report: c.Report) -> None:
        self.events.append(report.event)
        # Shown by pytest when a test fails: the story of the pod.
        print(f"{time.monotonic():.3f} {report.event}: {report.message}")


async def get(port: int, path: str = "/state") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return data


async def until(condition: object, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.005)


class Harness:
    def __init__(self, pod: PodDriver, sandbox: FakeSandbox, criu: FakeCriu, reports: Reports):
        self.pod, self.sandbox, self.criu, self.reports = pod, sandbox, criu, reports

    @property
    def shadow_port(self) -> int:
        return self.pod.listeners[0].shadow_port


Scenario = Callable[[Harness], Awaitable[None]]


def run(
    tmp_path: Path,
    scenario: Scenario,
    app: str = "sampleapp",
    leftover: object | None = None,
    **settings: Any,
) -> None:
    """Run `scenario` against a started pod on uvloop; stop the pod whatever happens.

    `leftover`: what the sandbox finds of a killed activator's pod at start.
    `settings` override PodConfig fields (scale-down after 0.3 s by default).
    """

    async def main() -> None:
        port = free_port()
        sandbox, criu, reports = FakeSandbox(), FakeCriu(app, port), Reports()
        sandbox.left = leftover
        config = PodConfig(name="t", ports=(port,), command=(app, str(port)), scaledown_after=0.3)
        config = dataclasses.replace(config, **settings)
        pod = PodDriver(config, sandbox, criu, tmp_path / "t", reports)  # type: ignore[arg-type]
        await pod.start()
        try:
            await scenario(Harness(pod, sandbox, criu, reports))
        finally:
            pod.stop()
            await asyncio.wait_for(pod.stopped.wait(), 30)

    try:
        uvloop.run(main())
    finally:
        end(STARTED)
        STARTED.clear()
