"""The driver of one pod: feeds the lifecycle events and carries out its commands.

All I/O of a pod happens here or below (proxy, CRIU, the sandbox); all the
decisions are the lifecycle's. Blocking work (a dump, spawning, sealing) runs
in threads so the event loop keeps accepting and relaying for every pod; a
restore's RPC waits on the loop itself, the shorter path for a wake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Collection, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, Protocol, assert_never, runtime_checkable

from activator import commands as c
from activator import events as e
from activator import preflight
from activator.config import PodConfig
from activator.criu import Criu, CriuError, Externals, Launcher, forget_conntrack
from activator.journal import Journal, Operation, wait_for_exit
from activator.lifecycle import Lifecycle, Phase, Policy
from activator.probes import ProbeMemory, Verdict
from activator.proxy import ClientConnection, ProbeDetection, ShadowListener
from netns.proc import Process

log = logging.getLogger(__name__)

# How long a forwarded connection waits for a cold-started app to listen.
CONNECT_TIMEOUT = 30.0
# How long after a wake the restored image is deleted (off the wake's path).
IMAGE_DELETE_DELAY = 0.5
# How long the app CRIU killed after a checkpoint may take to be reaped.
CHECKPOINTED_EXIT_WAIT = 5.0
# How long a killed activator's CRIU may take to finish before adoption gives up.
LEFTOVER_CRIU_TIMEOUT = 300.0
# How often the fast path's new connections are counted (at most; a quarter of
# the scale-down duration if that is shorter): at most this late, the idle time
# starts again after one (never earlier). A look costs about 0.6 ms of CPU.
DIRECT_TRAFFIC_EVERY = 5.0
# After the redirect is back, a connection that matched the old rules may still
# be on its way through them (netfilter swaps rules under RCU): wait it out.
REDIRECT_SETTLE = 0.01


class SpawnFailed(Exception):
    pass


class Sandbox(Protocol):
    """Where the app lives: its namespaces, its processes, its port redirects."""

    address: str
    # Where kubelet's probes come from (locally: the host side of the pod's link).
    node_address: str

    async def leftover(self) -> Any:
        """What a killed activator left of this pod (see localpod.Leftover), or None."""
        ...

    async def remove_leftover(self, leftover: Any) -> None: ...

    async def create(self) -> None: ...

    async def socket(self) -> socket.socket: ...

    async def redirect(self, shadow_ports: Mapping[int, int]) -> None: ...

    async def spawn_app(self, command: tuple[str, ...]) -> int:
        """Start the app; return its root pid. Raise SpawnFailed."""
        ...

    def app_exit(self, pid: int) -> asyncio.Future[int]:
        """The wait status of the app's root `pid` (started or restored), once it ends."""
        ...

    async def stop_app(self, pid: int, ended: asyncio.Future[int]) -> None:
        """End the app (or let it go on, where the sandbox owns its end)."""
        ...

    async def end_remains(self) -> None:
        """End whatever a failed restore left of the app (no app runs now)."""
        ...

    def externals(self) -> Externals: ...

    @property
    def criu_launcher(self) -> Launcher | None:
        """How CRIU is started for this sandbox; None: as our child."""
        ...

    async def destroy(self) -> None: ...


@runtime_checkable
class DirectPathSandbox(Protocol):
    """A sandbox that can open the fast path (see lifecycle.py)."""

    async def switch_direct_path(
        self, shadow_ports: Mapping[int, int], redirected: tuple[IPv4Network, ...] | None
    ) -> None:
        """Redirect only connections from `redirected` (the rest go directly to
        the app and are counted), or, with None, every connection again."""
        ...

    async def direct_connections(self) -> int:
        """How many connections the fast path has let through so far."""
        ...

    async def open_connections(self, ports: Collection[int]) -> int:
        """How many connections to `ports` from outside the pod are open now
        (about 1.5 ms of CPU here: the kernel walks every TCP socket)."""
        ...


class FastPathUnavailable(Exception):
    pass


class Reporter(Protocol):
    def report(self, pod: PodDriver, report: c.Report) -> None: ...


@dataclass(frozen=True)
class PodStatus:
    name: str
    address: str
    ports: tuple[int, ...]
    phase: str
    since: float  # unix time
    open_connections: int
    held_connections: int
    open_by_port: dict[int, int]
    app_pid: int | None  # host pid of the app's root process, while it runs
    last_checkpoint_ms: float | None
    last_restore_ms: float | None
    image_bytes: int | None
    # With the fast path: "open", "closing" or "closed", and the connections
    # it had open at its last close (it counts them only then).
    fast_path: str | None
    direct_connections: int


class PodDriver:
    def __init__(
        self,
        config: PodConfig,
        sandbox: Sandbox,
        criu: Criu,
        state_dir: Path,
        reporter: Reporter,
    ) -> None:
        self.config = config
        self.name = config.name
        self.sandbox = sandbox
        self.criu = criu if sandbox.criu_launcher is None else criu.using(sandbox.criu_launcher)
        self.state_dir = state_dir
        self.journal = Journal(state_dir)
        self.images = state_dir / "images"
        self.reporter = reporter
        if config.fast_path and not isinstance(sandbox, DirectPathSandbox):
            raise FastPathUnavailable(
                f"pod {config.name}: the fast path is for local pods only (not yet in a "
                "sidecar): remove the fast-path setting"
            )
        if self.criu.options.spares:
            self.criu = self.criu.ahead()
        self.lifecycle = Lifecycle(
            Policy(scaledown_after=config.scaledown_after, fast_path=config.fast_path)
        )
        self.listeners = [ShadowListener(port, self, None) for port in config.ports]
        self.probe_memory = ProbeMemory(config.probe_default_status)
        self.connections: dict[int, ClientConnection] = {}
        self.app_pid: int | None = None
        self.stopped = asyncio.Event()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._waking_conn: int | None = None
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._restored = 0
        self._page_server: subprocess.Popen[bytes] | None = None  # lazy restores
        # The fast path: opened and closed one after the other, never at once.
        self._direct_switch = asyncio.Lock()
        self._direct_watch: asyncio.Task[None] | None = None
        self._direct_counted = 0  # connections let through when last looked
        self._loop = asyncio.get_running_loop()

    # -- setup -----------------------------------------------------------------

    async def start(self) -> None:
        """Create the sandbox, put the activator in front of the app, start it.

        On failure everything created so far is removed again.
        """
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)  # the images hold the app's memory
        # Images a killed activator restored from but had not deleted yet: this
        # driver's names for them start again at 1.
        for restored in self.state_dir.glob("images.restored-*"):
            shutil.rmtree(restored, ignore_errors=True)
        adopted = False
        pending = self.journal.pending()
        if pending is not None and pending.criu is not None:
            await self._wait_for_leftover_criu(pending.kind, pending.criu)
        leftover = await self.sandbox.leftover()
        if leftover is not None:
            adopted = await self._adopt(leftover, pending)
        else:
            # The app starts cold or, in a sidecar, runs already (restored by
            # a killed sidecar, then handed to the holder): an image left
            # here is never used, and it holds the app's memory.
            shutil.rmtree(self.images, ignore_errors=True)
        self.journal.end()
        try:
            await self.sandbox.create()
            detection = self._probe_detection()
            for listener in self.listeners:
                listener.probe_detection = detection
                await listener.start(self.sandbox)
            await self.sandbox.redirect(self._shadow_ports)
        except BaseException:
            await self._remove_everything()
            raise
        self.feed(e.Adopted(self._loop.time()) if adopted else e.Boot(self._loop.time()))
        if self.config.close_idle_after is not None:
            self._spawn(self._close_quiet_connections(self.config.close_idle_after))

    async def _wait_for_leftover_criu(self, kind: str, criu: Process) -> None:
        """A killed activator's CRIU finishes its work before anything is decided."""
        if not criu.alive():
            return
        log.warning(
            "pod %s: waiting for the %s the killed activator left running (CRIU, pid %d)",
            self.name,
            kind,
            criu.pid,
        )
        if not await asyncio.to_thread(wait_for_exit, criu, LEFTOVER_CRIU_TIMEOUT):
            raise CriuError(
                f"the CRIU (pid {criu.pid}) of a killed activator still runs after "
                f"{LEFTOVER_CRIU_TIMEOUT:.0f} s: the pod is left as it is; see its log in "
                f"{self.state_dir}, end it, then start the activator again"
            )

    async def _adopt(self, leftover: Any, pending: Operation | None) -> bool:
        """Take over what a killed activator left; True if the app is checkpointed.

        A checkpoint that completed but was not recorded is taken (CRIU writes
        stats-dump last; one made for sealing is sealed now). An app still
        running there (it failed open and serves directly, a checkpoint
        failed, or a restore completed) is checkpointed where it runs. If the
        app cannot be checkpointed, the pod is left as it is, serving, and this
        raises.
        """
        staging = self.state_dir / "images.new"
        if pending is not None and pending.kind == "checkpoint":
            written = Path(pending.images)
            if (written / "stats-dump").exists():
                # Criu.dump's last step, which the killed activator missed (the
                # restore relies on it and stays short: it does not repeat it).
                forget_conntrack(written)
                if written != staging:
                    await asyncio.to_thread(self._seal, written, staging)
        if pending is not None and not Path(pending.images).is_relative_to(self.state_dir):
            shutil.rmtree(pending.images, ignore_errors=True)  # the plaintext of a sealed image
        if (staging / "stats-dump").exists():
            self._keep_image(staging)
        if leftover.app_pid is not None:
            log.warning("pod %s: adopting the running app: checkpointing it in place", self.name)
            shutil.rmtree(staging, ignore_errors=True)
            await asyncio.to_thread(self._dump, leftover.app_pid, staging, leftover.externals)
            self._keep_image(staging)
        await self.sandbox.remove_leftover(leftover)
        if not self.images.exists():
            log.warning("pod %s: left without its app or an image: starting it cold", self.name)
        return self.images.exists()

    def _dump(self, pid: int, images: Path, externals: Externals) -> int:
        """Checkpoint into `images`; sealed, with a key: CRIU then writes into
        memory and only the sealed files reach the disk. The image's size.

        What CRIU cannot dump is found first, without touching the app."""
        if found := preflight.problems(pid, self.criu.launcher.credentials()):
            raise CriuError("cannot checkpoint: " + "; ".join(found))
        if self.config.image_key is None:
            with self._journaled("checkpoint", images):
                return self.criu.dump(pid, images, externals, self.journal.criu_started)
        plain = self._plain_dir("dump")
        try:
            with self._journaled("checkpoint", plain):
                size = self.criu.dump(pid, plain, externals, self.journal.criu_started)
            self._seal(plain, images)
            return size
        finally:
            shutil.rmtree(plain, ignore_errors=True)

    async def _restore_from_images(self) -> int:
        externals = self.sandbox.externals()
        key = self.config.image_key
        if key is None:
            lazy = self.config.lazy_restore
            if lazy:
                self._page_server = await asyncio.to_thread(self.criu.serve_pages, self.images)
            try:
                with self._journaled("restore", self.images):
                    started = self.journal.criu_started
                    return await self.criu.restore(self.images, externals, started, lazy=lazy)
            except CriuError:
                self._stop_page_server()  # a lazy restore's, if any
                raise
        from activator import sealed

        plain = self._plain_dir("restore")
        try:
            await asyncio.to_thread(sealed.unseal, self.images, plain, key)
            with self._journaled("restore", plain):
                return await self.criu.restore(plain, externals, self.journal.criu_started)
        finally:
            await asyncio.to_thread(shutil.rmtree, plain, True)

    def _stop_page_server(self) -> None:
        server, self._page_server = self._page_server, None
        if server is not None and server.poll() is None:
            server.kill()  # our child: ends the lazy pages of an app that is gone
            server.wait()

    @contextlib.contextmanager
    def _journaled(self, kind: str, images: Path) -> Iterator[None]:
        """A CRIU call on `images`, journaled while it runs (its CRIU's pid
        comes from the call: `journal.criu_started`)."""
        self.journal.begin(kind, images)
        try:
            yield
        finally:
            self.journal.end()

    def _plain_dir(self, purpose: str) -> Path:
        from activator import sealed  # cryptography (7 MiB) only for pods that seal

        plain = sealed.PLAIN_ROOT / f"{self.name}.{purpose}"
        shutil.rmtree(plain, ignore_errors=True)
        return plain

    def _seal(self, plain: Path, images: Path) -> None:
        from activator import sealed

        if self.config.image_key is None:
            raise sealed.SealError(
                f"pod {self.name}: an image in {plain} waits to be sealed: "
                "start the activator with the same --image-key"
            )
        sealed.seal(plain, images, self.config.image_key)

    def _keep_image(self, staging: Path) -> None:
        """The new image replaces the old one only once it is complete."""
        shutil.rmtree(self.images, ignore_errors=True)
        staging.rename(self.images)

    def _probe_detection(self) -> ProbeDetection | None:
        if not self.config.probe_detection:
            return None
        sources = self.config.probe_sources or (IPv4Network(self.sandbox.node_address),)
        return ProbeDetection(sources, self.config.probe_wait)

    # -- the loop between lifecycle and drivers --------------------------------

    def feed(self, event: e.Event) -> None:
        for command in self.lifecycle.handle(event):
            self._dispatch(command)

    def _dispatch(self, command: c.Command) -> None:
        match command:
            case c.StartApp(reason):
                self._spawn(self._start_app(reason))
            case c.Checkpoint():
                self._spawn(self._checkpoint())
            case c.Restore():
                self._spawn(self._restore())
            case c.Forward(conns):
                for conn_id in conns:
                    conn = self.connections.get(conn_id)
                    if conn is not None:
                        deadline = time.monotonic() + CONNECT_TIMEOUT
                        self._spawn(conn.forward(self.sandbox, conn.port, deadline))
            case c.AnswerProbe(conn_id):
                conn = self.connections.get(conn_id)
                if conn is not None and conn.probe is not None:
                    conn.answer(self.probe_memory.answer(conn.port, conn.probe))
            case c.Refuse(conns, reason):
                for conn_id in conns:
                    if (conn := self.connections.get(conn_id)) is not None:
                        conn.refuse(reason)
            case c.SetIdleDeadline(at):
                if self._idle_timer is not None:
                    self._idle_timer.cancel()
                    self._idle_timer = None
                if at is not None:
                    self._idle_timer = self._loop.call_at(at, self._idle_deadline_reached)
            case c.OpenDirectPath():
                self._spawn(self._open_direct_path())
            case c.CloseDirectPath():
                self._spawn(self._close_direct_path())
            case c.Teardown():
                self._spawn(self._teardown())
            case c.Report():
                self.reporter.report(self, command)
            case _:
                assert_never(command)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("pod %s: internal error", self.name, exc_info=exc)

    def _idle_deadline_reached(self) -> None:
        self._idle_timer = None
        self.feed(e.IdleTimerFired(self._loop.time()))

    # -- connections (called by the proxy) --------------------------------------

    def connection_opened(self, conn: ClientConnection) -> None:
        log.debug(
            "pod %s: connection %d from %s opened on port %d",
            self.name,
            conn.id,
            conn.peer_address,
            conn.port,
        )
        self.connections[conn.id] = conn
        was_scaled_down = self.lifecycle.phase is Phase.SCALED_DOWN
        self.feed(e.ConnectionOpened(self._loop.time(), conn=conn.id, port=conn.port))
        if was_scaled_down and self.lifecycle.phase is Phase.RESTORING:
            self._waking_conn = conn.id

    def probe_opened(self, conn: ClientConnection) -> None:
        self.connections[conn.id] = conn
        self.feed(e.ProbeOpened(self._loop.time(), conn=conn.id, port=conn.port))

    def probe_answered(self, conn: ClientConnection, probe: Verdict, status: int) -> None:
        self.probe_memory.remember(conn.port, probe, status)

    async def _close_quiet_connections(self, quiet_for: float) -> None:
        """Close client connections that are open but idle (keep-alive, pools)."""
        while not self.stopped.is_set():
            await asyncio.sleep(min(quiet_for / 4, 1.0))
            now = time.monotonic()
            for conn in list(self.connections.values()):
                if conn.close_if_quiet(quiet_for, now):
                    log.info(
                        "pod %s: closed connection %d, idle %.0fs", self.name, conn.id, quiet_for
                    )

    def connection_closed(self, conn: ClientConnection) -> None:
        log.debug("pod %s: connection %d closed", self.name, conn.id)
        if self.connections.pop(conn.id, None) is not None:
            self.feed(e.ConnectionClosed(self._loop.time(), conn=conn.id))

    def first_byte(self, conn: ClientConnection) -> None:
        if conn.id == self._waking_conn and conn.first_byte_at is not None:
            self._waking_conn = None
            ms = (conn.first_byte_at - conn.accepted_at) * 1000
            self.reporter.report(
                self,
                c.Report(
                    "first-byte",
                    "info",
                    f"first byte {ms:.1f} ms after accept",
                    {"first_byte_ms": round(ms, 1)},
                ),
            )

    # -- the fast path -------------------------------------------------------------

    @property
    def _shadow_ports(self) -> dict[int, int]:
        return {ln.app_port: ln.shadow_port for ln in self.listeners}

    async def _open_direct_path(self) -> None:
        assert isinstance(self.sandbox, DirectPathSandbox)
        async with self._direct_switch:
            if self._stopping:
                return
            detection = self._probe_detection()  # probes still come to us
            redirected = detection.sources if detection is not None else ()
            await self.sandbox.switch_direct_path(self._shadow_ports, redirected)
            self._direct_counted = await self.sandbox.direct_connections()
            # A failed look is logged; the path then stays open and the pod up
            # (the close before a checkpoint must look again and succeed).
            self._direct_watch = self._spawn(self._watch_direct_traffic())

    async def _watch_direct_traffic(self) -> None:
        every = min(DIRECT_TRAFFIC_EVERY, self.config.scaledown_after / 4)
        while True:
            await asyncio.sleep(every)
            if opened := await self._directly_opened():
                self.feed(e.DirectTraffic(self._loop.time(), opened=opened))

    async def _directly_opened(self) -> int:
        """New connections on the fast path since the last look."""
        assert isinstance(self.sandbox, DirectPathSandbox)
        counted = await self.sandbox.direct_connections()
        opened, self._direct_counted = counted - self._direct_counted, counted
        return opened

    async def _close_direct_path(self) -> None:
        assert isinstance(self.sandbox, DirectPathSandbox)
        async with self._direct_switch:
            self._stop_watching_direct_traffic()
            if self._stopping:
                return
            await self.sandbox.switch_direct_path(self._shadow_ports, None)
            await asyncio.sleep(REDIRECT_SETTLE)
            opened = await self._directly_opened()
            open_now = await self.sandbox.open_connections(self.config.ports)
            self.feed(e.DirectPathClosed(self._loop.time(), open=open_now, opened=opened))

    @property
    def _stopping(self) -> bool:
        """The pod is being removed: its namespace and table are going away."""
        return self.lifecycle.phase in (Phase.STOPPING, Phase.STOPPED)

    def _stop_watching_direct_traffic(self) -> None:
        if self._direct_watch is not None:
            self._direct_watch.cancel()
            self._direct_watch = None

    # -- the app's processes -----------------------------------------------------

    async def _start_app(self, reason: str) -> None:
        log.info("pod %s: starting the app (%s)", self.name, reason)
        try:
            pid = await self.sandbox.spawn_app(self.config.command)
        except SpawnFailed as exc:
            self.feed(e.AppStartFailed(self._loop.time(), str(exc)))
            return
        self._watch(pid)
        self.feed(e.AppStarted(self._loop.time()))

    def _watch(self, pid: int) -> None:
        """Follow the app's root `pid` until it ends; report that if it is still the app."""
        self.app_pid = pid
        ended = self.sandbox.app_exit(pid)
        self._exits[pid] = ended

        def exited(ended: asyncio.Future[int]) -> None:
            del self._exits[pid]
            if pid == self.app_pid and not ended.cancelled():
                self.app_pid = None
                self.feed(e.AppExited(self._loop.time(), describe_wait_status(ended.result())))

        ended.add_done_callback(exited)

    async def _checkpoint(self) -> None:
        staging = self.state_dir / "images.new"
        shutil.rmtree(staging, ignore_errors=True)
        pid = self.app_pid
        started = time.monotonic()
        try:
            if pid is None:
                raise CriuError("the app is not running")
            size = await asyncio.to_thread(self._dump, pid, staging, self.sandbox.externals())
        except CriuError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            self.feed(e.CheckpointFailed(self._loop.time(), str(exc)))
            return
        ms = (time.monotonic() - started) * 1000
        # CRIU killed the app; reap it before anything (a restore) wants its pid.
        with contextlib.suppress(TimeoutError, KeyError):
            await asyncio.wait_for(asyncio.shield(self._exits[pid]), CHECKPOINTED_EXIT_WAIT)
        self._keep_image(staging)
        if self.app_pid == pid:
            self.app_pid = None
        self.feed(e.CheckpointDone(self._loop.time(), duration_ms=ms, image_bytes=size))

    async def _restore(self) -> None:
        started = time.monotonic()
        try:
            pid = await self._restore_from_images()
        except CriuError as exc:
            await self.sandbox.end_remains()  # a half-restored tree would hold the port
            # Keep the image that failed for a post-mortem; the next checkpoint replaces it.
            failed = self.state_dir / "images.failed"
            shutil.rmtree(failed, ignore_errors=True)
            if self.images.exists():
                self.images.rename(failed)
            self.feed(e.RestoreFailed(self._loop.time(), str(exc)))
            return
        ms = (time.monotonic() - started) * 1000
        self._watch(pid)
        self.feed(e.RestoreDone(self._loop.time(), duration_ms=ms))
        # The image holds the app's memory (secrets too): gone once it is back.
        # Renamed at once (the next checkpoint may come soon), deleted a moment
        # later: deleting holds the GIL, which would slow the held connections.
        self._restored += 1
        done = self.state_dir / f"images.restored-{self._restored}"
        self.images.rename(done)
        await asyncio.sleep(IMAGE_DELETE_DELAY)
        if (server := self._page_server) is not None:
            # A lazy restore: the pages are read from the image until all are back.
            await asyncio.to_thread(server.wait)
            self._page_server = None
        await asyncio.to_thread(shutil.rmtree, done, True)

    # -- manual control and stop ---------------------------------------------------

    def scale_down(self) -> None:
        self.feed(e.ScaleDownRequested(self._loop.time()))

    def wake(self) -> None:
        self.feed(e.WakeRequested(self._loop.time()))

    def stop(self) -> None:
        self.feed(e.StopRequested(self._loop.time()))

    async def _teardown(self) -> None:
        await self._stop_app()
        await self._remove_everything()
        self.stopped.set()

    async def _stop_app(self) -> None:
        pid = self.app_pid
        if pid is None:
            return
        self.app_pid = None  # an exit from here on is ours, not news
        await self.sandbox.stop_app(pid, self._exits[pid])

    async def _remove_everything(self) -> None:
        self._stop_page_server()
        self.criu.close()  # its spare CRIU holds the pod's namespaces
        self._stop_watching_direct_traffic()
        for conn in list(self.connections.values()):
            conn.refuse("pod removed")
        for listener in self.listeners:
            await listener.close()
        # Destroying the sandbox ends whatever is left of the app (its pid
        # namespace dies with the pause process), so it goes before the images.
        await self.sandbox.destroy()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- status ----------------------------------------------------------------

    def status(self) -> PodStatus:
        m = self.lifecycle
        return PodStatus(
            name=self.name,
            address=self.sandbox.address,
            ports=self.config.ports,
            phase=m.phase.value,
            since=time.time() - (self._loop.time() - m.since),
            open_connections=len(m.open_connections),
            open_by_port={
                port: sum(
                    1
                    for conn in self.connections.values()
                    if conn.port == port and conn.id in m.open_connections
                )
                for port in self.config.ports
            },
            held_connections=len(m.held_connections),
            app_pid=self.app_pid,
            last_checkpoint_ms=m.last_checkpoint_ms,
            last_restore_ms=m.last_restore_ms,
            image_bytes=m.image_bytes,
            fast_path=m.direct_path.value if self.config.fast_path else None,
            direct_connections=m.direct_connections,
        )


def describe_wait_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
