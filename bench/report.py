"""REPORT.md and PNG plots from the benches' JSON results (bench/results/*.json)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from bench.common import RESULTS, log, save_plot

MIB = 1048576
TARGETS = {
    "wake": 1.0,  # activator wake / raw criu restore CLI
    "checkpoint": 1.1,  # activator checkpoint / raw criu dump CLI
    "added_p50_us": 100.0,
    "transfer": 0.9,  # activator / direct throughput
    "fast_path_rps": 0.97,  # fast path / direct requests/s
    "density_mib": 60.0,  # the activator with 100 scaled-down pods
    "lazy": 2.0,  # lazy wake at the biggest size / lazy wake at the smallest
}


def load(directory: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for name in ("wake_checkpoint", "wake_timeline", "proxy", "density", "lazy"):
        path = directory / f"{name}.json"
        if path.exists():
            found[name] = json.loads(path.read_text())
    return found


def med(s: dict[str, Any] | None) -> float:
    return float(s["median"]) if s and s.get("n") else math.nan


def span(s: dict[str, Any] | None, unit: str = "", digits: int = 1) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{s['median']:.{digits}f}{unit} [{s['p10']:.{digits}f}-{s['p90']:.{digits}f}]"


def yes(ok: bool) -> str:
    return "**yes**" if ok else "**no**"


def verdict(s: dict[str, Any] | None, target: float, at_most: bool = True) -> str:
    """Reached or not by the median; "within noise" when the median's 95%
    confidence interval has the target inside (results from before it was
    recorded: by the median alone)."""
    m = med(s)
    ok = m <= target if at_most else m >= target
    if not s or "median_ci95_lo" not in s:
        return yes(ok)
    lo, hi = s["median_ci95_lo"], s["median_ci95_hi"]
    if lo <= target <= hi and lo != hi:
        return "within noise"
    return yes(ok)


def ci(s: dict[str, Any] | None, unit: str = "", digits: int = 2) -> str:
    if not s or "median_ci95_lo" not in s:
        return "-"
    return f"{s['median_ci95_lo']:.{digits}f}-{s['median_ci95_hi']:.{digits}f}{unit}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# -- plots ----------------------------------------------------------------------------------


def _errbars(stats: list[dict[str, Any]]) -> tuple[list[float], list[list[float]]]:
    mids = [med(s) for s in stats]
    lo = [
        max(0.0, m - s.get("p10", m)) if s.get("n") else 0.0
        for m, s in zip(mids, stats, strict=True)
    ]
    hi = [
        max(0.0, s.get("p90", m) - m) if s.get("n") else 0.0
        for m, s in zip(mids, stats, strict=True)
    ]
    return mids, [lo, hi]


def _bars(ax: Any, groups: list[str], series: list[tuple[str, list[dict[str, Any]], str]]) -> None:
    width = 0.8 / len(series)
    for i, (label, stats, color) in enumerate(series):
        mids, err = _errbars(stats)
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, mids, width, yerr=err, capsize=3, label=label, color=color)
        tops = [m + e for m, e in zip(mids, err[1], strict=True)]
        for x, m, top in zip(xs, mids, tops, strict=True):
            if not math.isnan(m):
                ax.annotate(
                    f"{m:.0f}",
                    (x, top),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(axis="y", alpha=0.3)


def plot_wake(wc: dict[str, Any], out: Path) -> str:
    import matplotlib.pyplot as plt

    s = wc["summary"]
    sizes = [str(x) for x in s["sizes"]]
    no_spares = [
        (
            "activator --criu-spares 0",
            [s["wake"][x].get("no_spares", {}) for x in sizes],
            "#aec7e8",
        )
    ]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _bars(
        ax,
        [f"{x} MiB" for x in sizes],
        [
            (
                "activator, default (connect -> first byte)",
                [s["wake"][x]["activator"] for x in sizes],
                "#1f77b4",
            ),
            *(no_spares if all("no_spares" in s["wake"][x] for x in sizes) else []),
            (
                "raw `criu restore` CLI (start -> first byte, polled 1 ms)",
                [s["wake"][x]["raw"] for x in sizes],
                "#ff7f0e",
            ),
            (
                "cold start (spawn -> first byte, polled 1 ms)",
                [s["wake"][x]["cold"] for x in sizes],
                "#7f7f7f",
            ),
        ],
    )
    ax.set_ylabel("ms (median, bars p10-p90)")
    ax.set_title("Wake: first response byte, sample app holding N MiB")
    ax.legend(fontsize=8)
    return save_plot(fig, out, "wake.png")


def plot_checkpoint(wc: dict[str, Any], out: Path) -> str:
    import matplotlib.pyplot as plt

    s = wc["summary"]
    sizes = [str(x) for x in s["sizes"]]
    k = s["checkpoint"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _bars(
        ax,
        [f"{x} MiB\n(image {k[x]['activator_image_mib'].get('median', 0):.0f} MiB)" for x in sizes],
        [
            (
                "activator: idle deadline -> app gone",
                [k[x]["activator_deadline_to_gone"] for x in sizes],
                "#1f77b4",
            ),
            (
                "activator: its checkpoint_ms",
                [k[x]["activator_checkpoint_ms"] for x in sizes],
                "#aec7e8",
            ),
            (
                "raw `criu dump` CLI: start -> app gone",
                [k[x]["raw_gone"] for x in sizes],
                "#ff7f0e",
            ),
        ],
    )
    ax.set_ylabel("ms (median, bars p10-p90)")
    ax.set_title("Checkpoint: until the app's process is gone")
    ax.legend(fontsize=8)
    return save_plot(fig, out, "checkpoint.png")


def plot_anatomy(wc: dict[str, Any], out: Path) -> str:
    import matplotlib.pyplot as plt

    s = wc["summary"]
    sizes = [str(x) for x in s["sizes"]]
    an = s["anatomy"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ax = axes[0]
    labels, probe, work, rest = [], [], [], []
    for x in sizes:
        for op in ("restore", "dump"):
            wall, p, w = (
                med(an[x][f"{op}_wall_ms"]),
                med(an[x][f"{op}_probe_ms"]),
                med(an[x][f"{op}_work_ms"]),
            )
            labels.append(f"{op}\n{x} MiB")
            probe.append(p)
            work.append(w)
            rest.append(max(0.0, wall - p - w))
    xs = range(len(labels))
    ax.bar(xs, probe, label="start-up + kernel-feature probe", color="#d62728")
    ax.bar(xs, work, bottom=probe, label="dump/restore work", color="#2ca02c")
    ax.bar(
        xs,
        rest,
        bottom=[a + b for a, b in zip(probe, work, strict=True)],
        label="exec + exit (outside the log)",
        color="#c7c7c7",
    )
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("ms (median)")
    ax.set_title("Raw CRIU CLI time, from -v4 log timestamps")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    whatif = s.get("whatif_kdat") or {}
    if whatif:
        ws = list(whatif)
        _bars(
            ax,
            [f"{x} MiB" for x in ws],
            [
                ("activator wake", [s["wake"][x]["activator"] for x in ws], "#1f77b4"),
                (
                    "activator wake, kdat cached",
                    [whatif[x]["activator_wake"] for x in ws],
                    "#aec7e8",
                ),
                ("raw restore", [s["wake"][x]["raw"] for x in ws], "#ff7f0e"),
                ("raw restore, kdat cached", [whatif[x]["raw_wake"] for x in ws], "#ffbb78"),
            ],
        )
        ax.set_title("What-if: CRIU kernel-feature cache present")
        ax.set_ylabel("wake, ms (median, bars p10-p90)")
        ax.legend(fontsize=7)
    else:
        ax.set_axis_off()
    return save_plot(fig, out, "anatomy.png")


def plot_proxy(px: dict[str, Any], out: Path) -> str:
    import matplotlib.pyplot as plt

    s = px["summary"]
    names = list(s["scenarios"])
    sc = s["scenarios"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.3))
    _bars(
        axes[0],
        names,
        [
            ("direct", [sc[n]["direct_rps"] for n in names], "#ff7f0e"),
            ("through the activator", [sc[n]["activator_rps"] for n in names], "#1f77b4"),
            *(
                [("fast path", [sc[n]["fast_path_rps"] for n in names], "#2ca02c")]
                if all("fast_path_rps" in sc[n] for n in names)
                else []
            ),
        ],
    )
    axes[0].set_yscale("log")
    axes[0].set_title("Small responses: requests/s (wrk -t1)")
    axes[0].legend(fontsize=8)
    _bars(
        axes[1],
        names,
        [
            ("direct p50", [sc[n]["direct_p50_us"] for n in names], "#ff7f0e"),
            ("activator p50", [sc[n]["activator_p50_us"] for n in names], "#1f77b4"),
            ("direct p99", [sc[n]["direct_p99_us"] for n in names], "#ffbb78"),
            ("activator p99", [sc[n]["activator_p99_us"] for n in names], "#aec7e8"),
        ],
    )
    axes[1].set_yscale("log")
    axes[1].set_title("Latency, us (log)")
    axes[1].legend(fontsize=7)
    t = s["transfer"]
    _bars(
        axes[2],
        [f"{t['mib']} MiB GET"],
        [
            ("direct", [t["direct_mib_s"]], "#ff7f0e"),
            ("through the activator", [t["activator_mib_s"]], "#1f77b4"),
            *([("fast path", [t["fast_path_mib_s"]], "#2ca02c")] if "fast_path_mib_s" in t else []),
        ],
    )
    axes[2].set_title("Large transfer, MiB/s")
    axes[2].legend(fontsize=8)
    return save_plot(fig, out, "proxy.png")


def plot_density(dn: dict[str, Any], out: Path) -> str:
    import matplotlib.pyplot as plt

    s = dn["summary"]
    mem = s["memory"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    ax = axes[0]
    for state, style in (("running", "-o"), ("scaled-down", "--s")):
        keys = [k for k in mem if mem[k]["state"] == state]
        pods = [mem[k]["pods"] for k in keys]
        ax.plot(pods, [mem[k]["rss_mib"] for k in keys], style, label=f"RSS, pods {state}")
        ax.plot(
            pods, [mem[k]["pss_mib"] for k in keys], style, alpha=0.6, label=f"PSS, pods {state}"
        )
        ax.plot(
            pods,
            [mem[k]["total_mib"] for k in keys],
            style,
            alpha=0.4,
            label=f"RSS + CRIU spares, pods {state}",
        )
    ax.axhline(
        TARGETS["density_mib"], color="red", lw=1, ls=":", label="target: 60 MiB at 100 pods"
    )
    ax.set_xscale("log")
    ax.set_xlabel("pods managed")
    ax.set_ylabel("activator process memory, MiB")
    ax.set_title("Activator memory vs pods")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    single = dn["samples"]["single"]["wake_ms"]
    together = dn["samples"]["concurrent"]["wake_ms"]
    ax.boxplot([single, together], whis=(10, 90), showfliers=True)
    ax.set_xticks([1, 2], ["one at a time", f"{s['wake']['together']} at once"])
    ax.set_ylabel("wake, connect -> first byte, ms")
    ax.set_title(f"Wake with {s['wake']['pods_managed']} pods managed (whiskers p10/p90)")
    ax.grid(axis="y", alpha=0.3)
    return save_plot(fig, out, "density.png")


# -- the report -------------------------------------------------------------------------------


def report(results: dict[str, dict[str, Any]], out: Path, plots: bool = True) -> str:
    lines: list[str] = ["# pod-activator: benchmarks", ""]
    any_meta = next(iter(results.values()))["meta"] if results else {}
    quick = any(r["meta"].get("quick") for r in results.values())
    m = any_meta
    runs = "; ".join(
        f"{name} {r['meta'].get('date', '?')} at `{r['meta'].get('commit', '?')}`"
        + (" (+ uncommitted product changes)" if r["meta"].get("product_dirty") else "")
        for name, r in results.items()
    )
    lines += [
        f"Runs{' (QUICK smoke runs: few repetitions)' if quick else ''}: {runs}.",
        f"Machine: Linux {m.get('kernel')}, Debian {m.get('debian')}, {m.get('cpus')} CPUs, "
        f"{m.get('mem_total_bytes', 0) / 2**30:.0f} GiB; CRIU {m.get('criu')}; /run is "
        f"{m.get('run_fs')} (CRIU keeps no kernel-feature cache unless /run is tmpfs).",
        "Regenerate: `scripts/bench` (all) or `scripts/bench --quick`; see bench/README.md.",
        "",
    ]
    foreign = {
        name: (r["meta"].get("foreign_at_start"), r["meta"].get("foreign_during"))
        for name, r in results.items()
    }
    busy = {k: v for k, v in foreign.items() if v[0] or v[1]}
    if busy:
        where = "; ".join(
            f"{name}: {', '.join(sorted((during or {}).keys()) or ['its start'])}"
            for name, (_, during) in busy.items()
        )
        lines += [
            "> **Other people's tests/activators ran on this machine during parts of the run** "
            "(each bench waits for a quiet machine before a repetition, up to 90 s, and notes "
            f"what it saw at the start and end of each): {where}. Those parts are noisier.",
            "",
        ]
    wc, px, dn = results.get("wake_checkpoint"), results.get("proxy"), results.get("density")
    img: dict[str, str] = {}
    if plots:
        try:
            import matplotlib

            matplotlib.use("Agg")
            if wc:
                img["wake"] = plot_wake(wc, out)
                img["checkpoint"] = plot_checkpoint(wc, out)
                img["anatomy"] = plot_anatomy(wc, out)
            if px:
                img["proxy"] = plot_proxy(px, out)
            if dn:
                img["density"] = plot_density(dn, out)
        except ImportError:
            log("matplotlib is not installed (pip install -e '.[bench]'): no plots")

    # -- targets
    rows = []
    if wc:
        s = wc["summary"]
        variants = (
            ("", "activator", "ratio_raw"),
            (
                " with `--criu-spares 0` (for comparison, not the default)",
                "no_spares",
                "ratio_raw_no_spares",
            ),
        )
        for how, kind, ratio in variants:
            for x in map(str, s["sizes"]):
                if ratio not in s["wake"][x]:
                    continue  # a run without that variant
                r = s["wake"][x][ratio]
                rows.append(
                    [
                        f"wake{how} <= 1.0x raw `criu restore` CLI, {x} MiB",
                        span(r, "x", 2),
                        ci(r, "x"),
                        f"{med(s['wake'][x][kind]):.1f} vs {med(s['wake'][x]['raw']):.1f} ms",
                        verdict(r, TARGETS["wake"]),
                    ]
                )
        for x in map(str, s["sizes"]):
            r = s["checkpoint"][x]["ratio_gone"]
            k = s["checkpoint"][x]
            rows.append(
                [
                    f"checkpoint <= 1.1x raw `criu dump` CLI, {x} MiB",
                    span(r, "x", 2),
                    ci(r, "x"),
                    f"{med(k['activator_deadline_to_gone']):.1f} vs {med(k['raw_gone']):.1f} ms",
                    verdict(r, TARGETS["checkpoint"]),
                ]
            )
    if px:
        shapes = (
            ("keepalive-1", "keep-alive, 1 connection"),
            ("close-1", "a new connection per request"),
        )
        for shape, how in shapes:
            sc = px["summary"]["scenarios"][shape]
            added = sc["added_p50_us"]
            rows.append(
                [
                    f"added p50 latency through the proxy <= 100 us ({how})",
                    span(added, " us", 0),
                    ci(added, " us", 0),
                    f"{med(sc['activator_p50_us']):.0f} vs {med(sc['direct_p50_us']):.0f} us",
                    verdict(added, TARGETS["added_p50_us"]),
                ]
            )
        t = px["summary"]["transfer"]
        rows.append(
            [
                f"{t['mib']} MiB transfer throughput >= 0.9x direct",
                span(t["ratio"], "x", 2),
                ci(t["ratio"], "x"),
                f"{med(t['activator_mib_s']):.0f} vs {med(t['direct_mib_s']):.0f} MiB/s",
                verdict(t["ratio"], TARGETS["transfer"], at_most=False),
            ]
        )
        for name, sc in px["summary"]["scenarios"].items():
            if "fast_pod_direct_rps" not in sc:
                continue
            r = sc["fast_path_ratio_rps"]
            rows.append(
                [
                    f"fast path requests/s >= 0.97x direct ({name})",
                    span(r, "x", 2),
                    ci(r, "x"),
                    f"{med(sc['fast_path_rps']):.0f} vs {med(sc['fast_pod_direct_rps']):.0f} req/s",
                    verdict(r, TARGETS["fast_path_rps"], at_most=False),
                ]
            )
    if lz := results.get("lazy"):
        sizes = sorted(int(k.split("-")[1]) for k in lz["summary"] if k.startswith("lazy-"))
        small, big = (lz["summary"][f"lazy-{x}"]["wake_ms"] for x in (sizes[0], sizes[-1]))
        rows.append(
            [
                f"lazy wake at {sizes[-1]} MiB <= 2x lazy wake at {sizes[0]} MiB "
                "(`--lazy-restore`; lazy.md)",
                f"{med(big) / med(small):.2f}x",
                "-",
                f"{med(big):.1f} vs {med(small):.1f} ms",
                yes(med(big) / med(small) <= TARGETS["lazy"]),
            ]
        )
    if dn:
        mem = dn["summary"]["memory"]
        top = max(int(k.split("/")[0]) for k in mem)
        e = mem.get(f"{top}/scaled-down")
        if e:
            rows.append(
                [
                    f"{top} scaled-down pods cost the activator <= 60 MiB (its RSS and its "
                    "idle CRIU spares' private memory)",
                    f"{e['total_mib']:.1f} MiB",
                    "-",
                    f"RSS {e['rss_mib']:.1f} + {e['spares']:.0f} spares "
                    f"{e['spares_private_mib']:.1f}; PSS {e['pss_mib']:.1f}, "
                    f"{e['rss_added_mib']:+.1f} MiB RSS over 1 pod "
                    f"({e['rss_per_pod_kib']:.0f} KiB/pod)",
                    yes(top >= 100 and e["total_mib"] <= TARGETS["density_mib"]),
                ]
            )
    lines += [
        "## Results against the targets",
        "",
        "Ratios are per repetition (activator / baseline of the same repetition, the "
        "kinds interleaved), shown as median [p10-p90], with the median's 95% confidence "
        "interval (distribution-free: order statistics of the repetitions). A target counts "
        "as reached when the median meets it, and as within noise when that interval holds "
        "the target: this machine cannot tell then (more repetitions narrow it).",
        "",
        table(["target", "ratio / value", "median's 95% CI", "medians", "reached"], rows),
        "",
    ]

    if wc:
        lines += wake_section(wc, img)
    if results.get("wake_timeline"):
        lines += timeline_section(results["wake_timeline"])
    if px:
        lines += proxy_section(px, img)
    if dn:
        lines += density_section(dn, img)
    lines += findings(wc, px, dn, results.get("wake_timeline"))
    lines += method_section(wc, px, dn)
    text = "\n".join(lines) + "\n"
    (out / "REPORT.md").write_text(text)
    log(f"wrote {out / 'REPORT.md'}")
    return text


def wake_section(wc: dict[str, Any], img: dict[str, str]) -> list[str]:
    s, c = wc["summary"], wc["config"]
    sizes = [str(x) for x in s["sizes"]]
    no_spares = all("no_spares" in s["wake"][x] for x in sizes)
    rows = []
    for x in sizes:
        w = s["wake"][x]
        rows.append(
            [
                f"{x} MiB",
                span(w["activator"]),
                span(w["activator_accept_to_first_byte"]),
                span(w["activator_restore_ms"]),
                span(w["raw"]),
                span(w["raw_criu_wall"]),
                span(w["cold"]),
                span(w["ratio_raw"], "x", 2),
                span(w["ratio_cold"], "x", 2),
                *(
                    [span(w["no_spares"]), span(w["ratio_raw_no_spares"], "x", 2)]
                    if no_spares
                    else []
                ),
            ]
        )
    spares = s.get("spares")
    spares_text = [
        "By default each pod keeps a `criu swrk` started ahead of its next call (from its "
        "second call on), up to `--criu-spares` pods per activator (8; the pods that cycled "
        "last keep theirs), so the restore's RPC goes to a CRIU that is already loaded."
        + (
            " `--criu-spares 0`: a second `activator run` with that flag and its own pods of "
            "the same sizes, cycled in the same repetitions: every call starts its own CRIU, "
            "as the CLI does (and as a pod beyond the limit does)."
            if no_spares
            else ""
        )
        + (
            f" What the spares cost: an idle `criu swrk` per pod ({spares['count']} for "
            f"{spares['pods']} scaled-down pods at the end of the run), on the node, "
            "outside the activator's own memory: "
            f"{span(spares['private_dirty_mib'], ' MiB', 2)} of private dirty pages each "
            "(what every further spare adds), "
            f"USS {span(spares['uss_mib'], ' MiB', 2)} (CRIU's binary counts as private "
            f"while few processes map it), PSS {span(spares['pss_mib'], ' MiB', 2)}, "
            f"RSS {span(spares['rss_mib'], ' MiB', 1)}."
            if spares and spares.get("count") and "private_dirty_mib" in spares
            else ""
        ),
        "",
    ]
    out = [
        "## Wake",
        "",
        f"{c['reps']} repetitions per size after one warm-up; ms, median [p10-p90]. CRIU's "
        "kernel-feature cache (/run/criu.kdat) during these cycles: "
        + (
            "present (the activator makes it at start-up), for the activator and the raw CLI alike."
            if wc["meta"].get("kdat_cache_during", wc["meta"].get("kdat_cache_present"))
            else "absent (/run is not a tmpfs): every CRIU call probes the kernel."
        ),
        "",
        table(
            [
                "app",
                "activator: connect -> 1st byte",
                "its accept -> 1st byte (event)",
                "its restore_ms",
                "raw CLI: start -> 1st byte",
                "raw CLI exit",
                "cold start -> 1st byte",
                "activator / raw",
                "activator / cold",
                *(
                    ["`--criu-spares 0`: connect -> 1st byte", "`--criu-spares 0` / raw"]
                    if no_spares
                    else []
                ),
            ],
            rows,
        ),
        "",
        *spares_text,
    ]
    lost = [x for x in sizes if not s["wake"][x].get("all_restored", True)]
    if lost:
        out += [f"Some wakes at {', '.join(lost)} MiB were cold starts, not restores.", ""]
    if "wake" in img:
        out += [f"![wake]({img['wake']})", ""]
    rows = []
    for x in sizes:
        k = s["checkpoint"][x]
        rows.append(
            [
                f"{x} MiB",
                span(k["activator_deadline_to_gone"]),
                span(k["activator_timer_to_gone"]),
                span(k["activator_checkpoint_ms"]),
                span(k["raw_gone"]),
                span(k["raw_wall"]),
                span(k["ratio_gone"], "x", 2),
                span(k["ratio_checkpoint_ms"], "x", 2),
                f"{med(k['activator_image_mib']):.1f} / {med(k['raw_image_mib']):.1f}",
                *(
                    [
                        span(k["no_spares_deadline_to_gone"]),
                        span(k["ratio_gone_no_spares"], "x", 2),
                    ]
                    if no_spares
                    else []
                ),
            ]
        )
    out += [
        "## Checkpoint",
        "",
        f"Idle deadline = the client's close + scale-down-after ({c['idle_s']:g} s). ms, "
        "median [p10-p90].",
        "",
        table(
            [
                "app",
                "activator: deadline -> app gone",
                "timer fired -> gone",
                "its checkpoint_ms",
                "raw CLI: start -> app gone",
                "raw CLI exit",
                "activator / raw (gone)",
                "checkpoint_ms / raw exit",
                "image MiB act / raw",
                *(
                    ["`--criu-spares 0`: deadline -> gone", "`--criu-spares 0` / raw"]
                    if no_spares
                    else []
                ),
            ],
            rows,
        ),
        "",
    ]
    if "checkpoint" in img:
        out += [f"![checkpoint]({img['checkpoint']})", ""]
    rows = []
    for x in sizes:
        a = s["anatomy"][x]
        rows.append(
            [
                f"{x} MiB",
                span(a["restore_wall_ms"]),
                span(a["restore_probe_ms"]),
                span(a["restore_work_ms"]),
                span(a["dump_wall_ms"]),
                span(a["dump_probe_ms"]),
                span(a["dump_work_ms"]),
            ]
        )
    out += [
        "## Where CRIU's time goes",
        "",
        f"Raw CLI cycles with `-v4` ({c['anatomy_reps']} per size): the log's timestamps up to "
        "`Reading image tree` / `Dumping processes` are CRIU's start-up and kernel-feature "
        "probe (kerndat), re-run by every call here; then the work itself. ms.",
        "",
        table(
            [
                "app",
                "restore wall",
                "restore: probe",
                "restore: work",
                "dump wall",
                "dump: probe",
                "dump: work",
            ],
            rows,
        ),
        "",
    ]
    whatif = s.get("whatif_kdat")
    if whatif:
        rows = []
        for x, e in whatif.items():
            rows.append(
                [
                    f"{x} MiB",
                    span(s["wake"][x]["activator"]),
                    span(e["activator_wake"]),
                    span(s["wake"][x]["raw"]),
                    span(e["raw_wake"]),
                    span(s["checkpoint"][x]["activator_deadline_to_gone"]),
                    span(e["activator_deadline_to_gone"]),
                    span(s["checkpoint"][x]["raw_gone"]),
                    span(e["raw_gone"]),
                ]
            )
        out += [
            f"What-if, {c['whatif_reps']} repetitions: the same cycles with a kernel-feature cache "
            "at /run/criu.kdat (made by `criu check` in a private mount namespace whose /run is "
            "a tmpfs, installed only for these cycles; CRIU loads it from any filesystem). ms.",
            "",
            table(
                [
                    "app",
                    "activator wake",
                    "+ cache",
                    "raw wake",
                    "+ cache",
                    "activator ckpt",
                    "+ cache",
                    "raw dump",
                    "+ cache",
                ],
                rows,
            ),
            "",
        ]
    if "anatomy" in img:
        out += [f"![anatomy]({img['anatomy']})", ""]
    return out


def timeline_section(tl: dict[str, Any]) -> list[str]:
    s, c = tl["summary"], tl["config"]
    has_second = any(v.get("n") for v in s.get("no_spares", {}).values())
    present = tl["meta"].get("kdat_cache_during")
    rows = []
    for key, text in s["steps"]:
        row = [text, span(s["default"].get(key, {}))]
        if has_second:
            row.append(span(s["no_spares"].get(key, {})))
        rows.append(row)
    headers = ["step", "default" if has_second else "ms"]
    if has_second:
        headers.append("`--criu-spares 0`")
    return [
        "## Where the activator's wake time goes",
        "",
        f"Diagnostic (`bench.wake_timeline`): the activator in the bench's process with its "
        f"internals wrapped to note when each step is reached; {c['hold_mib']} MiB app, "
        f"{c['cycles']} wakes each; ms after the client's connect, median [p10-p90]. "
        f"CRIU's kernel-feature cache was {'present' if present else 'absent'}. "
        + "By default the pod's `criu swrk` was started while it was scaled down, so its "
        "start steps are not on the wake's path (-). "
        "The client thread shares the activator's process (and GIL) here, so the total "
        "runs a few ms above the wake bench's.",
        "",
        table(headers, rows),
        "",
    ]


def proxy_section(px: dict[str, Any], img: dict[str, str]) -> list[str]:
    s, c = px["summary"], px["config"]
    rows = []
    for name, e in s["scenarios"].items():
        rows.append(
            [
                name,
                span(e["direct_rps"], "", 0),
                span(e["activator_rps"], "", 0),
                span(e["ratio_rps"], "x", 2),
                span(e["direct_p50_us"], "", 0),
                span(e["activator_p50_us"], "", 0),
                span(e["added_p50_us"], "", 0),
                span(e["direct_p99_us"], "", 0),
                span(e["activator_p99_us"], "", 0),
                span(e["activator_cpu_us_per_req"], "", 1),
            ]
        )
    t = s["transfer"]
    fast = all("fast_pod_direct_rps" in e for e in s["scenarios"].values())
    fast_rows = [
        [
            name,
            span(e["fast_pod_direct_rps"], "", 0),
            span(e["fast_path_rps"], "", 0),
            span(e["fast_path_ratio_rps"], "x", 2),
            span(e["fast_path_ratio_rps_vs_first_pod"], "x", 2),
            span(e["fast_pod_direct_p50_us"], "", 0),
            span(e["fast_path_p50_us"], "", 0),
            span(e["fast_path_added_p50_us"], "", 0),
            span(e["fast_pod_direct_p99_us"], "", 0),
            span(e["fast_path_p99_us"], "", 0),
            span(e["fast_path_cpu_us_per_req"], "", 2),
        ]
        for name, e in s["scenarios"].items()
        if fast
    ]
    out = [
        "## Proxy overhead while running",
        "",
        f"nginx ({c.get('nginx', 'nginx')}, 1 worker, as root) in a pod; port 8080 behind the "
        "activator, port 8081 straight to nginx; client in another pod. wrk -t1, "
        f"{c['seconds']:g} s per run, {c['reps']} runs per path and shape, alternating. "
        "`keepalive-N`: N persistent connections; `close-1`: a new connection per request.",
        "",
        table(
            [
                "shape",
                "direct req/s",
                "activator req/s",
                "ratio",
                "p50 direct us",
                "p50 activator us",
                "added p50 us",
                "p99 direct us",
                "p99 activator us",
                "activator CPU us/request",
            ],
            rows,
        ),
        "",
        f"{t['mib']} MiB GET (nginx sendfile; Python client, 4 MiB reads), "
        f"{c['transfer_reps']} per path: direct {span(t['direct_mib_s'], ' MiB/s', 0)}, "
        f"through the activator {span(t['activator_mib_s'], ' MiB/s', 0)}, ratio "
        f"{span(t['ratio'], 'x', 2)}; the activator spent "
        f"{span(t['activator_cpu_ms'], ' ms', 0)} of CPU per transfer.",
        "",
    ]
    if "cpu" in t:
        out += transfer_cpu(t)
    if fast:
        out += [
            "**The fast path** (`activator run --fast-path`): while the app runs, the pod's nft "
            "table stops redirecting new connections to the activator, except those from the "
            "probe sources; every other new connection goes straight to the app, and the "
            "activator only counts them (an nft counter, read a few times per scale-down "
            "period) and looks at the pod's TCP table when the idle time is up. Measured on "
            "a second nginx pod, identical, whose activator runs with `--fast-path`, on its "
            "port 8080 (the declared one), against the same nginx on its port 8081 (not "
            "declared: direct), in the same repetitions as the two paths above (the four "
            "kinds interleaved); the client's pod is no probe source. The bench waits "
            "until the pod's nft table holds the fast path's counter rule (`nft list table` "
            "in the pod's netns, looked at after the first request through each port: "
            f"{c.get('fast_path_open_after_s', 0) * 1000:.0f} ms of looking) and "
            "checks it is still there before each repetition and at the end. Ratios against "
            "the direct path of the same repetition, to the same pod (and, for comparison, "
            "to the first pod's direct path of the table above).",
            "",
            table(
                [
                    "shape",
                    "direct req/s (same pod)",
                    "fast path req/s",
                    "ratio",
                    "ratio to the first pod's direct",
                    "p50 direct us",
                    "p50 fast path us",
                    "added p50 us",
                    "p99 direct us",
                    "p99 fast path us",
                    "its activator's CPU us/request",
                ],
                fast_rows,
            ),
            "",
            f"{t['mib']} MiB GET on the fast path: {span(t['fast_path_mib_s'], ' MiB/s', 0)}, "
            f"direct to the same pod {span(t['fast_pod_direct_mib_s'], ' MiB/s', 0)}, "
            f"ratio {span(t['fast_path_ratio'], 'x', 2)}; its activator spent "
            f"{span(t['fast_path_cpu_ms'], ' ms', 0)} of CPU per transfer.",
            "",
        ]
    direct = px.get("samples", {}).get("wrk", {}).get("keepalive-1/direct", {}).get("p50", [])
    if direct and min(direct) > 0 and max(direct) / min(direct) > 3:
        out += [
            "Direct keep-alive latency with one connection is bimodal on this 2-CPU VM "
            f"(p50 per run: {', '.join(str(v) for v in direct)} us), as wrk and nginx land on "
            "the same CPU or not; hence the wide spread of that row.",
            "",
        ]
    if "proxy" in img:
        out += [f"![proxy]({img['proxy']})", ""]
    return out


def transfer_cpu(t: dict[str, Any]) -> list[str]:
    """Where the CPU went during the large transfers, and what it allows."""
    rows = [
        [
            path,
            span(c["cpus_busy"], "", 2),
            *(
                span(c[f"{k}_cpu_ms"], "", 0)
                for k in ("machine", "nginx", "client", "activator", "ksoftirqd", "rest")
            ),
            f"{c['cpu_ms_per_100_mib']:.0f}",
            f"{c['cpu_bound_mib_s']:.0f}",
        ]
        for path, c in t["cpu"].items()
    ]
    direct, relay = t["cpu"]["direct"], t["cpu"]["activator"]
    return [
        f"CPU during each {t['mib']} MiB transfer, ms, median [p10-p90]. The machine's busy "
        f"time is its {t['cpus']} CPUs times the wall time less their idle time (/proc/stat); "
        "a process's is the run time of its threads (schedstat), softirq work done in its "
        "time slices included; rest: the kernel outside any task, and other work on the "
        f"machine ({t['background_cpus_busy']:.2f} CPUs busy with nothing to transfer). "
        f"Per {t['mib']} MiB and MiB/s the CPUs allow: over all transfers of the path, "
        "at its CPU cost per byte with every CPU busy.",
        "",
        table(
            [
                "path",
                "CPUs busy",
                "machine",
                "nginx",
                "client",
                "activator",
                "ksoftirqd",
                "rest",
                "machine CPU ms per 100 MiB",
                "MiB/s the CPUs allow",
            ],
            rows,
        ),
        "",
        f"Over all transfers, relayed/direct is {t['relay_all_ratio']:.2f}x: "
        f"{t['relay_occupancy_factor']:.2f}x the CPUs busy ({relay['all_cpus_busy']:.2f} against "
        f"{direct['all_cpus_busy']:.2f} of {t['cpus']}) at {1 / t['relay_cost_factor']:.2f}x the "
        f"CPU per byte ({relay['cpu_ms_per_100_mib']:.0f} against "
        f"{direct['cpu_ms_per_100_mib']:.0f} ms per 100 MiB). With every CPU busy, the relayed "
        f"path's cost per byte would allow {relay['cpu_bound_mib_s']:.0f} MiB/s, "
        f"{t['relay_cpu_bound_ratio']:.2f}x direct; 0.9x needs at most "
        f"{t['cpu_ms_per_100_mib_for_target']:.0f} ms per 100 MiB (with as many CPUs busy as "
        f"direct: {t['cpu_ms_per_100_mib_for_target_at_direct_occupancy']:.0f}).",
        "",
    ]


def density_section(dn: dict[str, Any], img: dict[str, str]) -> list[str]:
    s, c = dn["summary"], dn["config"]
    rows = []
    for key, e in s["memory"].items():
        rows.append(
            [
                key,
                f"{e['rss_mib']:.1f}",
                f"{e['pss_mib']:.1f}",
                f"{e['uss_mib']:.1f}",
                f"{e['rss_ratio']:.2f}x",
                f"{e['rss_added_mib']:+.1f}",
                f"{e['rss_per_pod_kib']:.0f}" if e["pods"] > s["stages"][0] else "-",
                f"{e['threads']:.0f}",
                f"{e['fds']:.0f}",
                f"{e['spares']:.0f}",
                f"{e['spares_private_mib']:.1f}",
                f"{e['total_mib']:.1f}",
            ]
        )
    w = s["wake"]
    timing = s.get("timing", {})
    out = [
        "## Density",
        "",
        f"One activator process, pods of `{c['app']}`; the activator process, median of "
        "5 samples, and its idle CRIU spares (`criu swrk` started ahead for the pods that "
        "cycled last, at most 8): their private dirty pages, what each adds on the node; MiB.",
        "",
        table(
            [
                "pods / state",
                "RSS",
                "PSS",
                "USS",
                "RSS / 1 pod",
                "+RSS",
                "KiB per added pod",
                "threads",
                "fds",
                "CRIU spares",
                "their private MiB",
                "RSS + spares",
            ],
            rows,
        ),
        "",
    ]
    if timing:
        top = str(max(int(k) for k in timing))
        out += [
            f"Adding pods took {timing[top]['add_per_pod_ms']:.0f} ms per pod; scaling "
            f"{top} pods down at once took {timing[top]['scale_down_all_s']:.1f} s; removing "
            f"them all (SIGTERM to the activator) {c.get('teardown_s', 0):.1f} s.",
            "",
        ]
    out += [
        f"Wake with {w['pods_managed']} pods managed ({c['rounds']} rounds; ms, median [p10-p90]): "
        f"one pod at a time {span(w['single'])}; {w['together']} pods at the same moment "
        f"{span(w['concurrent'])} ({w['ratio_median']:.2f}x), all {w['together']} served after "
        f"{span(w['all_served_ms'])}.",
        "",
    ]
    if c.get("checkpoint_failures"):
        out += [f"Checkpoints that failed and were retried: {len(c['checkpoint_failures'])}.", ""]
    if "density" in img:
        out += [f"![density]({img['density']})", ""]
    return out


def findings(
    wc: dict[str, Any] | None,
    px: dict[str, Any] | None,
    dn: dict[str, Any] | None,
    tl: dict[str, Any] | None = None,
) -> list[str]:
    """What limits each missed target, from the numbers of this run."""
    out = ["## What limits the missed targets, and what to change", ""]
    if wc:
        s = wc["summary"]
        small = str(s["sizes"][0])
        an = s["anatomy"][small]
        cached = bool(wc["meta"].get("kdat_cache_during", wc["meta"].get("kdat_cache_present")))
        w = s["wake"][small]
        k = s["checkpoint"][small]
        sizes = list(map(str, s["sizes"]))

        def reached(key: str, target: float, table: str = "wake") -> str:
            got = {x: s[table][x][key] for x in sizes if key in s[table][x]}
            words = {"**yes**": "reached", "**no**": "not reached"}
            return ", ".join(
                f"{x} MiB {med(r):.2f}x ({words.get(v, v)})"
                for x, r in got.items()
                for v in [verdict(r, target)]
            )

        no_spares = all("ratio_raw_no_spares" in s["wake"][x] for x in sizes)
        spares = s.get("spares") or {}
        out += [
            f"- **Wake** (activator/raw {reached('ratio_raw', TARGETS['wake'])}"
            + (
                f"; with `--criu-spares 0` {reached('ratio_raw_no_spares', TARGETS['wake'])}"
                if no_spares
                else ""
            )
            + "). The activator restores with the same CRIU as the CLI. "
            + (
                f"CRIU's kernel-feature probe was cached (/run/criu.kdat present): "
                f"{med(an['restore_probe_ms']):.0f} ms before a restore's work starts. "
                if cached
                else f"Both pay CRIU's kernel-feature probe on every call "
                f"({med(an['restore_probe_ms']):.0f} ms of a {med(an['restore_wall_ms']):.0f} ms "
                f"restore at {small} MiB: /run is not a tmpfs, \"Can't keep kdat cache on "
                'non-tempfs"). '
            )
            + "Around CRIU's work the activator adds a chain of hand-offs, each waking a "
            "sleeping thread or process (costly on this VM): the connection is accepted on the "
            "event loop and held; the loop itself sends the restore request, with the "
            "activator's own RPC code (pycriu's message definitions only), to the pod's spare "
            "`criu swrk`, started (fork and exec straight through CRIU's loader, no shell) "
            "while the pod was scaled down, and CRIU's answer on its socket wakes the loop, "
            "without waiting for the swrk to end (it ends when its socket closes and is reaped "
            "at the next start); then an upstream socket made in the pod's netns ahead of "
            "time, the connect, the request. The image is renamed at once and deleted half a "
            "second later, off the forward's path. The raw figure includes up to 1 ms of polling, "
            "the activator's none. The spare costs an idle `criu swrk` per pod"
            + (
                f" ({med(spares.get('private_dirty_mib')):.1f} MiB of private dirty pages "
                "each here)"
                if spares.get("count") and "private_dirty_mib" in spares
                else ""
            )
            + ", for at most `--criu-spares` pods (8 by default): beyond that, the pods that "
            "cycled longest ago start their CRIU on the wake's path, as with `--criu-spares 0`."
            + (
                f" At {small} MiB the spare takes "
                f"{med(w['no_spares']) - med(w['activator']):.1f} ms off the wake: without it "
                f"the wake is {med(w['no_spares']) - med(w['raw']):+.1f} ms off the CLI's, "
                "which pays CRIU's exec and loading on every call as the activator then does."
                if no_spares
                else ""
            )
            + "".join(
                f" At {x} MiB the restores are bimodal (activator "
                f"{span(s['wake'][x]['activator'])}, raw {span(s['wake'][x]['raw'])} ms, "
                "median [p10-p90]; CRIU's own work is as spread in the anatomy above): the "
                f"median ratio there says little. {slow_wakes(wc, x)}"
                for x in sizes
                if any(
                    s["wake"][x][kind].get("n")
                    and s["wake"][x][kind]["p90"] > 2 * s["wake"][x][kind]["p10"]
                    for kind in ("activator", "raw")
                )
            ),
        ]
        if tl:
            summary = tl["summary"]
            steps = summary["default"]
            at = {key: med(v) for key, v in steps.items()}
            spareless = {key: med(v) for key, v in summary.get("no_spares", {}).items()}

            def between(a: str, b: str, marks: dict[str, float] = at) -> float:
                return marks.get(b, math.nan) - marks.get(a, math.nan)

            parts = [
                ("connect -> the lifecycle hears of it", at.get("connection_opened", math.nan)),
                (
                    "-> CRIU called (the restore's task)",
                    between("connection_opened", "restore_call"),
                ),
                ("-> `criu swrk` being started", between("restore_call", "swrk_spawn")),
                ("its fork and exec", between("swrk_spawn", "swrk_ready")),
                ("-> request sent", between("swrk_ready", "rpc_sent")),
                (
                    "-> request sent to the pod's spare `criu swrk`",
                    between("restore_call", "rpc_sent")
                    if math.isnan(at.get("swrk_spawn", math.nan))
                    else math.nan,
                ),
                (
                    "CRIU's restore (RPC, including CRIU's start-up)",
                    between("rpc_sent", "rpc_done"),
                ),
                ("-> the lifecycle hears of it", between("rpc_done", "restore_done")),
                ("the forward's task starts", between("restore_done", "forward_start")),
                (
                    "forward (netns socket, connect, request)",
                    between("forward_start", "forward_done"),
                ),
                ("the app answers, relayed", between("forward_done", "client_first_byte")),
            ]
            listed = "; ".join(f"{text} {ms:.1f} ms" for text, ms in parts if ms == ms)
            text = (
                f"  The timeline diagnostic (medians, {tl['config']['hold_mib']} MiB, "
                + (
                    "kdat cache present"
                    if tl["meta"].get("kdat_cache_during", tl["meta"].get("kdat_cache_present"))
                    else "no kdat cache"
                )
                + f", default options) splits a wake into: {listed}."
            )
            rpc_spareless = between("rpc_sent", "rpc_done", spareless)
            if rpc_spareless == rpc_spareless:
                text += (
                    f" With `--criu-spares 0` the swrk's fork and exec take "
                    f"{between('swrk_spawn', 'swrk_ready', spareless):.1f} ms on the wake's "
                    f"path, the RPC {rpc_spareless:.1f} ms (CRIU loads first), and the client "
                    f"has its first byte after "
                    f"{spareless.get('client_first_byte', math.nan):.1f} ms "
                    f"({at.get('client_first_byte', math.nan):.1f} by default)."
                )
            text += (
                " Until 2026-11-30 a worker thread ran the RPC: a hop to it and one back to "
                "the loop, 0.5 and 0.4 ms in the timeline of 2026-11-29, each the wake-up of "
                "a thread that slept. What is left outside CRIU's work: files touched before "
                "the request (the journal naming the CRIU, which must be written before it, "
                "and the spare's check that it holds the pod's namespaces), the lifecycle and "
                "the forward, and the wake-up of every process on the path: on this VM a CPU "
                "or process that slept half a second takes milliseconds to run again (a "
                "loopback connect took 1.6-2.9 ms after 0.5 s idle, 0.05 ms after 5 ms; the "
                "steps above are that much slower in runs where the VM is in that state). "
                "The CLI pays the same for its exec. What would shorten it further: the "
                "request built and the journal written while the pod is scaled down, for the "
                "spare that will serve it (a journal naming a CRIU that never got a request "
                "is harmless: the next activator waits for it to end, then finds the image)."
            )
            out += [text]
        whatif = s.get("whatif_kdat", {}).get(small)
        if whatif:
            out += [
                f"  With a kdat cache, at {small} MiB: activator wake {med(w['activator']):.0f} -> "
                f"{med(whatif['activator_wake']):.0f} ms, raw {med(w['raw']):.0f} -> "
                f"{med(whatif['raw_wake']):.0f} ms; checkpoint: activator "
                f"{med(k['activator_deadline_to_gone']):.0f} -> "
                f"{med(whatif['activator_deadline_to_gone']):.0f} ms, raw "
                f"{med(k['raw_gone']):.0f} -> {med(whatif['raw_gone']):.0f} ms (the dump's "
                "probe share is smaller and within this run's spread). Change: the activator makes "
                "the cache at start when /run is not a tmpfs (`criu check` in a private mount "
                "namespace with a tmpfs /run, copied to /run/criu.kdat; remade when the boot id "
                "or the CRIU version changes).",
            ]
        worst = max(sizes, key=lambda x: med(s["checkpoint"][x]["ratio_gone"]))
        kw = s["checkpoint"][worst]
        spareless_ckpt = all("ratio_gone_no_spares" in s["checkpoint"][x] for x in sizes)
        out += [
            "- **Checkpoint** (activator/raw "
            f"{reached('ratio_gone', TARGETS['checkpoint'], 'checkpoint')}"
            + (
                "; with `--criu-spares 0` "
                f"{reached('ratio_gone_no_spares', TARGETS['checkpoint'], 'checkpoint')}"
                if spareless_ckpt
                else ""
            )
            + f"): the dump is the same CRIU call. Around it, at {worst} MiB: the idle timer "
            "fires "
            f"{med(kw['activator_deadline_to_gone']) - med(kw['activator_timer_to_gone']):.1f} ms "
            "after the deadline the client's close set (the loop's timer fires a few ms late "
            "on this VM), the app is gone "
            f"{med(kw['activator_timer_to_gone']):.1f} ms after the timer fired, and the "
            f"activator's checkpoint_ms (the dump call, until CRIU's answer) is "
            f"{med(kw['activator_checkpoint_ms']) - med(kw['raw_wall']):+.1f} ms off the CLI's "
            "run. In a worker thread it runs a preflight scan of the app's processes, starts "
            "`criu swrk` (unless its spare was started after the last wake), sends the dump "
            "request with its own RPC code and returns with CRIU's answer, the swrk reaped "
            "later; the app's exit is then reaped on the loop. Until 2026-11-30 the preflight "
            "found the app's processes by reading every process of the machine (psutil): 11 ms "
            "after idle here, 2 ms warm; it now follows the kernel's lists of children, as CRIU "
            "does (3 and 0.3 ms). What is left is the loop's timer, late after idle on this VM, "
            "and the preflight's reads; running it before the deadline would take those off "
            f"the path, at the cost of a scan per idle period. CRIU's start-up before the dump's "
            f"work: "
            f"{med(an['dump_probe_ms']):.0f} ms "
            + ("(kdat cached)." if cached else "(its probe; see the kdat cache above)."),
        ]
    if px:
        sc = px["summary"]["scenarios"]
        ka1, ka32, close = sc["keepalive-1"], sc["keepalive-32"], sc["close-1"]
        t = px["summary"]["transfer"]
        out += [
            f"- **Proxy, throughput** ({med(t['ratio']):.2f}x direct for {t['mib']} MiB; "
            f"{med(ka32['ratio_rps']):.2f}x the requests/s at 32 connections): a connection "
            "moving bulk data (a read of 64 KiB or more) leaves the event loop for the "
            "activator's splice relay thread, which moves it socket -> pipe -> socket with "
            "`splice(2)`, without a user-space copy "
            f"({med(t['activator_cpu_ms']):.0f} ms of activator CPU per {t['mib']} MiB, "
            "most of it in the kernel). "
            + (relay_bound(t) if "cpu" in t else "")
            + "Small requests stay in the event loop, faster there "
            f"({med(ka1['activator_cpu_us_per_req']):.0f} us of CPU per small request). "
            "Changes that would close it: keep the activator out of the path of a running "
            "pod's connections, or relay in the kernel (sockmap, which needs the eBPF the "
            "design avoids)."
            + (
                " The first exists, per pod: on the fast path (`--fast-path`) a "
                f"{t['mib']} MiB transfer ran at {med(t['fast_path_ratio']):.2f}x direct and "
                f"new connections at {med(close['fast_path_ratio_rps']):.2f}x the requests/s "
                "of direct."
                if "fast_path_ratio" in t and "fast_path_ratio_rps" in close
                else ""
            ),
            f"- **Proxy, new connections** (`close-1`: {med(close['ratio_rps']):.2f}x the "
            f"requests/s of direct, +{med(close['added_p50_us']):.0f} us p50, "
            f"{med(close['activator_cpu_us_per_req']):.0f} us of activator CPU per connection"
            + (
                f", {med(close['activator_user_us_per_req']):.0f} of it in user space and "
                f"{med(close['activator_kernel_us_per_req']):.0f} in the kernel"
                if "activator_user_us_per_req" in close
                else ""
            )
            + "): with one client waiting for each answer, the added latency is about the "
            "activator's CPU per connection. Each connection costs it a second TCP connection "
            "(a connect on the pod's loopback, the request and the answer through it, two "
            "closes) and, in Python, the accept, the lifecycle's bookkeeping, a task that "
            "connects, and two transports. Already done: upstream sockets are made in the "
            "pod's namespace in batches (one hop to its thread per two connections) and "
            "connected without uvloop's resolver, which looked up even a numeric address "
            "(514 us of CPU per connection before both, measured the same way). "
            + (
                f"The kernel's part alone, {med(close['activator_kernel_us_per_req']):.0f} us, "
                "is over 100 us: a relay in native code would take off the user-space part "
                "and still miss the target. "
                if med(close.get("activator_kernel_us_per_req")) > 100
                else "A relay in native code would take off the user-space part. "
            )
            + "What closes it is the fast path, where new connections do not pass through the "
            f"activator (`close-1` at {med(close['fast_path_ratio_rps']):.2f}x direct, "
            f"{med(close['fast_path_added_p50_us']):+.0f} us p50).",
        ]
    if dn:
        mem = dn["summary"]["memory"]
        top = max(int(k.split("/")[0]) for k in mem)
        e = mem.get(f"{top}/scaled-down", {})
        counts = sorted({int(k.split("/")[0]) for k in mem})
        mid = counts[-2] if len(counts) > 1 else top
        lower = mem.get(f"{mid}/scaled-down", {})
        marginal = math.nan
        if e and lower and top > mid:
            marginal = (e["rss_mib"] - lower["rss_mib"]) * 1024 / (top - mid)
        if e:
            out += [
                f"- **Density** ({e['rss_mib']:.0f} MiB RSS with {top} scaled-down pods, "
                f"{e['total_mib']:.0f} MiB with its {e['spares']:.0f} idle CRIU spares, "
                f"{e['rss_per_pod_kib']:.0f} KiB per pod over 1 pod"
                + (
                    f", {marginal:.0f} KiB per pod from {mid} to {top}"
                    if marginal == marginal
                    else ""
                )
                + f", {e['threads']:.0f} threads): "
                + ("reached. " if top >= 100 and e["total_mib"] <= TARGETS["density_mib"] else "")
                + "The activator starts near 37 MiB (Python, uvloop with its ssl, libnftables, "
                "pycriu); pyroute2 never loads in it (pod networks are made by a short-lived "
                "netlink helper, `netns.plumber`), its threads share two malloc arenas (one "
                "each cost the first 16 pods ~0.7 MiB apiece), and one worker thread serves "
                "every pod's namespace. What is left per pod is its driver and proxy objects, "
                "listeners, spare upstream sockets and what libnftables leaves in the heap. "
                "A native core would be the way well under 60 MiB.",
            ]
    out += [""]
    return out


def slow_wakes(wc: dict[str, Any], size: str) -> str:
    """How often each kind's wake at `size` fell in the slow mode."""
    samples = wc["samples"][size]
    fastest = min(samples["raw"]["wake_ms"])
    counts = {
        kind: sum(ms > 1.25 * fastest for ms in samples[kind]["wake_ms"])
        for kind in ("activator", "raw", "no_spares")
        if kind in samples
    }
    listed = ", ".join(f"{kind} {n}" for kind, n in counts.items())
    return (
        f"Wakes slower than 1.25x the fastest raw one, of {len(samples['raw']['wake_ms'])} "
        f"each: {listed}. Their restore_ms is as slow: the time is inside CRIU's restore, "
        "and why it is slow more often for one kind than another is not known yet. "
    )


def relay_bound(t: dict[str, Any]) -> str:
    """Why the relayed transfer is slower, from the CPU it costs (see transfer_cpu)."""
    d, a = t["cpu"]["direct"], t["cpu"]["activator"]
    more = ", ".join(
        f"{k} {med(a[f'{k}_cpu_ms']) - med(d[f'{k}_cpu_ms']):+.0f}"
        for k in ("nginx", "client", "ksoftirqd", "rest")
    )
    return (
        "What is left is CPU per byte. A path's throughput is its CPUs busy over its CPU "
        "cost per byte; over all transfers, relayed/direct is "
        f"{t['relay_occupancy_factor']:.2f} (CPUs busy, {a['all_cpus_busy']:.2f} against "
        f"{d['all_cpus_busy']:.2f} of {t['cpus']}) / {1 / t['relay_cost_factor']:.2f} (CPU per "
        f"byte, {a['cpu_ms_per_100_mib']:.0f} against {d['cpu_ms_per_100_mib']:.0f} ms per "
        f"100 MiB) = {t['relay_all_ratio']:.2f}x. The added CPU is the second TCP "
        f"connection's kernel work: {med(a['activator_cpu_ms']):.0f} ms in the activator "
        "(splice moves the bytes in few system calls, with no user-space copy) and, median "
        f"per transfer, {more} ms. Neither path saturates the CPUs (one TCP stream through "
        "processes that wake one another). 0.9x needs the relayed path at "
        f"{t['cpu_ms_per_100_mib_for_target_at_direct_occupancy']:.0f} ms per 100 MiB with as "
        f"many CPUs busy as direct, or {t['cpu_ms_per_100_mib_for_target']:.0f} with every CPU "
        f"busy: a relay that kept every CPU busy would still reach "
        f"{t['relay_cpu_bound_ratio']:.2f}x. Tuning the relay (a 512 KiB pipe, 4 MiB socket "
        "buffers, reading until empty before writing) did not move the ratio measurably. "
    )


def cli_note(config: dict[str, Any]) -> list[str]:
    if "criu_cli" not in config:  # runs before 2026-11-30 went through the wrapper
        return [
            "- The raw CLI ran through scripts/setup's wrapper script (`.venv/bin/criu`), whose "
            "shell adds about 1.4 ms a call: those ratios flatter the activator by that much."
        ]
    return [
        "- The raw CLI is CRIU's binary run through its loader (`"
        + " ".join(Path(part).name for part in config["criu_cli"][:1])
        + " ... criu`), without the shell of scripts/setup's wrapper, as a packaged "
        "/usr/sbin/criu runs and as the activator starts `criu swrk`. Until 2026-11-30 it ran "
        "through the wrapper, whose shell added about 1.4 ms a call and flattered the activator "
        "by that much."
    ]


def method_section(
    wc: dict[str, Any] | None, px: dict[str, Any] | None, dn: dict[str, Any] | None
) -> list[str]:
    flags = (wc or {}).get("config", {}).get("criu_cli_flags", ["-v2", "--tcp-close"])
    out = [
        "## How it was measured",
        "",
        "- The activator runs as its own process (`activator run`, more pods over its control "
        "socket), as in production; clients run in another pod (a netns on the pod bridge), so "
        "their connections are real traffic (connections from the node's address are sniffed "
        "for kubelet probes first).",
        "- Raw baselines use pods laid out as the activator's (netns.pod: netns, veth, a pause as "
        "pid 1 of the pod's pid namespace, the app joining both), the app's stdout/stderr on a "
        "pipe, and the CRIU options of activator/criu.py: `dump --external net[...]:pod-net "
        "--external pid[...]:pod-pid --network-lock skip --skip-in-flight FLAGS`; "
        "`restore --restore-detached --restore-sibling --inherit-fd fd[N]:pod-net "
        "--inherit-fd fd[M]:pod-pid --inherit-fd fd[K]:pipe:[INO] FLAGS`, FLAGS being the "
        f"activator's CriuOptions defaults: `{' '.join(flags)}`.",
        *cli_note((wc or {}).get("config", {})),
        "- Raw and cold first bytes are polled: connect refused -> retry every 1 ms (up to ~1 ms "
        "of the figure); the activator's wake needs no polling (the connection is held).",
        "- Images live under /var/tmp (ext4, page cache), as the activator's state dir would.",
        "- Wake and checkpoint run the kinds of a repetition in a seeded shuffled order. Until "
        "2026-11-30 they rotated, which kept each kind behind the same other one: the activator "
        "always came right after a cold start that had just freed its app's memory, and the raw "
        "CLI after the other activator's checkpoint. With that order the default wake read "
        "0.84-0.95x the CLI at 16 MiB and 1.01-1.08x at 512 MiB; shuffled, both read about 1.0x.",
        "- Work-around in bench/: every app gets its own working directory (see the product "
        "issues below).",
        "",
        "## Product issues found while measuring",
        "",
        "- **Concurrent checkpoints failed now and then** when apps share a working directory, "
        "as all apps of one activator do (they inherit its cwd): CRIU's parasite creates its "
        "temporary /proc mount point in the dumped task's cwd (`Can't create a directory (-17)`, "
        "`can't get /proc fd`). Reproduced with the raw CLI: 5 of 40 concurrent dumps failed "
        "with a shared cwd, 0 of 40 with one cwd per app. The activator now serialises dumps per "
        "working directory (a file lock, `Criu._dump_lock`); the bench still gives each app its "
        "own directory.",
        "- `activator status` gives the app's pid now (the bench uses it); events still carry "
        "wall-clock times rounded to 1 ms. Wanted: a monotonic timestamp in events.",
        "",
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=RESULTS, help="where the JSON results are")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    results = load(args.dir)
    if not results:
        log(f"no results in {args.dir}: run the benches first")
        return 1
    report(results, args.dir, plots=not args.no_plots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
