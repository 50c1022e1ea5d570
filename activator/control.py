"""The control socket: how `activator status`, `wake`, `add` reach running agents.

Each agent listens on a unix socket `AGENTS_DIR/<pid>.sock` (root only). A
request is one JSON object on one line; the answer too: `{"ok": true, ...}` or
`{"ok": false, "error": "..."}`. `activator status` asks every agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

AGENTS_DIR = Path("/run/pod-activator/agents")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    pass


class ControlServer:
    def __init__(self, handler: Handler, agents_dir: Path = AGENTS_DIR) -> None:
        self.handler = handler
        self.path = agents_dir / f"{os.getpid()}.sock"
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                answer = {"ok": True, **await self.handler(json.loads(line))}
            except Exception as exc:  # every failure goes back to the asking client
                answer = {"ok": False, "error": str(exc) or type(exc).__name__}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()


def agent_sockets(agents_dir: Path = AGENTS_DIR) -> Iterator[Path]:
    """Sockets of agents that are alive; those of dead agents are removed."""
    if not agents_dir.is_dir():
        return
    for path in sorted(agents_dir.glob("*.sock")):
        pid = int(path.stem) if path.stem.isdigit() else 0
        if pid and Path(f"/proc/{pid}").exists():
            yield path
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def ask(path: Path, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise ControlError(f"agent at {path} does not answer: {exc.strerror}") from exc
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error")))
    return answer


def find_pod(name: str, agents_dir: Path = AGENTS_DIR) -> Path:
    """The socket of the agent that manages pod `name`."""
    for path in agent_sockets(agents_dir):
        with contextlib.suppress(ControlError):
            if any(p["name"] == name for p in ask(path, {"op": "status"})["pods"]):
                return path
    raise ControlError(f"no pod named {name!r} on this machine: see `activator status`")
