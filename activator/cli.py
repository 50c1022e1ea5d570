"""`activator`: the command line. Flags are parsed and checked here, at the edge."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from activator import annotations as pod_annotations
from activator.config import ConfigError, FieldError, parse_duration, pod_config
from activator.control import AGENTS_DIR, ControlError, agent_sockets, ask, find_pod
from activator.criu import CriuError, CriuOptions
from netns.errors import NetnsError

DEFAULT_STATE_ROOT = Path("/var/lib/pod-activator/pods")
DEFAULT_CRIU_SPARES = 8


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _pod_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="pod name (default: pod-<random>)")
    parser.add_argument(
        "--port", action="append", default=[], help="the app's TCP port (repeatable)"
    )
    parser.add_argument(
        "--scaledown-after",
        metavar="DURATION",
        help="idle time before scale-down, e.g. 30s, 5m (default 1m)",
    )
    parser.add_argument(
        "--close-idle-after",
        metavar="DURATION",
        help="close client connections that carried nothing for this long (default: never)",
    )
    parser.add_argument(
        "--no-probe-detection",
        dest="probe_detection",
        action="store_const",
        const=False,
        help="treat every connection as real traffic (no probe answering)",
    )
    parser.add_argument(
        "--probe-source",
        metavar="CIDR",
        action="append",
        default=[],
        help="where kubelet probes come from (repeatable; default: the node's address)",
    )
    parser.add_argument(
        "--probe-wait",
        metavar="DURATION",
        help="how long a silent connection from a probe source is sniffed (default 100ms)",
    )
    parser.add_argument(
        "--image-key",
        metavar="FILE",
        help="seal images at rest with this 32-byte key (AES-256-GCM); plaintext stays in memory",
    )
    parser.add_argument(
        "--lazy-restore",
        action="store_true",
        help="wake before the memory is back: pages come on first touch (userfaultfd)",
    )
    parser.add_argument(
        "--fast-path",
        action="store_true",
        default=None,
        help="while the app runs, new connections go to it directly (probes excepted); "
        "the activator only counts them (an nft counter; the pod's TCP table when idle)",
    )
    parser.add_argument(
        "--annotations",
        metavar="FILE",
        type=Path,
        help="pod annotations (zeropod's keys and ours) in Downward API format; flags win",
    )
    parser.add_argument(
        "--probe-default-status",
        metavar="CODE",
        help="HTTP status for probes before the app answered one (default 200)",
    )


def _pod_settings(args: argparse.Namespace, command: list[str]) -> dict[str, Any]:
    """The pod flags as given: `pod_config(**settings)` checks them (here and in
    the agent that receives them through `activator add`). With --annotations,
    the pod's annotations fill in what no flag gives."""
    settings: dict[str, Any] = {
        "name": args.name or f"pod-{secrets.token_hex(3)}",
        "ports": args.port,
        "command": command,
        "scaledown_after": args.scaledown_after,
        "close_idle_after": args.close_idle_after,
        "probe_detection": args.probe_detection,
        "probe_sources": args.probe_source,
        "probe_wait": args.probe_wait,
        "probe_default_status": args.probe_default_status,
        "image_key": args.image_key,
        "lazy_restore": args.lazy_restore,
        "fast_path": args.fast_path,
    }
    if args.annotations is not None:
        for key, value in _annotation_settings(args.annotations).items():
            if settings[key] in (None, []):
                settings[key] = value
    if settings["probe_detection"] is None:
        settings["probe_detection"] = True
    if settings["fast_path"] is None:
        settings["fast_path"] = False
    return settings


def _annotation_settings(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            [
                FieldError(
                    "--annotations", f"cannot read {path}: {exc.strerror}", "give a readable file"
                )
            ]
        ) from exc
    pod = pod_annotations.parse(pod_annotations.read_downward_api(text))
    return {
        "ports": [str(port) for ports in pod.ports.values() for port in ports],
        "scaledown_after": f"{pod.scaledown_after}s",
        "close_idle_after": None if pod.close_idle_after is None else f"{pod.close_idle_after}s",
        "probe_detection": pod.probe_detection,
        "probe_sources": [str(net) for net in pod.probe_sources],
        "probe_default_status": str(pod.probe_default_status),
        "fast_path": pod.fast_path,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="activator", description="Scale idle pods to zero; wake them on the next connection."
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: info (warning for demo, whose timeline is its output)",
    )
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    run = sub.add_parser(
        "run", help="run a local pod under an activator: run [flags] -- CMD [ARG ...]"
    )
    _pod_flags(run)

    sidecar = sub.add_parser(
        "sidecar", help="run as the Kubernetes sidecar of the pod we are in (see README)"
    )
    sidecar.add_argument(
        "--podinfo",
        type=Path,
        default=Path("/etc/pod-activator/podinfo"),
        help="the Downward API volume holding the pod's `annotations`",
    )
    sidecar.add_argument(
        "--shared",
        type=Path,
        default=Path("/pod-activator"),
        help="the volume shared with the app containers (holder, its socket, images)",
    )
    for cmd in (run, sidecar):
        cmd.add_argument(
            "--events", metavar="FILE", help="write one JSON line per event to FILE (- for stdout)"
        )
    run.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_ROOT, help="where checkpoints are kept"
    )
    run.add_argument(
        "--criu-timeout",
        metavar="DURATION",
        default="2m",
        help="end a checkpoint or restore that takes longer (default 2m)",
    )
    run.add_argument(
        "--criu-spares",
        metavar="N",
        type=_spare_count,
        default=DEFAULT_CRIU_SPARES,
        help="how many pods keep a CRIU started ahead of their next checkpoint or "
        "restore, taking its start-up (a few ms) off the wake's path; each costs "
        f"about 1 MiB; the pods that cycled last keep theirs (default {DEFAULT_CRIU_SPARES}; "
        "0: none)",
    )

    add = sub.add_parser(
        "add", help="add a pod to the running activator: add [flags] -- CMD [ARG ...]"
    )
    _pod_flags(add)

    status = sub.add_parser("status", help="list the pods managed on this machine")
    status.add_argument("--json", action="store_true")

    for name, text in (
        ("scale-down", "checkpoint a pod now"),
        ("wake", "restore a pod now"),
        ("remove", "stop and remove a pod"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("pod")

    demo = sub.add_parser(
        "demo", help="the sample app in a local pod: scale down, wake, print the timeline"
    )
    demo.add_argument("--cycles", type=int, default=3)
    demo.add_argument("--scaledown-after", default="2s")

    from activator import manifests, webhook  # their heavy imports load only when run

    manifests.add_parser(sub)
    webhook.add_parsers(sub)
    return parser


def _split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    flags, command = _split_command(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(flags)
        settings = _pod_settings(args, command) if args.cmd in ("run", "add") else {}
        config = pod_config(**settings) if settings else None
        demo_idle = 0.0
        if args.cmd == "demo":
            demo_idle = _duration(args.scaledown_after, "--scaledown-after")
        criu_timeout = _duration(args.criu_timeout, "--criu-timeout") if args.cmd == "run" else 0
        if args.cmd not in ("run", "add") and command:
            raise UsageError(f"{args.cmd} takes no command after --")
    except (UsageError, ConfigError) as exc:
        print(f"activator: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=(args.log_level or ("warning" if args.cmd == "demo" else "info")).upper(),
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.cmd == "run":
            assert config is not None
            from activator.runtime import serve

            options = CriuOptions(timeout=criu_timeout, spares=args.criu_spares)
            return _serve(args, lambda events: serve([config], args.state_dir, events, options))
        if args.cmd == "sidecar":
            from activator import sidecar

            return _serve(args, lambda events: sidecar.serve(args.podinfo, args.shared, events))
        if args.cmd == "add":
            assert config is not None
            return _add(settings)
        if args.cmd == "status":
            return _status(args.json)
        if args.cmd == "demo":
            from activator.demo import run_demo

            return run_demo(cycles=args.cycles, scaledown_after=demo_idle)
        if args.cmd in ("inject", "webhook", "webhook-cert"):
            return int(args.run(args))
        answer = ask(find_pod(args.pod), {"op": args.cmd, "pod": args.pod})
        if "pod" in answer:
            print(f"{args.pod}: {answer['pod']['phase']}")
        return 0
    except (ControlError, CriuError, NetnsError) as exc:
        print(f"activator: {exc}", file=sys.stderr)
        return 1


def _spare_count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a count: give a whole number, e.g. 8 (0: none)"
        )
    return int(text)


def _duration(text: str, flag: str) -> float:
    parsed = parse_duration(text, flag)
    if isinstance(parsed, FieldError):
        raise ConfigError([parsed])
    return parsed


def _serve(args: argparse.Namespace, serve: Callable[[TextIO | None], Any]) -> int:
    if os.geteuid() != 0:
        print(
            f"activator: error: {args.cmd} needs root (network namespaces, nftables, CRIU)",
            file=sys.stderr,
        )
        return 1
    events: TextIO | None = None
    if args.events == "-":
        events = sys.stdout
    elif args.events:
        events = open(args.events, "a", buffering=1)  # noqa: SIM115 - lives as long as the run
    try:
        return asyncio_run(serve(events))
    finally:
        if events is not None and events is not sys.stdout:
            events.close()


def asyncio_run(coro: Any) -> int:
    import uvloop

    result: int = uvloop.run(coro)
    return result


def _add(settings: dict[str, Any]) -> int:
    sockets = list(agent_sockets())
    if len(sockets) != 1:
        where = "none is" if not sockets else f"{len(sockets)} are"
        print(
            f"activator: error: add needs exactly one running activator, {where} running"
            f" (see {AGENTS_DIR})",
            file=sys.stderr,
        )
        return 1
    pod = ask(sockets[0], {"op": "add", "settings": settings})["pod"]
    print(f"{pod['name']}: {pod['phase']} at {pod['address']}")
    return 0


def _status(as_json: bool) -> int:
    pods: list[dict[str, Any]] = []
    for path in agent_sockets():
        try:
            pods.extend(ask(path, {"op": "status"}, timeout=5)["pods"])
        except ControlError as exc:
            print(f"activator: {exc}", file=sys.stderr)
    if as_json:
        print(json.dumps(pods, indent=2))
        return 0
    rows = [
        ("NAME", "ADDRESS", "PORTS", "PHASE", "SINCE", "CONNS", "CKPT_MS", "RESTORE_MS", "IMAGE")
    ]
    for p in pods:
        rows.append(
            (
                p["name"],
                p["address"],
                ",".join(map(str, p["ports"])),
                p["phase"] + (" (fast path)" if p.get("fast_path") == "open" else ""),
                f"{time.time() - p['since']:.0f}s ago",
                str(p["open_connections"] + p["held_connections"]),
                _num(p["last_checkpoint_ms"]),
                _num(p["last_restore_ms"]),
                _bytes(p["image_bytes"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1048576:.1f}MiB"
