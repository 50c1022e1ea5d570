"""Diagnostic: where the activator's wake time goes, step by step.

Runs the activator in this process (activator.runtime.local_agent, uvloop) with
a few of its internals wrapped to note the time they are reached (CRIU's restore
call, `criu swrk` started, the restore request sent on its socket and
answered, the forward to the app, the app's first byte). A client thread in
another pod connects to the scaled-down pod and sends a request; every mark is
reported in ms after the client's connect. As `activator run` does by default
(the pod's `criu swrk` started ahead, while it is scaled down: its start marks
are not reached during the wake), then as with `--criu-spares 0` (no spare).

The client shares this process (its thread sleeps in recv while the activator
works). The wrapped names are internals: when the product changes them, the
missing marks are left out, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench.common import (
    APP_PORT,
    KDAT_CACHE,
    Bench,
    BenchError,
    ClientNetns,
    Series,
    base_parser,
    http_get,
    in_own_directory,
    log,
    sample_app,
    summarize,
)
from bench.report import timeline_section

STEPS = (
    ("connection_opened", "the lifecycle hears of the connection"),
    ("restore_call", "CRIU restore called"),
    ("swrk_spawn", "`criu swrk` being started (fork, exec)"),
    ("swrk_ready", "`criu swrk` started (its pid known)"),
    ("rpc_sent", "restore request sent on its socket"),
    ("rpc_done", "restore answered, its socket closed (swrk reaped later)"),
    ("restore_done", "RestoreDone fed to the lifecycle"),
    ("forward_start", "forward to the app begins"),
    ("forward_done", "connected to the app, request passed on"),
    ("first_byte", "the app's first byte reaches the activator"),
    ("client_first_byte", "the client has the first byte"),
)


class Marks:
    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.armed = False

    def mark(self, key: str) -> None:
        if self.armed:
            self.t.setdefault(key, time.monotonic())


def instrument(marks: Marks) -> Callable[[], None]:
    """Wrap the product's internals; return the function that unwraps them."""
    from activator import criu as criu_mod
    from activator import pod as pod_mod
    from activator import proxy

    undo: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name, None)
        if original is None:
            log(f"timeline: {owner.__name__}.{name} is gone: its mark is left out")
            return
        undo.append((owner, name, original))
        setattr(owner, name, make(original))

    def restore(original: Any) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            marks.mark("restore_call")
            return original(self, *args, **kwargs)

        return wrapper

    def swrk(original: Any) -> Any:
        @contextlib.contextmanager
        def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
            marks.mark("swrk_spawn")
            with original(*args, **kwargs) as started:
                marks.mark("swrk_ready")
                yield started

        return wrapper

    def call(original: Any) -> Any:
        # Criu._call_on_loop sends the request, waits for the answer and closes
        # the socket (the swrk then ends by itself; it is reaped at the next start).
        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            marks.mark("rpc_sent")
            result = await original(self, *args, **kwargs)
            marks.mark("rpc_done")
            return result

        return wrapper

    def forward(original: Any) -> Any:
        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            marks.mark("forward_start")
            result = await original(self, *args, **kwargs)
            marks.mark("forward_done")
            return result

        return wrapper

    def data_received(original: Any) -> Any:
        def wrapper(self: Any, data: bytes) -> Any:
            marks.mark("first_byte")
            return original(self, data)

        return wrapper

    def feed(original: Any) -> Any:
        def wrapper(self: Any, event: Any) -> Any:
            name = type(event).__name__
            if name == "ConnectionOpened":
                marks.mark("connection_opened")
            elif name == "RestoreDone":
                marks.mark("restore_done")
            return original(self, event)

        return wrapper

    wrap(criu_mod.Criu, "restore", restore)
    wrap(criu_mod, "_swrk", swrk)  # LocalLauncher.swrk looks it up at each call
    wrap(criu_mod.Criu, "_call_on_loop", call)
    wrap(proxy.ClientConnection, "forward", forward)
    wrap(proxy._Upstream, "data_received", data_received)
    wrap(pod_mod.PodDriver, "feed", feed)

    def unwrap() -> None:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)

    return unwrap


async def cycles(
    b: Bench, client: ClientNetns, marks: Marks, count: int, hold: int, spares: int, into: Series
) -> None:
    from activator.config import PodConfig
    from activator.criu import CriuOptions
    from activator.lifecycle import Phase
    from activator.runtime import local_agent

    tag = "default" if spares else "no-spares"
    root = b.workdir / f"inproc-{tag}"
    agent = local_agent(root / "state", events=None, criu_options=CriuOptions(spares=spares))
    name = b.pod_name(f"tl{tag[0]}")
    command = in_own_directory(root / "cwd", sample_app(hold))
    pod = await agent.add(PodConfig(name=name, ports=(APP_PORT,), command=command))
    try:

        async def phase(wanted: Phase) -> None:
            deadline = time.monotonic() + 60
            while pod.lifecycle.phase is not wanted:
                if time.monotonic() > deadline:
                    raise BenchError(f"pod {name} not {wanted.value} in 60s")
                await asyncio.sleep(0.005)

        address = pod.sandbox.address
        client.fill(64)
        first = threading.Thread(target=http_get, args=(client, address, APP_PORT, "/"))
        first.start()
        while first.is_alive():
            await asyncio.sleep(0.01)
        for i in range(count + 1):  # the first one is a warm-up
            await phase(Phase.RUNNING)
            await asyncio.sleep(0.3)
            pod.scale_down()
            await phase(Phase.SCALED_DOWN)
            await asyncio.sleep(0.3)
            client.fill(64)
            marks.t.clear()
            marks.armed = True
            out: dict[str, Any] = {}

            def get(out: dict[str, Any] = out) -> None:
                out["reply"] = http_get(client, address, APP_PORT, "/")

            thread = threading.Thread(target=get)
            thread.start()
            while thread.is_alive():
                await asyncio.sleep(0.001)
            marks.armed = False
            reply = out.get("reply")
            if reply is None:
                raise BenchError("the timeline client got no answer")
            if i == 0:
                continue
            t0 = reply.start
            row = {key: (marks.t[key] - t0) * 1000 for key, _ in STEPS if key in marks.t}
            row["client_first_byte"] = reply.first_byte_ms
            into.add(**{key: row.get(key) for key, _ in STEPS})
    finally:
        await agent.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=None)
    parser.add_argument("--hold-mib", type=int, default=16)
    parser.add_argument(
        "--no-spareless", action="store_true", help="skip the wakes with --criu-spares 0"
    )
    args = parser.parse_args(argv)
    count = args.cycles or (3 if args.quick else 10)
    import uvloop

    from activator.cli import DEFAULT_CRIU_SPARES

    with Bench("wake_timeline", args) as b:
        client = b.client_netns()
        marks = Marks()
        unwrap = instrument(marks)
        b.defer(unwrap)
        default, no_spares = Series(), Series()
        b.settle("timeline")
        uvloop.run(cycles(b, client, marks, count, args.hold_mib, DEFAULT_CRIU_SPARES, default))
        # local_agent made CRIU's kernel-feature cache if /run is not a tmpfs.
        b.meta["kdat_cache_during"] = KDAT_CACHE.exists()
        if not args.no_spareless:
            b.settle("timeline, --criu-spares 0")
            uvloop.run(cycles(b, client, marks, count, args.hold_mib, 0, no_spares))
        b.check_quiet("timeline (end)")
        summary: dict[str, Any] = {
            "steps": [list(s) for s in STEPS],
            "default": {},
            "no_spares": {},
        }
        for key, _ in STEPS:
            summary["default"][key] = summarize(default[key])
            summary["no_spares"][key] = summarize(no_spares[key])
        b.result(
            {"cycles": count, "hold_mib": args.hold_mib},
            {"default": default.data, "no_spares": no_spares.data},
            summary,
            lambda result, _: timeline_section(result),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
