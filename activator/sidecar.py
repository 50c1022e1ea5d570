"""The activator as a Kubernetes native sidecar: app containers as sandboxes.

The sidecar shares the pod's network namespace (as every container does) and
its pid namespace (`shareProcessNamespace: true`). Each managed app container
runs the holder (holder/holder.c) as its first process, with the app as the
holder's child; the holder's control socket lies in a volume both share.
Through it the sidecar learns the app's pid and runs CRIU *inside* the app
container (the holder's child: its mount namespace, cgroup, stdout), which is
what works for every process shape (../shared/CONTAINERD.md), and makes the
restored app the holder's child again. The checkpoint code is the one local
pods use; only where CRIU runs differs (HolderLauncher).

Paths: the shared volume is `shared` here and SHARED_IN_APP in the app
container. The images live in it: CRIU works (and mounts) in the images
directory, which must be in the app container's mount namespace. CRIU's
binary is reached through /proc/OUR_PID/root, our pid being the same in the
app container's view (one pid namespace).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pyroute2 import IPRoute

from activator import annotations as pod_annotations
from activator import commands as c
from activator.agent import Agent, serving, stop_signal
from activator.config import ConfigError, FieldError, PodConfig
from activator.criu import Criu, CriuError, Externals, criu_command, find_criu
from activator.holder import Holder, HolderError
from activator.inject import METRICS_PORT
from activator.kube.reporter import KubeReporter
from activator.metrics import Metrics, MetricsReporter, start_exporter
from activator.pod import SpawnFailed
from activator.report import EventLog
from netns import proc
from netns.namespace import NetnsThread
from netns.nft import Redirector

log = logging.getLogger(__name__)

SHARED_IN_APP = Path("/pod-activator")
HOLDER_BINARY = "pod-activator-holder"
# How long a managed container's holder may take to appear (its container
# starts after the sidecar is up).
HOLDER_WAIT = 120.0
# How long the holder may take to start CRIU (it answers at once when alive).
HOLDER_REPLY_WAIT = 30.0
# The injection sets it from `--metrics-port` (inject.py).
METRICS_PORT_ENV = "POD_ACTIVATOR_METRICS_PORT"


class SidecarError(Exception):
    pass


class LeftoverUnknown(SidecarError):
    """What a previous sidecar left cannot be told apart: the container is
    left as it is (serving directly), not guessed at."""


class HolderLauncher:
    """CRIU as the holder's child, inside the app container."""

    def __init__(self, holder: Holder, shared: Path) -> None:
        self.holder = holder
        self.shared = shared
        self.loop = asyncio.get_running_loop()
        self.command = criu_command(f"/proc/{os.getpid()}/root")

    @contextmanager
    def _swrk(self, pass_fds: tuple[int, ...]) -> Iterator[tuple[socket.socket, int]]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [*self.command, "swrk", str(theirs.fileno())]
        try:
            # Called from a worker thread (CRIU calls block): the holder's
            # socket belongs to the event loop.
            started = asyncio.run_coroutine_threadsafe(
                self.holder.execute(argv, [theirs.fileno(), *pass_fds]), self.loop
            )
            pid = started.result(HOLDER_REPLY_WAIT)
        except (HolderError, TimeoutError) as exc:
            ours.close()
            raise CriuError(f"cannot run CRIU in the app container: {exc}") from exc
        finally:
            theirs.close()
        try:
            yield ours, pid
        finally:
            ours.close()  # criu swrk ends when its socket closes; the holder reaps it

    def reap(self, wait: bool = False) -> None:
        pass  # CRIU is the holder's child: the holder reaps it

    def swrk(self, pass_fds: tuple[int, ...]) -> AbstractContextManager[tuple[socket.socket, int]]:
        return self._swrk(pass_fds)

    def credentials(self) -> int:
        if self.holder.pid is None:
            raise CriuError("not connected to the app container's holder")
        return self.holder.pid

    def path(self, ours: Path) -> str:
        if not ours.is_relative_to(self.shared):
            raise CriuError(f"{ours} is outside the volume shared with the app ({self.shared})")
        return str(SHARED_IN_APP / ours.relative_to(self.shared))


class PodRedirects:
    """The pod's one nft table, shared by the containers it manages."""

    def __init__(self) -> None:
        self.thread = NetnsThread("/proc/self/ns/net", name="netns-pod")
        self.redirector = Redirector(self.thread)
        self.by_container: dict[str, Mapping[int, int]] = {}

    async def set(self, container: str, redirects: Mapping[int, int] | None) -> None:
        if redirects is None:
            self.by_container.pop(container, None)
        else:
            self.by_container[container] = dict(redirects)
        union = {p: s for r in self.by_container.values() for p, s in r.items()}
        if union:
            await self.thread.acall(self.redirector.install, union)
        else:
            await self.thread.acall(self.redirector.remove)


@dataclass(frozen=True)
class Leftover:
    """A container a previous sidecar managed, with no app running: the driver
    takes its image (see PodDriver._adopt). The container and its namespaces
    are untouched by a sidecar's end, so nothing else needs taking back."""

    app_pid: None = None  # the driver checkpoints a running app in place; none runs


class ContainerSandbox:
    """One app container of the pod we are the sidecar of."""

    def __init__(
        self, config: PodConfig, shared: Path, redirects: PodRedirects, addresses: tuple[str, str]
    ) -> None:
        self.name = config.name
        self.address, self.node_address = addresses
        self.shared = shared
        self.redirects = redirects
        self.holder = Holder(shared / "run" / f"{config.name}.sock", self._app_exited)
        # The app's pid in the pod, for the next sidecar: CRIU restores the
        # pid it dumped, so it also names an app restored but never handed
        # to the holder (its other children may be the app's orphans).
        self.app_record = shared / "run" / f"{config.name}.app"
        self._recorded: int | None = None
        self._ended: dict[int, asyncio.Future[int]] = {}
        self._ended_unwatched: dict[int, int] = {}
        self._adopting: set[asyncio.Future[None]] = set()
        self._managed = False
        self.criu_launcher = HolderLauncher(self.holder, shared)

    async def leftover(self) -> Leftover | None:
        """What a previous sidecar left of this container: a Leftover when no
        app runs (the driver then takes a complete image from the state dir,
        or starts cold), None when one runs (it is watched as it runs) or no
        holder listens yet (our first start: its container starts after us).

        Called once the CRIU a previous sidecar left running has ended (the
        driver waits for it first): an app it restored but could not hand to
        the holder is the holder's child with the recorded pid, and is handed
        over now. Other children are not the app: they are left as they are.
        """
        try:
            await self.holder.connect(0)
        except HolderError:
            return None
        self._managed = True
        if await self.holder.manage():
            return None  # spawn_app's `start` returns it
        assert self.holder.pid is not None
        children = proc.children_of(self.holder.pid)
        recorded = self._read_record()
        if recorded is None and children:
            raise LeftoverUnknown(
                f"container {self.name}: no app, and no record ({self.app_record}) of "
                f"which of the holder's children ({children}) it was: left as it is; "
                "restart the container to manage it again"
            )
        if recorded in children:
            log.warning(
                "container %s: taking the app the last sidecar restored (pid %d)",
                self.name,
                recorded,
            )
            await self.holder.adopt(recorded)
            return None
        if children:
            log.warning(
                "container %s: the holder's children %s are not the app (pid %d): left as they are",
                self.name,
                children,
                recorded,
            )
        return Leftover()

    def _read_record(self) -> int | None:
        try:
            return int(self.app_record.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise LeftoverUnknown(
                f"container {self.name}: unreadable {self.app_record} ({exc}): restart the "
                "container to manage it again"
            ) from exc

    def _record(self, pid: int) -> None:
        if pid == self._recorded:
            return  # a restored app: CRIU gave it its pid again
        staging = self.app_record.with_suffix(".new")
        try:
            staging.write_text(str(pid))
            staging.rename(self.app_record)
        except OSError as exc:
            # Only a later sidecar needs it; this one goes on managing the app.
            log.warning("container %s: cannot record the app's pid: %s", self.name, exc)
            return
        self._recorded = pid

    async def remove_leftover(self, leftover: Leftover) -> None:
        pass  # the container stays as it is: only the image was left to take

    async def create(self) -> None:
        if not self.holder.connected:
            await self.holder.connect(HOLDER_WAIT)

    async def socket(self) -> socket.socket:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    async def redirect(self, shadow_ports: Mapping[int, int]) -> None:
        await self.redirects.set(self.name, shadow_ports)

    async def spawn_app(self, command: tuple[str, ...]) -> int:
        """The app the holder runs (it started it, or a previous sidecar
        restored it), else a cold start by the holder."""
        try:
            if not self._managed:
                self._managed = True
                if pid := await self.holder.manage():
                    return pid
            return await self.holder.start()
        except HolderError as exc:
            raise SpawnFailed(str(exc)) from exc

    def app_exit(self, pid: int) -> asyncio.Future[int]:
        self._record(pid)  # the driver watches every app it starts or restores
        if (status := self._ended_unwatched.pop(pid, None)) is not None:
            ended: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            ended.set_result(status)
            return ended
        if pid not in self._ended:
            self._ended[pid] = asyncio.get_running_loop().create_future()
            # The holder learns of a restored app only from us; it forwards
            # signals to it and reports its end.
            adopting = asyncio.ensure_future(self._adopt(pid))
            self._adopting.add(adopting)
            adopting.add_done_callback(self._adopting.discard)
        return self._ended[pid]

    async def _adopt(self, pid: int) -> None:
        try:
            await self.holder.adopt(pid)
        except HolderError as exc:
            log.error("container %s: the holder cannot follow the app: %s", self.name, exc)

    def _app_exited(self, pid: int, status: int) -> None:
        ended = self._ended.pop(pid, None)
        if ended is None:
            # The app ended between the holder's reply and our watch: kept
            # for app_exit, which the driver calls next.
            self._ended_unwatched[pid] = status
        elif not ended.done():
            ended.set_result(status)

    async def stop_app(self, pid: int, ended: asyncio.Future[int]) -> None:
        """The app stays: its container's own stop ends it, not ours."""
        await self.holder.release()

    async def end_remains(self) -> None:
        """A failed restore's tasks are the holder's children (no app runs now)."""
        if self.holder.pid is not None:
            for pid in proc.children_of(self.holder.pid):
                if (remains := proc.Process.of(pid)) is not None:
                    remains.kill()

    def externals(self) -> Externals:
        # CRIU runs in the pod's namespaces: nothing is external. The app's
        # output goes to FIFOs the holder relays to the log (holder.c).
        return Externals({})

    async def destroy(self) -> None:
        await self.redirects.set(self.name, None)
        await self.holder.release()
        self.holder.close()
        # A plain init now: the next sidecar finds its app running, or a new
        # container (new pids) if the app ended.
        self.app_record.unlink(missing_ok=True)


def pod_addresses() -> tuple[str, str]:
    """(the pod's address, where kubelet's probes come from: the default gateway)."""
    with IPRoute() as ip:
        addresses = [
            str(a.get_attr("IFA_ADDRESS"))
            for a in ip.get_addr(family=socket.AF_INET)
            if not str(a.get_attr("IFA_ADDRESS")).startswith("127.")
        ]
        gateways = [str(r.get_attr("RTA_GATEWAY")) for r in ip.get_default_routes(socket.AF_INET)]
    address = os.environ.get("POD_IP") or (addresses[0] if addresses else "")
    return address, (gateways[0] if gateways else address)


def install_holder(shared: Path) -> None:
    """Put the holder where the app containers run it from (the injection names it)."""
    found = Path(sys.prefix) / "bin" / HOLDER_BINARY
    source = found if found.exists() else shutil.which(HOLDER_BINARY)
    if source is None:
        raise SidecarError(f"{HOLDER_BINARY} not found: run scripts/setup")
    target = shared / "bin" / "holder"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_suffix(".new")
    shutil.copy2(source, staging)
    staging.chmod(0o755)
    staging.rename(target)  # a container starting now sees the old one or the new


def container_configs(settings: pod_annotations.PodSettings) -> list[PodConfig]:
    errors = []
    if missing := [name for name in settings.managed if not settings.ports.get(name)]:
        errors.append(
            FieldError(
                pod_annotations.PORTS_MAP,
                f"no ports for {', '.join(missing)}",
                'give each managed container its ports, like "app=8080"',
            )
        )
    if settings.fast_path:
        errors.append(
            FieldError(
                pod_annotations.FAST_PATH,
                "the fast path is not available in a sidecar yet (local pods only)",
                "remove the annotation",
            )
        )
    if errors:
        raise ConfigError(errors)
    return [
        PodConfig(
            name=name,
            ports=settings.ports[name],
            command=(),  # the container's own: the holder starts it
            scaledown_after=settings.scaledown_after,
            close_idle_after=settings.close_idle_after,
            probe_detection=settings.probe_detection,
            probe_sources=settings.probe_sources,
            probe_default_status=settings.probe_default_status,
        )
        for name in settings.managed
    ]


async def serve(podinfo: Path, shared: Path, events: TextIO | None) -> int:
    """Manage the pod's annotated containers until SIGTERM; a pod with bad
    annotations is left running unmanaged (the errors are logged and reported)."""
    stop = stop_signal()
    try:
        install_holder(shared)
    except (SidecarError, OSError) as exc:
        log.error("cannot put the holder in %s: %s", shared, exc)
        return 1
    events_log = EventLog(events)
    metrics = Metrics()
    start_exporter(metrics, int(os.environ.get(METRICS_PORT_ENV, METRICS_PORT)))
    # Kubernetes learns of each phase: pod labels, Events, requests resized.
    reporter = KubeReporter.from_env(then=MetricsReporter(metrics, then=events_log))
    configs: list[PodConfig] = []
    try:
        found = pod_annotations.read_downward_api((podinfo / "annotations").read_text())
        configs = (
            container_configs(pod_annotations.parse(found))
            if pod_annotations.enabled(found)
            else []
        )
    except (OSError, ConfigError) as exc:
        events_log.write(
            os.environ.get("POD_NAME", "pod"),
            "unmanaged",
            c.Report("unmanaged", "error", f"left running unmanaged: {exc}"),
        )
    if not configs:
        await stop.wait()
        return 0
    redirects = PodRedirects()
    addresses = await asyncio.to_thread(pod_addresses)  # pyroute2 runs its own loop
    agent = Agent(
        shared / "state",
        Criu(find_criu()),
        reporter,
        lambda config: ContainerSandbox(config, shared, redirects, addresses),
    )
    try:
        async with serving(agent):
            for config in configs:
                try:
                    await agent.add(config)
                except (SidecarError, HolderError, SpawnFailed, CriuError, OSError) as exc:
                    # Failing open: its ports reach the app directly, not a
                    # redirect a previous sidecar left to a port nobody serves.
                    await redirects.set(config.name, None)
                    events_log.write(
                        config.name,
                        "unmanaged",
                        c.Report("unmanaged", "error", f"left running unmanaged: {exc}"),
                    )
            await stop.wait()
            return 0
    finally:
        await reporter.close()  # the last labels (stopped) go out too
        redirects.thread.close()
