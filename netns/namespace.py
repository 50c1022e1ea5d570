"""Run code inside a network namespace without moving the whole process.

setns(CLONE_NEWNET) switches only the calling thread, so a NetnsThread runs
whatever is submitted to it on a worker thread that enters the namespace for
each call and leaves it afterwards (two setns, about 2 us). The worker is
the NetnsThread's own, or a NetnsWorker shared by many: one thread for all
of an activator's pods instead of one each (~30 KiB of stack and thread
state per pod). Everything that binds to a namespace at creation time is
created there: sockets (a socket stays in the namespace it was made in, so
the event loop can serve it from any thread), netlink sockets of pyroute2
and libnftables contexts.
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

__all__ = ["NamespaceError", "NetnsThread", "NetnsWorker", "ns_inode"]

P = ParamSpec("P")
T = TypeVar("T")

# How long the constructor waits for the thread to enter the namespace; a
# setns either succeeds or fails at once, so this only guards a wedged host.
_ENTER_TIMEOUT = 10.0


def ns_inode(path: str | os.PathLike[str]) -> int:
    """The inode of a namespace file: what CRIU names as `external net[INODE]`."""
    try:
        return os.stat(path).st_ino
    except OSError as exc:
        raise NamespaceError(
            f"cannot stat namespace file {os.fspath(path)}: {exc.strerror}; "
            "is the pod (or the process owning /proc/PID/ns/...) still there?"
        ) from exc


_Work = tuple["NetnsThread | None", Callable[[], Any], "concurrent.futures.Future[Any]"]


class NetnsWorker:
    """One daemon thread serving NetnsThreads, each call in its caller's namespace.

    Calls are served one at a time, in submission order. Between calls the
    thread is back in the namespace it started in, so it never keeps a
    removed pod's namespace alive.
    """

    def __init__(self, name: str = "netns") -> None:
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self.serving: NetnsThread | None = None  # whose call runs now
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def put(self, work: _Work | None) -> None:
        """Queue work; None ends the thread once it gets there."""
        self._queue.put(work)

    def stop(self) -> None:
        """End the thread after the work already queued (waiting for it to end)."""
        self.put(None)
        if not self.on_thread():
            self._thread.join()

    def _run(self) -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            while (work := self._queue.get()) is not None:
                owner, thunk, future = work
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    if owner is None:
                        result = thunk()
                    else:
                        owner._enter()
                        self.serving = owner
                        try:
                            result = thunk()
                        finally:
                            self.serving = None
                            _libc.setns(home, _libc.CLONE_NEWNET)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
        finally:
            os.close(home)


class NetnsThread:
    """Runs calls in the network namespace at `path`, on a worker thread.

    The worker is `worker` if given (shared; it outlives this object), else
    one of its own, ended by close(). The constructor returns only once a
    call has run inside the namespace and raises NamespaceError (naming the
    path) if it cannot get there. Calls are served one at a time, in
    submission order.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        worker: NetnsWorker | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NamespaceError(
                f"cannot open network namespace {self.path}: {exc.strerror}; "
                "check the pod exists (ip netns list) and the path is right"
            ) from exc
        self._own_worker = worker is None
        self._worker = worker or NetnsWorker(name or f"netns:{os.path.basename(self.path)}")
        try:
            self.submit(lambda: None).result(timeout=_ENTER_TIMEOUT)
        except NamespaceError:
            self.close()
            raise
        except concurrent.futures.TimeoutError as exc:
            # Not waited for: a thread stuck in setns would hang us too; it is
            # a daemon and gets to the rest of its queue if it ever comes back.
            with self._lock:
                self._closed = True
                self._worker.put((None, lambda: os.close(self._fd), concurrent.futures.Future()))
                if self._own_worker:
                    self._worker.put(None)
            raise NamespaceError(
                f"thread did not enter network namespace {self.path} within {_ENTER_TIMEOUT:.0f}s"
            ) from exc

    def _enter(self) -> None:
        """On the worker: move it into this namespace."""
        try:
            _libc.setns(self._fd, _libc.CLONE_NEWNET)
        except OSError as exc:
            raise NamespaceError(
                f"cannot enter network namespace {self.path}: {os.strerror(exc.errno or 0)}"
                "; it must be a net namespace file (/run/netns/NAME or "
                "/proc/PID/ns/net) and entering needs CAP_SYS_ADMIN"
            ) from exc

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        """Queue fn(*args, **kwargs) for the namespace; return its future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            # Checked under the lock so nothing is queued behind the work that
            # close() queues, which closes the namespace's fd.
            if self._closed:
                raise NamespaceError(f"NetnsThread for {self.path} is closed")
            self._worker.put((self, lambda: fn(*args, **kwargs), future))
        return future

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run fn inside the namespace, wait, and return its result or raise its error."""
        if self._worker.on_thread():
            if self._worker.serving is not self:
                # Queueing would wait on ourselves forever.
                raise NamespaceError(
                    f"call for {self.path} made from a call of another namespace's "
                    "on their shared worker thread"
                )
            return fn(*args, **kwargs)  # already inside
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
        """Release the namespace after the work already queued. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            closed: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._worker.put((None, lambda: os.close(self._fd), closed))
        if self._own_worker:
            self._worker.stop()
        elif not self._worker.on_thread():
            closed.result()

    def __enter__(self) -> NetnsThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<NetnsThread {self.path} {state}>"
