"""The TCP side: accept on the shadow ports, hold, and relay to the app.

A client connection is accepted at once and its reading paused, so whatever it
sends waits in the kernel while the app is brought back. `ClientConnection`s
are created by the listener; the pod driver tells the lifecycle about them and
later calls `forward()` or `refuse()` as the lifecycle commands.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from typing import Protocol, cast

log = logging.getLogger(__name__)

_conn_ids = itertools.count(1)


class SocketMaker(Protocol):
    """Makes sockets inside the pod's network namespace."""

    async def socket(self) -> socket.socket: ...


class ConnectionEvents(Protocol):
    def connection_opened(self, conn: ClientConnection) -> None: ...

    def connection_closed(self, conn: ClientConnection) -> None: ...

    def first_byte(self, conn: ClientConnection) -> None: ...


class _Side(asyncio.Protocol):
    """One end of a relay: what it reads it writes to its peer, with backpressure."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.eof = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer is not None and peer.eof:
            self.close()
            return False
        return True  # keep the other direction open (half close)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None:
            self.peer.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        peer = self.peer.transport if self.peer is not None else None
        if peer is not None and not peer.is_closing():
            peer.close()


class _Upstream(_Side):
    def __init__(self, client: ClientConnection) -> None:
        super().__init__()
        self.client = client

    def data_received(self, data: bytes) -> None:
        if self.client.first_byte_at is None:
            self.client.first_byte_at = time.monotonic()
            self.client.events.first_byte(self.client)
        super().data_received(data)


class ClientConnection(_Side):
    """A client of the app, accepted on a shadow port."""

    def __init__(self, port: int, events: ConnectionEvents) -> None:
        super().__init__()
        self.id = next(_conn_ids)
        self.port = port
        self.events = events
        self.accepted_at = time.monotonic()
        self.first_byte_at: float | None = None
        self.forwarded = False
        self.early_data: list[bytes] = []  # read before the app was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Hold: whatever the client sends stays in the kernel until forwarded.
        # (uvloop may already have read a first chunk: see data_received.)
        assert self.transport is not None
        self.transport.pause_reading()
        self.events.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early_data.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.events.connection_closed(self)

    async def forward(self, maker: SocketMaker, app_port: int, deadline: float) -> None:
        """Connect to the app on 127.0.0.1:`app_port` in the pod and relay.

        A cold-started app may not listen yet: retry a refused connect until
        `deadline` (monotonic seconds), then fail with a logged reason.
        """
        self.forwarded = True
        loop = asyncio.get_running_loop()
        delay = 0.002
        while True:
            if self.closed:
                return
            sock = await maker.socket()
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, ("127.0.0.1", app_port))
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() + delay > deadline:
                    self.refuse(f"the app does not accept on port {app_port}: {exc.strerror}")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream = _Upstream(self)
        try:
            await loop.create_connection(lambda: upstream, sock=sock)
        except OSError as exc:
            sock.close()
            self.refuse(f"relay to the app failed: {exc}")
            return
        upstream.peer, self.peer = self, upstream
        if self.closed:
            upstream.close()
            return
        assert upstream.transport is not None
        for chunk in self.early_data:
            upstream.transport.write(chunk)
        self.early_data.clear()
        if self.eof:
            upstream.transport.write_eof()
        assert self.transport is not None
        self.transport.resume_reading()

    def refuse(self, reason: str) -> None:
        log.warning("connection %d on port %d refused: %s", self.id, self.port, reason)
        if self.transport is not None:
            # A reset, not a FIN: the client must not mistake this for an answer.
            self.transport.abort()


class ShadowListener:
    """Listens on one shadow port inside the pod for one app port."""

    def __init__(self, app_port: int, events: ConnectionEvents) -> None:
        self.app_port = app_port
        self.events = events
        self.server: asyncio.AbstractServer | None = None
        self.shadow_port = 0

    async def start(self, maker: SocketMaker) -> None:
        sock = await maker.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 0))
        sock.listen(1024)
        sock.setblocking(False)
        self.shadow_port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: ClientConnection(self.app_port, self.events), sock=sock
        )

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
