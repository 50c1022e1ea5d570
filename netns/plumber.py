"""The netlink helper: a short-lived process that does a pod network's netlink work.

A long-lived activator must stay small, and pyroute2 (some 10 MiB once
imported, more once used, never given back by Python's allocator) is only
needed to create and remove pod networks. So that work (netns.links) runs in
`python -m netns.plumber`, a child started on the first request and told to
exit once it has been idle for IDLE_S: a burst (100 pods added, or removed on
SIGTERM) pays its start (about 0.2 s) once.

Requests and replies are JSON lines on its stdin and stdout, tagged with an
id: the helper serves up to WORKERS at a time, as the threads of the
activator did before (a removal mostly waits for the kernel, and removals
side by side take a third of the time of removals in a row). A netns error
raised in the helper is raised again here with the same type and message;
any other failure becomes a PodError naming it (its traceback goes to the
helper's stderr, which is ours).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from netns import errors
from netns.errors import NetnsError, PodError

__all__ = ["IDLE_S", "WORKERS", "Plumber", "call"]

IDLE_S = 2.0
WORKERS = 6
_STOP_TIMEOUT = 10.0
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent

_Reply = concurrent.futures.Future[dict[str, Any]]


class _Helper:
    """One running helper process and the requests it has not answered yet."""

    def __init__(self) -> None:
        # The package's own root first: the helper must import this very netns.
        path = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "netns.plumber"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": path},
                # Out of our process group: a Ctrl-C meant for us must leave
                # it alive for the teardown that follows.
                start_new_session=True,
            )
        except OSError as exc:
            raise PodError(f"cannot start the netlink helper {sys.executable}: {exc}") from exc
        self.pending: dict[int, _Reply] = {}
        self._ids = itertools.count()
        # Between the reader failing what is pending and a late send.
        self._lock = threading.Lock()
        self._ended: PodError | None = None
        self._replies = threading.Thread(target=self._read_replies, name="plumber", daemon=True)
        self._replies.start()

    def send(self, op: str, kwargs: dict[str, Any]) -> _Reply:
        """Send a request (callers serialise sends); its reply comes in the future."""
        assert self.popen.stdin is not None
        key = next(self._ids)
        reply: _Reply = concurrent.futures.Future()
        with self._lock:
            if self._ended is not None:
                reply.set_exception(self._ended)
                return reply
            self.pending[key] = reply
        try:
            self.popen.stdin.write(json.dumps({"id": key, "op": op, "kwargs": kwargs}).encode())
            self.popen.stdin.write(b"\n")
            self.popen.stdin.flush()
        except OSError:
            pass  # it died: the reader fails every pending request
        return reply

    def _read_replies(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            reply = json.loads(line)
            with self._lock:
                future = self.pending.pop(reply["id"])
            future.set_result(reply)
        status = self.popen.wait()
        with self._lock:
            self._ended = PodError(
                f"the netlink helper (pid {self.popen.pid}, python -m netns.plumber) "
                f"ended with status {status} during a request: see its output above"
            )
            for reply in self.pending.values():
                reply.set_exception(self._ended)
            self.pending.clear()

    def stop(self) -> None:
        """Close its stdin (it exits once its requests are answered) and reap it."""
        assert self.popen.stdin is not None
        self.popen.stdin.close()
        try:
            self.popen.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._replies.join()
        assert self.popen.stdout is not None
        self.popen.stdout.close()


class Plumber:
    """The client side: one helper at a time, started on demand (thread-safe)."""

    def __init__(self, idle_s: float = IDLE_S) -> None:
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._helper: _Helper | None = None
        self._busy = 0
        self._idle: threading.Timer | None = None

    @property
    def pid(self) -> int | None:
        """The running helper's pid, if one runs."""
        helper = self._helper
        return None if helper is None else helper.popen.pid

    def call(self, op: str, **kwargs: Any) -> Any:
        """Run links.`op`(**kwargs) in the helper; return its result or raise its error."""
        with self._lock:
            if self._idle is not None:
                self._idle.cancel()
            if self._helper is None or self._helper.popen.poll() is not None:
                self._helper = _Helper()
            reply = self._helper.send(op, kwargs)
            self._busy += 1
        try:
            answer = reply.result()
        finally:
            with self._lock:
                self._busy -= 1
                if not self._busy:
                    self._idle = threading.Timer(self.idle_s, self._stop_if_idle)
                    self._idle.daemon = True
                    self._idle.start()
        if "error" in answer:
            raise _error(op, answer["error"]["type"], answer["error"]["message"])
        return answer["result"]

    def close(self) -> None:
        """Stop the helper now (it would exit at our own exit anyway, a moment later)."""
        with self._lock:
            if self._idle is not None:
                self._idle.cancel()
            self._stop()

    def _stop_if_idle(self) -> None:
        with self._lock:
            if not self._busy:
                self._stop()

    def _stop(self) -> None:
        helper, self._helper = self._helper, None
        if helper is not None:
            helper.stop()


def _error(op: str, kind: str, message: str) -> NetnsError:
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, NetnsError):
        return cls(message)
    return PodError(f"{op} failed in the netlink helper: {kind}: {message}")


_plumber = Plumber()
# So that no helper is left running, even for a moment, once we are gone.
atexit.register(_plumber.close)


def call(op: str, **kwargs: Any) -> Any:
    """Run links.`op` in this process's netlink helper (see Plumber.call)."""
    return _plumber.call(op, **kwargs)


def serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    """The helper's side: answer requests, WORKERS at a time, until EOF."""
    from netns import links

    ops: dict[str, Callable[..., Any]] = {"create": links.create, "teardown": links.teardown}
    lock = threading.Lock()

    def answer(request: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"id": request["id"]}
        try:
            reply["result"] = ops[request["op"]](**request["kwargs"])
        except Exception as exc:
            if not isinstance(exc, NetnsError):
                traceback.print_exc()
            reply["error"] = {"type": type(exc).__name__, "message": str(exc)}
        with lock:
            replies.write(json.dumps(reply).encode() + b"\n")
            replies.flush()

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as workers:
        for line in requests:
            workers.submit(answer, json.loads(line))


def main() -> None:
    # Replies get a private copy of stdout; stdout itself goes to stderr, so
    # that nothing printed by the work can break the protocol.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
