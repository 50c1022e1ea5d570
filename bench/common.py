"""What every bench shares: statistics, tables, results, clean-up, pods, clients, CRIU.

The activator is driven as a subprocess (`activator run`, then more pods over its
control socket), so the measuring client never shares an event loop or a GIL
with it. Clients run in a "client pod": a network namespace on the pod bridge
with its own address, as another pod of the cluster would be. (Connections from
the node's own address are sniffed for kubelet probes by the activator; a
client in another pod is plain traffic, the path that matters.)

Raw baselines (CRIU CLI, cold starts) use pods laid out exactly as the
activator lays them out (netns.pod: netns + veth + pause as pid 1 of the pod's
pid namespace, the app joining both), owned by the bench process itself.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import queue
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
PYTHON = BIN / "python"
CRIU = BIN / "criu"
ACTIVATOR = BIN / "activator"
RESULTS = REPO / "bench" / "results"
APP_PORT = 8080
SAMPLE_APP = "activator.sampleapp"
KDAT_CACHE = Path("/run/criu.kdat")


class BenchError(Exception):
    """A measurement could not be made; the message says why."""


# -- statistics ------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between order statistics."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median_ci95(values: Sequence[float]) -> tuple[float, float]:
    """A 95% confidence interval of the median, free of any assumption on
    the distribution: the order statistics j and k of n values that hold the
    median with probability >= 0.95 (Binomial(n, 1/2) tails, each <= 2.5%).
    Too few values for one (n < 6): the whole range."""
    ordered = sorted(values)
    n = len(ordered)
    below = 0.0  # P(Binomial(n, 1/2) <= j)
    j = -1
    while below + math.comb(n, j + 1) / 2**n <= 0.025:
        j += 1
        below += math.comb(n, j) / 2**n
    if j < 0:
        return ordered[0], ordered[-1]
    return ordered[j], ordered[n - 1 - j]


def summarize(values: Iterable[float | None]) -> dict[str, float]:
    data = [float(v) for v in values if v is not None]
    if not data:
        return {"n": 0}
    ci_lo, ci_hi = median_ci95(data)
    return {
        "n": len(data),
        "median": quantile(data, 0.5),
        "median_ci95_lo": ci_lo,
        "median_ci95_hi": ci_hi,
        "p10": quantile(data, 0.1),
        "p90": quantile(data, 0.9),
        "p25": quantile(data, 0.25),
        "p75": quantile(data, 0.75),
        "min": min(data),
        "max": max(data),
        "mean": sum(data) / len(data),
    }


def paired(a: Sequence[float | None], b: Sequence[float | None], op: str) -> list[float]:
    """Per-repetition a/b ("ratio") or a-b ("diff") of two interleaved series."""
    out = []
    for x, y in zip(a, b, strict=False):
        if x is None or y is None:
            continue
        if op == "ratio":
            if y:
                out.append(x / y)
        else:
            out.append(x - y)
    return out


def fmt(summary: dict[str, float], unit: str = "", digits: int = 1) -> str:
    """'median [p10-p90]' of a summary."""
    if not summary or summary.get("n", 0) == 0:
        return "-"
    m, lo, hi = summary["median"], summary["p10"], summary["p90"]
    return f"{m:.{digits}f}{unit} [{lo:.{digits}f}-{hi:.{digits}f}]"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    cells = [list(headers), *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print(
            "  "
            + "  ".join(
                c.rjust(w) if j else c.ljust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    sys.stdout.flush()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the run: options, metadata, results ---------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few repetitions")
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default bench/results)"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="wait this long for other tests/activators on the machine to end (default 300)",
    )
    return parser


def out_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return Path(args.out)
    return RESULTS / "quick" if args.quick else RESULTS


def _cmd(argv: Sequence[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict[str, Any]:
    criu_version = ""
    for line in _cmd([str(CRIU), "--version"]).splitlines():
        if line.startswith("Version:"):
            criu_version = line.split(":", 1)[1].strip()
    mem_total = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    dirty = _cmd(["git", "-C", str(REPO), "status", "--porcelain", "--", "activator", "netns"])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "kernel": platform.release(),
        "debian": _read("/etc/debian_version"),
        "cpus": os.cpu_count(),
        "mem_total_bytes": mem_total,
        "python": platform.python_version(),
        "criu": criu_version,
        "run_fs": _cmd(["stat", "-f", "-c", "%T", "/run"]),
        "kdat_cache_present": KDAT_CACHE.exists(),
        "commit": _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "product_dirty": [line[3:] for line in dirty.splitlines()],
        "loadavg": os.getloadavg(),
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def write_result(directory: Path, name: str, data: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)
    log(f"wrote {path}")
    return path


# -- clean-up ----------------------------------------------------------------------------


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


class Bench:
    """One bench run: a unique pod-name prefix, a work dir, a client pod, clean-up.

    Everything made is registered with `defer` and undone in reverse order on
    exit, failure or SIGTERM/SIGINT/SIGHUP; then pods of this run that are
    still there (if an activator died) are swept by name.
    """

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.args = args
        self.quick = bool(args.quick)
        self.run_id = secrets.token_hex(3)
        self.prefix = f"bench-{self.run_id}"
        self.stack = contextlib.ExitStack()
        self.workdir = Path("/")
        self.client: ClientNetns | None = None
        self.meta: dict[str, Any] = {}

    def __enter__(self) -> Bench:
        if os.geteuid() != 0:
            raise BenchError("benches need root (network namespaces, nftables, CRIU)")
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise_exit)
        from netns.pod import become_subreaper

        # Raw pods' apps (spawn_in_pod) and CRIU-restored apps (--restore-sibling)
        # become our children.
        become_subreaper()
        foreign = wait_quiet(getattr(self.args, "wait_quiet", 300.0))
        swept = sweep_pods("bench-", orphans_only=True)
        if swept:
            log(f"removed leftover pods of earlier bench runs: {', '.join(swept)}")
        self.stack.__enter__()
        try:
            # Images go where the activator's would: a disk-backed directory.
            self.workdir = Path(tempfile.mkdtemp(prefix=f"pa-{self.prefix}-", dir="/var/tmp"))
            self.defer(shutil.rmtree, self.workdir, True)
            self.defer(sweep_pods, self.prefix + "-", False)
            self.meta = machine_info()
            self.meta.update(bench=self.name, quick=self.quick, run_id=self.run_id)
            self.meta["foreign_at_start"] = foreign
        except BaseException:
            self.stack.close()
            raise
        log(f"{self.name}: run {self.run_id}, work dir {self.workdir}")
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None and self.workdir != Path("/"):
            # Keep what tells why: the activators' logs and events, CRIU's logs.
            keep = Path("/var/tmp") / f"bench-failed-{self.run_id}"
            for path in self.workdir.rglob("*"):
                if path.suffix in (".log", ".jsonl") and path.is_file():
                    target = keep / path.relative_to(self.workdir)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with contextlib.suppress(OSError):
                        shutil.copyfile(path, target)
            log(f"failed: logs kept in {keep}")
        self.stack.__exit__(*exc)  # type: ignore[arg-type]

    def defer(self, fn: Callable[..., Any], *args: Any) -> None:
        def quiet() -> None:
            try:
                fn(*args)
            except Exception as exc:
                log(f"clean-up step {getattr(fn, '__name__', fn)} failed: {exc}")

        self.stack.callback(quiet)

    def pod_name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def client_netns(self) -> ClientNetns:
        if self.client is None:
            from netns.pod import create_pod, destroy_pod

            network = create_pod(self.pod_name("client"), owner_pid=os.getpid())
            self.defer(destroy_pod, network)
            self.client = ClientNetns(network.netns_path, str(network.address))
            self.defer(self.client.close)
        return self.client

    def activator(
        self, first: PodSpec, tag: str = "activator", criu_spares: int | None = None
    ) -> Activator:
        act = Activator(self.workdir / tag, first, criu_spares)
        self.defer(act.stop)
        return act

    def raw_pod(self, suffix: str) -> RawPod:
        pod = RawPod(self.pod_name(suffix), self.workdir / "cwd" / suffix)
        self.defer(pod.destroy)
        return pod

    def check_quiet(self, stage: str) -> bool:
        """Note CRIU/activator/test processes of someone else running now."""
        foreign = foreign_processes()
        if foreign:
            self.meta.setdefault("foreign_during", {})[stage] = foreign
            log(f"WARNING: other work on this machine during {stage}: {'; '.join(foreign[:3])}")
        return not foreign

    def settle(self, stage: str, timeout: float = 90.0) -> None:
        """Before a repetition: wait (bounded) until no one else's work runs."""
        t0 = time.monotonic()
        deadline = t0 + min(timeout, getattr(self.args, "wait_quiet", timeout))
        waited = False
        while foreign_processes() and time.monotonic() < deadline:
            if not waited:
                log(f"{stage}: waiting for other work on the machine to end")
                waited = True
            time.sleep(1)
        if waited:
            self.meta["waited_s"] = self.meta.get("waited_s", 0.0) + time.monotonic() - t0
        self.check_quiet(f"{stage} (start)")

    def result(
        self,
        config: dict[str, Any],
        samples: dict[str, Any],
        summary: dict[str, Any],
        section: Callable[[dict[str, Any], dict[str, str]], list[str]] | None = None,
    ) -> None:
        """Write the result; print it as `section` (bench.report's) renders it."""
        self.meta["loadavg_end"] = os.getloadavg()
        result = {"meta": self.meta, "config": config, "samples": samples, "summary": summary}
        write_result(out_dir(self.args), self.name, result)
        if section is not None:
            print("\n".join(section(result, {})), flush=True)


_BUSY = ("pytest", "activator", "criu", "wrk", "nginx", "sampleapp")


def foreign_processes() -> list[str]:
    """Processes not started by this bench that would compete for the CPU."""
    import psutil

    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.pid == me or not any(word in cmdline for word in _BUSY):
                continue
            if any(parent.pid == me for parent in proc.parents()):
                continue
            found.append(f"{proc.pid} {cmdline[:120]}")
    return found


def wait_quiet(timeout: float) -> list[str]:
    """Wait up to `timeout` s until no one else runs tests, CRIU or activators."""
    deadline = time.monotonic() + timeout
    foreign = foreign_processes()
    if foreign:
        log(f"waiting up to {timeout:.0f}s for other work to end: {'; '.join(foreign[:3])}")
    while foreign and time.monotonic() < deadline:
        time.sleep(2)
        foreign = foreign_processes()
    if foreign:
        log("WARNING: measuring while other work runs on this machine (see the report)")
    return foreign


def sweep_pods(prefix: str, orphans_only: bool) -> list[str]:
    """Remove local pods whose name starts with `prefix` (last resort clean-up).

    Kills every process in the pod's network namespace by pid (the pause is
    pid 1 of the pod, so its pid namespace goes with it), deletes the host end
    of the veth, the address lease and the namespace. With `orphans_only`,
    pods whose address lease belongs to a live process are left alone.
    """
    from netns import ipam
    from netns.pod import NETNS_DIR, host_ifname

    removed = []
    owners: dict[str, list[ipam.Lease]] = {}
    with contextlib.suppress(Exception):
        for lease in ipam.leases():
            owners.setdefault(lease.pod, []).append(lease)
    if not NETNS_DIR.is_dir():
        return removed
    for path in sorted(NETNS_DIR.glob(f"pa-{prefix}*")):
        pod = path.name[3:]
        leases = owners.get(pod, [])
        if orphans_only and any(lease.owner_alive() for lease in leases):
            continue
        with contextlib.suppress(OSError):
            inode = path.stat().st_ino
            for pid in _pids_in_netns(inode):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        _reap_children()
        subprocess.run(["ip", "link", "del", host_ifname(pod)], capture_output=True)
        for lease in leases:
            with contextlib.suppress(Exception):
                ipam.release(lease.address, pod)
        subprocess.run(["ip", "netns", "delete", path.name], capture_output=True)
        removed.append(pod)
    return removed


def _pids_in_netns(inode: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if os.stat(entry / "ns" / "net").st_ino == inode:
                pids.append(int(entry.name))
    return pids


def _reap_children() -> None:
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.02)


def wait_exit(pid: int, timeout: float) -> float | None:
    """Block until `pid` exits (pidfd); return time.time() then, None on timeout."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return time.time()
    try:
        return wait_pidfd(pidfd, timeout)
    finally:
        os.close(pidfd)


def wait_pidfd(pidfd: int, timeout: float) -> float | None:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    if poller.poll(timeout * 1000):
        return time.time()
    return None


# -- clients in a pod of their own ----------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


class ClientNetns:
    """Sockets made in the client pod's network namespace, usable from any thread.

    A dedicated thread enters the namespace once and makes sockets in batches;
    they are kept in a pool so that no measured interval pays a thread hop.
    """

    def __init__(self, netns_path: str, address: str) -> None:
        self.netns_path = netns_path
        self.address = address
        self._requests: queue.SimpleQueue[tuple[int, Future[list[socket.socket]]] | None] = (
            queue.SimpleQueue()
        )
        self._pool: list[socket.socket] = []
        self._lock = threading.Lock()
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.result(timeout=10)

    def _run(self, ready: Future[None]) -> None:
        try:
            fd = os.open(self.netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {self.netns_path}: {os.strerror(err)}")
            finally:
                os.close(fd)
        except OSError as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        while (item := self._requests.get()) is not None:
            count, future = item
            try:
                future.set_result(
                    [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
                )
            except OSError as exc:
                future.set_exception(exc)

    def fill(self, size: int = 512) -> None:
        with self._lock:
            missing = size - len(self._pool)
        if missing > 0:
            future: Future[list[socket.socket]] = Future()
            self._requests.put((missing, future))
            fresh = future.result(timeout=30)
            with self._lock:
                self._pool.extend(fresh)

    def socket(self) -> socket.socket:
        with self._lock:
            if self._pool:
                return self._pool.pop()
        self.fill(64)
        return self.socket()

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=5)
        with self._lock:
            for sock in self._pool:
                sock.close()
            self._pool.clear()

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the client pod's network namespace."""
        return ["nsenter", f"--net={self.netns_path}", "--", *argv]


@dataclass
class Reply:
    status: int
    body: bytes
    start: float  # time.monotonic() the measured interval starts at
    first_byte: float  # seconds from start to the first byte of the answer
    done: float  # seconds from start to the end of the answer
    attempts: int  # connects tried (polling)

    @property
    def first_byte_ms(self) -> float:
        return self.first_byte * 1000


def http_get(
    client: ClientNetns,
    host: str,
    port: int,
    path: str = "/",
    *,
    start: float | None = None,
    poll: bool = False,
    interval: float = 0.001,
    timeout: float = 60.0,
) -> Reply:
    """GET `path` with a fresh connection (Connection: close), blocking sockets.

    `start` (time.monotonic()) is when the measured interval began (default:
    now). With `poll`, a refused connect is retried every `interval` seconds
    until `timeout`: how a client finds out that a server (re)started.
    """
    t0 = time.monotonic() if start is None else start
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        sock = client.socket()
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            sock.connect((host, port))
            break
        except (ConnectionRefusedError, ConnectionResetError) as exc:
            sock.close()
            if not poll or time.monotonic() + interval > deadline:
                raise BenchError(f"{host}:{port} refused the connection: {exc}") from exc
            time.sleep(interval)
        except OSError:
            sock.close()
            raise
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        first = sock.recv(65536)
        t_first = time.monotonic()
        if not first:
            raise BenchError(f"{host}:{port} closed the connection without an answer")
        chunks = [first]
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        t_done = time.monotonic()
    except ConnectionResetError as exc:
        raise BenchError(f"{host}:{port} reset the connection: {exc}") from exc
    finally:
        sock.close()
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        status = 0
    return Reply(status, body, t0, t_first - t0, t_done - t0, attempts)


# -- pods owned by the bench (the raw baselines) -------------------------------------------


class RawPod:
    """A local pod laid out as the activator lays one out, without an activator."""

    def __init__(self, name: str, cwd: Path) -> None:
        from netns.pod import create_pod, destroy_pod, start_pause

        self.name = name
        self.cwd = cwd  # the app's own working directory (see in_own_directory)
        cwd.mkdir(parents=True, exist_ok=True)
        self.network = create_pod(name, owner_pid=os.getpid())
        try:
            self.pause = start_pause(self.network.netns_path)
        except BaseException:
            destroy_pod(self.network)
            raise
        self.address = str(self.network.address)
        # The app's stdout/stderr, a pipe as with the activator (CRIU gets it
        # back with --inherit-fd).
        self.out_r, self.out_w = os.pipe()
        os.set_blocking(self.out_r, False)
        self.apps: set[int] = set()

    def spawn(self, argv: Sequence[str]) -> int:
        from netns.pod import spawn_in_pod

        self.drain()
        pid = spawn_in_pod(
            self.pause.pid, list(argv), stdout=self.out_w, stderr=self.out_w, cwd=self.cwd
        )
        self.apps.add(pid)
        return pid

    def adopt(self, pid: int) -> None:
        """A pid restored into this pod (our child through --restore-sibling)."""
        self.apps.add(pid)

    def reaped(self, pid: int) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        self.apps.discard(pid)

    def kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.reaped(pid)

    def drain(self) -> bytes:
        data = b""
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(self.out_r, 65536):
                data += chunk
        return data

    def ns_file(self, kind: str) -> str:
        return f"/proc/{self.pause.pid}/ns/{kind}"

    def destroy(self) -> None:
        from netns.pod import destroy_pod

        for pid in list(self.apps):
            self.kill(pid)
        destroy_pod(self.network, self.pause, reap_children=True)
        for fd in (self.out_r, self.out_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def sample_app(hold_mib: int = 0, port: int = APP_PORT) -> tuple[str, ...]:
    return (str(PYTHON), "-m", SAMPLE_APP, "--port", str(port), "--hold-mib", str(hold_mib))


# -- the CRIU command line, with the options the activator gives CRIU ---------------------


def criu_cli() -> list[str]:
    """How the raw baselines run CRIU: the binary itself, without the shell of
    scripts/setup's wrapper (1-2 ms a call), as a packaged /usr/sbin/criu runs
    and as the activator starts its `criu swrk`."""
    from activator.criu import CriuNotFound, criu_command

    try:
        return criu_command("")
    except CriuNotFound:
        return [str(CRIU)]


def image_bytes(images: Path) -> int:
    """Like activator.criu.image_bytes: the size of the *.img files."""
    return sum(p.stat().st_size for p in images.iterdir() if p.is_file() and p.suffix == ".img")


def criu_log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [ln for ln in text if "Error" in ln] or text
    return "\n    ".join(errors[-lines:])


def criu_flags(verbosity: int | None = None) -> list[str]:
    """CLI flags for the options activator/criu.py gives CRIU (its CriuOptions defaults)."""
    from activator.criu import CriuOptions

    options = CriuOptions()
    level = options.log_level if verbosity is None else verbosity
    flags = [f"-v{level}"]
    if options.tcp_close:
        flags.append("--tcp-close")
    if getattr(options, "file_locks", False):
        flags.append("--file-locks")
    if options.ghost_limit != 1 << 20:
        flags += ["--ghost-limit", str(options.ghost_limit)]
    return flags


@dataclass
class DumpTiming:
    wall_ms: float  # criu started -> criu exited
    gone_ms: float  # criu started -> the app's process exited
    image_bytes: int


def criu_dump(pid: int, images: Path, pod: RawPod, verbosity: int | None = None) -> DumpTiming:
    """`criu dump` of the app tree at `pid`, as activator/criu.py asks swrk for it:
    the pod's net and pid namespaces external, network lock skip, skip in-flight,
    its CriuOptions (tcp-close, file locks, log level), the app killed after."""
    images.mkdir(mode=0o700, parents=True, exist_ok=True)
    argv = [
        *criu_cli(), "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log",
        "--external", f"net[{os.stat(pod.ns_file('net')).st_ino}]:pod-net",
        "--external", f"pid[{os.stat(pod.ns_file('pid')).st_ino}]:pod-pid",
        "--network-lock", "skip", "--skip-in-flight", *criu_flags(verbosity),
    ]  # fmt: skip
    pidfd = os.pidfd_open(pid)
    try:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            umask=0o077,
        )
        # Until the app is gone, or criu exits without having killed it (failure).
        criu_fd = os.pidfd_open(proc.pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.register(criu_fd, select.POLLIN)
            poller.poll(300_000)
        finally:
            os.close(criu_fd)
        t_gone = time.monotonic()
        gone = wait_pidfd(pidfd, 0)
        rc = proc.wait()
        t_exit = time.monotonic()
    finally:
        os.close(pidfd)
    if rc != 0 or gone is None:
        raise BenchError(f"criu dump failed ({rc}):\n    {criu_log_tail(images / 'dump.log')}")
    pod.reaped(pid)
    return DumpTiming((t_exit - t0) * 1000, (t_gone - t0) * 1000, image_bytes(images))


@dataclass
class Restoring:
    proc: subprocess.Popen[bytes]
    start: float  # time.monotonic() just before criu was started
    pidfile: Path
    images: Path
    fds: tuple[int, ...]

    def finish(self, pod: RawPod) -> tuple[int, float]:
        """Wait for criu; return the restored pid and criu's wall time (ms)."""
        rc = self.proc.wait()
        wall = (time.monotonic() - self.start) * 1000
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if rc != 0:
            raise BenchError(
                f"criu restore failed ({rc}):\n    {criu_log_tail(self.images / 'restore.log')}"
            )
        pid = int(self.pidfile.read_text().strip())
        pod.adopt(pid)
        return pid, wall


def criu_restore_start(images: Path, pod: RawPod, verbosity: int | None = None) -> Restoring:
    """Start `criu restore` as activator/criu.py asks swrk for it: the pod's
    namespaces and the output pipe given back with --inherit-fd, the restored
    root our child (--restore-sibling, detached), its CriuOptions."""
    net = os.open(pod.ns_file("net"), os.O_RDONLY | os.O_CLOEXEC)
    pidns = os.open(pod.ns_file("pid"), os.O_RDONLY | os.O_CLOEXEC)
    pidfile = images.parent / f"{images.name}.pid"
    pidfile.unlink(missing_ok=True)
    argv = [
        *criu_cli(), "restore", "-D", str(images), "-o", "restore.log",
        "--restore-detached", "--restore-sibling", "--pidfile", str(pidfile),
        "--inherit-fd", f"fd[{net}]:pod-net", "--inherit-fd", f"fd[{pidns}]:pod-pid",
        "--inherit-fd", f"fd[{pod.out_w}]:pipe:[{os.fstat(pod.out_w).st_ino}]",
        *criu_flags(verbosity),
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(net, pidns, pod.out_w),
    )
    return Restoring(proc, t0, pidfile, images, (net, pidns))


_LOG_TS = re.compile(r"^\((\d+)\.(\d+)\)")


def criu_log_times(path: Path, marks: dict[str, str]) -> dict[str, float]:
    """Milliseconds into a -v4 CRIU log at which each marker text first appears."""
    found: dict[str, float] = {}
    with contextlib.suppress(OSError), path.open(errors="replace") as lines:
        for line in lines:
            m = _LOG_TS.match(line)
            if not m:
                continue
            for key, text in marks.items():
                if key not in found and text in line:
                    found[key] = int(m.group(1)) * 1000 + int(m.group(2)) / 1000
    return found


@contextlib.contextmanager
def kdat_cache() -> Iterator[bool]:
    """Give CRIU a kernel-feature cache for the duration of the block (a what-if).

    CRIU 4.2.1 saves /run/criu.kdat only when /run is a tmpfs (it is not
    here: "Can't keep kdat cache on non-tempfs"), but it loads the file
    wherever it is. The cache is made by `criu check` in a private mount
    namespace with a tmpfs on /run, installed for the block, and removed after.
    Yields False (and does nothing) if a cache is there already.
    """
    if KDAT_CACHE.exists():
        yield False
        return
    tmp = KDAT_CACHE.with_name(f"criu.kdat.bench-{os.getpid()}")
    script = 'mount -t tmpfs bench-kdat /run && "$0" check >/dev/null 2>&1; cat /run/criu.kdat'
    with tmp.open("wb") as out:
        rc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(CRIU)],
            stdout=out,
            stderr=subprocess.DEVNULL,
        ).returncode
    if rc != 0 or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        raise BenchError("could not make a CRIU kdat cache in a private mount namespace")
    tmp.replace(KDAT_CACHE)
    ours = KDAT_CACHE.stat().st_ino
    try:
        yield True
    finally:
        # Only ours: an activator may have installed its own meanwhile.
        with contextlib.suppress(FileNotFoundError):
            if KDAT_CACHE.stat().st_ino == ours:
                KDAT_CACHE.unlink()


# -- the activator, as a process of its own ----------------------------------------------------


@dataclass(frozen=True)
class PodSpec:
    name: str
    command: tuple[str, ...]
    ports: tuple[int, ...] = (APP_PORT,)
    scaledown_after: str = "1h"  # Go duration syntax, as the CLI takes it
    lazy_restore: bool = False
    fast_path: bool = False


def in_own_directory(directory: Path, command: Sequence[str]) -> tuple[str, ...]:
    """`command` run with `directory` as its working directory (exec: same pid).

    Work-around: the activator starts every app in its own working directory,
    and CRIU's parasite makes its temporary /proc mount point in the dumped
    task's working directory, so two checkpoints at once of apps sharing one
    fail now and then ("Can't create a directory (-17)").
    """
    directory.mkdir(parents=True, exist_ok=True)
    return ("/bin/sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", str(directory), *command)


class Events:
    """The activator's --events file, read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[dict[str, Any]] = []
        self._pos = 0
        self._partial = b""

    def poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return
        self._pos += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                with contextlib.suppress(ValueError):
                    self.items.append(json.loads(line))

    def mark(self) -> int:
        self.poll()
        return len(self.items)

    def find(self, since: int, pod: str, event: str, **match: Any) -> dict[str, Any] | None:
        self.poll()
        for item in self.items[since:]:
            if (
                item.get("pod") == pod
                and item.get("event") == event
                and all(item.get(k) == v for k, v in match.items())
            ):
                return item
        return None

    def wait(
        self, since: int, pod: str, event: str, timeout: float = 120, **match: Any
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(since, pod, event, **match)
            if found is not None:
                return found
            failed = self.find(since, pod, "failed")
            if failed is not None:
                raise BenchError(f"pod {pod} failed: {failed.get('message')}")
            if time.monotonic() > deadline:
                raise BenchError(f"pod {pod}: no {event!r} event within {timeout:g}s")
            time.sleep(0.005)


def save_plot(fig: Any, out: Path, name: str) -> str:
    """Write matplotlib figure `fig` as out/name and let it go; its name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def idle_swrks(pid: int) -> list[dict[str, float]]:
    """The memory of each `criu swrk` under `pid` (the activator's spares while
    its pods are idle), bytes. USS counts CRIU's binary as private while one
    swrk alone maps it; the private dirty pages are what each spare adds
    whatever their number."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error, OSError):
            if "swrk" not in child.cmdline():
                continue
            info = child.memory_full_info()
            rollup = Path(f"/proc/{child.pid}/smaps_rollup").read_text()
            dirty_kib = sum(
                int(line.split()[1])
                for line in rollup.splitlines()
                if line.startswith("Private_Dirty:")
            )
            found.append(
                {
                    "uss": float(info.uss),
                    "pss": float(info.pss),
                    "rss": float(info.rss),
                    "private_dirty": dirty_kib * 1024.0,
                }
            )
    return found


class Activator:
    """`activator run` with one pod; more pods through its control socket."""

    def __init__(self, directory: Path, first: PodSpec, criu_spares: int | None = None) -> None:
        from activator.control import AGENTS_DIR

        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.events = Events(directory / "events.jsonl")
        self.log_path = directory / "activator.log"
        argv = [
            str(ACTIVATOR), "--log-level", "warning", "run", "--name", first.name,
            *[a for p in first.ports for a in ("--port", str(p))],
            "--scaledown-after", first.scaledown_after,
            "--events", str(self.events.path), "--state-dir", str(directory / "state"),
            *(["--lazy-restore"] if first.lazy_restore else []),
            *(["--fast-path"] if first.fast_path else []),
            *(["--criu-spares", str(criu_spares)] if criu_spares is not None else []),
            "--", *self.command(first),
        ]  # fmt: skip
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                argv,
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the bench, which stops us in order
            )
        self.pid = self.proc.pid
        self.socket = AGENTS_DIR / f"{self.pid}.sock"
        self.specs: dict[str, PodSpec] = {first.name: first}
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"the activator exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            # Up once its first pod booted: network, listeners and redirects in place.
            if self.socket.exists() and self.events.find(0, first.name, "starting"):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the activator did not come up in 60s:\n{self.log_tail()}")
            time.sleep(0.02)

    def command(self, spec: PodSpec) -> tuple[str, ...]:
        return in_own_directory(self.dir / "cwd" / spec.name, spec.command)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def ask(self, request: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        from activator.control import ControlError, ask

        try:
            return ask(self.socket, request, timeout=timeout)
        except (ControlError, OSError, ValueError) as exc:
            raise BenchError(f"activator control {request.get('op')}: {exc}") from exc

    def status(self) -> list[dict[str, Any]]:
        pods: list[dict[str, Any]] = self.ask({"op": "status"}, timeout=30)["pods"]
        return pods

    def pod(self, name: str) -> dict[str, Any]:
        for pod in self.status():
            if pod["name"] == name:
                return pod
        raise BenchError(f"the activator has no pod {name}")

    def add(self, spec: PodSpec) -> dict[str, Any]:
        settings = {
            "name": spec.name,
            "ports": [str(p) for p in spec.ports],
            "command": list(self.command(spec)),
            "scaledown_after": spec.scaledown_after,
            "lazy_restore": spec.lazy_restore,
            "fast_path": spec.fast_path,
        }
        try:
            answer = self.ask({"op": "add", "settings": settings})
        except BenchError as exc:
            if "malformed" not in str(exc):
                raise
            # The control request of activators before `settings` came in.
            answer = self.ask({"op": "add", **settings})
        self.specs[spec.name] = spec
        pod: dict[str, Any] = answer["pod"]
        return pod

    def scale_down(self, name: str) -> None:
        self.ask({"op": "scale-down", "pod": name})

    def wake(self, name: str) -> None:
        self.ask({"op": "wake", "pod": name})

    def app_pid(self, pod: str, marker: str) -> int:
        """The host pid of the pod's app: as its status says, else our child in the
        pod's netns running `marker` (a lazily restored app's command line reads
        empty until its pages are back)."""
        if pid := self.pod(pod).get("app_pid"):
            return int(pid)
        import psutil

        from netns.pod import NETNS_DIR, netns_name

        inode = os.stat(NETNS_DIR / netns_name(pod)).st_ino
        for child in psutil.Process(self.pid).children():
            with contextlib.suppress(psutil.Error, OSError):
                if os.stat(f"/proc/{child.pid}/ns/net").st_ino != inode:
                    continue
                if marker in " ".join(child.cmdline()):
                    return child.pid
        raise BenchError(f"no process running {marker!r} in pod {pod}")

    def memory(self) -> dict[str, float]:
        """The activator process's memory, and its idle CRIU spares' (bytes)."""
        import psutil

        proc = psutil.Process(self.pid)
        info = proc.memory_full_info()
        spares = idle_swrks(self.pid)
        return {
            "rss": float(info.rss),
            "pss": float(getattr(info, "pss", 0)),
            "uss": float(getattr(info, "uss", 0)),
            "threads": float(proc.num_threads()),
            "fds": float(proc.num_fds()),
            "spares": float(len(spares)),
            "spares_private_dirty": sum(spare["private_dirty"] for spare in spares),
        }

    def cpu_seconds(self) -> tuple[float, float]:
        """The activator's CPU time so far: in user space, in the kernel."""
        import psutil

        times = psutil.Process(self.pid).cpu_times()
        return float(times.user), float(times.system)

    def stop(self, timeout: float = 180) -> float:
        """SIGTERM (the activator removes its pods), SIGKILL after `timeout`."""
        if self.proc.poll() is not None:
            return 0.0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"the activator did not stop within {timeout:g}s: killing it")
            self.proc.kill()
            self.proc.wait()
        return time.monotonic() - t0


@dataclass
class Series:
    """Named lists of per-repetition samples (None where one was lost)."""

    data: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, **values: Any) -> None:
        for key, value in values.items():
            self.data.setdefault(key, []).append(value)

    def __getitem__(self, key: str) -> list[Any]:
        return self.data.get(key, [])
