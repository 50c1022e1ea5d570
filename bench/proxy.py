"""Proxy overhead while running: the activator's relay against straight to the app.

nginx (Debian's, run as root, one worker) is the app of a pod managed by
`activator run`; it listens on two ports. Port 8080 is the pod's declared
port, redirected by the activator's nft rule to its shadow port and relayed
to nginx over the pod's loopback; port 8081 is not declared, so a client
reaches nginx there directly. The client sits in another pod (netns on the
same bridge), so both paths cross the same veths.

The fast path: a second, identical nginx pod whose activator runs with
`--fast-path`. Once the app runs, its nft table lets new connections from
non-probe sources (our client) through to nginx, counted; the bench waits
until the table holds the fast path's rules, and checks they are still there
at each repetition. Its port 8080 is the fast path; its 8081 the fast path's
baseline (the same nginx, reached directly).

- small responses: wrk (Debian's) against GET / (a 17-byte body) through
  each path, alternating, in three shapes: keep-alive with 1 connection
  (latency: p50/p99), keep-alive with 32 connections (throughput: requests/s),
  and a new connection per request (`Connection: close`: accept + the
  activator's connect to the app on each request);
- large transfers: GET of a 100 MiB file (nginx sendfile) by a blocking
  Python client reading into a 4 MiB buffer, time from connect to last byte.

The activator's CPU time (user+sys, from /proc) is read around each run.

Where the CPU goes during each large transfer: the machine's busy CPU-seconds
(its CPUs times the wall time, less the idle time of /proc/stat, which the
kernel keeps in ns between ticks), the kernel's share sampled in softirq and
the hypervisor's steal (tick-sampled, 4 ms), and the run time of nginx, the
client (this process), the activator and the kernel's ksoftirqd threads
(/proc/PID/task/*/schedstat, in ns; softirq work done while a process runs
counts as its own, as this kernel keeps no separate irq time). The rest is
other work on the machine and kernel work outside any task. From them: CPUs
busy during a transfer, and the throughput the machine's CPUs allow at a
path's CPU cost per byte (its CPU-seconds per byte, all CPUs busy).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    Bench,
    BenchError,
    ClientNetns,
    PodSpec,
    Series,
    base_parser,
    http_get,
    log,
    paired,
    summarize,
)
from bench.report import proxy_section

PROXIED, DIRECT = 8080, 8081
FAST_DIRECT = "direct to the fast-path pod"
BIG_MIB = 100
TARGET_RATIO = 0.9  # issue 4: relayed throughput >= 0.9x direct

NGINX_CONF = """\
user root;
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 1000000000;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    default_type application/octet-stream;
    server {{
        listen {proxied} reuseport backlog=4096;
        listen {direct} reuseport backlog=4096;
        root {www};
        location = / {{
            default_type text/plain;
            return 200 "hello from nginx\\n";
        }}
    }}
}}
"""

WRK_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "duration_us": %d, "bytes": %d, "errors": %d, "status_errors": %d, '
    .. '"p50": %d, "p90": %d, "p99": %d, "mean": %.2f, "max": %d}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""

# name, connections, new connection per request
SCENARIOS = (
    ("keepalive-1", 1, False),
    ("keepalive-32", 32, False),
    ("close-1", 1, True),
)


def wrk(
    client: ClientNetns, url: str, connections: int, close: bool, seconds: float, script: Path
) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s"]
    argv += ["-s", str(script)]
    if close:
        argv += ["-H", "Connection: close"]
    out = subprocess.run(
        client.command([*argv, url]), capture_output=True, text=True, timeout=seconds + 60
    )
    for line in out.stdout.splitlines():
        if line.startswith("WRK "):
            result: dict[str, Any] = json.loads(line[4:])
            result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
            if result["errors"] or result["status_errors"]:
                log(f"wrk {url}: {result['errors']} errors, {result['status_errors']} bad status")
            return result
    raise BenchError(f"wrk gave no result ({out.returncode}): {out.stderr.strip()[-300:]}")


def download(client: ClientNetns, host: str, port: int, path: str) -> tuple[int, float]:
    """GET `path`; return (body bytes, seconds from connect to the last byte)."""
    sock = client.socket()
    sock.settimeout(120)
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    t0 = time.monotonic()
    try:
        sock.connect((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            n = sock.recv_into(view)
            if not n:
                raise BenchError(f"{host}:{port}{path}: closed before the headers")
            head += bytes(view[:n])
        header, _, body_start = head.partition(b"\r\n\r\n")
        length = -1
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if not header.startswith(b"HTTP/1.1 200") or length < 0:
            raise BenchError(f"{host}:{port}{path}: {header.splitlines()[0]!r}")
        got = len(body_start)
        while got < length:
            n = sock.recv_into(view)
            if not n:
                raise BenchError(f"{host}:{port}{path}: closed after {got} of {length} bytes")
            got += n
        return got, time.monotonic() - t0
    finally:
        sock.close()


CPUS = os.cpu_count() or 1
USER_HZ = os.sysconf("SC_CLK_TCK")


def run_seconds(pids: list[int]) -> float:
    """CPU-seconds the processes' threads have run, to the ns (schedstat)."""
    ns = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone: it runs no more
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    ns += int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                pass  # the thread ended meanwhile
    return ns / 1e9


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (nginx: the master and its worker)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for tid in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{tid}/children") as f:
                todo += [int(c) for c in f.read().split()]
    return pids


def softirq_threads() -> list[int]:
    """The kernel's ksoftirqd threads: network receive work deferred off the
    processes' own time slices runs there."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().startswith("ksoftirqd/"):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


@dataclass(frozen=True)
class CpuReading:
    """CPU counters at one instant, in seconds (see the module doc)."""

    wall: float
    idle: float  # summed over the CPUs, iowait included
    softirq: float
    steal: float
    processes: dict[str, float]

    @classmethod
    def now(cls, processes: dict[str, list[int]]) -> CpuReading:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        _user, _nice, _system, idle, iowait, _irq, softirq, steal = ticks
        return cls(
            wall=time.monotonic(),
            idle=(idle + iowait) / USER_HZ,
            softirq=softirq / USER_HZ,
            steal=steal / USER_HZ,
            processes={name: run_seconds(pids) for name, pids in processes.items()},
        )

    def since(self, before: CpuReading) -> dict[str, float]:
        """Per-transfer fields: CPUs busy, and CPU-ms by kind and by process."""
        wall = self.wall - before.wall
        busy = CPUS * wall - (self.idle - before.idle)
        fields = {
            "cpus_busy": busy / wall,
            "machine_cpu_ms": busy * 1000,
            "softirq_cpu_ms": (self.softirq - before.softirq) * 1000,
            "steal_cpu_ms": (self.steal - before.steal) * 1000,
        }
        for name, seconds in self.processes.items():
            fields[f"{name}_cpu_ms"] = (seconds - before.processes[name]) * 1000
        fields["rest_cpu_ms"] = fields["machine_cpu_ms"] - sum(
            fields[f"{name}_cpu_ms"] for name in self.processes
        )
        return fields


def cpu_cost(series: Series, mib: int) -> dict[str, float]:
    """A path's throughput, CPUs busy and CPU cost per byte over all its transfers
    (sums, so that ticks average out): mib_s = all_cpus_busy / cost, exactly; and
    the throughput the machine's CPUs allow at that cost, every CPU busy."""
    busy_s = sum(series["machine_cpu_ms"]) / 1000
    wall_s = sum(series["ms"]) / 1000
    moved_mib = mib * len(series["ms"])
    return {
        "mib_s": moved_mib / wall_s,
        "all_cpus_busy": busy_s / wall_s,
        "cpu_ms_per_100_mib": busy_s * 1000 * 100 / moved_mib,
        "cpu_bound_mib_s": CPUS * moved_mib / busy_s,
    }


def nginx_pod(b: Bench, nginx: str, www: Path, suffix: str, fast_path: bool) -> PodSpec:
    """A pod running nginx from its own directory (pid file, temp dirs), serving `www`."""
    site = b.workdir / f"nginx-{suffix}"
    (site / "tmp").mkdir(parents=True)
    conf = site / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=site, www=www, proxied=PROXIED, direct=DIRECT))
    command = (nginx, "-e", "stderr", "-c", str(conf))
    return PodSpec(b.pod_name(suffix), command, (PROXIED,), fast_path=fast_path)


def direct_path_open(pod: str) -> bool:
    """Whether the pod's nft table lets new connections through to the app: the
    fast path's rules (a counted pass-through) instead of the plain redirect."""
    from netns.nft import COUNTER, TABLE
    from netns.pod import NETNS_DIR, netns_name

    out = subprocess.run(
        ["nsenter", f"--net={NETNS_DIR / netns_name(pod)}", "nft", "list", "table", "ip", TABLE],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.returncode == 0 and f'counter name "{COUNTER}"' in out.stdout


def wait_direct_path(pod: str, timeout: float = 60) -> float:
    """Wait until the pod's fast path is open; return the seconds waited."""
    t0 = time.monotonic()
    while not direct_path_open(pod):
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"pod {pod}: the fast path did not open within {timeout:g}s")
        time.sleep(0.05)
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=None, help="runs per scenario and path")
    parser.add_argument("--seconds", type=float, default=None, help="length of one wrk run")
    parser.add_argument(
        "--transfer-reps", type=int, default=None, help="100 MiB transfers per path"
    )
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    transfer_reps = args.transfer_reps or (3 if args.quick else 10)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists() or not shutil.which("wrk"):
        raise BenchError("needs nginx and wrk from Debian: apt-get install nginx-light wrk")

    with Bench("proxy", args) as b:
        client = b.client_netns()
        www = b.workdir / "www"
        www.mkdir()
        chunk = os.urandom(1 << 20)
        with (www / "big.bin").open("wb") as f:
            for _ in range(BIG_MIB):
                f.write(chunk)
        script = b.workdir / "report.lua"
        script.write_text(WRK_SCRIPT)
        spec = nginx_pod(b, nginx, www, "px", fast_path=False)
        act = b.activator(spec)
        address = act.pod(spec.name)["address"]
        fast_spec = nginx_pod(b, nginx, www, "pxfast", fast_path=True)
        fast_act = b.activator(fast_spec, tag="activator-fast-path")
        fast_address = fast_act.pod(fast_spec.name)["address"]
        client.fill()
        for host in (address, fast_address):
            http_get(client, host, DIRECT, "/", poll=True, timeout=30)
            reply = http_get(client, host, PROXIED, "/", timeout=30)
            if reply.status != 200:
                raise BenchError(f"nginx at {host} through the activator answered {reply.status}")
        waited = wait_direct_path(fast_spec.name)
        # name -> (address, port, the activator whose CPU the run costs). The fast
        # path's baseline is the same nginx reached on its undeclared port: the
        # two pods' nginx may differ (placement, conntrack tables of their netns).
        paths = {
            "direct": (address, DIRECT, act),
            "activator": (address, PROXIED, act),
            "fast path": (fast_address, PROXIED, fast_act),
            FAST_DIRECT: (fast_address, DIRECT, fast_act),
        }
        # Whose CPU each transfer's reading counts, besides the machine's.
        on_path = {
            owner.pid: {
                "nginx": process_tree(owner.app_pid(pod, "nginx")),
                "client": [os.getpid()],
                "activator": [owner.pid],
                "ksoftirqd": softirq_threads(),
            }
            for owner, pod in ((act, spec.name), (fast_act, fast_spec.name))
        }
        log(
            f"nginx in pod {spec.name} at {address}: direct :{DIRECT}, activator :{PROXIED}; "
            f"in pod {fast_spec.name} at {fast_address} (--fast-path, open after "
            f"{waited:.2f}s): :{PROXIED}"
        )

        for _name, conns, close in SCENARIOS:  # warm-up, not counted
            for host, port, _act in paths.values():
                wrk(client, f"http://{host}:{port}/", conns, close, 1, script)

        runs = {(sc[0], p): Series() for sc in SCENARIOS for p in paths}
        for rep in range(reps):
            b.settle(f"wrk rep {rep + 1}")
            if not direct_path_open(fast_spec.name):
                raise BenchError(f"pod {fast_spec.name}: the fast path closed during the run")
            for name, conns, close in SCENARIOS:
                order = list(paths) if rep % 2 == 0 else list(reversed(paths))
                for path in order:
                    host, port, owner = paths[path]
                    user0, kernel0 = owner.cpu_seconds()
                    r = wrk(client, f"http://{host}:{port}/", conns, close, seconds, script)
                    user, kernel = owner.cpu_seconds()
                    per_request = 1e6 / max(1, r["requests"])
                    r["activator_user_us_per_req"] = (user - user0) * per_request
                    r["activator_kernel_us_per_req"] = (kernel - kernel0) * per_request
                    r["activator_cpu_us_per_req"] = (user - user0 + kernel - kernel0) * per_request
                    runs[(name, path)].add(**r)
            b.check_quiet(f"wrk rep {rep + 1}")
            p50 = {p: runs[("keepalive-1", p)]["p50"][-1] for p in paths}
            log(f"rep {rep + 1}/{reps}: keep-alive p50 (us) {p50}")

        transfers = {p: Series() for p in paths}
        for _ in range(2):  # warm-up
            for host, port, _act in paths.values():
                download(client, host, port, "/big.bin")
        b.settle("transfers")
        # What the rest of the machine keeps busy with nothing to transfer.
        before = CpuReading.now({})
        time.sleep(1)
        background_cpus_busy = CpuReading.now({}).since(before)["cpus_busy"]
        for rep in range(transfer_reps):
            order = list(paths) if rep % 2 == 0 else list(reversed(paths))
            for path in order:
                host, port, owner = paths[path]
                before = CpuReading.now(on_path[owner.pid])
                size, took = download(client, host, port, "/big.bin")
                cpu = CpuReading.now(on_path[owner.pid]).since(before)
                transfers[path].add(mib_s=size / 1048576 / took, ms=took * 1000, **cpu)
        b.check_quiet("transfers")
        fast_path_held = direct_path_open(fast_spec.name)
        fast_act.stop()
        act.stop()
        if not fast_path_held:
            raise BenchError(f"pod {fast_spec.name}: the fast path closed during the run")

        summary: dict[str, Any] = {"scenarios": {}, "transfer": {}}
        for name, conns, close in SCENARIOS:
            d, a = runs[(name, "direct")], runs[(name, "activator")]
            f, fd = runs[(name, "fast path")], runs[(name, FAST_DIRECT)]
            entry = {
                "connections": conns,
                "new_connection_per_request": close,
                "direct_rps": summarize(d["rps"]),
                "activator_rps": summarize(a["rps"]),
                "ratio_rps": summarize(paired(a["rps"], d["rps"], "ratio")),
                "direct_p50_us": summarize(d["p50"]),
                "activator_p50_us": summarize(a["p50"]),
                "added_p50_us": summarize(paired(a["p50"], d["p50"], "diff")),
                "direct_p99_us": summarize(d["p99"]),
                "activator_p99_us": summarize(a["p99"]),
                "added_p99_us": summarize(paired(a["p99"], d["p99"], "diff")),
                "activator_cpu_us_per_req": summarize(a["activator_cpu_us_per_req"]),
                "activator_user_us_per_req": summarize(a["activator_user_us_per_req"]),
                "activator_kernel_us_per_req": summarize(a["activator_kernel_us_per_req"]),
                "fast_path_rps": summarize(f["rps"]),
                "fast_pod_direct_rps": summarize(fd["rps"]),
                "fast_path_ratio_rps": summarize(paired(f["rps"], fd["rps"], "ratio")),
                "fast_path_ratio_rps_vs_first_pod": summarize(paired(f["rps"], d["rps"], "ratio")),
                "fast_path_p50_us": summarize(f["p50"]),
                "fast_pod_direct_p50_us": summarize(fd["p50"]),
                "fast_path_added_p50_us": summarize(paired(f["p50"], fd["p50"], "diff")),
                "fast_path_p99_us": summarize(f["p99"]),
                "fast_pod_direct_p99_us": summarize(fd["p99"]),
                "fast_path_cpu_us_per_req": summarize(f["activator_cpu_us_per_req"]),
                "errors": sum(sum(runs[(name, p)]["errors"]) for p in paths),
            }
            summary["scenarios"][name] = entry
        td, ta = transfers["direct"], transfers["activator"]
        tf, tfd = transfers["fast path"], transfers[FAST_DIRECT]
        summary["transfer"] = {
            "mib": BIG_MIB,
            "direct_mib_s": summarize(td["mib_s"]),
            "activator_mib_s": summarize(ta["mib_s"]),
            "ratio": summarize(paired(ta["mib_s"], td["mib_s"], "ratio")),
            "activator_cpu_ms": summarize(ta["activator_cpu_ms"]),
            "fast_path_mib_s": summarize(tf["mib_s"]),
            "fast_pod_direct_mib_s": summarize(tfd["mib_s"]),
            "fast_path_ratio": summarize(paired(tf["mib_s"], tfd["mib_s"], "ratio")),
            "fast_path_cpu_ms": summarize(tf["activator_cpu_ms"]),
        }
        t = summary["transfer"]
        # Where the CPU went on each path, and the throughput the CPUs allow at
        # each path's cost per byte: the bound a path meets when its CPUs are busy.
        t["cpus"] = CPUS
        t["background_cpus_busy"] = background_cpus_busy
        t["cpu"] = {
            path: {
                **{k: summarize(v) for k, v in series.data.items() if k not in ("mib_s", "ms")},
                **cpu_cost(series, BIG_MIB),
            }
            for path, series in transfers.items()
        }
        # The relayed/direct throughput over all transfers is, exactly, the ratio of
        # their CPUs busy times the inverse ratio of their CPU costs per byte.
        d, a = t["cpu"]["direct"], t["cpu"]["activator"]
        t["relay_all_ratio"] = a["mib_s"] / d["mib_s"]
        t["relay_occupancy_factor"] = a["all_cpus_busy"] / d["all_cpus_busy"]
        t["relay_cost_factor"] = d["cpu_ms_per_100_mib"] / a["cpu_ms_per_100_mib"]
        relay_bound = a["cpu_bound_mib_s"]
        t["relay_cpu_bound_ratio"] = relay_bound / d["mib_s"]
        # What the relayed path may cost per 100 MiB to reach the target: with
        # every CPU busy, and with as many busy as direct keeps.
        t["cpu_ms_per_100_mib_for_target"] = CPUS * 100 * 1000 / (TARGET_RATIO * d["mib_s"])
        t["cpu_ms_per_100_mib_for_target_at_direct_occupancy"] = (
            d["cpu_ms_per_100_mib"] / TARGET_RATIO
        )
        log(
            f"over all transfers, relayed/direct {t['relay_all_ratio']:.2f}x = CPUs busy "
            f"{t['relay_occupancy_factor']:.2f}x * CPU per byte 1/{1 / t['relay_cost_factor']:.2f}"
            f"; with every CPU busy the relay's cost allows {relay_bound:.0f} MiB/s = "
            f"{t['relay_cpu_bound_ratio']:.2f}x direct; {TARGET_RATIO}x needs <= "
            f"{t['cpu_ms_per_100_mib_for_target']:.0f} CPU ms per 100 MiB (at direct's "
            f"occupancy <= {t['cpu_ms_per_100_mib_for_target_at_direct_occupancy']:.0f}), it "
            f"takes {a['cpu_ms_per_100_mib']:.0f}"
        )
        samples = {
            "wrk": {f"{k[0]}/{k[1]}": v.data for k, v in runs.items()},
            "transfer": {k: v.data for k, v in transfers.items()},
        }
        config = {
            "reps": reps,
            "seconds": seconds,
            "transfer_reps": transfer_reps,
            "transfer_mib": BIG_MIB,
            "scenarios": [list(s) for s in SCENARIOS],
            "paths": list(paths),
            "fast_path_open_after_s": waited,
            "nginx": subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip(),
            "wrk": "wrk -t1 (Debian)",
        }
        b.result(config, samples, summary, proxy_section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
