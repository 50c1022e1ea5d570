"""The splice relay on loopback: bytes, accounting, half closes, resets, closes.

Each test relays between two real TCP connections: `client` talks to the
relay's client side, `app` to its app side, as the proxy's client and app
would. No root needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
import uvloop

from activator import splice


@dataclass
class Account:
    last_activity: float = 0.0
    awaiting_response: bool = False
    bytes_to_app: int = 0
    bytes_to_client: int = 0


@dataclass
class Relayed:
    client: socket.socket  # the client's end
    app: socket.socket  # the app's end
    pair: splice.RelayedPair
    account: Account
    ended: asyncio.Future[OSError | None]


def connected_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        outer = socket.create_connection(server.getsockname())
        inner, _ = server.accept()
    return outer, inner


def run(scenario: Callable[[Relayed], Awaitable[None]]) -> None:
    async def main() -> None:
        client, relay_client = connected_pair()
        app, relay_app = connected_pair()
        account = Account()
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[OSError | None] = loop.create_future()
        pair = splice.relay().relay(relay_client, relay_app, account, ended.set_result)
        r = Relayed(client, app, pair, account, ended)
        try:
            await scenario(r)
        finally:
            client.close()
            app.close()

    uvloop.run(main())


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    return await asyncio.to_thread(_recv_exactly, sock, size)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(20)
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(size - got, 1 << 20))
        assert chunk, f"end of file after {got} of {size} bytes"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


async def recv_to_eof(sock: socket.socket) -> bytes:
    def read() -> bytes:
        sock.settimeout(20)
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    return await asyncio.to_thread(read)


def test_bulk_both_ways_arrives_intact_and_is_counted() -> None:
    up = os.urandom(3 << 20)
    down = os.urandom(9 << 20)

    async def scenario(r: Relayed) -> None:
        sent_up = asyncio.to_thread(r.client.sendall, up)
        got_up = recv_exactly(r.app, len(up))
        _, got = await asyncio.gather(sent_up, got_up)
        assert hashlib.sha256(got).digest() == hashlib.sha256(up).digest()
        assert r.account.awaiting_response, "the client spoke last: a request is in flight"
        sent_down = asyncio.to_thread(r.app.sendall, down)
        _, got = await asyncio.gather(sent_down, recv_exactly(r.client, len(down)))
        assert hashlib.sha256(got).digest() == hashlib.sha256(down).digest()
        assert not r.account.awaiting_response, "answered"
        assert (r.account.bytes_to_app, r.account.bytes_to_client) == (len(up), len(down))
        assert r.account.last_activity > 0
        assert r.pair.pending() == 0
        assert not r.ended.done()

    run(scenario)


def test_a_half_close_goes_on_and_the_other_way_keeps_flowing() -> None:
    async def scenario(r: Relayed) -> None:
        r.client.sendall(b"request")
        r.client.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(r.app) == b"request"  # the client's FIN reached the app
        r.app.sendall(b"answer after the client's FIN")
        assert await recv_exactly(r.client, 29) == b"answer after the client's FIN"
        assert not r.ended.done(), "one way is still open"
        r.app.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(r.client) == b""
        assert await asyncio.wait_for(r.ended, 20) is None

    run(scenario)


def test_an_app_reset_ends_both_after_what_it_sent_is_delivered() -> None:
    async def scenario(r: Relayed) -> None:
        r.client.sendall(b"request")
        assert await recv_exactly(r.app, 7) == b"request"
        r.app.sendall(b"partial answer")
        r.app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        r.app.close()
        error = await asyncio.wait_for(r.ended, 20)
        assert isinstance(error, ConnectionResetError), error
        assert await recv_to_eof(r.client) == b"partial answer"

    run(scenario)


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "reset"])
def test_a_close_asked_for_ends_the_client_with_a_fin_or_a_reset(reset: bool) -> None:
    async def scenario(r: Relayed) -> None:
        r.client.sendall(b"ping")
        assert await recv_exactly(r.app, 4) == b"ping"
        splice.relay().close(r.pair, reset=reset)
        assert await asyncio.wait_for(r.ended, 20) is None
        assert await recv_to_eof(r.app) == b""  # the app always gets a FIN
        if reset:
            with pytest.raises(ConnectionResetError):
                await recv_to_eof(r.client)
        else:
            assert await recv_to_eof(r.client) == b""
        splice.relay().close(r.pair)  # a close after the end is nothing

    run(scenario)


def test_a_client_that_does_not_read_stops_the_app_not_memory() -> None:
    async def scenario(r: Relayed) -> None:
        r.app.setblocking(False)
        sent = 0
        chunk = b"x" * 65536
        # The app writes until its socket is full: the relay holds at most a
        # pipe's worth plus what the kernel buffers, and then stops reading.
        for _ in range(100_000):
            try:
                sent += r.app.send(chunk)
            except BlockingIOError:
                await asyncio.sleep(0.05)
                try:
                    sent += r.app.send(chunk)
                except BlockingIOError:
                    break
        else:
            pytest.fail(f"the app could write {sent} bytes to a client that reads none")
        got = await recv_exactly(r.client, sent)
        assert got == b"x" * sent
        assert r.account.bytes_to_client == sent

    run(scenario)
