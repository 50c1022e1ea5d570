"""The netlink helper: a short-lived process that does a pod network's netlink work.

A long-lived activator must stay small, and pyroute2 (some 20 MiB once
imported and used, never given back by Python's allocator) is only needed to
create and remove pod networks. So that work (netns.links) runs in
`python -m netns.plumber`, a child started on the first request and told to
exit once it has been idle for IDLE_S: a burst (100 pods added, or removed on
SIGTERM) pays its start (about 0.2 s) once.

Requests and replies are JSON lines on its stdin and stdout. A netns error
raised in the helper is raised again here with the same type and message;
any other failure becomes a PodError naming it (its traceback goes to the
helper's stderr, which is ours).
"""

from __future__ import annotations

import atexit
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

__all__ = ["IDLE_S", "Plumber", "call"]

IDLE_S = 2.0
_STOP_TIMEOUT = 10.0
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class Plumber:
    """The client side: one helper at a time, one request at a time (thread-safe)."""

    def __init__(self, idle_s: float = IDLE_S) -> None:
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._helper: subprocess.Popen[bytes] | None = None
        self._idle: threading.Timer | None = None

    def call(self, op: str, **kwargs: Any) -> Any:
        """Run links.`op`(**kwargs) in the helper; return its result or raise its error."""
        with self._lock:
            if self._idle is not None:
                self._idle.cancel()
            try:
                reply = self._ask(json.dumps({"op": op, "kwargs": kwargs}).encode() + b"\n")
            finally:
                self._idle = threading.Timer(self.idle_s, self._stop_if_idle)
                self._idle.daemon = True
                self._idle.start()
        if "error" in reply:
            raise _error(op, reply["error"]["type"], reply["error"]["message"])
        return reply["result"]

    def _ask(self, request: bytes) -> dict[str, Any]:
        helper = self._helper
        if helper is None or helper.poll() is not None:
            helper = self._helper = self._start()
        assert helper.stdin is not None and helper.stdout is not None
        try:
            helper.stdin.write(request)
            helper.stdin.flush()
            line = helper.stdout.readline()
        except OSError:
            line = b""
        if not line:
            self._stop()
            raise PodError(
                f"the netlink helper (pid {helper.pid}, python -m netns.plumber) ended "
                f"with status {helper.returncode} during a request: see its output above"
            )
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _start(self) -> subprocess.Popen[bytes]:
        # The package's own root first: the helper must import this very netns.
        path = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
        try:
            return subprocess.Popen(
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

    def close(self) -> None:
        """Stop the helper now (it would exit at our own exit anyway, a moment later)."""
        with self._lock:
            if self._idle is not None:
                self._idle.cancel()
            self._stop()

    def _stop_if_idle(self) -> None:
        # A request that came meanwhile cancelled this timer, or will find the
        # helper gone and start another: either way nothing is lost.
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        helper, self._helper = self._helper, None
        if helper is None:
            return
        assert helper.stdin is not None and helper.stdout is not None
        helper.stdin.close()  # EOF: the helper exits
        try:
            helper.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
        helper.stdout.close()


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
    """The helper's side: answer requests until EOF."""
    from netns import links

    ops: dict[str, Callable[..., Any]] = {"create": links.create, "teardown": links.teardown}
    for line in requests:
        request = json.loads(line)
        try:
            reply: dict[str, Any] = {"result": ops[request["op"]](**request["kwargs"])}
        except Exception as exc:
            if not isinstance(exc, NetnsError):
                traceback.print_exc()
            reply = {"error": {"type": type(exc).__name__, "message": str(exc)}}
        replies.write(json.dumps(reply).encode() + b"\n")
        replies.flush()


def main() -> None:
    # Replies get a private copy of stdout; stdout itself goes to stderr, so
    # that nothing printed by the work can break the protocol.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
