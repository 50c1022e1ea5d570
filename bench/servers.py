"""The server compatibility matrix as a table: real servers behind the activator.

For each server of tests/integration/servers.py (the recipes the integration
tests use): run it in a local pod under `activator run --scaledown-after 1s`,
write state through its own protocol, then CYCLES times: wait for the
activator's own scale-down, wake the pod by connecting with the server's
protocol from the host, and check that its processes and its state came back.

Columns (medians over the cycles):
- version; processes (threads) and RSS of the app before the first checkpoint
  (RSS summed over its processes, shared pages counted once per process);
- checkpoint ms and image size: the activator's `scaled-down` event;
- restore ms: the activator's `running` event after the wake;
- wake ms: at the client, from connect() to the first byte of the answer to
  the server's own first exchange (HTTP GET, PING, `version`, MySQL's greeting,
  PostgreSQL's SSLRequest) on a scaled-down pod.

The pods run with --no-probe-detection: the client is on the node, whose
connections the activator otherwise sniffs for up to --probe-wait (100 ms)
when the client sends nothing first (MySQL), which is not what a client in
another pod sees. Servers that run processes of another user cannot be
checkpointed without CAP_SYS_RESOURCE; their row says so.

Run as root:  .venv/bin/python bench/servers.py [--cycles N] [--only NAME ...]
Prints the table and writes it as Markdown to bench/results/servers.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repo's packages come from its root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.harness import BIN, REPO, START_TIMEOUT, ns_members
from tests.integration.servers import (
    SERVERS,
    PodRun,
    Scratch,
    Server,
    Unavailable,
    has_cap_sys_resource,
    read_image_tree,
)

RESULTS = REPO / "bench" / "results"
HEADERS = (
    "server",
    "version",
    "processes (threads)",
    "RSS MiB",
    "checkpoint ms",
    "image MiB",
    "restore ms",
    "wake ms",
    "state kept",
)


@dataclass
class Row:
    server: Server
    version: str = "-"
    processes: str = "-"
    rss: float | None = None
    checkpoint_ms: list[float] = field(default_factory=list)
    image_bytes: list[int] = field(default_factory=list)
    restore_ms: list[float] = field(default_factory=list)
    wake_ms: list[float] = field(default_factory=list)
    outcome: str = "-"
    note: str = ""

    def cells(self) -> list[str]:
        return [
            self.server.title,
            self.version,
            self.processes,
            _num(self.rss, 1),
            _median(self.checkpoint_ms),
            _median([b / 1048576 for b in self.image_bytes], 1),
            _median(self.restore_ms),
            _median(self.wake_ms),
            self.outcome,
        ]


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _median(values: list[float], digits: int = 0) -> str:
    return "-" if not values else f"{statistics.median(values):.{digits}f}"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(server: Server, scratch: Scratch, cycles: int) -> Row:
    row = Row(server)
    try:
        server.check_available()
        row.version = server.version()
        workdir = scratch.workdir(server.name)
        launch = server.launch(workdir, scratch)
    except Unavailable as exc:
        row.outcome = "not installed"
        row.note = str(exc)
        return row
    run = PodRun.start(
        server,
        launch,
        scratch.path / f"activator-{server.name}",
        extra_flags=("--no-probe-detection",),
    )
    try:
        run.wait_for("running", timeout=START_TIMEOUT)
        address = run.address()
        token = server.write_state(address)
        with run.client():
            before = run.app()
        row.processes = f"{len(before)} ({sum(len(t.threads) for t in before.values())})"
        row.rss = sum(t.rss for t in before.values()) / 1048576
        if server.other_users and not has_cap_sys_resource():
            failed = run.wait_for("checkpoint-failed")
            server.check_state(address, token)  # and it keeps serving
            uids = sorted({t.uid for t in before.values() if t.uid != os.geteuid()})
            row.outcome = "refused (uid " + ",".join(map(str, uids)) + "), kept serving"
            row.note = failed["message"].split("; ")[0]
            if server.blocker:
                row.note += f". Also: {server.blocker}"
            return row
        mark = run.mark()
        pause = run.pause()
        pid_ns = run.pid_namespace()
        kept = True
        for cycle in range(1, cycles + 1):
            scaled = run.wait_for("scaled-down", after=mark)
            row.checkpoint_ms.append(float(scaled["checkpoint_ms"]))
            row.image_bytes.append(int(scaled["image_bytes"]))
            image = read_image_tree(run.images)
            assert ns_members("pid", pid_ns) == {pause}, f"cycle {cycle}: app processes left"
            mark = run.mark()
            with run.client() as (_, wake_ms):
                after = run.app()
            row.wake_ms.append(wake_ms)
            try:
                assert image.pids <= set(after), f"processes {image.pids - set(after)} lost"
                server.check_state(address, token)
            except AssertionError as exc:
                kept = False
                row.note = f"cycle {cycle}: {exc}"
            running = run.wait_for("running", after=mark)
            if running.get("restore_ms") is None:
                kept = False
                row.note = f"cycle {cycle}: cold start: {running['message']}"
            else:
                row.restore_ms.append(float(running["restore_ms"]))
            mark = run.mark()
            log(
                f"{server.name} cycle {cycle}: checkpoint {scaled['checkpoint_ms']:.0f} ms,"
                f" wake {wake_ms:.0f} ms"
            )
        row.outcome = f"yes ({cycles} cycles)" if kept else "NO"
        return row
    except AssertionError as exc:
        row.outcome = "error"
        row.note = str(exc).splitlines()[0]
        return row
    finally:
        problems = run.teardown()
        if problems:
            log(f"{server.name}: left behind (now removed): {'; '.join(problems)}")


def table(rows: list[Row]) -> list[list[str]]:
    return [list(HEADERS), *[row.cells() for row in rows]]


def print_table(cells: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for i, row in enumerate(cells):
        print(
            "  ".join(
                c.ljust(w) if j < 3 else c.rjust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))


KDAT_CACHE = Path("/run/criu.kdat")
_BUSY = ("activator", "criu", "pytest", "bench.")


def other_work() -> list[str]:
    """Processes of others that compete for the CPU or change CRIU's timings."""
    import psutil

    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.pid == me or not any(word in cmdline for word in _BUSY):
                continue
            if any(parent.pid == me for parent in proc.parents()):
                continue
        except psutil.Error:
            continue
        found.append(f"{proc.pid} {cmdline[:100]}")
    return found


def wait_quiet(timeout: float) -> list[str]:
    """Wait up to `timeout` s for other tests, benches and activators to end."""
    deadline = time.monotonic() + timeout
    found = other_work()
    if found:
        log(f"waiting up to {timeout:.0f}s for other work to end: {'; '.join(found[:3])}")
    while found and time.monotonic() < deadline:
        time.sleep(2)
        found = other_work()
    if found:
        log("WARNING: measuring while other work runs (noted in the results)")
    return found


def markdown(
    cells: list[list[str]], rows: list[Row], cycles: int, conditions: dict[str, str]
) -> str:
    argv = [str(BIN / "criu"), "--version"]
    version = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    criu = version.split("\n")[0].replace("Version:", "CRIU")
    lines = [
        "# Real servers behind the activator",
        "",
        f"`bench/servers.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: kernel"
        f" {platform.release()}, Debian {Path('/etc/debian_version').read_text().strip()},"
        f" {os.cpu_count()} CPUs, {criu}, CAP_SYS_RESOURCE:"
        f" {'yes' if has_cap_sys_resource() else 'no'}. Each server in its own local pod,"
        f" `--scaledown-after 1s`, {cycles} scale-down/wake cycles; medians. Images on"
        " disk (page cache). Wake = connect() to the first byte at a client on the node."
        f" CRIU kdat cache ({KDAT_CACHE}) at start/end: {conditions['kdat']}. Other work"
        f" (tests, benches, activators) at start/end: {conditions['others']}.",
        "",
        "| " + " | ".join(cells[0]) + " |",
        "|" + "|".join("---" if i < 3 else "---:" for i in range(len(cells[0]))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    notes = [f"- {row.server.title}: {row.note}" for row in rows if row.note]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=[s.name for s in SERVERS])
    parser.add_argument("--out", type=Path, default=RESULTS / "servers.md")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="first wait this long for other tests/benches/activators to end (default 300)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/servers.py: needs root (network namespaces, nftables, CRIU)", file=sys.stderr)
        return 1
    for sig in (signal.SIGTERM, signal.SIGHUP):  # clean up as on Ctrl-C
        signal.signal(sig, _exit_on_signal)
    others_start = len(wait_quiet(args.wait_quiet))
    kdat_start = KDAT_CACHE.exists()
    scratch = Scratch()
    rows = []
    try:
        for server in SERVERS:
            if args.only and server.name not in args.only:
                continue
            log(f"{server.name}: starting")
            rows.append(measure(server, scratch, args.cycles))
    finally:
        scratch.close()
    cells = table(rows)
    print_table(cells)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    yes_no = {True: "present", False: "absent"}
    conditions = {
        "kdat": f"{yes_no[kdat_start]}/{yes_no[KDAT_CACHE.exists()]}",
        "others": f"{others_start}/{len(other_work())} processes",
    }
    args.out.write_text(markdown(cells, rows, args.cycles, conditions))
    log(f"wrote {args.out}")
    return 0 if all(row.outcome.startswith(("yes", "refused", "not")) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
