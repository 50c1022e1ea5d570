"""Bulk connections through the proxy go to the splice relay and keep their
accounting: the pod sees them open while they are, closed when they end,
quiet ones are closed only with no request in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from activator.lifecycle import Phase

from . import fakepod
from .fakepod import Harness, run, until

IDLE = 0.3

# Echoes what it reads; a read of exactly b"slow" is echoed after 4 x IDLE.
ECHO_APP = """
import socket, sys, threading, time
def serve(conn):
    while data := conn.recv(1 << 20):
        if data == b"slow":
            time.sleep(1.2)
        conn.sendall(data)
    conn.close()
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


async def echo_bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> None:
    data = os.urandom(size)
    writer.write(data)
    got = await asyncio.wait_for(reader.readexactly(size), 30)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def spliced(h: Harness) -> bool:
    return any(conn.relayed is not None for conn in h.pod.connections.values())


def test_a_bulk_connection_is_spliced_and_its_end_reaches_the_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(fakepod.APPS, "echo", ECHO_APP)

    async def scenario(h: Harness) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.shadow_port)
        await echo_bulk(reader, writer, 8 << 20)
        assert spliced(h), "8 MiB each way stayed in the event loop"
        # Small exchanges go on through the relay, on the same connection.
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        (conn,) = h.pod.connections.values()
        assert (conn.bytes_to_app, conn.bytes_to_client) == ((8 << 20) + 4, (8 << 20) + 4)
        await asyncio.sleep(4 * IDLE)
        assert h.pod.lifecycle.phase is Phase.RUNNING, "scaled down under an open connection"
        # The client's FIN goes to the app, whose FIN ends the connection.
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        await until(lambda: not h.pod.connections, timeout=10)
        await until(lambda: h.pod.lifecycle.phase is Phase.SCALED_DOWN, timeout=10)

    run(tmp_path, scenario, app="echo", scaledown_after=IDLE, probe_detection=False)


def test_a_quiet_spliced_connection_is_closed_but_never_with_a_request_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(fakepod.APPS, "echo", ECHO_APP)

    async def scenario(h: Harness) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.shadow_port)
        await echo_bulk(reader, writer, 4 << 20)
        assert spliced(h)
        # The app takes four times the quiet time to answer: in flight.
        writer.write(b"slow")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"slow"
        # Once answered and quiet, it is closed with a FIN, and the pod scales down.
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        await until(lambda: h.pod.lifecycle.phase is Phase.SCALED_DOWN, timeout=10)

    run(
        tmp_path,
        scenario,
        app="echo",
        scaledown_after=IDLE,
        close_idle_after=IDLE,
        probe_detection=False,
    )
