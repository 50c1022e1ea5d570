"""Activity and probes, told by real clients against a pod on loopback.

Every client here comes from 127.0.0.1, the fake pod's node address, so every
connection goes through probe detection unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import time
from ipaddress import IPv4Network
from pathlib import Path

from activator.lifecycle import Phase

from .fakepod import Harness, get, run, until

IDLE = 0.3


async def probe(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: pod\r\nUser-Agent: kube-probe/1.35\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n".encode()
    )
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return answer


async def tcp_probe(port: int) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    await writer.wait_closed()


def test_http_and_tcp_probes_while_scaled_down_never_wake_and_keep_the_last_status(
    tmp_path: Path,
) -> None:
    async def scenario(h: Harness) -> None:
        # While running, probes pass through: the app says 200 for /state and
        # 404 for /healthz (it has none: a failing readiness probe).
        assert (await probe(h.shadow_port, "/state")).startswith(b"HTTP/1.1 200")
        assert (await probe(h.shadow_port, "/healthz")).startswith(b"HTTP/1.1 404")
        await until(lambda: h.pod.lifecycle.phase is Phase.SCALED_DOWN)
        answers = await asyncio.gather(
            *(probe(h.shadow_port, "/healthz") for _ in range(100)),
            *(probe(h.shadow_port, "/state") for _ in range(100)),
        )
        await asyncio.gather(*(tcp_probe(h.shadow_port) for _ in range(100)))
        assert all(a.startswith(b"HTTP/1.1 404 Not Found") for a in answers[:100])
        assert all(a.startswith(b"HTTP/1.1 200 OK") for a in answers[100:])
        assert all(b"X-Answered-By: pod-activator" in a for a in answers)
        assert "restoring" not in h.reports.events
        assert h.pod.lifecycle.phase is Phase.SCALED_DOWN

    run(tmp_path, scenario, scaledown_after=IDLE)


def test_probes_before_any_answer_get_the_default_status(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await until(lambda: h.pod.lifecycle.phase is Phase.SCALED_DOWN)
        assert (await probe(h.shadow_port, "/ready")).startswith(b"HTTP/1.1 503")
        assert "restoring" not in h.reports.events

    run(tmp_path, scenario, scaledown_after=IDLE, probe_default_status=503)


def test_probes_do_not_keep_a_running_pod_up(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        deadline = time.monotonic() + 3 * IDLE
        while time.monotonic() < deadline and h.pod.lifecycle.phase is Phase.RUNNING:
            await probe(h.shadow_port, "/state")
        await until(lambda: h.pod.lifecycle.phase is Phase.SCALED_DOWN, timeout=10)

    run(tmp_path, scenario, scaledown_after=IDLE)


def test_with_probe_detection_off_a_probe_is_traffic(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await until(lambda: h.pod.lifecycle.phase is Phase.SCALED_DOWN)
        answer = await probe(h.shadow_port, "/state")
        assert answer.startswith(b"HTTP/1.1 200 OK")
        assert b"X-Answered-By" not in answer
        assert "restoring" in h.reports.events

    run(tmp_path, scenario, scaledown_after=IDLE, probe_detection=False)


async def banner(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    line = await asyncio.wait_for(reader.readline(), 30)
    writer.close()
    return line


def test_server_first_client_from_the_probe_source_wakes_the_app(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await until(lambda: h.pod.lifecycle.phase is Phase.SCALED_DOWN)
        assert await banner(h.shadow_port) == b"220 banner\r\n"
        assert "restoring" in h.reports.events

    run(tmp_path, scenario, app="banner", scaledown_after=IDLE)


def test_server_first_client_from_elsewhere_is_not_sniffed_at_all(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await until(lambda: h.pod.lifecycle.phase is Phase.SCALED_DOWN)
        # With a probe wait of a minute, a sniffed client would wait that long.
        assert await asyncio.wait_for(banner(h.shadow_port), 20) == b"220 banner\r\n"

    run(
        tmp_path,
        scenario,
        app="banner",
        scaledown_after=IDLE,
        probe_sources=(IPv4Network("127.0.0.2/32"),),
        probe_wait=60.0,
    )


def test_request_loops_never_see_a_failure_or_a_scale_down(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        failures = 0
        # New connections, back to back, for 3x the scale-down duration.
        deadline = time.monotonic() + 3 * IDLE
        while time.monotonic() < deadline:
            failures += not (await get(h.shadow_port)).startswith(b"HTTP/1.1 200 OK")
        # One keep-alive connection, for 3x the scale-down duration.
        reader, writer = await asyncio.open_connection("127.0.0.1", h.shadow_port)
        deadline = time.monotonic() + 3 * IDLE
        while time.monotonic() < deadline:
            writer.write(b"GET /state HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            failures += not head.startswith(b"HTTP/1.1 200 OK")
        writer.close()
        assert failures == 0
        assert "checkpointing" not in h.reports.events
        # Once the loops stop, the pod scales down within the idle time and a
        # bound for the checkpoint (generous: this machine is shared).
        stopped = time.monotonic()
        await until(lambda: h.pod.lifecycle.phase is Phase.SCALED_DOWN, timeout=10)
        assert time.monotonic() - stopped < IDLE + 3.0

    run(tmp_path, scenario, scaledown_after=IDLE)


def test_an_idle_keep_alive_connection_blocks_scale_down_unless_closed_when_quiet(
    tmp_path: Path,
) -> None:
    async def held_open(h: Harness) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.shadow_port)
        writer.write(b"GET /state HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(4 * IDLE)
        assert h.pod.lifecycle.phase is Phase.RUNNING
        writer.close()

    run(tmp_path, held_open, scaledown_after=IDLE)

    async def closed_when_quiet(h: Harness) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.shadow_port)
        writer.write(b"GET /state HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        # The activator closes it with a FIN (EOF here), not a reset...
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        # ...and then the pod scales down.
        await until(lambda: h.pod.lifecycle.phase is Phase.SCALED_DOWN, timeout=10)

    run(tmp_path, closed_when_quiet, scaledown_after=IDLE, close_idle_after=IDLE)


def grpc_probe(port: int) -> int:
    """A health check as kubelet's gRPC prober makes it; the serving status."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    # Kubelet dials a connection per probe: no subchannel shared between probes.
    options = [
        ("grpc.primary_user_agent", "kube-probe/1.35"),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=20)
        status: int = answer.status
        return status


def test_grpc_health_probes_while_scaled_down_get_the_apps_last_answer(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        not_serving = 2
        # While running the probe reaches the app, which is not serving.
        assert await asyncio.to_thread(grpc_probe, h.shadow_port) == not_serving
        await until(lambda: h.pod.lifecycle.phase is Phase.SCALED_DOWN)
        statuses = await asyncio.gather(
            *(asyncio.to_thread(grpc_probe, h.shadow_port) for _ in range(20))
        )
        assert statuses == [not_serving] * 20
        assert "restoring" not in h.reports.events

    run(tmp_path, scenario, app="grpc", scaledown_after=1.0)


def test_closing_quiet_connections_never_cuts_a_request_in_flight(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.shadow_port)
        # The app takes four times the quiet time to answer: the request is in flight.
        writer.write(b"GET /slow/1200 HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 OK")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        assert await reader.readexactly(length) == b"slow answer\n"
        # Once answered and quiet, it is closed (FIN).
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()

    run(tmp_path, scenario, scaledown_after=IDLE, close_idle_after=IDLE)
