"""Zero-copy relay of established connections: one thread, epoll, os.splice.

Once a client connection is relayed to the app and moving bulk data, the proxy
hands both sockets over (duplicates of their descriptors, the event loop's
transports closed without a FIN) to the one relay thread of the process. The
bytes then go socket -> pipe -> socket inside the kernel, one pipe per
direction, and never reach Python.

The thread keeps the connection's activity accounting as the event loop did
(`Accounting`): byte counts, `last_activity`, `awaiting_response` (the client
spoke last). These are plain attribute writes of ints, floats and bools, each
atomic under the GIL; the event loop only reads them (to close quiet
connections), so no lock is needed. Everything else crosses threads
explicitly: the loop asks for a start or a close through a queue and an
eventfd; the end of a connection goes back to the loop with
`call_soon_threadsafe`. The thread alone watches, reads, writes and closes the
descriptors it was given.

Backpressure: a direction reads from its source only what its pipe can take,
and only writes what the pipe holds. It is pumped until its source has nothing
(EAGAIN) or its destination takes nothing (EAGAIN); then it waits, edge-
triggered, for its source to be readable or for its destination to be
writable, and only for that: a source whose destination is full is not
watched, or every segment arriving on it would wake the thread for nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

# Bigger pipes mean fewer trips through Python per byte; the kernel may refuse
# (a user's total of pipe pages is capped without CAP_SYS_RESOURCE), and then
# the default size serves.
PIPE_SIZE = 1 << 20
_READABLE = select.EPOLLIN | select.EPOLLRDHUP
_ENDED = select.EPOLLHUP | select.EPOLLERR  # reported whatever is watched
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class Accounting(Protocol):
    """What the relay keeps up to date for a connection (see the module doc)."""

    last_activity: float
    awaiting_response: bool
    bytes_to_app: int
    bytes_to_client: int


class _Direction:
    """One way of a pair: source socket -> pipe -> destination socket."""

    __slots__ = (
        "blocked",
        "dst",
        "eof",
        "error",
        "pending",
        "pipe_r",
        "pipe_w",
        "room",
        "shut",
        "src",
        "src_events",
        "to_client",
    )

    def __init__(self, src: int, dst: int, to_client: bool) -> None:
        self.src = src
        self.dst = dst
        self.to_client = to_client
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.room = fcntl.fcntl(self.pipe_w, fcntl.F_GETPIPE_SZ)
        self.pending = 0  # bytes in the pipe
        self.eof = False  # the source is done (end of file, or an error)
        self.shut = False  # the destination got our FIN
        self.error: OSError | None = None  # why the source ended, if not a FIN
        self.blocked = False  # the destination took nothing: wait until writable
        self.src_events = _READABLE | select.EPOLLET  # watched on the source socket

    def close(self) -> None:
        os.close(self.pipe_r)
        os.close(self.pipe_w)


class RelayedPair:
    """A client connection and its connection to the app, relayed by the thread."""

    def __init__(
        self,
        client: socket.socket,
        app: socket.socket,
        account: Accounting,
        ended: Callable[[OSError | None], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.client = client
        self.app = app
        self.client_fd = client_fd = client.fileno()
        app_fd = app.fileno()
        self.account = account
        self.ended = ended
        self.loop = loop
        self.to_app = _Direction(client_fd, app_fd, to_client=False)
        try:
            self.to_client = _Direction(app_fd, client_fd, to_client=True)
        except OSError:
            self.to_app.close()
            raise
        self.done = False

    def pending(self) -> int:
        """Bytes read from one side and not yet written to the other."""
        return self.to_app.pending + self.to_client.pending


class SpliceRelay:
    """The relay thread and the pairs it serves."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._pairs: dict[int, RelayedPair] = {}  # by either socket's descriptor
        self._asked: collections.deque[Callable[[], None]] = collections.deque()
        self._thread = threading.Thread(target=self._run, name="splice-relay", daemon=True)
        self._thread.start()

    def relay(
        self,
        client: socket.socket,
        app: socket.socket,
        account: Accounting,
        ended: Callable[[OSError | None], None],
    ) -> RelayedPair:
        """Relay between two connected sockets, which the relay now owns.

        `ended(error)` is called on the calling thread's event loop once both
        descriptors are closed: after a FIN each way, a close asked for, or an
        error (a reset, for one)."""
        client.setblocking(False)
        app.setblocking(False)
        pair = RelayedPair(client, app, account, ended, asyncio.get_running_loop())
        self._ask(lambda: self._start(pair))
        return pair

    def close(self, pair: RelayedPair, reset: bool = False) -> None:
        """Close both sockets: with a FIN, or the client's with a reset."""
        self._ask(lambda: self._close(pair, reset))

    def _ask(self, action: Callable[[], None]) -> None:
        self._asked.append(action)
        os.eventfd_write(self._wake, 1)

    def _run(self) -> None:
        poll = self._epoll.poll
        pairs = self._pairs
        while True:
            for fd, events in poll():
                if fd == self._wake:
                    self._do_asked()
                    continue
                pair = pairs.get(fd)
                if pair is None:
                    continue  # ended earlier in this batch
                if fd == pair.client_fd:
                    reading, writing = pair.to_app, pair.to_client
                else:
                    reading, writing = pair.to_client, pair.to_app
                try:
                    if writing.blocked and events & (select.EPOLLOUT | _ENDED):
                        writing.blocked = False
                        self._pump(pair, writing)
                    if events & (_READABLE | _ENDED) and not (
                        reading.eof or reading.blocked or pair.done
                    ):
                        self._pump(pair, reading)
                    if not pair.done:
                        self._watch(pair)
                except Exception as exc:  # a bug here must not end every other relay
                    log.exception("splice relay: connection failed")
                    self._end(pair, OSError(errno.EIO, f"relay failed: {exc!r}"))

    def _do_asked(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        while self._asked:
            try:
                self._asked.popleft()()
            except Exception:  # a bug here must not end the thread
                log.exception("splice relay: a start or close failed")

    def _start(self, pair: RelayedPair) -> None:
        try:
            for sock, d in ((pair.client, pair.to_app), (pair.app, pair.to_client)):
                # Edge-triggered: what is already readable is reported at once.
                self._epoll.register(sock, d.src_events)
                self._pairs[sock.fileno()] = pair
        except OSError as exc:
            self._end(pair, exc)

    def _close(self, pair: RelayedPair, reset: bool) -> None:
        if pair.done:
            return
        if reset:
            with contextlib.suppress(OSError):
                linger = struct.pack("ii", 1, 0)
                pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        self._end(pair, None)

    def _pump(self, pair: RelayedPair, d: _Direction) -> None:
        """Move what can move one way, until blocked on both ends."""
        account = pair.account
        while True:
            moved = False
            if not d.eof and d.pending < d.room:
                try:
                    n = os.splice(d.src, d.pipe_w, d.room - d.pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    d.eof, d.error = True, exc
                else:
                    if n == 0:
                        d.eof = True
                    else:
                        d.pending += n
                        moved = True
                        account.last_activity = time.monotonic()
                        if d.to_client:
                            account.bytes_to_client += n
                            account.awaiting_response = False
                        else:
                            account.bytes_to_app += n
                            account.awaiting_response = True
            if d.pending:
                try:
                    n = os.splice(d.pipe_r, d.dst, d.pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    d.blocked = True  # until the destination is writable again
                    return
                except OSError as exc:
                    self._end(pair, exc)  # nowhere to write to
                    return
                d.pending -= n
                moved = True
            if not moved:
                break
        if d.eof and not d.pending:
            if d.error is not None:
                # The source was reset (after what it sent was delivered): both end.
                self._end(pair, d.error)
            elif not d.shut:
                d.shut = True
                with contextlib.suppress(OSError):
                    # The half close goes on.
                    (pair.app if d is pair.to_app else pair.client).shutdown(socket.SHUT_WR)
                if pair.to_app.shut and pair.to_client.shut:
                    self._end(pair, None)

    def _watch(self, pair: RelayedPair) -> None:
        """Watch each socket for what its directions wait for, and only that."""
        for d, other in ((pair.to_app, pair.to_client), (pair.to_client, pair.to_app)):
            events = select.EPOLLET
            if not (d.eof or d.blocked):
                events |= _READABLE
            if other.blocked:  # other.dst is d.src
                events |= select.EPOLLOUT
            if events != d.src_events:
                d.src_events = events
                self._epoll.modify(d.src, events)

    def _end(self, pair: RelayedPair, error: OSError | None) -> None:
        if pair.done:
            return
        pair.done = True
        for sock in (pair.client, pair.app):
            if self._pairs.pop(sock.fileno(), None) is pair:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(sock)
            sock.close()
        pair.to_app.close()
        pair.to_client.close()
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to tell
            pair.loop.call_soon_threadsafe(pair.ended, error)


_relay: SpliceRelay | None = None
_relay_lock = threading.Lock()


def relay() -> SpliceRelay:
    """The process's relay thread, started on first use."""
    global _relay
    with _relay_lock:
        if _relay is None:
            _relay = SpliceRelay()
        return _relay
