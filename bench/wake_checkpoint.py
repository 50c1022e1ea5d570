"""Wake and checkpoint: the activator against the raw CRIU CLI and a cold start.

For each app size (the sample app holding 16, 128 and 512 MiB) one repetition
runs the kinds below in an order shuffled per repetition and size (seeded). A
rotation kept each kind behind the same other one: the activator always came
right after a cold start whose app had just freed its memory.

- activator: a pod managed by `activator run`, scaled down by its own idle
  timer. A client (in another pod) connects and sends GET /state: wake = from
  connect to the first byte of the answer at the client (the activator's own
  `first-byte` event, accept -> first byte, is kept too). The client closes;
  the idle deadline (close + scaledown-after) fires the checkpoint: checkpoint
  = deadline -> the app's process gone (pidfd), with the activator's
  `checkpoint_ms` and image size from its events.
- raw CRIU CLI, same layout (a pod with pause and the same namespaces, no
  activator): `criu restore -d -S --inherit-fd ...` of the app's image while
  the client polls (connect refused -> retry every 1 ms) and sends GET /state:
  wake = criu started -> first byte. After the same idle time, `criu dump`
  with the activator's options: checkpoint = criu started -> process gone
  (and criu's exit).
- cold start: spawn the app in a pod (the activator's own spawn path), poll
  as above: start -> first byte.
- the activator with `--criu-spares 0` (a second `activator run`, its own pods
  of the same sizes), cycled as the first: no pod keeps a `criu swrk` started
  ahead of its next call, as the first activator's do (its default). The
  first activator's idle spares' memory is read once at the end.

Then, as diagnostics: the same activator/raw cycles with a CRIU kernel-feature
cache present (what /run on tmpfs would give), and raw cycles with -v4 logs
whose timestamps split CRIU's time into start-up + probe, work and exit.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import (
    APP_PORT,
    KDAT_CACHE,
    SAMPLE_APP,
    Activator,
    Bench,
    BenchError,
    ClientNetns,
    PodSpec,
    RawPod,
    Series,
    base_parser,
    criu_cli,
    criu_dump,
    criu_flags,
    criu_log_times,
    criu_restore_start,
    http_get,
    idle_swrks,
    kdat_cache,
    log,
    paired,
    sample_app,
    summarize,
    wait_exit,
)
from bench.report import wake_section

SIZES = (16, 128, 512)


class RawState:
    """A raw pod with the app checkpointed in `images` between cycles."""

    def __init__(self, pod: RawPod, root: Path) -> None:
        self.pod = pod
        self.root = root
        self.count = 0
        self.images: Path | None = None
        self.boot_id = ""

    def next_images(self) -> Path:
        self.count += 1
        return self.root / f"images-{self.count}"


def boot_id(body: bytes) -> str:
    try:
        return str(json.loads(body)["boot_id"])
    except (ValueError, KeyError, TypeError):
        return ""


def act_cycle(
    act: Activator, client: ClientNetns, name: str, address: str, boot: str, idle: float
) -> dict[str, Any]:
    """Wake the scaled-down pod with a request, then let it scale down by itself."""
    since = act.events.mark()
    client.fill()
    reply = http_get(client, address, APP_PORT, "/state")
    closed_at = time.time()
    if reply.status != 200:
        raise BenchError(f"pod {name} answered {reply.status}")
    pid = act.app_pid(name, SAMPLE_APP)
    gone_at = wait_exit(pid, idle + 120)
    if gone_at is None:
        raise BenchError(f"pod {name}: the app was not checkpointed within {idle + 120:g}s")
    scaled = act.events.wait(since, name, "scaled-down", timeout=120)
    restored = act.events.find(since, name, "running", previous="restoring")
    first = act.events.find(since, name, "first-byte")
    fired = act.events.find(since, name, "checkpointing")
    return {
        "wake_ms": reply.first_byte_ms,
        "wake_activator_ms": first.get("first_byte_ms") if first else None,
        "restore_ms": restored.get("restore_ms") if restored else None,
        "checkpoint_ms": scaled.get("checkpoint_ms"),
        "deadline_to_gone_ms": (gone_at - (closed_at + idle)) * 1000,
        "timer_to_gone_ms": (gone_at - fired["time"]) * 1000 if fired else None,
        "image_bytes": scaled.get("image_bytes"),
        "restored": boot_id(reply.body) == boot,
    }


def raw_cycle(
    client: ClientNetns, raw: RawState, idle: float, verbosity: int | None = None
) -> dict[str, Any]:
    """criu restore (client polling for the first byte), idle, criu dump."""
    assert raw.images is not None
    client.fill()
    restoring = criu_restore_start(raw.images, raw.pod, verbosity)
    try:
        reply = http_get(
            client, raw.pod.address, APP_PORT, "/state", start=restoring.start, poll=True
        )
    finally:
        pid, restore_wall = restoring.finish(raw.pod)
    if reply.status != 200:
        raise BenchError(f"raw pod {raw.pod.name} answered {reply.status}")
    old = raw.images
    restore_log = old / "restore.log"
    kept_log = raw.root / f"restore-{raw.count}.log"
    shutil.copyfile(restore_log, kept_log)
    # As the activator does: the image goes once the app is back.
    shutil.rmtree(old, ignore_errors=True)
    time.sleep(idle)
    images = raw.next_images()
    dump = criu_dump(pid, images, raw.pod, verbosity)
    raw.images = images
    return {
        "wake_ms": reply.first_byte_ms,
        "restore_wall_ms": restore_wall,
        "poll_attempts": reply.attempts,
        "dump_gone_ms": dump.gone_ms,
        "dump_wall_ms": dump.wall_ms,
        "image_bytes": dump.image_bytes,
        "restored": boot_id(reply.body) == raw.boot_id,
        "restore_log": str(kept_log),
        "dump_log": str(images / "dump.log"),
    }


def cold_cycle(client: ClientNetns, pod: RawPod, hold: int) -> dict[str, Any]:
    client.fill()
    t0 = time.monotonic()
    pid = pod.spawn(sample_app(hold))
    try:
        reply = http_get(client, pod.address, APP_PORT, "/", start=t0, poll=True)
    finally:
        pod.kill(pid)
    if reply.status != 200:
        raise BenchError(f"cold pod {pod.name} answered {reply.status}")
    return {"wake_ms": reply.first_byte_ms, "poll_attempts": reply.attempts}


def anatomy(raw_log: Path, dump_log: Path) -> dict[str, float]:
    r = criu_log_times(
        raw_log, {"start": "Reading image tree", "end": "Restore finished successfully"}
    )
    d = criu_log_times(
        dump_log, {"start": "Dumping processes (pid", "end": "Dumping finished successfully"}
    )
    return {
        "restore_probe_ms": r.get("start", float("nan")),
        "restore_work_ms": r.get("end", float("nan")) - r.get("start", float("nan")),
        "dump_probe_ms": d.get("start", float("nan")),
        "dump_work_ms": d.get("end", float("nan")) - d.get("start", float("nan")),
    }


def spare_memory(act: Activator) -> dict[str, list[float]]:
    """Memory of the idle `criu swrk`s an activator keeps for its pods (scaled
    down: each spare waits for a restore), MiB each."""
    time.sleep(0.5)  # a spare starts SPARE_AFTER after its pod's call
    spares = idle_swrks(act.pid)
    found = {
        f"{key}_mib": [spare[key] / 1048576 for spare in spares]
        for key in ("uss", "pss", "rss", "private_dirty")
    }
    log(f"idle criu swrk spares: {found}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="MiB the app holds")
    parser.add_argument("--reps", type=int, default=None, help="measured repetitions per size")
    parser.add_argument("--idle", type=float, default=0.5, help="scale-down after (seconds)")
    parser.add_argument("--no-whatif", action="store_true", help="skip the kdat-cache cycles")
    parser.add_argument(
        "--no-spareless", action="store_true", help="skip the activator with --criu-spares 0"
    )
    args = parser.parse_args(argv)
    sizes = tuple(args.sizes or ((16, 128) if args.quick else SIZES))
    # 512 MiB restores are bimodal on these VMs: enough for a median to say something.
    reps = args.reps or (3 if args.quick else 25)
    whatif_sizes = tuple(s for s in sizes if s <= 128)[:2]
    whatif_reps = 0 if args.no_whatif else (2 if args.quick else 8)
    anatomy_reps = 1 if args.quick else 3
    idle_ms = int(args.idle * 1000)

    with Bench("wake_checkpoint", args) as b:
        client = b.client_netns()
        managed = ("activator",) if args.no_spareless else ("activator", "no_spares")
        acts: dict[str, Activator] = {}
        specs: dict[tuple[str, int], PodSpec] = {}
        boots: dict[tuple[str, int], str] = {}
        address: dict[tuple[str, int], str] = {}
        for kind in managed:
            letter = "a" if kind == "activator" else "h"
            for s in sizes:
                specs[(kind, s)] = PodSpec(
                    b.pod_name(f"{letter}{s}"), sample_app(s), scaledown_after=f"{idle_ms}ms"
                )
            names = ", ".join(specs[(kind, s)].name for s in sizes)
            log(f"{kind}: activator with pods {names}")
            acts[kind] = act = b.activator(
                specs[(kind, sizes[0])],
                tag="activator" if kind == "activator" else "activator-no-criu-spares",
                criu_spares=0 if kind == "no_spares" else None,
            )
            for s in sizes[1:]:
                act.add(specs[(kind, s)])
            for s in sizes:
                name = specs[(kind, s)].name
                since = act.events.mark()
                address[(kind, s)] = act.pod(name)["address"]
                client.fill()
                reply = http_get(client, address[(kind, s)], APP_PORT, "/state", timeout=120)
                boots[(kind, s)] = boot_id(reply.body)
                act.events.wait(since, name, "scaled-down", timeout=120)
        # The activator may make CRIU's kernel-feature cache at start-up.
        b.meta["kdat_cache_during"] = KDAT_CACHE.exists()

        log("raw pods: start the apps, first dumps")
        raws: dict[int, RawState] = {}
        colds: dict[int, RawPod] = {}
        for s in sizes:
            pod = b.raw_pod(f"r{s}")
            raw = RawState(pod, b.workdir / f"raw{s}")
            raw.root.mkdir()
            pid = pod.spawn(sample_app(s))
            client.fill()
            reply = http_get(client, pod.address, APP_PORT, "/state", poll=True, timeout=120)
            raw.boot_id = boot_id(reply.body)
            time.sleep(args.idle)
            raw.images = raw.next_images()
            criu_dump(pid, raw.images, pod)
            raws[s] = raw
            colds[s] = b.raw_pod(f"c{s}")

        kinds = (*managed, "raw", "cold")

        def one(kind: str, s: int) -> dict[str, Any]:
            if kind in acts:
                key = (kind, s)
                return act_cycle(
                    acts[kind], client, specs[key].name, address[key], boots[key], args.idle
                )
            if kind == "raw":
                return raw_cycle(client, raws[s], args.idle)
            return cold_cycle(client, colds[s], s)

        log("warm-up: one cycle of each kind per size (not counted)")
        for s in sizes:
            for kind in kinds:
                one(kind, s)

        series = {(k, s): Series() for k in kinds for s in sizes}
        for rep in range(reps):
            b.settle(f"rep {rep + 1}")
            for s in sizes:
                order = random.Random(f"{rep}/{s}").sample(kinds, len(kinds))
                for kind in order:
                    series[(kind, s)].add(**one(kind, s))
            a16 = series[("activator", sizes[0])]["wake_ms"][-1]
            r16 = series[("raw", sizes[0])]["wake_ms"][-1]
            log(f"rep {rep + 1}/{reps}: {sizes[0]} MiB wake: activator {a16:.1f}, raw {r16:.1f} ms")
            b.check_quiet(f"rep {rep + 1} (end)")

        whatif = {(k, s): Series() for k in ("activator", "raw") for s in whatif_sizes}
        kdat_used = False
        if whatif_reps:
            log(f"what-if: CRIU kdat cache present, {whatif_reps} reps at {whatif_sizes} MiB")
            with kdat_cache() as installed:
                kdat_used = installed
                if installed:
                    for s in whatif_sizes:  # warm-up
                        one("activator", s)
                        one("raw", s)
                    for rep in range(whatif_reps):
                        b.settle(f"what-if rep {rep + 1}")
                        for s in whatif_sizes:
                            order = ("activator", "raw") if rep % 2 == 0 else ("raw", "activator")
                            for kind in order:
                                whatif[(kind, s)].add(**one(kind, s))
                else:
                    log("a kdat cache is present already: the what-if is the main run")

        log(f"anatomy: {anatomy_reps} raw cycle(s) per size with -v4 logs")
        parts = {s: Series() for s in sizes}
        for rep in range(anatomy_reps):
            b.settle(f"anatomy rep {rep + 1}")
            for s in sizes:
                cycle = raw_cycle(client, raws[s], args.idle, verbosity=4)
                parts[s].add(
                    restore_wall_ms=cycle["restore_wall_ms"],
                    dump_wall_ms=cycle["dump_wall_ms"],
                    **anatomy(Path(cycle["restore_log"]), Path(cycle["dump_log"])),
                )

        spares = spare_memory(acts["activator"])
        for act in acts.values():
            act.stop()
        samples: dict[str, Any] = {}
        summary: dict[str, Any] = {"sizes": list(sizes), "wake": {}, "checkpoint": {}}
        if spares:
            samples["spares"] = spares
            summary["spares"] = {
                "count": len(spares["uss_mib"]),
                "pods": len(sizes),
                **{key: summarize(values) for key, values in spares.items()},
            }
        for s in sizes:
            a, r, c = series[("activator", s)], series[("raw", s)], series[("cold", s)]
            h = series.get(("no_spares", s), Series())
            samples[f"{s}"] = {"activator": a.data, "raw": r.data, "cold": c.data}
            if "no_spares" in acts:
                samples[f"{s}"]["no_spares"] = h.data
            restoring = (("activator", a), ("no_spares", h), ("raw", r))
            lost = [k for k, ser in restoring if not all(ser["restored"])]
            if lost:
                log(f"WARNING {s} MiB: some {lost} wakes were not restores (new boot id)")
            w = {
                "activator": summarize(a["wake_ms"]),
                "activator_accept_to_first_byte": summarize(a["wake_activator_ms"]),
                "activator_restore_ms": summarize(a["restore_ms"]),
                "raw": summarize(r["wake_ms"]),
                "raw_criu_wall": summarize(r["restore_wall_ms"]),
                "cold": summarize(c["wake_ms"]),
                "ratio_raw": summarize(paired(a["wake_ms"], r["wake_ms"], "ratio")),
                "ratio_cold": summarize(paired(a["wake_ms"], c["wake_ms"], "ratio")),
                "all_restored": not lost,
            }
            if "no_spares" in acts:
                w["no_spares"] = summarize(h["wake_ms"])
                w["no_spares_accept_to_first_byte"] = summarize(h["wake_activator_ms"])
                w["no_spares_restore_ms"] = summarize(h["restore_ms"])
                w["ratio_raw_no_spares"] = summarize(paired(h["wake_ms"], r["wake_ms"], "ratio"))
            k = {
                "activator_deadline_to_gone": summarize(a["deadline_to_gone_ms"]),
                "activator_timer_to_gone": summarize(a["timer_to_gone_ms"]),
                "activator_checkpoint_ms": summarize(a["checkpoint_ms"]),
                "raw_gone": summarize(r["dump_gone_ms"]),
                "raw_wall": summarize(r["dump_wall_ms"]),
                "ratio_gone": summarize(
                    paired(a["deadline_to_gone_ms"], r["dump_gone_ms"], "ratio")
                ),
                "ratio_checkpoint_ms": summarize(
                    paired(a["checkpoint_ms"], r["dump_wall_ms"], "ratio")
                ),
                "activator_image_mib": summarize([v / 1048576 for v in a["image_bytes"]]),
                "raw_image_mib": summarize([v / 1048576 for v in r["image_bytes"]]),
            }
            if "no_spares" in acts:
                k["no_spares_deadline_to_gone"] = summarize(h["deadline_to_gone_ms"])
                k["no_spares_checkpoint_ms"] = summarize(h["checkpoint_ms"])
                k["ratio_gone_no_spares"] = summarize(
                    paired(h["deadline_to_gone_ms"], r["dump_gone_ms"], "ratio")
                )
            summary["wake"][str(s)] = w
            summary["checkpoint"][str(s)] = k
            p = parts[s]
            an = {key: summarize(p[key]) for key in p.data}
            summary.setdefault("anatomy", {})[str(s)] = an
            samples[f"{s}"]["anatomy"] = p.data
        if kdat_used:
            summary["whatif_kdat"] = {}
            for s in whatif_sizes:
                wa, wr = whatif[("activator", s)], whatif[("raw", s)]
                samples[f"{s}"]["whatif_kdat"] = {"activator": wa.data, "raw": wr.data}
                entry = {
                    "activator_wake": summarize(wa["wake_ms"]),
                    "raw_wake": summarize(wr["wake_ms"]),
                    "activator_deadline_to_gone": summarize(wa["deadline_to_gone_ms"]),
                    "activator_checkpoint_ms": summarize(wa["checkpoint_ms"]),
                    "raw_gone": summarize(wr["dump_gone_ms"]),
                }
                summary["whatif_kdat"][str(s)] = entry
        config = {
            "criu_cli_flags": criu_flags(),
            "criu_cli": criu_cli(),
            "sizes": list(sizes),
            "reps": reps,
            "idle_s": args.idle,
            "poll_interval_ms": 1.0,
            "whatif_reps": whatif_reps if kdat_used else 0,
            "whatif_sizes": list(whatif_sizes),
            "anatomy_reps": anatomy_reps,
            "no_spares_variant": "no_spares" in acts,
        }
        b.result(config, samples, summary, wake_section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
