"""Density: the activator's own memory with 1, 10 and 100 pods, and 10 wakes at once.

One `activator run` process manages N pods of the sample app (no ballast);
pods are added over its control socket. At each N (1, 10, 100) the
activator process alone is measured (RSS, PSS, USS from
/proc/PID/smaps_rollup via psutil; threads; fds), median of 5 samples over
1 s, once with every pod running (each app answered a request through the
activator) and once with every pod scaled down (checkpointed on request).

Then, with all N pods scaled down, wake latency (client connect -> first
byte, client in another pod): 10 pods woken one at a time (the baseline),
against the same 10 pods woken by 10 clients at the same moment (a thread
barrier), alternating, for several rounds.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from bench.common import (
    APP_PORT,
    Activator,
    Bench,
    BenchError,
    ClientNetns,
    PodSpec,
    Reply,
    Series,
    base_parser,
    http_get,
    log,
    sample_app,
    summarize,
)
from bench.report import density_section

MIB = 1048576


def memory(act: Activator, samples: int = 5, interval: float = 0.2) -> dict[str, float]:
    taken = []
    for i in range(samples):
        if i:
            time.sleep(interval)
        taken.append(act.memory())
    return {key: statistics.median(m[key] for m in taken) for key in taken[0]}


FAILURES: list[str] = []


def scale_down_all(act: Activator, names: list[str], timeout: float = 120) -> float:
    """Ask every pod to scale down; wait until all are; return the seconds it took.

    A refused request (a connection's close not seen yet) or a failed
    checkpoint (the activator keeps the app running) is asked again, at most
    3 times; failures are counted in the results.
    """
    t0 = time.monotonic()
    since = act.events.mark()
    for name in names:
        act.scale_down(name)
    for name in names:
        deadline = time.monotonic() + timeout
        asked, retries = since, 0
        while act.events.find(since, name, "scaled-down") is None:
            refused = act.events.find(asked, name, "scale-down-refused")
            failed = act.events.find(asked, name, "checkpoint-failed")
            if failed is not None:
                FAILURES.append(f"{name}: {str(failed.get('message'))[:300]}")
                log(f"checkpoint of {name} failed: {str(failed.get('message'))[:200]}")
            if refused is not None or failed is not None:
                retries += 1
                if retries > 3:
                    raise BenchError(f"pod {name} cannot be scaled down: see {act.log_path}")
                time.sleep(0.05)
                asked = act.events.mark()
                act.scale_down(name)
            if time.monotonic() > deadline:
                raise BenchError(f"pod {name} did not scale down within {timeout:g}s")
            time.sleep(0.01)
    return time.monotonic() - t0


def wake_one(act: Activator, client: ClientNetns, name: str, address: str) -> dict[str, Any]:
    since = act.events.mark()
    client.fill(64)
    reply = http_get(client, address, APP_PORT, "/")
    first = act.events.wait(since, name, "first-byte", timeout=60)
    return {"wake_ms": reply.first_byte_ms, "activator_ms": first.get("first_byte_ms")}


def wake_together(
    act: Activator, client: ClientNetns, names: list[str], addresses: dict[str, str]
) -> tuple[list[dict[str, Any]], float]:
    """Wake `names` with one client each, all released at the same moment."""
    since = act.events.mark()
    client.fill(64)
    barrier = threading.Barrier(len(names))
    replies: dict[str, Reply | BaseException] = {}

    def run(name: str) -> None:
        try:
            barrier.wait(timeout=30)
            replies[name] = http_get(client, addresses[name], APP_PORT, "/", timeout=120)
        except BaseException as exc:
            replies[name] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    out = []
    for name in names:
        reply = replies.get(name)
        if not isinstance(reply, Reply):
            raise BenchError(f"concurrent wake of {name} failed: {reply}")
        first = act.events.wait(since, name, "first-byte", timeout=60)
        out.append({"wake_ms": reply.first_byte_ms, "activator_ms": first.get("first_byte_ms")})
    done = [r for r in replies.values() if isinstance(r, Reply)]
    all_served = max(r.start + r.first_byte for r in done) - min(r.start for r in done)
    return out, all_served * 1000


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=None, help="pod counts")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the 10-wake test")
    parser.add_argument("--together", type=int, default=10, help="pods woken at once")
    args = parser.parse_args(argv)
    stages = sorted(args.stages or ((1, 10) if args.quick else (1, 10, 100)))
    rounds = args.rounds or (2 if args.quick else 5)
    together = min(args.together, max(stages))
    settle = 1.0 if args.quick else 2.0

    with Bench("density", args) as b:
        client = b.client_netns()

        def spec(i: int) -> PodSpec:
            return PodSpec(b.pod_name(f"d{i:03d}"), sample_app(0))

        act = b.activator(spec(0))
        names = [spec(0).name]
        addresses: dict[str, str] = {}
        mem: dict[str, dict[str, Any]] = {}
        timing: dict[str, dict[str, float]] = {}
        for n in stages:
            b.settle(f"{n} pods")
            t0 = time.monotonic()
            added = 0
            while len(names) < n:
                s = spec(len(names))
                act.add(s)
                names.append(s.name)
                added += 1
            add_s = time.monotonic() - t0
            for pod in act.status():
                addresses[pod["name"]] = pod["address"]
            t0 = time.monotonic()
            for name in names:  # every app up; scaled-down ones woken
                client.fill(64)
                reply = http_get(client, addresses[name], APP_PORT, "/", timeout=120)
                if reply.status != 200:
                    raise BenchError(f"pod {name} answered {reply.status}")
            up_s = time.monotonic() - t0
            time.sleep(settle)
            mem[f"{n}/running"] = memory(act)
            down_s = scale_down_all(act, names)
            time.sleep(settle)
            mem[f"{n}/scaled-down"] = memory(act)
            timing[str(n)] = {
                "add_s": add_s,
                "add_per_pod_ms": add_s / added * 1000 if added else 0.0,
                "requests_s": up_s,
                "scale_down_all_s": down_s,
            }
            r, d = mem[f"{n}/running"], mem[f"{n}/scaled-down"]
            log(
                f"{n} pods: activator RSS {r['rss'] / MIB:.1f} MiB running, "
                f"{d['rss'] / MIB:.1f} MiB scaled down (added in {add_s:.1f}s, "
                f"scaled down in {down_s:.1f}s)"
            )
            b.check_quiet(f"{n} pods")

        group = names[:together]
        log(f"wake test: {together} pods, one at a time vs all at once, {rounds} rounds")
        single, concurrent = Series(), Series()
        all_served: list[float] = []
        for rnd in range(rounds):
            b.settle(f"wake round {rnd + 1}")
            for name in group:
                single.add(**wake_one(act, client, name, addresses[name]))
            scale_down_all(act, group)
            results, served = wake_together(act, client, group, addresses)
            for result in results:
                concurrent.add(**result)
            all_served.append(served)
            scale_down_all(act, group)
            alone = statistics.median(single["wake_ms"][-together:])
            at_once = statistics.median(r["wake_ms"] for r in results)
            log(
                f"round {rnd + 1}/{rounds}: alone median {alone:.1f} ms, {together} at once "
                f"median {at_once:.1f} ms, all served {served:.0f} ms"
            )
            b.check_quiet(f"wake round {rnd + 1} (end)")
        b.check_quiet("wake test")
        stop_s = act.stop()
        log(f"the activator removed {len(names)} pods in {stop_s:.1f}s")

        base = mem[f"{stages[0]}/running"]
        summary: dict[str, Any] = {"stages": stages, "memory": {}, "timing": timing}
        for key, m in mem.items():
            n = int(key.split("/")[0])
            entry = {
                "pods": n,
                "state": key.split("/")[1],
                "rss_mib": m["rss"] / MIB,
                "pss_mib": m["pss"] / MIB,
                "uss_mib": m["uss"] / MIB,
                "threads": m["threads"],
                "fds": m["fds"],
                "rss_ratio": m["rss"] / base["rss"],
                "rss_added_mib": (m["rss"] - base["rss"]) / MIB,
                "rss_per_pod_kib": (m["rss"] - base["rss"]) / 1024 / max(1, n - stages[0]),
                "spares": m["spares"],
                "spares_private_mib": m["spares_private_dirty"] / MIB,
                # what the node pays for the activator: itself and its idle CRIUs
                "total_mib": (m["rss"] + m["spares_private_dirty"]) / MIB,
            }
            summary["memory"][key] = entry
        s, c = summarize(single["wake_ms"]), summarize(concurrent["wake_ms"])
        summary["wake"] = {
            "pods_managed": len(names),
            "together": together,
            "single": s,
            "single_activator": summarize(single["activator_ms"]),
            "concurrent": c,
            "concurrent_activator": summarize(concurrent["activator_ms"]),
            "all_served_ms": summarize(all_served),
            "ratio_median": c["median"] / s["median"],
            "ratio_p90": c["p90"] / s["p90"],
        }
        samples = {
            "memory": mem,
            "single": single.data,
            "concurrent": concurrent.data,
            "all_served_ms": all_served,
        }
        config = {
            "stages": stages,
            "rounds": rounds,
            "together": together,
            "app": "activator.sampleapp --hold-mib 0",
            "settle_s": settle,
            "teardown_s": stop_s,
            "checkpoint_failures": FAILURES,
        }
        b.result(config, samples, summary, density_section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
