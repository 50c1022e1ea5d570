"""The pause process: pid 1 of a pod's pid namespace, pinning the pod.

Run as `python -I -S pause.py READY_FD [--lifeline FD --output FD --nft NFT
--table TABLE]`: stdlib only, no site import, so it costs a few MiB. As pid 1
it has two duties the kernel gives no default for: exit on SIGTERM/SIGINT
(pid 1 ignores signals it has no handler for) and reap the orphans the kernel
re-parents to it. Its exit makes the kernel kill everything else in the pod's
pid namespace.

It is also the activator's fallback, so that the pod fails open: the
activator holds the write end of the lifeline pipe; when the activator dies
the pause sees EOF, deletes the activator's nft table (the app's ports are
reached directly again), and from then on reads and drops the app's output,
which nobody else reads any more (a full pipe would block the app).

Signals are blocked until their handlers and the wakeup fd are in place, so
one sent early stays pending instead of being dropped; the handlers only
wake the poll loop, which does the work. poll, not select: the fds it gets
keep the activator's numbers, which pass 1024 with many pods (select aborts).
"""

import os
import select
import signal
import subprocess
import sys

_STOP = {signal.SIGTERM, signal.SIGINT}
_WAITED = {*_STOP, signal.SIGCHLD}


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _options(args: list[str]) -> dict[str, str]:
    return dict(zip(args[0::2], args[1::2], strict=True))


def _fail_open(nft: str, table: str) -> None:
    subprocess.run(
        [nft, "delete", "table", "ip", table],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


def main(argv: list[str]) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
    os.chdir("/")  # do not pin the directory we were started from
    options = _options(argv[2:])
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for signum in _WAITED:
        signal.signal(signum, lambda *_: None)
    if len(argv) > 1:
        # Tell the starter we are ready: signals sent from now on are honoured.
        ready = int(argv[1])
        os.write(ready, b"R")
        os.close(ready)
    lifeline = int(options["--lifeline"]) if "--lifeline" in options else None
    output = int(options["--output"]) if "--output" in options else None
    draining = False
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WAITED)
    while True:
        watched = select.poll()
        for fd in (wake_r, lifeline, output if draining else None):
            if fd is not None:
                watched.register(fd, select.POLLIN)
        readable = {fd for fd, _ in watched.poll()}
        if wake_r in readable:
            signums = set(os.read(wake_r, 512))
            if signums & _STOP:
                return 0
            _reap()
        if lifeline is not None and lifeline in readable and not os.read(lifeline, 1):
            # The activator is gone.
            os.close(lifeline)
            lifeline = None
            _fail_open(options["--nft"], options["--table"])
            draining = True
        if output is not None and output in readable and not os.read(output, 65536):
            os.close(output)
            output = None


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
