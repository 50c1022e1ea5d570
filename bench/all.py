"""Run every bench, each in its own process, then write REPORT.md and the plots.

    python -m bench.all [--quick] [--only NAME ...] [--out DIR] [--wait-quiet SECONDS]

A bench that fails does not stop the others; the exit status says whether all
passed. The report covers whatever results are in the results directory.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS, log

BENCHES = ("wake_checkpoint", "wake_timeline", "proxy", "density", "lazy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (~2 min)")
    parser.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--wait-quiet", type=float, default=None, metavar="SECONDS")
    args = parser.parse_args(argv)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    common = ["--out", str(out)]
    if args.quick:
        common.append("--quick")
    if args.wait_quiet is not None:
        common += ["--wait-quiet", str(args.wait_quiet)]

    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, frame: object) -> None:
        # The bench cleans up on SIGTERM; then we stop.
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGHUP, forward)
    failed = []
    started = time.monotonic()
    for name in args.only:
        log(f"== bench {name}")
        t0 = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", f"bench.{name}", *common])
        try:
            rc = child.wait()
        except KeyboardInterrupt:
            child.wait()  # it got the SIGINT too, and cleans up
            raise
        outcome = "ok" if rc == 0 else f"FAILED ({rc})"
        log(f"== bench {name}: {outcome} in {time.monotonic() - t0:.0f}s")
        if rc != 0:
            failed.append(name)
    from bench.report import main as report_main

    report_main(["--dir", str(out)])
    log(f"all benches done in {time.monotonic() - started:.0f}s; report: {out / 'REPORT.md'}")
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
