"""An app that ends a relayed connection before answering: the client is told.

The client gets what it would get from the app itself, at once (the app's FIN
as a FIN, its reset as a reset), never silence, and the activator logs a
warning naming the connection. Both for a connection relayed to a running app
and for one held while the app was brought back.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest

from activator.lifecycle import Phase

from . import fakepod
from .fakepod import Harness, run, until

# Reads a request, then closes without a byte of answer: with a FIN, or with
# a reset (SO_LINGER 0).
ENDS_EARLY_APP = """
import socket, struct, sys
RESET = {reset}
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = srv.accept()
    data = b""
    while b"\\r\\n\\r\\n" not in data and (chunk := conn.recv(4096)):
        data += chunk
    if RESET:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
"""
REQUEST = b"GET /state HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n"


async def ask(port: int) -> bytes | OSError:
    """What the client gets: the bytes up to EOF, or the error reading them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    try:
        # A client left waiting (neither data, FIN nor reset) fails here.
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionError as exc:
        return exc
    finally:
        writer.close()


@pytest.mark.parametrize("held", [False, True], ids=["running", "held-for-a-wake"])
@pytest.mark.parametrize("ending", ["fin", "reset"])
def test_an_app_that_ends_the_connection_unanswered_ends_the_clients_with_a_warning(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    held: bool,
    ending: str,
) -> None:
    app = f"ends-early-{ending}"
    monkeypatch.setitem(fakepod.APPS, app, ENDS_EARLY_APP.format(reset=ending == "reset"))
    caplog.set_level(logging.WARNING, "activator.proxy")

    async def scenario(h: Harness) -> None:
        if held:
            await until(lambda: h.pod.lifecycle.phase is Phase.SCALED_DOWN)
        else:
            await until(lambda: h.pod.lifecycle.phase is Phase.RUNNING)
        got = await ask(h.shadow_port)
        if ending == "fin":
            assert got == b"", f"the app's FIN did not reach the client: {got!r}"
        else:
            assert isinstance(got, ConnectionResetError), f"no reset for the client: {got!r}"
        assert ("restoring" in h.reports.events) == held

    run(tmp_path, scenario, app=app, scaledown_after=0.3 if held else 60)
    how = "closed the connection" if ending == "fin" else r"reset the connection \(.+\)"
    warning = (
        rf"connection \d+ on port \d+ from 127\.0\.0\.1:\d+: the app {how} before answering "
        rf"\({len(REQUEST)} bytes relayed to it\); the client gets "
        + ("a FIN" if ending == "fin" else "a reset")
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(re.fullmatch(warning, w) for w in warnings), warnings


def test_a_client_that_leaves_without_a_request_is_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "activator.proxy")

    async def scenario(h: Harness) -> None:
        await until(lambda: h.pod.lifecycle.phase is Phase.RUNNING)
        reader, writer = await asyncio.open_connection("127.0.0.1", h.shadow_port)
        # Silent past the probe wait: real traffic, relayed to the app.
        await until(lambda: h.pod.lifecycle.open_connections)
        writer.write_eof()
        # The app answers the client's FIN with its own, which reaches the client.
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()

    run(tmp_path, scenario, scaledown_after=60)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert not warnings, warnings
