"""The checkpoint backend: CRIU driven through its RPC (pycriu) in swrk mode.

We start `criu swrk FD` ourselves and hand pycriu the socket (`use_fd`),
rather than `use_binary`, because pycriu then forks the Python process itself
and would hand criu every inheritable fd of every pod; `subprocess` passes
exactly the fds we name, with the same numbers (`inherit_fd` needs that).

What lies outside the dumped tree is external and must be given back at
restore: the pod's namespaces (kept by its pause process) and the pipe the app
writes its output to (read by the activator). Which pipe that was is recorded
next to the image at dump, so that a restore can give the app the activator's
current pipe even when the image was made under another one (a pod adopted
after its activator was killed).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
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
from typing import Any, Protocol

import pycriu

from netns import proc

LOG_TAIL_LINES = 8
OUTPUT_PIPES = "output-pipes.json"
DUMP_LOCKS = Path("/run/pod-activator/dump-locks")

OnStart = Callable[[int], None]  # called with CRIU's pid


class CriuError(Exception):
    """A dump or restore failed; the message carries the tail of CRIU's log."""


class CriuNotFound(CriuError):
    pass


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
    extra: Mapping[str, Any] = field(default_factory=dict)


def _nothing(pid: int) -> None:
    pass


def _no_op() -> None:
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


class LocalLauncher:
    """CRIU as our child, in our namespaces."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary
        self._command: list[str] | None = None

    def swrk(self, pass_fds: tuple[int, ...]) -> AbstractContextManager[tuple[socket.socket, int]]:
        if self._command is None:
            # Straight through CRIU's loader: the wrapper's shell costs a wake 1-2 ms.
            try:
                self._command = criu_command("")
            except CriuNotFound:
                self._command = [str(self.binary)]
        return _swrk(self._command, pass_fds)

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


class Criu:
    def __init__(
        self, binary: Path, options: CriuOptions | None = None, launcher: Launcher | None = None
    ) -> None:
        self.binary = binary
        self.options = options or CriuOptions()
        self.launcher = launcher or LocalLauncher(binary)

    def using(self, launcher: Launcher) -> Criu:
        """The same CRIU, started by `launcher`."""
        return Criu(self.binary, self.options, launcher)

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

        `on_start` gets CRIU's pid before CRIU touches the app (for the journal)."""
        images.mkdir(mode=0o700, parents=True, exist_ok=True)
        opts = self._common_opts(images, "dump.log")
        opts.pid = pid
        opts.leave_running = False
        for kind, path in externals.namespaces.items():
            opts.external.append(f"{kind}[{os.stat(path).st_ino}]:pod-{kind}")
        fd = os.open(images / OUTPUT_PIPES, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as record:
            json.dump(output_pipes(pid), record)
        with self._dump_lock(pid):
            self._call("dump", opts, images, pass_fds=(), on_start=on_start)
        if "net" in externals.namespaces:
            forget_conntrack(images)
        return image_bytes(images)

    def restore(
        self, images: Path, externals: Externals, on_start: OnStart = _nothing, lazy: bool = False
    ) -> int:
        """Restore the tree saved in `images` as our child; return its root's pid.

        `lazy`: the memory is not copied now but fetched on first touch from a
        `serve_pages` daemon on the same images (userfaultfd)."""
        with ExitStack() as stack:
            opts = self._common_opts(images, "restore.log")
            opts.lazy_pages = lazy
            opts.rst_sibling = True  # the restored root becomes our child: we reap it
            fds: list[int] = []
            for kind, path in externals.namespaces.items():
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                stack.callback(os.close, fd)
                fds.append(fd)
                opts.inherit_fd.add(key=f"pod-{kind}", fd=fd)
            if externals.output is not None:
                fds.append(externals.output)
                for key in recorded_output_pipes(images):
                    opts.inherit_fd.add(key=key, fd=externals.output)
            if "net" in externals.namespaces:
                forget_conntrack(images)  # an image dumped before it was done at dump
            response = self._call("restore", opts, images, tuple(fds), on_start)
            return int(response.pid)

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
        opts = pycriu.rpc.criu_opts(images_dir_fd=-1)
        opts.images_dir = self.launcher.path(images)
        opts.log_file = log_file
        opts.log_level = self.options.log_level
        # The activator keeps serving the pod's network during the dump: no lock.
        opts.network_lock = pycriu.rpc.SKIP
        opts.tcp_skip_in_flight = True
        opts.tcp_close = self.options.tcp_close
        opts.file_locks = self.options.file_locks
        opts.ghost_limit = self.options.ghost_limit
        for name, value in self.options.extra.items():
            setattr(opts, name, value)
        return opts

    def _call(
        self,
        op: str,
        opts: Any,
        images: Path,
        pass_fds: tuple[int, ...],
        on_start: OnStart,
    ) -> Any:
        with self.launcher.swrk(pass_fds) as (sock, pid):
            on_start(pid)
            # A CRIU that hangs (seen: a restore from a truncated image waits
            # forever for a task that died) is ended, so the pod goes on.
            criu = proc.Process.of(pid)
            watchdog = threading.Timer(self.options.timeout, criu.kill if criu else _no_op)
            watchdog.daemon = True
            watchdog.start()
            client = pycriu.criu()
            client.use_fd(sock.fileno())
            client.opts = opts
            try:
                return getattr(client, op)()
            except Exception as exc:
                tail = log_tail(images / opts.log_file)
                if watchdog.finished.is_set():  # it fired: we ended CRIU
                    raise CriuError(
                        f"criu {op} did not finish within {self.options.timeout:g} s "
                        f"and was ended{tail}"
                    ) from exc
                if isinstance(exc, pycriu.CRIUException):
                    raise CriuError(f"criu {op} failed: {exc}{tail}") from exc
                raise
            finally:
                watchdog.cancel()


@contextmanager
def _swrk(command: list[str], pass_fds: tuple[int, ...]) -> Iterator[tuple[socket.socket, int]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = subprocess.Popen(
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
        yield ours, proc.pid
    finally:
        ours.close()  # criu swrk serves until its socket closes
        proc.wait()


def output_pipes(pid: int) -> list[str]:
    """The pipes (CRIU's keys, "pipe:[INODE]") the app's stdout and stderr are."""
    keys = []
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if (target := os.readlink(f"/proc/{pid}/fd/{fd}")).startswith("pipe:["):
                keys.append(target)
    return sorted(set(keys))


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
    images are raw netlink messages: empty means no entry.
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
