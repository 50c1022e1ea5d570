"""Lazy restore: wake latency by app size, with and without --lazy-restore.

One activator manages, for each size (the sample app holding 16, 128 and
512 MiB), one pod restored in full and one with --lazy-restore (CRIU's lazy
pages over userfaultfd: the restore returns before the memory is copied and
pages are served on first touch). Each repetition wakes every pod with
GET /state from a client pod (connect -> first byte at the client; the
answer must carry the app's boot id: its state) and lets it scale down by its
idle timer. Target (issue 4): the lazy wake at 512 MiB within 2x the lazy
wake at 16 MiB; the full restore at 16 MiB is the baseline of the same run.

Run as root:
    .venv/bin/python -m bench.lazy [--sizes 16 128 512] [--reps N] [--quick]
Prints the table; writes DIR/lazy.md, lazy.json and lazy.png
(DIR: bench/results, or bench/results/quick with --quick).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repo's packages come from its root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    APP_PORT,
    Bench,
    BenchError,
    PodSpec,
    base_parser,
    fmt,
    http_get,
    log,
    out_dir,
    print_table,
    sample_app,
    save_plot,
    summarize,
)
from bench.report import table
from bench.wake_checkpoint import act_cycle, boot_id

SIZES = (16, 128, 512)
KINDS = ("full", "lazy")


def plot(summary: dict[str, Any], sizes: tuple[int, ...], out: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    from bench.report import _bars

    fig, ax = plt.subplots(figsize=(7, 4))
    _bars(
        ax,
        [f"{s} MiB" for s in sizes],
        [
            ("full restore", [summary[f"full-{s}"]["wake_ms"] for s in sizes], "#bbbbbb"),
            ("--lazy-restore", [summary[f"lazy-{s}"]["wake_ms"] for s in sizes], "#1f77b4"),
        ],
    )
    ax.set_ylabel("wake: connect -> first byte, ms (median, bars p10-p90)")
    ax.set_title("Lazy restore: wake latency by app size")
    ax.legend(fontsize=8)
    return save_plot(fig, out, "lazy.png")


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="MiB the app holds")
    parser.add_argument("--reps", type=int, default=None, help="default 10 (3 with --quick)")
    parser.add_argument("--idle", type=float, default=0.5, help="scale-down after (seconds)")
    args = parser.parse_args(argv)
    sizes = tuple(args.sizes or SIZES)
    reps = args.reps or (3 if args.quick else 10)
    with Bench("lazy", args) as b:
        client = b.client_netns()
        specs = {
            f"{kind}-{s}": PodSpec(
                b.pod_name(f"{kind}{s}"),
                sample_app(s),
                scaledown_after=f"{int(args.idle * 1000)}ms",
                lazy_restore=kind == "lazy",
            )
            for s in sizes
            for kind in KINDS
        }
        keys = list(specs)
        act = b.activator(specs[keys[0]])
        for key in keys[1:]:
            act.add(specs[key])
        boots, addresses = {}, {}
        for key, spec in specs.items():
            since = act.events.mark()
            addresses[key] = act.pod(spec.name)["address"]
            client.fill()
            boots[key] = boot_id(http_get(client, addresses[key], APP_PORT, "/state").body)
            act.events.wait(since, spec.name, "scaled-down", timeout=120)
        samples: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
        for rep in range(reps):
            b.settle(f"rep {rep + 1}")
            # Shuffled (seeded): a rotation keeps each pod behind the same other one.
            order = random.Random(rep).sample(keys, len(keys))
            for key in order:
                cycle = act_cycle(
                    act, client, specs[key].name, addresses[key], boots[key], args.idle
                )
                if not cycle["restored"]:
                    raise BenchError(f"{key}: the wake lost the app's state")
                samples[key].append(cycle)
            log(
                f"rep {rep + 1}/{reps}: "
                + ", ".join(f"{k} {samples[k][-1]['wake_ms']:.0f}" for k in keys)
            )
        b.check_quiet("end")
        summary = {
            key: {
                name: summarize(c.get(name) for c in samples[key])
                for name in ("wake_ms", "restore_ms")
            }
            for key in keys
        }
        base = summary[f"full-{sizes[0]}"]["wake_ms"]["median"]
        lazy_small = summary[f"lazy-{sizes[0]}"]["wake_ms"]["median"]
        headers = [
            "MiB",
            "full wake ms",
            "lazy wake ms",
            "lazy restore ms",
            f"lazy / full {sizes[0]}",
            f"lazy / lazy {sizes[0]}",
        ]
        rows = [
            [
                str(s),
                fmt(summary[f"full-{s}"]["wake_ms"]),
                fmt(summary[f"lazy-{s}"]["wake_ms"]),
                fmt(summary[f"lazy-{s}"]["restore_ms"]),
                f"{summary[f'lazy-{s}']['wake_ms']['median'] / base:.2f}x",
                f"{summary[f'lazy-{s}']['wake_ms']['median'] / lazy_small:.2f}x",
            ]
            for s in sizes
        ]
        print_table("Wake (connect -> first byte), median [p10-p90]", headers, rows)
        out = out_dir(args)
        out.mkdir(parents=True, exist_ok=True)
        config = {"sizes": list(sizes), "reps": reps, "plot": plot(summary, sizes, out)}
        b.result(config, samples, summary)
        largest = sizes[-1]
        verdict = summary[f"lazy-{largest}"]["wake_ms"]["median"] / lazy_small
        text = (
            "# Lazy restore: wake latency by app size\n\n"
            + __doc__.split("\n\n")[1]
            + f"\n\n{reps} repetitions; medians [p10-p90].\n\n{table(headers, rows)}\n\n"
            + f"Lazy wake at {largest} MiB: {verdict:.2f}x the lazy wake at {sizes[0]} MiB "
            + f"(target <= 2x): {'met' if verdict <= 2 else 'missed'}.\n"
            + (f"\n![lazy]({config['plot']})\n" if config["plot"] else "")
        )
        (out / "lazy.md").write_text(text)
        log(f"wrote {out / 'lazy.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
