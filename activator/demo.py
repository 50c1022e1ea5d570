"""`activator demo`: the bundled sample app in a local pod, scaled to zero and woken.

Prints the timeline of each cycle: checkpoint ms, image size, restore ms, and
first byte ms as the client saw it, and checks the app's memory survived.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

from activator.config import PodConfig
from activator.lifecycle import Phase
from activator.pod import PodDriver
from activator.runtime import local_agent

PORT = 8080


class DemoFailed(Exception):
    pass


async def http_request(
    host: str, port: int, method: str, path: str, body: str = ""
) -> tuple[float, str]:
    """One HTTP/1.1 request; returns (seconds to the first response byte, body)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode())
        first = await reader.read(1)
        first_byte = time.monotonic() - started
        rest = await reader.read()
    finally:
        writer.close()
    response = (first + rest).decode()
    status = response.split(" ", 2)[1] if " " in response else "?"
    if not status.startswith("2"):
        raise DemoFailed(f"{method} {path} answered {status!r}")
    return first_byte, response.split("\r\n\r\n", 1)[1]


async def wait_for_phase(pod: PodDriver, phase: Phase, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pod.lifecycle.phase is not phase:
        if time.monotonic() > deadline:
            raise DemoFailed(f"pod did not become {phase.value} within {timeout:g}s")
        await asyncio.sleep(0.01)


async def _demo(cycles: int, scaledown_after: float) -> None:
    state_root = Path(tempfile.mkdtemp(prefix="activator-demo-"))
    agent = local_agent(state_root, events=None)
    config = PodConfig(
        name=f"demo-{secrets.token_hex(3)}",
        ports=(PORT,),
        command=(sys.executable, "-m", "activator.sampleapp", "--port", str(PORT)),
        scaledown_after=scaledown_after,
    )
    pod = await agent.add(config)
    try:
        host = pod.sandbox.address
        print(f"pod {config.name} at {host}:{PORT}, scales down after {scaledown_after:g}s idle")
        await http_request(host, PORT, "PUT", "/values/greeting", "hello")
        _, body = await http_request(host, PORT, "GET", "/state")
        before = json.loads(body)
        print(f"app started cold: boot {before['boot_id']}, stored greeting=hello\n")
        print(f"{'cycle':>5}  {'checkpoint':>10}  {'image':>9}  {'restore':>8}  {'first byte':>10}")
        for cycle in range(1, cycles + 1):
            await wait_for_phase(pod, Phase.SCALED_DOWN, scaledown_after + 30)
            if pod.app_pid is not None:
                raise DemoFailed("scaled down but the app's process is still there")
            first_byte, body = await http_request(host, PORT, "GET", "/state")
            after = json.loads(body)
            intact = (
                after["boot_id"] == before["boot_id"]
                and after["values"] == {"greeting": "hello"}
                and after["hits"] == before["hits"] + 1
            )
            m = pod.lifecycle
            image_mib = (m.image_bytes or 0) / 1048576
            print(
                f"{cycle:>5}  {m.last_checkpoint_ms or 0:>8.0f}ms  {image_mib:>6.1f}MiB"
                f"  {m.last_restore_ms or 0:>6.0f}ms  {first_byte * 1000:>8.0f}ms  "
                + (f"state intact (hits {after['hits']})" if intact else f"state LOST: {after}")
            )
            if not intact:
                raise DemoFailed("the app's memory did not survive the checkpoint")
            before = after
        print("\nthe app's memory survived every scale-down; removing the pod")
    finally:
        await agent.stop_all()
        shutil.rmtree(state_root, ignore_errors=True)


def run_demo(cycles: int, scaledown_after: float) -> int:
    from activator.cli import asyncio_run

    async def main() -> int:
        try:
            await _demo(cycles, scaledown_after)
        except DemoFailed as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            return 1
        return 0

    return asyncio_run(main())
