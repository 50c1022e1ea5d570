"""The pause process: pid 1 of a pod's pid namespace, pinning the pod.

Run as `python -I -S pause.py [READY_FD]`: stdlib only, no site import, so
it costs a few MiB. As pid 1 it has two duties the kernel gives no default
for: exit on SIGTERM/SIGINT (pid 1 ignores signals it has no handler for)
and reap the orphans the kernel re-parents to it. Its exit makes the kernel
kill everything else in the pod's pid namespace.

Signals are blocked and taken synchronously with sigwaitinfo: no handler can
interrupt a reap, and a signal sent before the loop starts stays pending
instead of being dropped. Blocked signals are never discarded for pid 1.
"""

import os
import signal
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


def main(argv: list[str]) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
    os.chdir("/")  # do not pin the directory we were started from
    if len(argv) > 1:
        # Tell the starter we are ready: signals sent from now on are honoured.
        ready = int(argv[1])
        os.write(ready, b"R")
        os.close(ready)
    while True:
        info = signal.sigwaitinfo(_WAITED)
        if info.si_signo in _STOP:
            return 0
        _reap()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
