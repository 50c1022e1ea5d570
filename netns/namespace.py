"""Run code inside a network namespace without moving the whole process.

setns(CLONE_NEWNET) switches only the calling thread, so a NetnsThread owns
one dedicated daemon thread that enters the namespace once and then runs
whatever is submitted to it. Everything that binds to a namespace at
creation time is created there: sockets (a socket stays in the namespace it
was made in, so the event loop can serve it from any thread), netlink
sockets of pyroute2 and libnftables contexts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import socket as _socket
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from netns import _libc
from netns.errors import NamespaceError

__all__ = ["NamespaceError", "NetnsThread", "ns_inode"]

P = ParamSpec("P")
T = TypeVar("T")

# How long the constructor waits for the thread to enter the namespace; a
# setns either succeeds or fails at once, so this only guards a wedged host.
_ENTER_TIMEOUT = 10.0

_Work = tuple[Callable[[], Any], "concurrent.futures.Future[Any]"]


def ns_inode(path: str | os.PathLike[str]) -> int:
    """The inode of a namespace file: what CRIU names as `external net[INODE]`."""
    try:
        return os.stat(path).st_ino
    except OSError as exc:
        raise NamespaceError(
            f"cannot stat namespace file {os.fspath(path)}: {exc.strerror}; "
            "is the pod (or the process owning /proc/PID/ns/...) still there?"
        ) from exc


class NetnsThread:
    """One thread living in the network namespace at `path`.

    The constructor returns only once the thread is inside the namespace and
    raises NamespaceError (naming the path) if it cannot get there. Calls are
    served one at a time, in submission order.
    """

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None) -> None:
        self.path = os.fspath(path)
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        entered: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run,
            args=(entered,),
            name=name or f"netns:{os.path.basename(self.path)}",
            daemon=True,
        )
        self._thread.start()
        try:
            entered.result(timeout=_ENTER_TIMEOUT)
        except NamespaceError:
            self._closed = True
            self._thread.join()
            raise
        except concurrent.futures.TimeoutError as exc:
            # Not joined: a thread stuck in setns would hang us too; it is a
            # daemon and exits at the sentinel if it ever gets there.
            with self._lock:
                self._closed = True
                self._queue.put(None)
            raise NamespaceError(
                f"thread did not enter network namespace {self.path} within {_ENTER_TIMEOUT:.0f}s"
            ) from exc

    def _run(self, entered: concurrent.futures.Future[None]) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            entered.set_exception(
                NamespaceError(
                    f"cannot open network namespace {self.path}: {exc.strerror}; "
                    "check the pod exists (ip netns list) and the path is right"
                )
            )
            return
        try:
            _libc.setns(fd, _libc.CLONE_NEWNET)
        except OSError as exc:
            entered.set_exception(
                NamespaceError(
                    f"cannot enter network namespace {self.path}: {os.strerror(exc.errno or 0)}"
                    "; it must be a net namespace file (/run/netns/NAME or "
                    "/proc/PID/ns/net) and entering needs CAP_SYS_ADMIN"
                )
            )
            return
        finally:
            os.close(fd)
        entered.set_result(None)
        while (item := self._queue.get()) is not None:
            thunk, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = thunk()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        """Queue fn(*args, **kwargs) on the namespace thread; return its future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            # Checked under the lock so nothing is queued behind the sentinel
            # that close() puts, where it would never run.
            if self._closed:
                raise NamespaceError(f"NetnsThread for {self.path} is closed")
            self._queue.put((lambda: fn(*args, **kwargs), future))
        return future

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run fn inside the namespace, wait, and return its result or raise its error."""
        if threading.current_thread() is self._thread:
            # Already inside: queueing would wait on ourselves forever.
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    async def acall(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Like call(), for asyncio/uvloop code: awaits without blocking the loop."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def socket(
        self,
        family: int = _socket.AF_INET,
        type: int = _socket.SOCK_STREAM,
        proto: int = 0,
    ) -> _socket.socket:
        """A new socket that belongs to this namespace, usable from any thread."""
        return self.call(_socket.socket, family, type, proto)

    def close(self) -> None:
        """Stop the thread after the work already queued. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> NetnsThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<NetnsThread {self.path} {state}>"
