"""The WordPress + MariaDB cascade, timed: one GET of a post, with pods cold or warm.

The stack of tests/integration/wordpress.py (the one test_wordpress.py uses):
MariaDB in one local pod, WordPress (Debian's, on nginx + php-fpm, as root) in
another, each under its own `activator run`, WordPress's DB_HOST the database
pod's address; install and a post made by script. Then ROUNDS times, in this
order, one GET of the post's page from the node (connect to the last byte;
the page must hold the post's title):

- cold: both pods scaled down: the request restores web, whose database
  connection restores MariaDB (the cascade);
- half-cold: only web scaled down;
- db-cold: only MariaDB scaled down (web's PHP connects per request);
- warm: both running.

Pods scale down when asked (`activator scale-down`, waiting for the
`scaled-down` event), not on an idle timer, so every round measures the same
thing. They run with --no-probe-detection: the client is on the node, whose
connections are otherwise sniffed for kubelet probes (bench/servers.py does the
same). Beside each figure: what zeropod's users measured on a small VM, from
the article issue 5 cites (first request to a scaled-down WordPress about
0.45 s, 0.09 s warm, about 1 s for the WordPress + MySQL cascade).

Run as root, after scripts/setup-test-servers:
    .venv/bin/python -m bench.wordpress [--rounds N] [--quick] [--out DIR]
Prints the table; writes DIR/wordpress.md, wordpress.json and wordpress.png
(DIR: bench/results, or bench/results/quick with --quick).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repo's packages come from its root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Bench,
    BenchError,
    base_parser,
    fmt,
    log,
    out_dir,
    print_table,
    save_plot,
    summarize,
)
from tests.integration.servers import Scratch, Task, Unavailable
from tests.integration.wordpress import Stack, check_available, scale_down, versions


@dataclass(frozen=True)
class Case:
    name: str
    down: tuple[str, ...]  # the pods ("web", "db") scaled down before the GET
    article_s: float | None  # what zeropod's users measured, if they did
    article: str

    @property
    def down_text(self) -> str:
        return " + ".join(self.down) or "nothing"


CASES = (
    Case("cold", ("web", "db"), 1.0, "~1 s, +0.91 s over warm (WordPress + MySQL cascade)"),
    Case(
        "half-cold", ("web",), 0.45, "~0.45 s, +0.36 s (first request to a scaled-down WordPress)"
    ),
    Case("db-cold", ("db",), None, "-"),
    Case("warm", (), 0.09, "0.09 s"),
)


def _restore_ms(stack: Stack, marks: dict[str, int]) -> dict[str, float | None]:
    """restore_ms of each pod's 'running' since its mark (None: it was not restored)."""
    found: dict[str, float | None] = {}
    for role, run in (("web", stack.web), ("db", stack.db)):
        assert run is not None
        running = [e for e in run.events()[marks[role] :] if e["event"] == "running"]
        found[role] = float(running[0]["restore_ms"]) if running else None
        if running and running[0].get("restore_ms") is None:
            raise BenchError(f"{role} pod started cold: {running[0]['message']}")
    return found


def one(stack: Stack, case: Case) -> dict[str, Any]:
    """Scale down what `case` says, then one GET; its timings and the pods' checkpoints."""
    assert stack.web is not None and stack.db is not None
    sample: dict[str, Any] = {}
    for role in case.down:
        event = scale_down(stack.web if role == "web" else stack.db)
        sample[f"{role}_checkpoint_ms"] = event.get("checkpoint_ms")
        sample[f"{role}_image_bytes"] = event.get("image_bytes")
    marks = {"web": stack.web.mark(), "db": stack.db.mark()}
    _, seconds = stack.get_post()  # checks HTTP 200 and the post's title
    sample["total_ms"] = seconds * 1000
    restored = _restore_ms(stack, marks)
    for role, ms in restored.items():
        if (ms is not None) != (role in case.down):
            raise BenchError(f"{case.name}: {role} restored: {ms is not None}, down: {case.down}")
        sample[f"{role}_restore_ms"] = ms
    return sample


def _footprint(tasks: dict[int, Task]) -> str:
    rss = sum(t.rss for t in tasks.values()) / 1048576
    threads = sum(len(t.threads) for t in tasks.values())
    return f"processes {len(tasks)} (threads {threads}), RSS {rss:.0f} MiB"


def table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "case",
        "scaled down before the GET",
        "GET ms",
        "over warm ms",
        "web restore ms",
        "db restore ms",
        "zeropod's users (small VM)",
    ]
    rows = []
    warm = summary["warm"]["total_ms"].get("median")
    for case in CASES:
        s = summary[case.name]
        median = s["total_ms"].get("median")
        added = "-" if median is None or warm is None else f"+{median - warm:.0f}"
        rows.append(
            [
                case.name,
                case.down_text,
                fmt(s["total_ms"], digits=0),
                added,
                fmt(s["web_restore_ms"], digits=0),
                fmt(s["db_restore_ms"], digits=0),
                case.article,
            ]
        )
    return headers, rows


def markdown(
    headers: list[str], rows: list[list[str]], meta: dict[str, Any], config: dict[str, Any]
) -> str:
    v = config["versions"]
    lines = [
        "# WordPress + MariaDB: the cascade wake",
        "",
        f"`bench/wordpress.py`, {meta['date']} at `{meta['commit']}`: kernel {meta['kernel']},"
        f" Debian {meta['debian']}, {meta['cpus']} CPUs, CRIU {meta['criu']}. WordPress"
        f" {v['wordpress']} (Debian) on nginx {v['nginx']} + php-fpm {v['php']}, as root, in"
        f" one local pod; MariaDB {v['mariadb']} in another; each under its own `activator"
        f" run`. {config['rounds']} rounds; in each, the cases in this order. GET = connect()"
        " to the last byte of the post's page (about"
        f" {config['page_bytes'] / 1024:.0f} KiB, HTTP 200, title checked) from a client on"
        " the node; over warm = its median minus warm's; restore ms = the activators' `running`"
        " events; median [p10-p90]. Pods"
        " scaled down by `activator scale-down` (waiting for `scaled-down`); images on disk"
        " (page cache).",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---", "---", "---:", "---:", "---:", "---:", "---"]) + "|",
        *["| " + " | ".join(row) + " |" for row in rows],
        "",
        f"- Web pod: {config['web_footprint']}; checkpoint {config['web_checkpoint']}.",
        f"- Database pod: {config['db_footprint']}; checkpoint {config['db_checkpoint']}.",
        "- zeropod's figures are from its users' report cited in issue 5 (Apache/mod_php and"
        " MySQL on a small VM), not measured here.",
    ]
    if meta.get("foreign_at_start") or meta.get("foreign_during"):
        lines.append(
            "- Other tests/activators ran on this machine during parts of the run"
            f" (at start: {len(meta.get('foreign_at_start') or [])} processes; during:"
            f" {', '.join(sorted(meta.get('foreign_during', {})))}): those rounds are noisier."
        )
    if config.get("plot"):
        lines += ["", f"![WordPress cascade]({config['plot']})"]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], out: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    from bench.report import _bars

    article = [
        {"n": 1, "median": c.article_s * 1000, "p10": c.article_s * 1000, "p90": c.article_s * 1000}
        if c.article_s
        else {"n": 0}
        for c in CASES
    ]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _bars(
        ax,
        [f"{c.name}\n({c.down_text} down)" for c in CASES],
        [
            ("pod-activator (median, bars p10-p90)", [summary[c.name]["total_ms"] for c in CASES],
             "#1f77b4"),
            ("zeropod's users, small VM (article)", article, "#bbbbbb"),
        ],
    )  # fmt: skip
    ax.set_ylabel("GET of the post's page, ms")
    ax.set_title("WordPress + MariaDB in two pods: one request, pods cold or warm")
    ax.legend(fontsize=8)
    return save_plot(fig, out, "wordpress.png")


def _median_of(samples: list[dict[str, Any]], key: str, scale: float = 1.0, unit: str = "") -> str:
    s = summarize(x[key] * scale for x in samples if x.get(key) is not None)
    return "-" if not s.get("n") else f"{s['median']:.0f}{unit}"


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (2 with --quick)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    try:
        check_available()
    except Unavailable as exc:
        log(f"bench/wordpress.py: {exc}: run scripts/setup-test-servers")
        return 1
    with Bench("wordpress", args) as bench:
        scratch = Scratch()
        bench.defer(scratch.close)
        stack = Stack(bench.workdir / "stack", scratch, extra_flags=("--no-probe-detection",))

        def teardown() -> None:
            problems = stack.teardown()
            if problems:
                log(f"left behind (now removed): {'; '.join(problems)}")

        bench.defer(teardown)
        log("starting MariaDB and WordPress pods, installing the site")
        stack.start()
        assert stack.web is not None and stack.db is not None
        page, _ = stack.get_post()  # the first page after install fills PHP's opcache
        config: dict[str, Any] = {
            "rounds": rounds,
            "versions": versions(),
            "page_bytes": len(page.encode()),
            "web_footprint": _footprint(stack.web.app()),
            "db_footprint": _footprint(stack.db.app()),
        }
        samples: dict[str, list[dict[str, Any]]] = {case.name: [] for case in CASES}
        for n in range(1, rounds + 1):
            bench.settle(f"round {n}")
            for case in CASES:
                sample = one(stack, case)
                samples[case.name].append(sample)
                log(f"round {n} {case.name}: {sample['total_ms']:.0f} ms")
        bench.check_quiet("end")
        summary = {
            name: {
                key: summarize(s.get(key) for s in samples[name])
                for key in ("total_ms", "web_restore_ms", "db_restore_ms")
            }
            for name in samples
        }
        checkpoints = samples["cold"]
        for role in ("web", "db"):
            config[f"{role}_checkpoint"] = (
                _median_of(checkpoints, f"{role}_checkpoint_ms", unit=" ms")
                + ", image "
                + _median_of(checkpoints, f"{role}_image_bytes", 1 / 1048576, " MiB")
                + " (medians)"
            )
        headers, rows = table(summary)
        print_table("WordPress + MariaDB: one GET of a post", headers, rows)
        out = out_dir(args)
        out.mkdir(parents=True, exist_ok=True)
        config["plot"] = plot(summary, out)
        bench.result(config, samples, summary)
        path = out / "wordpress.md"
        path.write_text(markdown(headers, rows, bench.meta, config))
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
