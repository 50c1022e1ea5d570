"""The processes of a local pod: the pause process, and applications started in it.

The pause process is pid 1 of the pod's own pid namespace and sits in the
pod's network namespace, as a kubelet's sandbox does. Applications join both
namespaces, so CRIU can dump their subtree with both namespaces external
and restore them into the same ones while the pause keeps them alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from netns import _libc, proc
from netns.errors import PauseError, SpawnError

__all__ = [
    "Fallback",
    "Pause",
    "PauseError",
    "SpawnError",
    "become_subreaper",
    "is_subreaper",
    "spawn_in_pod",
    "start_pause",
]

_HERE = Path(__file__).resolve().parent
# -I: ignore PYTHON* variables and user site; -S: skip site, which keeps the
# pause at a few MiB and both programs fast to start. They use stdlib only.
_PYTHON = [sys.executable, "-I", "-S"]

DEFAULT_START_TIMEOUT = 5.0
DEFAULT_STOP_TIMEOUT = 5.0


# The limit of open files this process was started with, which the apps it
# starts get back (see raise_open_files_limit).
_app_open_files: tuple[int, int] | None = None


def raise_open_files_limit() -> None:
    """Raise this process's soft limit of open files to its hard limit.

    The activator holds two fds per relayed connection and a few per pod:
    under the soft limit services commonly start with (1024), a hundred pods
    with some traffic would run out and refuse connections. The apps that
    spawn_in_pod starts get the limit this process was started with, as any
    other launcher would have given them.
    """
    global _app_open_files
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _app_open_files is None:
        _app_open_files = (soft, hard)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def become_subreaper() -> None:
    """Make orphaned descendants of this process its children (PR_SET_CHILD_SUBREAPER).

    Call it before starting any pod application: spawn_in_pod relies on it,
    and the kernel only lets processes forked afterwards find this reaper.
    """
    try:
        _libc.set_child_subreaper(True)
    except OSError as exc:
        raise SpawnError(f"cannot become a child subreaper: {exc.strerror}", exc.errno) from exc


def is_subreaper() -> bool:
    return _libc.is_child_subreaper()


def _wait_readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def _tool(name: str, package: str = "util-linux") -> str:
    path = shutil.which(name)
    if path is None:
        raise PauseError(f"{name} not found in PATH: install {package}")
    return path


class Pause:
    """A running pause process.

    `pid` is the pause's pid in the host pid namespace (pid 1 inside the
    pod): the one for /proc/PID/ns/{net,pid} and `nsenter -t PID`.
    `net_ns_inode` and `pid_ns_inode` name the pod's namespaces (CRIU's
    `external net[...]` / `pid[...]`). `popen` is our direct child,
    `unshare`, which waits for the pause; `pidfd` refers to the pause
    itself, so signals never hit a recycled pid.
    """

    def __init__(self, popen: subprocess.Popen[bytes], pid: int, pidfd: int) -> None:
        self.popen = popen
        self.pid = pid
        self.pidfd = pidfd
        self.net_ns_inode = os.stat(f"/proc/{pid}/ns/net").st_ino
        self.pid_ns_inode = os.stat(f"/proc/{pid}/ns/pid").st_ino
        self._stopped = False

    def alive(self) -> bool:
        return not self._stopped and not _wait_readable(self.pidfd, 0)

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, sig)

    def _dead_children_of_ours(self) -> list[int]:
        """Our children in the pod's pid namespace that have died but are not reaped."""
        found = []
        for child in proc.children_of(os.getpid()):
            try:
                if os.stat(f"/proc/{child}/ns/pid").st_ino != self.pid_ns_inode:
                    continue
            except OSError:
                continue
            if proc.state_of(child) == "Z":
                found.append(child)
        return found

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT, *, reap_children: bool = False) -> None:
        """SIGTERM the pause, SIGKILL it after `timeout`; reap unshare. Idempotent.

        When pid 1 of a pid namespace exits, the kernel kills the rest of the
        namespace and pid 1 finishes exiting only once every one of them has
        been reaped. Applications started with spawn_in_pod (or restored by
        CRIU with rst_sibling) are children of this process, not of the
        pause: this process must reap them. With reap_children, stop() does
        it (their exit statuses are lost to any other waiter); without,
        stop() raises PauseError naming them as soon as they are found dead
        and unreaped, so the caller can reap them and call stop() again.
        """
        if self._stopped:
            return
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        killed = False
        # A pidfd turns readable when its process exits, child of ours or not.
        while not _wait_readable(self.pidfd, 0.01):
            dead = self._dead_children_of_ours()
            if dead and not reap_children:
                raise PauseError(
                    f"pause pid {self.pid} cannot finish exiting: the pod's processes "
                    f"{dead} are children of this process and must be reaped (waitpid) "
                    "first; or stop with reap_children=True"
                )
            for pid in dead:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            if time.monotonic() >= deadline:
                if killed:
                    raise PauseError(
                        f"pause pid {self.pid} still there {timeout:.0f}s after SIGKILL; "
                        "check its state in /proc and any process of its pid namespace"
                    )
                self._signal(signal.SIGKILL)
                killed = True
                deadline = time.monotonic() + timeout
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout)
        self._stopped = True
        os.close(self.pidfd)

    def __repr__(self) -> str:
        return f"<Pause pid={self.pid} unshare={self.popen.pid}>"


@dataclass(frozen=True)
class Fallback:
    """What the pause does when the activator dies (see pause.py): it sees EOF
    on `lifeline` (whose write end only the activator holds), deletes the nft
    `table` so the app is reached directly, and drains `output`."""

    lifeline: int
    output: int
    table: str

    def argv(self) -> list[str]:
        return [
            "--lifeline", str(self.lifeline),
            "--output", str(self.output),
            "--nft", _tool("nft", "nftables"),
            "--table", self.table,
        ]  # fmt: skip


def start_pause(
    netns_path: str | os.PathLike[str],
    *,
    timeout: float = DEFAULT_START_TIMEOUT,
    fallback: Fallback | None = None,
) -> Pause:
    """Start a pause process in the network namespace at `netns_path` and a new pid namespace.

    Runs `nsenter --net=NETNS unshare --pid --fork --kill-child PAUSE` and
    returns once the pause has its signal handling in place.
    """
    path = os.fspath(netns_path)
    # stderr goes to a file, not a pipe: unshare keeps it open for the pod's
    # lifetime and nobody would read a pipe after start-up.
    with tempfile.TemporaryFile() as errors:
        return _start_pause(path, errors, timeout, fallback)


def _start_pause(path: str, errors: BinaryIO, timeout: float, fallback: Fallback | None) -> Pause:
    ready_r, ready_w = os.pipe()
    try:
        argv = [
            _tool("nsenter"),
            f"--net={path}",
            "--",
            _tool("unshare"),
            "--pid",
            "--fork",
            "--kill-child",  # the pause dies with unshare, so it cannot leak
            "--",
            *_PYTHON,
            str(_HERE / "pause.py"),
            str(ready_w),
            *(fallback.argv() if fallback else ()),
        ]
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                pass_fds=(ready_w, *((fallback.lifeline, fallback.output) if fallback else ())),
                # Its own session: a Ctrl-C meant for the activator must not
                # kill the pods behind its back; the activator stops them.
                start_new_session=True,
            )
        except OSError as exc:
            raise PauseError(f"cannot run {argv[0]}: {exc}") from exc
        os.close(ready_w)
        ready_w = -1
        deadline = time.monotonic() + timeout
        if not _wait_readable(ready_r, timeout):
            failure = f"was not ready within {timeout:.0f}s"
        elif os.read(ready_r, 1) != b"R":
            failure = "exited before it was ready"
        else:
            return _find_pause(popen, deadline)
        _discard(popen, timeout)
        errors.seek(0)
        said = errors.read().decode(errors="replace").strip() or "no message"
        raise PauseError(
            f"pause process for {path} {failure} (exit status {popen.returncode}): {said}"
        )
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)


def _find_pause(popen: subprocess.Popen[bytes], deadline: float) -> Pause:
    # nsenter execs unshare in place (it forks only for a pid namespace), so
    # the pause is the child of our child. It announced readiness, so it
    # exists; and unshare waits for it, so its pid cannot be recycled before
    # we hold a pidfd. The parent check after opening makes that certain.
    while True:
        kids = proc.children_of(popen.pid)
        if len(kids) == 1:
            pid = kids[0]
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                pidfd = -1
            if pidfd >= 0:
                if proc.parent_of(pid) == popen.pid:
                    try:
                        return Pause(popen, pid, pidfd)
                    except OSError:
                        pass  # it died meanwhile: reported below at the deadline
                os.close(pidfd)
        if time.monotonic() >= deadline:
            _discard(popen, 1.0)
            raise PauseError(
                f"cannot find the pause process under unshare pid {popen.pid} "
                f"(children: {kids}); is /proc mounted?"
            )
        time.sleep(0.005)


def _discard(popen: subprocess.Popen[bytes], timeout: float) -> None:
    # Killing unshare is enough: --kill-child takes the pause with it.
    if popen.poll() is None:
        popen.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout)


def spawn_in_pod(
    pause_pid: int,
    argv: Sequence[str],
    *,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
    stderr: int | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_START_TIMEOUT,
) -> int:
    """Start `argv` in the pod of `pause_pid`; return its host pid.

    The new process is in the pause's network and pid namespaces, leads its
    own session, and is a direct child of the caller, which must therefore be
    a child subreaper (become_subreaper()) and must waitpid() it. stdin,
    stdout, stderr are file descriptors (or subprocess.DEVNULL); None
    inherits the caller's. env defaults to the caller's environment. Nothing
    else is inherited: the caller's listening sockets stay with the caller.
    Raises SpawnError, with `errno` set, if the command cannot be started.
    """
    if not argv:
        raise SpawnError("cannot start an empty command line")
    if not is_subreaper():
        raise SpawnError(
            "the caller is not a child subreaper, so the application would be "
            "re-parented to init and could not be waited for: call "
            "become_subreaper() at start-up"
        )
    spec = {
        "argv": list(argv),
        "env": dict(os.environ if env is None else env),
        "cwd": None if cwd is None else os.fspath(cwd),
        "open_files": _app_open_files,
    }
    # A memfd rather than a pipe: the spec (environment included) can exceed
    # a pipe's buffer, and nothing has to be written concurrently.
    spec_fd = os.memfd_create("pod-activator-spawn")
    report_r, report_w = os.pipe()
    try:
        os.write(spec_fd, json.dumps(spec).encode())
        os.lseek(spec_fd, 0, os.SEEK_SET)
        try:
            helper = subprocess.Popen(
                [*_PYTHON, str(_HERE / "spawn.py"), str(pause_pid), str(spec_fd), str(report_w)],
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                pass_fds=(spec_fd, report_w),
                env={},
            )
        except OSError as exc:
            raise SpawnError(f"cannot start the spawn helper: {exc}", exc.errno) from exc
        os.close(report_w)
        report_w = -1
        report = _read_report(report_r, timeout)
        try:
            helper.wait(timeout)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
    finally:
        os.close(spec_fd)
        os.close(report_r)
        if report_w >= 0:
            os.close(report_w)
    pid = report.get("pid")
    if isinstance(pid, int):
        return pid
    errno = report.get("errno")
    raise SpawnError(
        f"cannot start {argv[0]!r} in the pod of pause pid {pause_pid}: "
        f"{report.get('error', 'the spawn helper died without a report')}",
        errno if isinstance(errno, int) else None,
    )


def _read_report(fd: int, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while _wait_readable(fd, deadline - time.monotonic()):
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    else:
        return {"error": f"the spawn helper did not answer within {timeout:.0f}s"}
    if not chunks:
        return {}
    report: dict[str, object] = json.loads(b"".join(chunks))
    return report
