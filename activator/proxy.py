"""The TCP side: accept on the shadow ports, hold, and relay to the app.

A client connection is accepted at once and its reading paused, so whatever it
sends waits in the kernel while the app is brought back. `ClientConnection`s
are created by the listener; the pod driver tells the lifecycle about them and
later calls `forward()`, `answer()` or `refuse()` as the lifecycle commands.

Connections from a probe source are first sniffed (see probes.py): a probe is
reported as one (`probe_opened`), never as activity.

A relayed connection that moves bulk data leaves the event loop: both sockets
go to the splice relay (see splice.py), which copies inside the kernel and
keeps the same accounting; its end comes back as `connection_lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address
from typing import Protocol, cast

from activator import grpc_health, probes, splice

log = logging.getLogger(__name__)

_conn_ids = itertools.count(1)
# How long a client answered in the app's place may take to close.
DRAIN_TIMEOUT = 5.0
# A read this big means a sender is ahead of us (bulk data): the connection
# goes to the splice relay, for good. Connections that only exchange small
# requests and answers stay in the event loop, where those are faster.
BULK_READ = 64 * 1024


class SocketMaker(Protocol):
    """Makes sockets inside the pod's network namespace."""

    async def socket(self) -> socket.socket: ...


class ConnectionEvents(Protocol):
    def connection_opened(self, conn: ClientConnection) -> None: ...

    def probe_opened(self, conn: ClientConnection) -> None: ...

    def probe_answered(
        self, conn: ClientConnection, probe: probes.Verdict, status: int
    ) -> None: ...

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
        self.client_side().splice_if_bulk()

    def client_side(self) -> ClientConnection:
        raise NotImplementedError

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
        self.answer_head = bytearray()  # the app's first bytes to a gRPC probe

    def client_side(self) -> ClientConnection:
        return self.client

    def data_received(self, data: bytes) -> None:
        client = self.client
        client.last_activity = time.monotonic()
        client.awaiting_response = False
        client.bytes_to_client += len(data)
        if client.first_byte_at is None:
            client.first_byte_at = client.last_activity
            client.events.first_byte(client)
        if client.probe is not None:
            self._learn_probe_answer(data)
        super().data_received(data)
        client.relayed_read(len(data))

    def eof_received(self) -> bool:
        # The app's FIN goes on to the client after whatever came before it
        # (a half close: the client may still send). After the client's own
        # FIN it is only the app's reply to it (a client that connected and
        # left without a request, as load balancers' TCP checks do).
        if self.client.first_byte_at is None and not self.client.eof:
            self.client.app_ended_unanswered("closed the connection", "a FIN")
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        client = self.client
        if exc is not None and client.first_byte_at is None and not client.closed:
            # Reset by the app before a byte of answer: the client gets a reset
            # too, which it cannot take for an (empty) answer.
            self.closed = True
            client.app_ended_unanswered(f"reset the connection ({exc})", "a reset")
            if client.transport is not None:
                reset(client.transport)
            return
        super().connection_lost(exc)

    def _learn_probe_answer(self, data: bytes) -> None:
        """Remember what the app answered a probe (it is answered for it later)."""
        probe = self.client.probe
        assert probe is not None
        if probe.grpc is None:
            status = probes.response_status(data)
        else:
            self.answer_head += data
            status = grpc_health.grpc_serving_status(bytes(self.answer_head))
            if status is None and len(self.answer_head) < grpc_health.MAX_HEAD:
                return
        self.client.probe = None  # learnt (or not to be learnt): stop looking
        if status is not None:
            self.client.events.probe_answered(self.client, probe, status)


@dataclass(frozen=True)
class ProbeDetection:
    sources: tuple[IPv4Network, ...]
    # How long a connection from a probe source may stay silent before it is
    # taken for real traffic (a client whose protocol has the server speak first).
    wait: float = 0.1

    def applies_to(self, peer: str) -> bool:
        address = ip_address(peer)
        return isinstance(address, IPv4Address) and any(address in net for net in self.sources)


class ClientConnection(_Side):
    """A client of the app, accepted on a shadow port."""

    def __init__(
        self, port: int, events: ConnectionEvents, probe_detection: ProbeDetection | None
    ) -> None:
        super().__init__()
        self.id = next(_conn_ids)
        self.port = port
        self.events = events
        self.probe_detection = probe_detection
        self.accepted_at = time.monotonic()
        self.last_activity = self.accepted_at
        self.awaiting_response = False  # the client spoke last: a request is in flight
        self.first_byte_at: float | None = None
        self.probe: probes.Verdict | None = None
        self.early_data: list[bytes] = []  # read before the app was connected
        self.bytes_to_app = 0
        self.bytes_to_client = 0
        self.http2_preface_sent = False
        self.draining = False
        self.bulk = False  # a bulk read was seen: splice once nothing is buffered
        self.relayed: splice.RelayedPair | None = None  # handed to the splice relay
        self.peer_address = "?"
        self._sniff_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_address = f"{peer[0]}:{peer[1]}"
        if self.probe_detection is not None and peer and self.probe_detection.applies_to(peer[0]):
            loop = asyncio.get_running_loop()
            self._sniff_timer = loop.call_later(
                self.probe_detection.wait, self._decide, probes.REAL
            )
            return  # keep reading: the first bytes say what this is
        self._decide(probes.REAL)

    def _decide(self, verdict: probes.Verdict) -> None:
        if self._sniff_timer is not None:
            self._sniff_timer.cancel()
            self._sniff_timer = None
        assert self.transport is not None
        if self.http2_preface_sent:
            # The client acknowledged our SETTINGS; the app must not see that.
            self.early_data = [grpc_health.drop_settings_ack(b"".join(self.early_data))]
        match verdict.kind:
            case probes.Kind.REAL:
                # Hold: what the client sends stays in the kernel until forwarded.
                self.transport.pause_reading()
                self.events.connection_opened(self)
            case probes.Kind.HTTP_PROBE | probes.Kind.GRPC_PROBE:
                self.transport.pause_reading()
                self.probe = verdict
                self.events.probe_opened(self)
            case probes.Kind.TCP_PROBE:
                # Connected and closed without a byte: answered by accepting.
                self.close()

    @property
    def sniffing(self) -> bool:
        return self._sniff_timer is not None

    def _sniff(self, eof: bool) -> None:
        head = b"".join(self.early_data)
        if not self.http2_preface_sent and head.startswith(grpc_health.CLIENT_PREFACE):
            # An HTTP/2 client (kubelet's gRPC prober) waits for the server's
            # SETTINGS before it sends its request.
            assert self.transport is not None
            self.transport.write(grpc_health.SERVER_PREFACE)
            self.http2_preface_sent = True
        verdict = probes.classify(head, eof, self.http2_preface_sent)
        if verdict is not None or eof:
            self._decide(verdict or probes.REAL)

    def data_received(self, data: bytes) -> None:
        if self.draining:
            return  # after answering in the app's place: read until the client closes
        self.last_activity = time.monotonic()
        self.awaiting_response = True
        if self.peer is None:
            # Before the app is connected (uvloop may deliver a first chunk
            # even after pause_reading in connection_made): keep it.
            self.early_data.append(data)
            if self.sniffing:
                self._sniff(eof=False)
            elif self.transport is not None:
                self.transport.pause_reading()
            return
        self.bytes_to_app += len(data)
        super().data_received(data)
        self.relayed_read(len(data))

    def client_side(self) -> ClientConnection:
        return self

    def relayed_read(self, size: int) -> None:
        if size >= BULK_READ:
            self.bulk = True
        if self.bulk:
            self.splice_if_bulk()

    def splice_if_bulk(self) -> None:
        """Hand a bulk connection to the splice relay once it is plain relaying:
        answered, not a probe, no half close, nothing buffered either way.
        (A slow reader keeps a buffer; it empties when writing resumes.)"""
        upstream = self.peer
        if (
            not self.bulk
            or self.first_byte_at is None
            or self.probe is not None
            or self.draining
            or self.eof
            or self.closed
            or upstream is None
            or upstream.eof
            or upstream.closed
            or self.transport is None
            or upstream.transport is None
            or self.transport.get_write_buffer_size()
            or upstream.transport.get_write_buffer_size()
        ):
            return
        # Duplicates: closing a transport then closes only its own descriptor
        # (no FIN, no reset) and takes it out of the event loop's epoll. The
        # relay may start before that: the loop cannot read or write meanwhile.
        dups: list[socket.socket] = []
        try:
            for transport in (self.transport, upstream.transport):
                dups.append(
                    socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
                )
            self.relayed = splice.relay().relay(dups[0], dups[1], self, self.connection_lost)
        except OSError as exc:  # out of descriptors, say: relaying goes on here
            for sock in dups:
                sock.close()
            self.bulk = False
            log.warning("connection %d: not spliced: %s", self.id, exc)
            return
        for side in (self, upstream):
            assert side.transport is not None
            side.transport.set_protocol(asyncio.Protocol())  # its end is no news
            side.transport.close()
            side.transport = None
        log.debug(
            "connection %d: spliced after %d bytes to the app and %d to the client",
            self.id,
            self.bytes_to_app,
            self.bytes_to_client,
        )

    def close(self) -> None:
        if self.relayed is not None:
            splice.relay().close(self.relayed)
            return
        super().close()

    def eof_received(self) -> bool:
        if self.sniffing:
            self.eof = True
            self._sniff(eof=True)
            return True
        if self.draining:
            return False  # close
        return super().eof_received()

    def answer(self, response: bytes) -> None:
        """Answer in the app's place (a probe while the app is not running)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(response)
        if self.probe is not None and self.probe.grpc is not None:
            # An HTTP/2 client still sends (acks, window updates): closing with
            # unread bytes would reset the connection and could lose the answer.
            self.draining = True
            transport.write_eof()
            transport.resume_reading()
            asyncio.get_running_loop().call_later(DRAIN_TIMEOUT, self.close)
        else:
            transport.close()

    def close_if_quiet(self, quiet_for: float, now: float) -> bool:
        """Close gracefully (FIN both ways) if nothing moved for `quiet_for`
        seconds and no request is waiting for its answer."""
        in_flight = (
            self.awaiting_response
            or (self.transport is not None and self.transport.get_write_buffer_size() > 0)
            or (self.relayed is not None and self.relayed.pending() > 0)
        )
        if in_flight or now - self.last_activity < quiet_for or self.peer is None:
            return False
        self.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._sniff_timer is not None:
            self._sniff_timer.cancel()
            self._sniff_timer = None
        if exc is not None and self.peer is not None:
            log.info(
                "connection %d on port %d from %s: lost (%s) after %d bytes to the app "
                "and %d to the client",
                self.id,
                self.port,
                self.peer_address,
                exc,
                self.bytes_to_app,
                self.bytes_to_client,
            )
        super().connection_lost(exc)
        self.events.connection_closed(self)

    async def forward(self, maker: SocketMaker, app_port: int, deadline: float) -> None:
        """Connect to the app on 127.0.0.1:`app_port` in the pod and relay.

        A cold-started app may not listen yet: retry a refused connect until
        `deadline` (monotonic seconds), then fail with a logged reason.
        """
        loop = asyncio.get_running_loop()
        delay = 0.002
        while True:
            if self.closed:
                return
            sock = await maker.socket()
            sock.setblocking(False)
            try:
                await connect(loop, sock, ("127.0.0.1", app_port))
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
        # Linked before connecting: a server-first app speaks at once.
        upstream.peer = self
        try:
            await loop.create_connection(lambda: upstream, sock=sock)
        except OSError as exc:
            sock.close()
            self.refuse(f"relay to the app failed: {exc}")
            return
        self.peer = upstream
        if self.closed or upstream.closed:  # either side ended while connecting
            upstream.close()
            return
        assert upstream.transport is not None
        log.debug(
            "connection %d relayed to the app (%d early bytes, eof %s)",
            self.id,
            sum(map(len, self.early_data)),
            self.eof,
        )
        for chunk in self.early_data:
            upstream.transport.write(chunk)
            self.bytes_to_app += len(chunk)
        self.early_data.clear()
        if self.eof:
            upstream.transport.write_eof()
        assert self.transport is not None
        self.transport.resume_reading()

    def app_ended_unanswered(self, how: str, client_gets: str) -> None:
        log.warning(
            "connection %d on port %d from %s: the app %s before answering "
            "(%d bytes relayed to it); the client gets %s",
            self.id,
            self.port,
            self.peer_address,
            how,
            self.bytes_to_app,
            client_gets,
        )

    def refuse(self, reason: str) -> None:
        log.warning("connection %d on port %d refused: %s", self.id, self.port, reason)
        if self.relayed is not None:
            splice.relay().close(self.relayed, reset=True)
        elif self.transport is not None:
            # A reset, not a FIN: the client must not mistake this for an answer.
            reset(self.transport)


async def connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, address: tuple[str, int]
) -> None:
    """Connect non-blocking `sock` to a numeric `address`. uvloop's sock_connect
    resolves the address first, even a numeric one: about 90 us of CPU per
    connection, most of what a new connection through the proxy cost."""
    error = sock.connect_ex(address)
    if error == errno.EINPROGRESS:
        writable = loop.create_future()
        loop.add_writer(sock, writable.set_result, None)
        try:
            await writable
        finally:
            loop.remove_writer(sock)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


def reset(transport: asyncio.Transport) -> None:
    """Close with a reset. abort() alone closes the socket, which sends a FIN
    unless bytes the client sent are still unread in the kernel."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class ShadowListener:
    """Listens on one shadow port inside the pod for one app port."""

    def __init__(
        self, app_port: int, events: ConnectionEvents, probe_detection: ProbeDetection | None
    ) -> None:
        self.app_port = app_port
        self.events = events
        self.probe_detection = probe_detection
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
            lambda: ClientConnection(self.app_port, self.events, self.probe_detection), sock=sock
        )

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
