"""The checkpoint backend: CRIU driven through its RPC in swrk mode.

We start `criu swrk FD` ourselves, with exactly the fds a call needs at the
same numbers (`inherit_fd` names CRIU's own fds), and speak the RPC on its
socket: one protobuf message (pycriu's rpc_pb2) per SEQPACKET message each way.
A pod's CRIU can start its next `criu swrk` ahead of the call (`ahead`), so
that CRIU's own start-up is off the wake's and the checkpoint's path; the pods
of one activator keep at most `CriuOptions.spares` of those at a time. A
restore is called from the event loop, a dump from a worker thread (see each).

What lies outside the dumped tree is external and must be given back at
restore: the pod's namespaces (kept by its pause process) and the pipe the app
writes its output to (read by the activator). Which pipe that was is recorded
next to the image at dump, so that a restore can give the app the activator's
current pipe even when the image was made under another one (a pod adopted
after its activator was killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from netns import proc

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 8
# How long after a call its pod's next `criu swrk` is started: after the woken
# app's first answer, well before a scale-down (at least half a second later).
SPARE_AFTER = 0.05
# How long a `criu swrk` whose socket was closed may take to end, at a pod's removal.
SWRK_END_WAIT = 5.0
# CRIU's largest RPC message (CR_MAX_MSG_SIZE).
MAX_MESSAGE = 1024
OUTPUT_PIPES = "output-pipes.json"
DUMP_LOCKS = Path("/run/pod-activator/dump-locks")

OnStart = Callable[[int], None]  # called with CRIU's pid


class CriuError(Exception):
    """A dump or restore failed; the message carries the tail of CRIU's log."""


class CriuNotFound(CriuError):
    pass


def _load_rpc() -> ModuleType:
    """pycriu's rpc_pb2 alone. `import pycriu` also loads pycriu.images, the
    schemas of every image file (3.5 MiB of the activator's memory), which
    the activator never reads; rpc_pb2 itself needs only protobuf. It is
    registered under its own name, so a later `import pycriu` reuses it."""
    name = "pycriu.rpc_pb2"
    if (loaded := sys.modules.get(name)) is not None:
        return loaded
    package = importlib.util.find_spec("pycriu")  # finds it without running __init__
    if package is None or not package.submodule_search_locations:
        raise ImportError("pycriu is not installed: run scripts/setup")
    path = Path(next(iter(package.submodule_search_locations))) / "rpc_pb2.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"pycriu has no {path}: run scripts/setup")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


rpc = _load_rpc()


@dataclass(frozen=True)
class Externals:
    """What the app uses but the image does not hold."""

    # kind ("net", "pid") -> an ns file such as /proc/PAUSE/ns/net
    namespaces: Mapping[str, Path]
    # the write end of the pipe the restored app's stdout and stderr go to
    output: int | None = None


@dataclass(frozen=True)
class CriuOptions:
    tcp_close: bool = True  # the app's own TCP connections get EOF, not a stale peer
    # Servers that lock files (MariaDB) cannot be dumped without it; it costs
    # nothing when the app holds no locks.
    file_locks: bool = True
    ghost_limit: int = 1 << 20
    log_level: int = 2
    # How long one dump or restore may take before CRIU is ended.
    timeout: float = 120.0
    # How many pods keep their next call's `criu swrk` started ahead of it
    # (see Criu.ahead): each is an idle CRIU, about 1 MiB of the node's memory.
    spares: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)


def _nothing(pid: int) -> None:
    pass


class Launcher(Protocol):
    """How `criu swrk` is started, and how it names our paths."""

    def swrk(self, pass_fds: tuple[int, ...]) -> AbstractContextManager[tuple[socket.socket, int]]:
        """Run `criu swrk` with `pass_fds` at the same numbers; its socket and pid."""
        ...

    def path(self, ours: Path) -> str:
        """The name CRIU (maybe in other namespaces) knows `ours` by."""
        ...

    def credentials(self) -> int:
        """A process whose user and capabilities CRIU will have (for pre-flight)."""
        ...

    def reap(self, wait: bool = False) -> None:
        """Reap the `criu swrk`s that ended (`wait`: for those still ending)."""
        ...


class LocalLauncher:
    """CRIU as our child, in our namespaces."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary
        self._command: list[str] | None = None
        # `criu swrk`s told to end (their socket closed), reaped at the next
        # start rather than waited for: they end after the call's answer.
        self._ending: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()

    def swrk(self, pass_fds: tuple[int, ...]) -> AbstractContextManager[tuple[socket.socket, int]]:
        self.reap()
        if self._command is None:
            # Straight through CRIU's loader: the wrapper's shell costs a wake 1-2 ms.
            try:
                self._command = criu_command("")
            except CriuNotFound:
                self._command = [str(self.binary)]
        return _swrk(self._command, pass_fds, self._ended)

    def reap(self, wait: bool = False) -> None:
        with self._lock:
            ending, self._ending = self._ending, []
        for swrk in ending:
            with contextlib.suppress(subprocess.TimeoutExpired):
                swrk.wait(SWRK_END_WAIT if wait else 0)
        with self._lock:
            self._ending += [swrk for swrk in ending if swrk.returncode is None]

    def _ended(self, swrk: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._ending.append(swrk)

    def path(self, ours: Path) -> str:
        return str(ours)

    def credentials(self) -> int:
        return os.getpid()


def criu_command(root: str) -> list[str]:
    """How to run our CRIU without a shell: through its own loader, every path
    under `root` (our root as another mount namespace sees it, for a sidecar:
    nothing of the app's image is used, it may have no libc at all)."""
    prefix = Path(sys.prefix) / "criu"  # scripts/setup's private CRIU, if it made one
    loaders = sorted(prefix.glob("usr/lib/*/ld-linux-*.so.*"))
    if loaders:
        libraries = [loaders[0].parent]
        binary = prefix / "usr/sbin/criu"
    else:
        system = shutil.which("criu")
        loaders = sorted(Path("/lib64").glob("ld-linux-*.so.*"))
        if system is None or not loaders:
            raise CriuNotFound("no criu (or no loader for it) here: run scripts/setup")
        binary = Path(system).resolve()
        triplet = f"{os.uname().machine}-linux-gnu"
        libraries = [Path("/lib") / triplet, Path("/usr/lib") / triplet]
    return [
        root + str(loaders[0]),
        "--library-path",
        ":".join(root + str(d) for d in libraries),
        root + str(binary),
    ]


def find_criu() -> Path:
    """The criu that scripts/setup installed next to this Python, else PATH's."""
    candidates = [Path(sys.prefix) / "bin" / "criu"]
    if found := shutil.which("criu"):
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise CriuNotFound("criu not found next to this Python or on PATH: run scripts/setup")


@dataclass
class _Swrk:
    """A started `criu swrk`, and the fds it holds for a restore."""

    sock: socket.socket
    pid: int
    fds: dict[str, int]  # namespace kind or "output" -> the fd's number in CRIU
    holds: tuple[Any, ...]  # what those fds are (see _identity)
    stack: ExitStack  # ends it

    def end(self) -> None:
        self.stack.close()


def _identity(needs: Externals | None) -> tuple[Any, ...]:
    """What a `criu swrk` started for `needs` holds: a spare started earlier
    serves a call only if the namespaces and the pipe are still the same."""
    if needs is None:
        return ()
    held: list[Any] = []
    for kind, path in sorted(needs.namespaces.items()):
        st = os.stat(path)
        held.append((kind, st.st_dev, st.st_ino))
    if needs.output is not None:
        st = os.fstat(needs.output)
        held.append(("output", st.st_dev, st.st_ino))
    return tuple(held)


class Criu:
    def __init__(
        self,
        binary: Path,
        options: CriuOptions | None = None,
        launcher: Launcher | None = None,
    ) -> None:
        self.binary = binary
        self.options = options or CriuOptions()
        self.launcher = launcher or LocalLauncher(binary)
        self._spare: _Spare | None = None
        self._spares = _Spares(self.options.spares)
        # The output pipes of this CRIU's last dump: (its record's identity, keys).
        self._dumped_pipes: tuple[tuple[int, int], list[str]] | None = None

    def using(self, launcher: Launcher) -> Criu:
        """The same CRIU, started by `launcher`."""
        criu = Criu(self.binary, self.options, launcher)
        criu._spares = self._spares  # one limit for all the activator's pods
        return criu

    def ahead(self) -> Criu:
        """The same CRIU for one pod, which starts the `criu swrk` of the pod's
        next call ahead of it (a dump after a restore, a restore after a dump),
        so that CRIU's start-up (fork, exec, loading) is off the wake's path.
        From the pod's second call on, while fewer than `options.spares` other
        pods hold one. Call from the event loop; close() ends the spare."""
        criu = self.using(self.launcher)
        criu._spare = _Spare(criu, self._spares, asyncio.get_running_loop())
        return criu

    def close(self) -> None:
        """End the spare, if any, and reap what has ended: no zombie outlives a pod."""
        if self._spare is not None:
            self._spare.close()
        self.launcher.reap(wait=True)

    @contextmanager
    def _dump_lock(self, pid: int) -> Iterator[None]:
        """One dump at a time per working directory, on this machine: CRIU's
        parasite makes a temporary directory there named after the task's pid,
        and apps of different pods share pids (each is pid 2 or so in its own
        namespace): concurrent dumps then fail with EEXIST (seen by the bench,
        and between activators). A file lock: it holds across threads and
        processes alike."""
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        DUMP_LOCKS.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = hashlib.sha256(cwd.encode(errors="surrogateescape")).hexdigest()[:32]
        fd = os.open(DUMP_LOCKS / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # and the lock with it

    def dump(
        self, pid: int, images: Path, externals: Externals, on_start: OnStart = _nothing
    ) -> int:
        """Checkpoint the tree rooted at `pid` into `images`; return the image size.
        Blocks (the dump lock, the call): run it in a worker thread.

        `on_start` gets CRIU's pid before CRIU touches the app (for the journal)."""
        images.mkdir(mode=0o700, parents=True, exist_ok=True)
        opts = self._common_opts(images, "dump.log")
        opts.pid = pid
        opts.leave_running = False
        for kind, path in externals.namespaces.items():
            opts.external.append(f"{kind}[{os.stat(path).st_ino}]:pod-{kind}")
        pipes = output_pipes(pid)
        fd = os.open(images / OUTPUT_PIPES, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as record:
            json.dump(pipes, record)
        with self._dump_lock(pid):
            self._call(rpc.DUMP, opts, images, self._start(None), on_start)
        self._dumped_pipes = (_file_identity(images / OUTPUT_PIPES), pipes)
        if self._spare is not None:
            self._spare.prepare(externals)  # the pod's next call restores it
        if "net" in externals.namespaces:
            forget_conntrack(images)
        return image_bytes(images)

    async def restore(
        self, images: Path, externals: Externals, on_start: OnStart = _nothing, lazy: bool = False
    ) -> int:
        """Restore the tree saved in `images` as our child; return its root's pid.

        On the event loop, which the RPC's wait does not hold: with the pod's
        spare `criu swrk` the wake has no hop to a worker thread and back (on
        these VMs a thread that slept takes up to a millisecond to run again).
        Only starting a new `criu swrk` (fork, exec) goes to a thread.

        `lazy`: the memory is not copied now but fetched on first touch from a
        `serve_pages` daemon on the same images (userfaultfd)."""
        opts = self._common_opts(images, "restore.log")
        opts.lazy_pages = lazy
        opts.rst_sibling = True  # the restored root becomes our child: we reap it
        swrk = self._take_spare(externals)
        if swrk is None:
            swrk = await asyncio.to_thread(self._spawn, externals)
        for kind in externals.namespaces:
            opts.inherit_fd.add(key=f"pod-{kind}", fd=swrk.fds[kind])
        if externals.output is not None:
            for key in self._recorded_pipes(images):
                opts.inherit_fd.add(key=key, fd=swrk.fds["output"])
        response = await self._call_on_loop(rpc.RESTORE, opts, images, swrk, on_start)
        if self._spare is not None:
            self._spare.prepare(None)  # the pod's next call dumps it
        return int(response.restore.pid)

    def serve_pages(self, images: Path) -> subprocess.Popen[bytes]:
        """Start CRIU's lazy-pages daemon on `images`, ready when this returns;
        it ends once every page went to the restored app (or the app ended)."""
        if not isinstance(self.launcher, LocalLauncher):
            raise CriuError("lazy restore needs CRIU in our own namespaces (not in a sidecar)")
        ready_r, ready_w = os.pipe()
        try:
            daemon = subprocess.Popen(
                [
                    *(str(self.binary), "lazy-pages", "-D", self.launcher.path(images)),
                    *("-o", "lazy-pages.log", f"-v{self.options.log_level}"),
                    *("--status-fd", str(ready_w)),
                ],
                pass_fds=(ready_w,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError as exc:
            raise CriuNotFound(f"cannot run {self.binary}: {exc.strerror}") from exc
        finally:
            os.close(ready_w)
        with open(ready_r, "rb") as ready:
            if ready.read(1) != b"\0":  # EOF: it failed before listening
                daemon.wait()
                raise CriuError(f"criu lazy-pages failed{log_tail(images / 'lazy-pages.log')}")
        return daemon

    def _common_opts(self, images: Path, log_file: str) -> Any:
        opts = rpc.criu_opts(images_dir_fd=-1)
        opts.images_dir = self.launcher.path(images)
        opts.log_file = log_file
        opts.log_level = self.options.log_level
        # The activator keeps serving the pod's network during the dump: no lock.
        opts.network_lock = rpc.SKIP
        opts.tcp_skip_in_flight = True
        opts.tcp_close = self.options.tcp_close
        opts.file_locks = self.options.file_locks
        opts.ghost_limit = self.options.ghost_limit
        for name, value in self.options.extra.items():
            setattr(opts, name, value)
        return opts

    def _recorded_pipes(self, images: Path) -> list[str]:
        """The output pipes recorded with `images`: those of our last dump if
        its record is there (the pod renames the directory), known without
        reading it: one file read less on the wake's path, and its page may
        have been evicted while the pod was scaled down."""
        if self._dumped_pipes is not None:
            record, pipes = self._dumped_pipes
            with contextlib.suppress(OSError):
                if _file_identity(images / OUTPUT_PIPES) == record:
                    return pipes
        return recorded_output_pipes(images)

    def _start(self, needs: Externals | None) -> _Swrk:
        """A `criu swrk` for a call: the pod's spare if it serves, else a new one."""
        return self._take_spare(needs) or self._spawn(needs)

    def _take_spare(self, needs: Externals | None) -> _Swrk | None:
        """The pod's spare, if it holds what the call needs (a restore: the
        pod's namespaces and output pipe)."""
        return self._spare.take(_identity(needs)) if self._spare is not None else None

    def _spawn(self, needs: Externals | None) -> _Swrk:
        holds = _identity(needs)
        stack = ExitStack()
        fds: dict[str, int] = {}
        with ExitStack() as ours:  # CRIU keeps its copies
            for kind, path in needs.namespaces.items() if needs else ():
                fds[kind] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                ours.callback(os.close, fds[kind])
            if needs is not None and needs.output is not None:
                fds["output"] = needs.output
            sock, pid = stack.enter_context(self.launcher.swrk(tuple(fds.values())))
        return _Swrk(sock, pid, fds, holds, stack)

    def _call(self, kind: int, opts: Any, images: Path, swrk: _Swrk, on_start: OnStart) -> Any:
        """One request to `swrk`, which ends with it; CRIU's answer. Blocks."""
        with swrk.stack, self._failures(kind, opts, images, swrk):
            self._send(kind, opts, swrk, on_start)
            swrk.sock.settimeout(self.options.timeout)
            answer = swrk.sock.recvmsg(MAX_MESSAGE)
        return _response(kind, opts, images, answer)

    async def _call_on_loop(
        self, kind: int, opts: Any, images: Path, swrk: _Swrk, on_start: OnStart
    ) -> Any:
        """`_call`, waiting for the answer without holding the event loop."""
        loop = asyncio.get_running_loop()
        with swrk.stack, self._failures(kind, opts, images, swrk):
            self._send(kind, opts, swrk, on_start)
            answered = loop.create_future()

            def readable() -> None:
                if not answered.done():
                    answered.set_result(None)

            loop.add_reader(swrk.sock, readable)
            try:
                await asyncio.wait_for(answered, self.options.timeout)
            finally:
                loop.remove_reader(swrk.sock)
            answer = swrk.sock.recvmsg(MAX_MESSAGE, 0, socket.MSG_DONTWAIT)
        return _response(kind, opts, images, answer)

    def _send(self, kind: int, opts: Any, swrk: _Swrk, on_start: OnStart) -> None:
        on_start(swrk.pid)
        swrk.sock.send(rpc.criu_req(type=kind, opts=opts).SerializeToString())

    @contextmanager
    def _failures(self, kind: int, opts: Any, images: Path, swrk: _Swrk) -> Iterator[None]:
        """A call's failures as CriuErrors. A CRIU that hangs (seen: a restore
        from a truncated image waits forever for a task that died) is ended
        at the timeout, so the pod goes on."""
        op = rpc.criu_req_type.Name(kind).lower()
        try:
            yield
        except TimeoutError:
            if (criu := proc.Process.of(swrk.pid)) is not None:
                criu.kill()
            raise CriuError(
                f"criu {op} did not finish within {self.options.timeout:g} s "
                f"and was ended{log_tail(images / opts.log_file)}"
            ) from None
        except OSError as exc:
            raise CriuError(f"criu {op} failed: {exc}{log_tail(images / opts.log_file)}") from exc


def _response(kind: int, opts: Any, images: Path, answer: tuple[bytes, Any, int, Any]) -> Any:
    """CRIU's answer to a call of `kind`, or the CriuError of its failure."""
    data, _, flags, _ = answer
    response = rpc.criu_resp()
    if data and not flags & socket.MSG_TRUNC:
        response.ParseFromString(data)
    if not response.success or response.type != kind:
        op = rpc.criu_req_type.Name(kind).lower()
        raise CriuError(f"criu {op} failed: {_why(response)}{log_tail(images / opts.log_file)}")
    return response


def _why(response: Any) -> str:
    if not response.IsInitialized():
        return "it ended without an answer"
    if response.cr_errmsg:
        return str(response.cr_errmsg)
    if response.cr_errno:
        return f"{os.strerror(response.cr_errno)} (errno {response.cr_errno})"
    return "see its log"


class _Spares:
    """The spares of one activator's pods, at most `limit` at a time: a new
    one ends the spare held longest, so the pods that cycled last keep
    theirs (the likeliest to cycle again soon). A place is taken before the
    swrk is started, so that a burst of calls (many pods scaled down at
    once) starts few more than `limit`. Its lock guards every spare."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self._holders: dict[_Spare, None] = {}  # the oldest first

    def admit(self, spare: _Spare) -> list[_Swrk]:
        """Give `spare` a place; the swrks this ends (lock held)."""
        self._holders.pop(spare, None)
        self._holders[spare] = None
        ended = []
        while len(self._holders) > self.limit:
            oldest = next(iter(self._holders))
            del self._holders[oldest]
            if oldest._swrk is not None:
                ended.append(oldest._swrk)
                oldest._swrk = None
        return ended

    def release(self, spare: _Spare) -> None:
        """`spare` gives up its place (lock held)."""
        self._holders.pop(spare, None)

    def placed(self, spare: _Spare) -> bool:
        return spare in self._holders


class _Spare:
    """One `criu swrk` started ahead of a pod's next call, off the wake's path.

    The call that ends asks for the next one's (prepare); it is started
    SPARE_AFTER later in a worker thread (a launcher may block), unless
    another call came first, which then started its own."""

    def __init__(self, criu: Criu, spares: _Spares, loop: asyncio.AbstractEventLoop) -> None:
        self.criu = criu
        self.spares = spares
        self.loop = loop
        self._swrk: _Swrk | None = None
        self._calls = 0  # prepared spares of earlier calls are stale
        self._closed = False

    def take(self, holds: tuple[Any, ...]) -> _Swrk | None:
        with self.spares.lock:
            self._calls += 1
            swrk, self._swrk = self._swrk, None
            self.spares.release(self)
        if swrk is not None and swrk.holds != holds:
            swrk.end()
            return None
        return swrk

    def prepare(self, needs: Externals | None) -> None:
        with self.spares.lock:
            calls = self._calls
        self.loop.call_soon_threadsafe(self.loop.call_later, SPARE_AFTER, self._start, calls, needs)

    def close(self) -> None:
        with self.spares.lock:
            self._closed = True
            swrk, self._swrk = self._swrk, None
            self.spares.release(self)
        if swrk is not None:
            swrk.end()

    def _start(self, calls: int, needs: Externals | None) -> None:
        with self.spares.lock:
            if self._closed or calls != self._calls:
                return
            ended = self.spares.admit(self)
        for other in ended:
            other.end()
        self.loop.run_in_executor(None, self._make, calls, needs)

    def _wanted(self, calls: int) -> bool:
        """Still no call since, and still a place (lock held)."""
        return not self._closed and calls == self._calls and self.spares.placed(self)

    def _make(self, calls: int, needs: Externals | None) -> None:
        with self.spares.lock:
            if not self._wanted(calls):
                return  # its place went to a later spare before it started
        try:
            swrk = self.criu._spawn(needs)
        except (CriuError, OSError) as exc:  # the next call starts its own, and says why
            log.debug("no spare criu swrk: %s", exc)
            with self.spares.lock:
                if self._wanted(calls):
                    self.spares.release(self)  # its place to another pod's
            return
        with self.spares.lock:
            kept = self._wanted(calls) and self._swrk is None
            if kept:
                self._swrk = swrk
        if not kept:
            swrk.end()


@contextmanager
def _swrk(
    command: list[str], pass_fds: tuple[int, ...], ended: Callable[[subprocess.Popen[bytes]], None]
) -> Iterator[tuple[socket.socket, int]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        swrk = subprocess.Popen(
            [*command, "swrk", str(theirs.fileno())],
            pass_fds=(theirs.fileno(), *pass_fds),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            umask=0o077,  # the images hold the app's memory, secrets too: 0600
        )
    except OSError as exc:
        ours.close()
        raise CriuNotFound(f"cannot run {command[0]}: {exc.strerror}: run scripts/setup") from exc
    finally:
        theirs.close()
    try:
        yield ours, swrk.pid
    finally:
        ours.close()  # criu swrk serves until its socket closes
        ended(swrk)


def output_pipes(pid: int) -> list[str]:
    """The pipes (CRIU's keys, "pipe:[INODE]") the app's stdout and stderr are."""
    keys = []
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if (target := os.readlink(f"/proc/{pid}/fd/{fd}")).startswith("pipe:["):
                keys.append(target)
    return sorted(set(keys))


def _file_identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def recorded_output_pipes(images: Path) -> list[str]:
    try:
        keys = json.loads((images / OUTPUT_PIPES).read_text())
    except (OSError, ValueError):
        return []
    return [k for k in keys if isinstance(k, str) and k.startswith("pipe:[")]


def forget_conntrack(images: Path) -> None:
    """Empty the connection-tracking table CRIU saved with the pod's network
    namespace, so that a restore leaves the live table alone.

    CRIU dumps a network namespace's conntrack entries even when the namespace
    is external, and a restore writes each one back (create or update). The
    pod's namespace is not restored, it lives on, and the activator keeps
    accepting connections in it during the checkpoint and the restore: writing
    back the table of the dump overwrites the entry of such a connection when
    its client port was used before by a connection still remembered then
    (TIME_WAIT). The entry gets the old state and timer, and when that timer
    runs out its port redirect goes with it: the app's answer leaves the pod
    from the shadow port instead of the app's, the client resets it, and
    waits for an answer that never comes (entries that expired since the
    dump came back to life too). The app's own connections are closed at the
    dump (tcp_close): nothing in the table is the image's to restore. The
    images are raw netlink messages: empty means no entry. Done as a dump's
    last step (by the next activator for a dump a killed one left), not on
    the wake's path.
    """
    for pattern in ("netns-ct-*.img", "netns-exp-*.img"):
        for table in images.glob(pattern):
            os.truncate(table, 0)


def image_bytes(images: Path) -> int:
    return sum(p.stat().st_size for p in images.iterdir() if p.is_file() and p.suffix == ".img")


def log_tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if "Error" in line or "rror (" in line]
    tail = (errors or lines)[-LOG_TAIL_LINES:]
    return ("\n  criu log (" + str(log) + "):\n  " + "\n  ".join(tail)) if tail else ""
