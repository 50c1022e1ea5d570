"""The pod driver and proxy with a fake sandbox and a fake CRIU; no root needed.

The app is the real sample app on loopback; "checkpoint" kills it and
"restore" starts it again (its memory is not kept: that is CRIU's part, tested
in tests/integration). What is tested here is the driver: connections held and
forwarded, timers, reports, failures, teardown.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import pytest
import uvloop

from activator import commands as c
from activator.config import PodConfig
from activator.criu import CriuError, Externals
from activator.lifecycle import Phase
from activator.pod import PodDriver, SpawnFailed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn_sample_app(port: int) -> int:
    argv = [sys.executable, "-m", "activator.sampleapp", "--port", str(port)]
    return os.posix_spawn(sys.executable, argv, dict(os.environ), setsid=True)


class FakeSandbox:
    address = "127.0.0.1"
    node_address = "127.0.0.1"

    def __init__(self) -> None:
        self.redirects: dict[int, int] = {}
        self.destroyed = False
        self.spawn_error: str | None = None

    async def create(self) -> None:
        pass

    async def socket(self) -> socket.socket:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    async def redirect(self, shadow_ports: Mapping[int, int]) -> None:
        self.redirects = dict(shadow_ports)

    async def spawn_app(self, command: tuple[str, ...]) -> int:
        if self.spawn_error:
            raise SpawnFailed(self.spawn_error)
        return spawn_sample_app(int(command[-1]))

    def externals(self) -> Externals:
        return Externals({})

    async def destroy(self) -> None:
        self.destroyed = True


class FakeCriu:
    def __init__(self, port: int) -> None:
        self.port = port
        self.restore_error: str | None = None
        self.dumps = 0

    def dump(self, pid: int, images: Path, externals: Externals) -> int:
        images.mkdir(parents=True)
        (images / "pages-1.img").write_bytes(b"x" * 100)
        os.kill(pid, signal.SIGKILL)
        self.dumps += 1
        return 100

    def restore(self, images: Path, externals: Externals) -> int:
        if self.restore_error:
            raise CriuError(self.restore_error)
        assert (images / "pages-1.img").exists()
        return spawn_sample_app(self.port)


class Reports:
    def __init__(self) -> None:
        self.events: list[str] = []

    def report(self, pod: PodDriver, report: c.Report) -> None:
        self.events.append(report.event)


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


def run(tmp_path: Path, scenario: Scenario) -> None:
    """Run `scenario` against a started pod on uvloop; stop the pod whatever happens."""

    async def main() -> None:
        port = free_port()
        sandbox, criu, reports = FakeSandbox(), FakeCriu(port), Reports()
        config = PodConfig(
            name="t", ports=(port,), command=("sampleapp", str(port)), scaledown_after=0.3
        )
        pod = PodDriver(config, sandbox, criu, tmp_path / "t", reports)  # type: ignore[arg-type]
        await pod.start()
        try:
            await scenario(Harness(pod, sandbox, criu, reports))
        finally:
            pod.stop()
            await asyncio.wait_for(pod.stopped.wait(), 30)

    uvloop.run(main())


def test_requests_pass_through_while_running(tmp_path: Path) -> None:
    run(tmp_path, _requests_pass_through_while_running)


async def _requests_pass_through_while_running(harness: Harness) -> None:
    assert harness.sandbox.redirects == {harness.pod.config.ports[0]: harness.shadow_port}
    answer = await get(harness.shadow_port)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert b'"hits": 1' in answer


def test_idle_pod_is_checkpointed_and_the_next_connection_restores_it(tmp_path: Path) -> None:
    run(tmp_path, _idle_pod_is_checkpointed_and_the_next_connection_restores_it)


async def _idle_pod_is_checkpointed_and_the_next_connection_restores_it(
    harness: Harness,
) -> None:
    await until(lambda: harness.pod.lifecycle.phase is Phase.SCALED_DOWN)
    assert harness.pod.app_pid is None
    answers = await asyncio.gather(*(get(harness.shadow_port) for _ in range(20)))
    assert all(a.startswith(b"HTTP/1.1 200 OK") for a in answers)
    assert harness.reports.events.count("restoring") == 1
    assert "first-byte" in harness.reports.events
    # The image is deleted once the app is back.
    assert not harness.pod.images.exists()


def test_failed_restore_starts_the_app_cold_and_serves(tmp_path: Path) -> None:
    run(tmp_path, _failed_restore_starts_the_app_cold_and_serves)


async def _failed_restore_starts_the_app_cold_and_serves(harness: Harness) -> None:
    await until(lambda: harness.pod.lifecycle.phase is Phase.SCALED_DOWN)
    harness.criu.restore_error = "corrupted image"
    answer = await get(harness.shadow_port)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    events = harness.reports.events
    assert events.index("restore-failed") < len(events) - 1
    assert events[events.index("restore-failed") - 1 :][:3] == [
        "starting",
        "restore-failed",
        "running",
    ]
    assert (harness.pod.state_dir / "images.failed").exists()


def test_an_app_that_exits_is_restarted(tmp_path: Path) -> None:
    run(tmp_path, _an_app_that_exits_is_restarted)


async def _an_app_that_exits_is_restarted(harness: Harness) -> None:
    await until(lambda: harness.pod.app_pid is not None)
    first = harness.pod.app_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await until(lambda: harness.pod.app_pid not in (None, first))
    assert "app-exited" in harness.reports.events
    assert (await get(harness.shadow_port)).startswith(b"HTTP/1.1 200 OK")


def test_connections_while_the_app_cannot_start_are_refused_with_a_reason(tmp_path: Path) -> None:
    run(tmp_path, _connections_while_the_app_cannot_start_are_refused_with_a_reason)


async def _connections_while_the_app_cannot_start_are_refused_with_a_reason(
    harness: Harness,
) -> None:
    await until(lambda: harness.pod.lifecycle.phase is Phase.SCALED_DOWN)
    harness.criu.restore_error = "corrupted image"
    harness.sandbox.spawn_error = "no such file: sampleapp"
    try:
        answer = await get(harness.shadow_port)
    except ConnectionResetError:
        answer = b""
    assert answer == b"", "a connection that cannot be served must not look answered"
    assert harness.pod.lifecycle.phase is Phase.FAILED
    assert "start-failed" in harness.reports.events


def test_stop_ends_the_app_and_removes_everything(tmp_path: Path) -> None:
    run(tmp_path, _stop_ends_the_app_and_removes_everything)


async def _stop_ends_the_app_and_removes_everything(harness: Harness) -> None:
    await until(lambda: harness.pod.app_pid is not None)
    pid = harness.pod.app_pid
    assert pid is not None
    harness.pod.stop()
    await asyncio.wait_for(harness.pod.stopped.wait(), 30)
    assert harness.sandbox.destroyed
    assert not harness.pod.state_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
