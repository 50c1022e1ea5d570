"""Helper program that starts an application inside a pod (see process.spawn_in_pod).

Run as `python -I -S spawn.py PAUSE_PID SPEC_FD REPORT_FD`, stdlib only. It
joins the pause process's network and pid namespaces, forks (a pid
namespace applies to children only), and the child becomes a session leader
and execs the application. The helper reports the child's host pid, or why
it could not run, as one JSON object on REPORT_FD and exits at once, so the
child is re-parented to the nearest subreaper: the activator that started
us. SPEC_FD holds {"argv": [...], "env": {...}, "cwd": str | null}.

A fork inside the activator itself would do the same without this extra
exec, but forking a multi-threaded asyncio process and running Python in
the child risks deadlocks on locks other threads held; this process is
single-threaded, so its fork is safe.
"""

import ctypes
import json
import os
import resource
import signal
import sys
from typing import Any

_CLONE_NEWNET = 0x40000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWIPC = 0x08000000


def _setns(fd: int, nstype: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _enter(pause_pid: int) -> None:
    # Open both before entering either, so both refer to the same pause.
    net = os.open(f"/proc/{pause_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    pid = os.open(f"/proc/{pause_pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(net, _CLONE_NEWNET)
        _setns(pid, _CLONE_NEWPID)
    finally:
        os.close(net)
        os.close(pid)
    # The app's own IPC namespace, as a Kubernetes pod has one: SysV shared
    # memory (PostgreSQL's) can only be dumped from a namespace of its own;
    # CRIU saves and restores it with the app.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWIPC) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _StepFailed(Exception):
    def __init__(self, step: str, error: OSError) -> None:
        super().__init__(step)
        self.step = step
        self.error = error


def _exec_app(spec: Any) -> None:
    argv = [str(a) for a in spec["argv"]]
    env = {str(k): str(v) for k, v in spec["env"].items()}
    os.setsid()
    cwd = spec.get("cwd")
    if cwd is not None:
        try:
            os.chdir(str(cwd))
        except OSError as exc:
            raise _StepFailed(f"change to directory {cwd!r}", exc) from exc
    if (open_files := spec.get("open_files")) is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, tuple(open_files))
        except OSError as exc:
            raise _StepFailed(f"set the limit of open files to {open_files}", exc) from exc
    # Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec:
    # give the application the defaults any other launcher would.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        raise _StepFailed(f"execute {argv[0]!r}", exc) from exc


def _report(fd: int, message: dict[str, object]) -> None:
    os.write(fd, json.dumps(message).encode())


def main(args: list[str]) -> int:
    pause_pid, spec_fd, report_fd = (int(a) for a in args[1:4])
    # Neither descriptor may reach the application: an inherited REPORT_FD
    # would keep the caller waiting for an end of file that never comes.
    os.set_inheritable(report_fd, False)
    with os.fdopen(spec_fd, "rb") as spec_file:
        spec = json.load(spec_file)
    try:
        _enter(pause_pid)
    except OSError as exc:
        _report(
            report_fd,
            {
                "error": f"cannot join the namespaces of pause pid {pause_pid}: {exc.strerror}",
                "errno": exc.errno,
            },
        )
        return 1
    # Close-on-exec: it reaches end of file when the exec succeeds, and
    # carries the errno when it fails.
    exec_r, exec_w = os.pipe()
    child = os.fork()
    if child == 0:
        # Whatever happens here must end in _exit: returning would run the
        # helper's own code twice. Any failure is reported, since an end of
        # file without a report would read as a successful exec.
        try:
            os.close(exec_r)
            _exec_app(spec)
            failed: dict[str, object] = {"step": "exec", "errno": None, "strerror": "returned"}
        except _StepFailed as exc:
            failed = {"step": exc.step, "errno": exc.error.errno, "strerror": exc.error.strerror}
        except BaseException as exc:
            failed = {"step": "start the application", "errno": None, "strerror": repr(exc)}
        try:
            os.write(exec_w, json.dumps(failed).encode())
        finally:
            os._exit(127)
    os.close(exec_w)
    chunks = []
    while chunk := os.read(exec_r, 65536):
        chunks.append(chunk)
    if chunks:
        os.waitpid(child, 0)
        failed = json.loads(b"".join(chunks))
        _report(
            report_fd,
            {"error": f"cannot {failed['step']}: {failed['strerror']}", "errno": failed["errno"]},
        )
        return 1
    _report(report_fd, {"pid": child})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
