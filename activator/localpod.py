"""A local pod as the sandbox of a PodDriver: netns, veth, pause, redirects, app.

Laid out as a kubelet lays out a pod (see netns.pod): a pause process pins the
pod's network and pid namespaces, the app joins both, and the activator stays
outside, reaching the app over the pod's loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import cache
from ipaddress import IPv4Network
from pathlib import Path

from activator.children import child_exit, stop_child
from activator.config import PodConfig
from activator.criu import Externals
from activator.pod import SpawnFailed
from netns import nft, proc, tcp_table
from netns.errors import NetnsError, SpawnError
from netns.namespace import NetnsThread, NetnsWorker
from netns.nft import Redirector
from netns.pod import (
    Fallback,
    Pause,
    PodNetwork,
    StalePod,
    create_pod,
    destroy_pod,
    remove_stale_pod,
    spawn_in_pod,
    stale_pod,
    start_pause,
)

log = logging.getLogger(__name__)

# Sockets kept ready in each pod's namespace for the next connections; made
# in batches, once half are used: one hop to the namespace's thread (about
# 50 us of CPU) serves several connections.
SPARE_SOCKETS = 4


def _tcp_sockets(count: int) -> list[socket.socket]:
    return [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]


@cache
def _pod_namespaces() -> NetnsWorker:
    """The one thread that runs the calls of every pod in its namespace: a
    thread per pod would cost ~30 KiB each, and the calls are short."""
    return NetnsWorker("netns-pods")


@dataclass(frozen=True)
class Leftover:
    stale: StalePod
    app_pid: int | None  # the app's root process, still running (failed open)
    externals: Externals  # the old pod's namespaces, to checkpoint the app in place


class LocalSandbox:
    criu_launcher = None  # CRIU is our child, in the host's namespaces

    def __init__(self, config: PodConfig) -> None:
        self.name = config.name
        self.address = ""
        self.node_address = ""
        self.network: PodNetwork | None = None
        self.pause: Pause | None = None
        self.thread: NetnsThread | None = None
        self.redirector: Redirector | None = None
        # The app's stdout and stderr: one pipe, read by us, kept across
        # checkpoints (CRIU reconnects the restored app to it).
        self.output_r, self.output_w = os.pipe()
        self._output_tail = b""
        # Only we hold the write end: when we die the pause sees EOF and lets
        # the app's ports through directly (fail open; see netns/pause.py).
        self.lifeline_r, self.lifeline_w = os.pipe()
        self._spare_sockets: list[socket.socket] = []
        self._refill: asyncio.Future[None] | None = None

    async def leftover(self) -> Leftover | None:
        """What a killed activator left of this pod, if anything."""
        stale = await asyncio.to_thread(stale_pod, self.name)
        if stale is None:
            return None
        pause = [pid for pid in stale.pids if proc.nspid(pid)[1:] == [1]]
        if len(pause) != 1:
            return Leftover(stale, app_pid=None, externals=Externals({}))
        pid_ns = os.stat(f"/proc/{pause[0]}/ns/pid").st_ino
        members = {p for p in stale.pids if proc.ns_inode_of(p, "pid") == pid_ns} - set(pause)
        # The app's root: its parent is outside the pod (it was the killed activator).
        roots = [p for p in members if proc.parent_of(p) not in members]
        if len(roots) > 1:
            raise NetnsError(f"pod {self.name}: more than one process tree left ({roots})")
        ns = Path(f"/proc/{pause[0]}/ns")
        externals = Externals({"net": ns / "net", "pid": ns / "pid"})
        return Leftover(stale, app_pid=roots[0] if roots else None, externals=externals)

    async def remove_leftover(self, leftover: Leftover) -> None:
        await asyncio.to_thread(remove_stale_pod, leftover.stale)

    async def create(self) -> None:
        self.network = await asyncio.to_thread(create_pod, self.name, owner_pid=os.getpid())
        self.address = str(self.network.address)
        self.node_address = str(self.network.gateway)
        fallback = Fallback(self.lifeline_r, self.output_r, nft.TABLE)
        self.pause = await asyncio.to_thread(
            start_pause, str(self.network.netns_path), fallback=fallback
        )
        os.close(self.lifeline_r)  # the pause holds it now
        self.lifeline_r = -1
        self.thread = NetnsThread(self.network.netns_path, worker=_pod_namespaces())
        self.redirector = Redirector(self.thread)
        os.set_blocking(self.output_r, False)
        asyncio.get_running_loop().add_reader(self.output_r, self._log_output)

    def _in_pod(self) -> NetnsThread:
        if self.thread is None:
            raise NetnsError(f"pod {self.name} has no network namespace yet")
        return self.thread

    async def socket(self) -> socket.socket:
        """A TCP socket in the pod's network namespace.

        Made on the pod's namespace thread, a hop of about 120 us: a few are
        kept ready so that a new connection to the app does not wait for one.
        """
        if self._spare_sockets:
            sock = self._spare_sockets.pop()
        else:
            sock = await self._in_pod().acall(socket.socket, socket.AF_INET, socket.SOCK_STREAM)
        refilling = self._refill is not None and not self._refill.done()
        if len(self._spare_sockets) <= SPARE_SOCKETS // 2 and not refilling:
            self._refill = asyncio.ensure_future(self._make_spare_sockets())
        return sock

    async def _make_spare_sockets(self) -> None:
        if self.thread is not None:
            wanted = SPARE_SOCKETS - len(self._spare_sockets)
            self._spare_sockets += await self.thread.acall(_tcp_sockets, wanted)

    async def redirect(self, shadow_ports: Mapping[int, int]) -> None:
        assert self.redirector is not None
        await self._in_pod().acall(self.redirector.install, shadow_ports)

    async def switch_direct_path(
        self, shadow_ports: Mapping[int, int], redirected: tuple[IPv4Network, ...] | None
    ) -> None:
        assert self.redirector is not None
        await self._in_pod().acall(self.redirector.switch, shadow_ports, redirected)

    async def direct_connections(self) -> int:
        assert self.redirector is not None
        return await self._in_pod().acall(self.redirector.direct_connections)

    async def open_connections(self, ports: Collection[int]) -> int:
        return await self._in_pod().acall(tcp_table.open_connections, ports)

    async def spawn_app(self, command: tuple[str, ...]) -> int:
        assert self.pause is not None
        try:
            return await asyncio.to_thread(
                spawn_in_pod,
                self.pause.pid,
                list(command),
                stdout=self.output_w,
                stderr=self.output_w,
            )
        except SpawnError as exc:
            raise SpawnFailed(str(exc)) from exc

    def app_exit(self, pid: int) -> asyncio.Future[int]:
        return child_exit(pid)

    async def stop_app(self, pid: int, ended: asyncio.Future[int]) -> None:
        await stop_child(pid, ended)

    async def end_remains(self) -> None:
        if self.pause is None:
            return
        pid_ns = proc.ns_inode_of(self.pause.pid, "pid")
        if pid_ns is None:
            return
        remains = [
            proc.Process.of(p) for p in proc.members_of("pid", pid_ns) if p != self.pause.pid
        ]
        await asyncio.to_thread(proc.end, filter(None, remains))

    def externals(self) -> Externals:
        assert self.pause is not None
        proc = Path(f"/proc/{self.pause.pid}/ns")
        return Externals({"net": proc / "net", "pid": proc / "pid"}, output=self.output_w)

    def _log_output(self) -> None:
        try:
            data = os.read(self.output_r, 65536)
        except BlockingIOError:
            return
        lines = (self._output_tail + data).split(b"\n")
        self._output_tail = lines.pop()[-4096:]
        for line in lines:
            log.info("pod %s app: %s", self.name, line.decode(errors="replace"))

    async def destroy(self) -> None:
        """Remove everything `create` made; safe after a partial create."""
        if self._refill is not None:
            self._refill.cancel()
        for sock in self._spare_sockets:
            sock.close()
        self._spare_sockets.clear()
        if self.thread is not None:
            if self.redirector is not None:
                with contextlib.suppress(NetnsError):
                    await self.thread.acall(self.redirector.remove)
            self.thread.close()
            self.thread = None
        if self.network is not None:
            # reap_children: the pod's pid 1 cannot finish exiting until the
            # app processes that are our children are reaped.
            await asyncio.to_thread(destroy_pod, self.network, self.pause, reap_children=True)
            self.network = None
            self.pause = None
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.output_r)
        for fd in (self.output_r, self.output_w, self.lifeline_r, self.lifeline_w):
            if fd >= 0:
                os.close(fd)
        self.output_r = self.output_w = self.lifeline_r = self.lifeline_w = -1
