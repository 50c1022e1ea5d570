"""The sidecar's end of a holder's control socket (the holder: holder/holder.c).

The holder is the first process of an app container; the app is its child.
Through it the sidecar learns the app's pid and its end, starts it cold, and
runs CRIU inside the container (as the holder's child, so a restored app is
the holder's child again). One request at a time; the holder's "exited"
messages can arrive between a request and its reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


class HolderError(Exception):
    pass


class Holder:
    def __init__(self, path: Path, on_exit: Callable[[int, int], None]) -> None:
        self.path = path
        self.on_exit = on_exit  # (pid, wait status) of the app's root
        self._sock: socket.socket | None = None
        self._reply: asyncio.Future[list[str]] | None = None
        self._one_at_a_time = asyncio.Lock()
        self.closed = asyncio.Event()
        self.pid: int | None = None  # the holder's, from the socket's credentials

    async def connect(self, timeout: float) -> None:
        """Connect, waiting up to `timeout` for the holder to listen (its
        container may start after us)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if loop.time() > deadline:
                    raise HolderError(
                        f"no holder listens on {self.path} after {timeout:.0f} s: is the "
                        "app container's command the holder (see `activator inject`)?"
                    ) from exc
                await asyncio.sleep(0.1)
        sock.setblocking(False)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid = struct.unpack("3i", creds)[0]
        self._sock = sock
        self.closed.clear()
        loop.add_reader(sock.fileno(), self._readable)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _readable(self) -> None:
        assert self._sock is not None
        try:
            message = self._sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            message = b""
        if not message:
            self._lost()
            return
        fields = message.decode(errors="replace").split()
        if fields[:1] == ["exited"] and len(fields) == 3:
            self.on_exit(int(fields[1]), int(fields[2]))
        elif self._reply is not None and not self._reply.done():
            self._reply.set_result(fields)
        else:
            log.warning("holder %s: unexpected message %r", self.path, message)

    def _lost(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(HolderError(f"holder {self.path} went away"))
        self.closed.set()

    async def request(self, *fields: str, fds: Sequence[int] = ()) -> list[str]:
        async with self._one_at_a_time:
            if self._sock is None:
                raise HolderError(f"not connected to the holder {self.path}")
            self._reply = asyncio.get_running_loop().create_future()
            message = "\0".join(fields).encode()
            socket.send_fds(self._sock, [message], list(fds))
            reply = await self._reply
            if reply[:1] == ["error"]:
                raise HolderError(f"holder {self.path}: {' '.join(reply[1:])}")
            return reply

    async def manage(self) -> int | None:
        """From now on the holder leaves the app's end to us; the app's pid."""
        return _pid(await self.request("manage"))

    async def start(self) -> int:
        pid = _pid(await self.request("start"))
        if pid is None:
            raise HolderError(f"holder {self.path} could not start the app (see its log)")
        return pid

    async def execute(self, argv: Sequence[str], fds: Sequence[int]) -> int:
        """Run `argv` as the holder's child, with `fds` at the same numbers; its pid."""
        pid = _pid(await self.request("exec", ",".join(map(str, fds)), *argv, fds=fds))
        if pid is None:
            raise HolderError(f"holder {self.path} could not run {argv[0]}")
        return pid

    async def adopt(self, pid: int) -> None:
        """`pid` is the app now (CRIU restored it as the holder's child)."""
        await self.request("adopt", str(pid))

    async def release(self) -> None:
        """The holder is a plain init again: the app's next exit ends it."""
        with contextlib.suppress(HolderError):
            await self.request("release")

    async def exit(self, status: int) -> None:
        """The app really ended: the holder ends its container with `status`."""
        async with self._one_at_a_time:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.send(f"exit\0{status}".encode())

    def close(self) -> None:
        self._lost()


def _pid(reply: list[str]) -> int | None:
    if len(reply) != 2 or not reply[1].isdigit():
        raise HolderError(f"unexpected reply from the holder: {' '.join(reply)}")
    return int(reply[1]) or None
