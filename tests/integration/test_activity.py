"""Issue 3's acceptance against real pods: activity that never cuts a user off,
and probes that never wake the app.

Each test runs `activator run` (servers.PodRun: real CRIU, the pod's own netns,
veth and nftables redirect) with a scale-down duration of 1 s, and talks to
the pod with real clients. A client on the host reaches a local pod from the
node's address (the bridge's, the host side of the pod's link), which is where
kubelet's probes come from and what the activator takes as the probe source
by default; a client in another pod's network namespace is not a probe source.

Synchronisation is on the events file and the activator's status, polled with
deadlines; the deadlines are functional bounds ("scaled down within the
duration plus 10 s"), never measurements.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netns.bridge import DEFAULT_SUBNET, gateway_of
from netns.namespace import NetnsThread
from tests.integration.harness import NEEDS_ROOT, NETNS_DIR, PYTHON, Event, phase_changes
from tests.integration.servers import (
    CLIENT_TIMEOUT,
    FAILURES,
    Launch,
    MariaDB,
    PodRun,
    PythonSample,
    Scratch,
    Server,
    StartPod,
    Unavailable,
)

pytestmark = NEEDS_ROOT

SCALEDOWN = 1.0  # seconds: every pod here scales down after 1 s without activity
# How much later than the scale-down duration a pod must have scaled down: a
# functional bound (a checkpoint takes ~0.1 s here), not a measurement.
SCALEDOWN_BOUND = 10.0
KUBE_PROBE = "kube-probe/1.35"
# The wake of a server-first client may take the restore and at most this
# much more: far above the probe wait (100 ms) and far below a stall.
WAKE_SLACK_MS = 2000.0

# --- clients ------------------------------------------------------------------------------


def node_address() -> str:
    """Where a local pod's probes come from: the bridge's address on the host."""
    return str(gateway_of(DEFAULT_SUBNET).ip)


@dataclass(frozen=True)
class Answer:
    status: int
    by_activator: bool  # answered in the app's place (X-Answered-By: pod-activator)
    source: str  # the client's address, as the pod saw it


def http_probe(address: str, port: int, path: str) -> Answer:
    """An HTTP probe as kubelet sends it, from the host."""
    conn = http.client.HTTPConnection(address, port, timeout=CLIENT_TIMEOUT)
    try:
        headers = {"User-Agent": KUBE_PROBE, "Accept": "*/*", "Connection": "close"}
        conn.request("GET", path, headers=headers)
        assert conn.sock is not None
        source = conn.sock.getsockname()[0]
        response = conn.getresponse()
        response.read()
        by_activator = response.getheader("X-Answered-By") == "pod-activator"
        return Answer(response.status, by_activator, source)
    finally:
        conn.close()


def tcp_probe(address: str, port: int) -> bytes:
    """A TCP probe: connect, send nothing, close. What came back (b"": a plain
    FIN; a reset raises ConnectionResetError)."""
    with socket.create_connection((address, port), timeout=CLIENT_TIMEOUT) as sock:
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(1)


def get(conn: http.client.HTTPConnection, path: str = "/") -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def until(check: Callable[[], bool], what: str, timeout: float = CLIENT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


@contextlib.contextmanager
def client_holding(run: PodRun) -> Iterator[socket.socket]:
    """A real client's connection, open and silent, with the app running: while
    it is open the pod cannot scale down, so probes reach the app."""
    with socket.create_connection((run.address(), run.server.port), CLIENT_TIMEOUT) as sock:

        def held() -> bool:
            status = run.status()
            return bool(status["phase"] == "running" and status["open_connections"] >= 1)

        until(held, f"pod {run.name} runs with the client's connection open")
        yield sock


def assert_no_event(run: PodRun, event: str, after: int, seconds: float) -> None:
    """Nothing of `event` happens within `seconds` (fails as soon as it does)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen = [ev for ev in run.events()[after:] if ev["event"] == event]
        assert not seen, f"{event} happened: {seen}\n{run.log_tail()}"
        time.sleep(0.05)


def wakes(run: PodRun, after: int) -> list[Event]:
    """Restores and cold starts of the pod's app from event index `after`."""
    return [ev for ev in run.events()[after:] if ev["event"] in ("restoring", "starting")]


# --- probes while scaled down ---------------------------------------------------------------


class ScriptApp(Server):
    """A small app written for these tests, run by the venv's Python."""

    def __init__(self, name: str, port: int, script: str) -> None:
        self.name = self.title = name
        self.port = port
        self.script = script

    def check_available(self) -> None:
        if not PYTHON.exists():
            raise Unavailable("no .venv/bin/python: run scripts/setup")

    def launch(self, workdir: Path, scratch: Scratch) -> Launch:
        return Launch([str(PYTHON), "-c", self.script, str(self.port)], workdir)


# GET / is 200, GET /ready is what was last PUT to /ready (200 at first), any
# other path 404. Threads: a client holding a connection open must not block others.
READINESS_APP = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    ready = 200
    def do_GET(self):
        status = {"/": 200, "/ready": Handler.ready}.get(self.path, 404)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def do_PUT(self):
        Handler.ready = int(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
"""


def test_http_and_tcp_probes_never_wake_the_app_and_get_its_last_answer(pod: StartPod) -> None:
    app = ScriptApp("readiness", 8080, READINESS_APP)
    run = pod(app, "--probe-default-status", "503")
    address, port, node = run.address(), app.port, node_address()
    with client_holding(run):
        # While the app runs, probes pass through to it: the activator learns its answers.
        assert http_probe(address, port, "/") == Answer(200, False, node)
        assert http_probe(address, port, "/ready") == Answer(200, False, node)
        # Then the app starts failing its readiness probe.
        conn = http.client.HTTPConnection(address, port, timeout=CLIENT_TIMEOUT)
        try:
            conn.request("PUT", "/ready", body=b"500")
            assert conn.getresponse().status == 204
        finally:
            conn.close()
        assert http_probe(address, port, "/ready") == Answer(500, False, node)
        assert http_probe(address, port, "/healthz") == Answer(404, False, node)
        mark = run.mark()
    run.wait_for("scaled-down", after=mark, timeout=SCALEDOWN + SCALEDOWN_BOUND)

    mark = run.mark()
    paths = ["/", "/ready", "/healthz", "/never-probed"]
    answers = {path: Counter[Answer]() for path in paths}
    for i in range(100):
        path = paths[i % len(paths)]
        answers[path][http_probe(address, port, path)] += 1
    tcp_answers = Counter(tcp_probe(address, port) for _ in range(100))

    assert answers == {
        "/": {Answer(200, True, node): 25},
        "/ready": {Answer(500, True, node): 25},  # the last answer, not the first
        "/healthz": {Answer(404, True, node): 25},
        # Never answered by the app: the configured default.
        "/never-probed": {Answer(503, True, node): 25},
    }
    assert tcp_answers == {b"": 100}, tcp_answers
    assert not wakes(run, mark), wakes(run, mark)
    status = run.status()
    assert status["phase"] == "scaled-down" and status["last_restore_ms"] is None, status
    assert not run.app(), "an app process runs in the pod"

    # Real traffic from the same address wakes it.
    conn = http.client.HTTPConnection(address, port, timeout=CLIENT_TIMEOUT)
    try:
        assert get(conn)[0] == 200
    finally:
        conn.close()
    assert phase_changes(run.events()[mark:])[:2] == ["restoring", "running"]


GRPC_HEALTH_APP = """
import sys
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
servicer = health.HealthServicer()
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
servicer.set("", health_pb2.HealthCheckResponse.SERVING)
servicer.set("readiness", health_pb2.HealthCheckResponse.NOT_SERVING)
server.add_insecure_port("0.0.0.0:" + sys.argv[1])
server.start()
server.wait_for_termination()
"""
SERVING, NOT_SERVING = 1, 2


def grpc_probe(address: str, port: int, service: str) -> int:
    """A health check as kubelet's gRPC prober makes it; the serving status."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    # Kubelet dials a connection per probe: no subchannel shared between probes.
    options = [("grpc.primary_user_agent", KUBE_PROBE), ("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(f"{address}:{port}", options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=20)
        status: int = answer.status
        return status


def test_grpc_health_probes_never_wake_the_app_and_get_its_last_answer(pod: StartPod) -> None:
    # grpcio's health service: the server is serving, its "readiness" is not.
    server = ScriptApp("grpc", 50051, GRPC_HEALTH_APP)
    run = pod(server)
    address = run.address()
    with client_holding(run):
        assert grpc_probe(address, server.port, "") == SERVING
        assert grpc_probe(address, server.port, "readiness") == NOT_SERVING
        mark = run.mark()
    run.wait_for("scaled-down", after=mark, timeout=SCALEDOWN + SCALEDOWN_BOUND)

    mark = run.mark()
    answers = Counter(
        (service, grpc_probe(address, server.port, service))
        for _ in range(20)
        for service in ("", "readiness")
    )
    assert answers == {("", SERVING): 20, ("readiness", NOT_SERVING): 20}, answers
    assert not wakes(run, mark), wakes(run, mark)
    status = run.status()
    assert status["phase"] == "scaled-down" and status["last_restore_ms"] is None, status


@pytest.mark.parametrize("switched_off_by", ["flag", "annotation"])
def test_probe_detection_switched_off_lets_a_probe_wake_the_app(
    pod: StartPod, tmp_path: Path, switched_off_by: str
) -> None:
    sample = PythonSample()
    if switched_off_by == "flag":
        flags: tuple[str, ...] = ("--no-probe-detection",)
    else:
        # A zeropod manifest's annotations, as the Downward API writes them.
        annotations = tmp_path / "annotations"
        annotations.write_text(
            f'zeropod.ctrox.dev/ports-map="app={sample.port}"\n'
            'zeropod.ctrox.dev/disable-probe-detection="true"\n'
        )
        flags = ("--annotations", str(annotations))
    run = pod(sample, *flags)
    run.wait_for("scaled-down", timeout=SCALEDOWN + SCALEDOWN_BOUND)
    mark = run.mark()
    # The app itself answers (404: it has no /healthz), after a restore.
    answer = http_probe(run.address(), sample.port, "/healthz")
    assert answer == Answer(404, False, node_address())
    assert phase_changes(run.events()[mark:])[:2] == ["restoring", "running"]
    assert run.status()["last_restore_ms"] is not None


# --- activity -----------------------------------------------------------------------------------


@dataclass
class LoopResult:
    served: int
    failures: list[str]
    client_ports: set[int]  # the local ports the client's requests went out from
    ended: float  # unix time the last answer came


def request_loop(address: str, port: int, seconds: float, keep_alive: bool) -> LoopResult:
    """GET / back to back for `seconds`, over one keep-alive connection or a new
    connection per request."""
    result = LoopResult(0, [], set(), 0.0)
    headers = {} if keep_alive else {"Connection": "close"}
    conn = http.client.HTTPConnection(address, port, timeout=CLIENT_TIMEOUT)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                conn.request("GET", "/", headers=headers)
                assert conn.sock is not None
                result.client_ports.add(conn.sock.getsockname()[1])
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                result.failures.append(repr(exc))
                conn.close()
                continue
            if response.status == 200 and body.startswith(b"hello"):
                result.served += 1
            else:
                result.failures.append(f"{response.status} {body[:80]!r}")
            if not keep_alive:
                conn.close()
        result.ended = time.time()
    finally:
        conn.close()
    return result


@pytest.mark.parametrize(
    ("keep_alive", "flags"),
    [
        (False, ()),
        (True, ()),
        # A connection that carries requests is never quiet, however long it lives.
        (True, ("--close-idle-after", f"{SCALEDOWN:g}s")),
    ],
    ids=["new-connections", "keep-alive", "keep-alive-closing-quiet-ones"],
)
def test_a_request_loop_is_never_cut_and_the_pod_scales_down_after_it(
    pod: StartPod, keep_alive: bool, flags: tuple[str, ...]
) -> None:
    sample = PythonSample()
    run = pod(sample, *flags)
    address = run.address()
    conn = http.client.HTTPConnection(address, sample.port, timeout=CLIENT_TIMEOUT)
    try:
        assert get(conn)[0] == 200  # running from here (a wake, if it scaled down already)
    finally:
        conn.close()
    mark = run.mark()
    loop = request_loop(address, sample.port, 3 * SCALEDOWN, keep_alive)
    assert not loop.failures, f"{len(loop.failures)} of {loop.served} failed: {loop.failures[:5]}"
    assert loop.served > 0
    if keep_alive:  # http.client would reconnect silently: one port means one connection
        assert len(loop.client_ports) == 1, f"the connection was replaced: {loop.client_ports}"

    scaled = run.wait_for("scaled-down", after=mark, timeout=SCALEDOWN + SCALEDOWN_BOUND)
    after = run.events()[mark:]
    assert phase_changes(after)[:2] == ["checkpointing", "scaled-down"], after
    checkpointing = next(ev for ev in after if ev["event"] == "checkpointing")
    # The checkpoint began only after the loop stopped (event times are rounded to ms).
    assert checkpointing["time"] >= round(loop.ended, 3), (checkpointing, loop.ended)
    assert scaled["time"] <= loop.ended + SCALEDOWN + SCALEDOWN_BOUND
    assert not [ev for ev in after if ev["event"] in FAILURES], after


def test_an_idle_keep_alive_connection_blocks_scale_down_by_default(pod: StartPod) -> None:
    sample = PythonSample()
    run = pod(sample)
    conn = http.client.HTTPConnection(run.address(), sample.port, timeout=CLIENT_TIMEOUT)
    try:
        assert get(conn)[0] == 200
        assert conn.sock is not None
        client_port = conn.sock.getsockname()[1]
        mark = run.mark()
        assert_no_event(run, "checkpointing", after=mark, seconds=3 * SCALEDOWN)
        status = run.status()
        assert status["phase"] == "running" and status["open_connections"] == 1, status
        assert get(conn)[0] == 200  # still served, on the same connection
        assert conn.sock is not None and conn.sock.getsockname()[1] == client_port
    finally:
        conn.close()
    run.wait_for("scaled-down", after=mark, timeout=SCALEDOWN + SCALEDOWN_BOUND)


def test_quiet_connections_are_closed_gracefully_and_never_mid_request(pod: StartPod) -> None:
    sample = PythonSample()
    quiet = SCALEDOWN
    run = pod(sample, "--close-idle-after", f"{quiet:g}s")
    conn = http.client.HTTPConnection(run.address(), sample.port, timeout=CLIENT_TIMEOUT)
    try:
        mark = run.mark()
        # The answer takes three times the quiet time: a request in flight is not cut.
        slow_ms = int(3 * quiet * 1000)
        assert get(conn, f"/slow/{slow_ms}") == (200, b"slow answer\n")
        sock = conn.sock
        assert sock is not None, "the connection was closed with the answer"
        sock.settimeout(quiet + SCALEDOWN_BOUND)
        # Then, quiet: the activator closes it with a FIN (a reset would raise here).
        assert sock.recv(1) == b""
    finally:
        conn.close()
    run.wait_for("scaled-down", after=mark, timeout=SCALEDOWN + SCALEDOWN_BOUND)
    assert f"idle {quiet:.0f}s" in run.log_tail(200), run.log_tail()


# --- a server-first client ------------------------------------------------------------------


def mysql_greeting(sock: socket.socket) -> bytes:
    """The server's handshake packet (MySQL's protocol: the server speaks first)."""
    data = b""
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:3], "little"):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    payload = data[4 : 4 + int.from_bytes(data[:3], "little")]
    assert data[3] == 0 and payload[0] == 10, f"not a protocol-10 handshake: {data[:64]!r}"
    return payload


@dataclass(frozen=True)
class Greeted:
    server_version: bytes
    source: str  # the client's address
    ms: float  # connect to greeting, on the client


def greet(connect: Callable[[], socket.socket]) -> Greeted:
    started = time.perf_counter()
    with connect() as sock:
        payload = mysql_greeting(sock)
        ms = (time.perf_counter() - started) * 1000
        return Greeted(payload[1:].split(b"\0", 1)[0], sock.getsockname()[0], ms)


def wake_report(run: PodRun, after: int) -> tuple[float, float]:
    """(restore_ms, first_byte_ms) of the wake from event index `after`."""
    running = run.wait_for("running", after=after)
    first_byte = run.wait_for("first-byte", after=after)
    assert phase_changes(run.events()[after:])[:2] == ["restoring", "running"]
    restore_ms: Any = running.get("restore_ms")
    assert restore_ms is not None, f"a cold start, not a restore: {running}"
    return float(restore_ms), float(first_byte["first_byte_ms"])


def test_a_server_first_client_wakes_mariadb_from_the_node_and_from_another_pod(
    pod: StartPod,
) -> None:
    mariadb = MariaDB()
    port = mariadb.port
    node_pod = pod(mariadb)
    # A client sniffed here would wait 20 s for its greeting; the client from
    # the other pod gives up after 10 s.
    probe_wait = 20.0
    other_pod = pod(mariadb, "--probe-wait", f"{probe_wait:g}s")
    other_netns = NetnsThread(NETNS_DIR / f"pa-{node_pod.name}")
    try:

        def from_node(run: PodRun) -> socket.socket:
            return socket.create_connection((run.address(), port), CLIENT_TIMEOUT)

        def from_the_other_pod() -> socket.socket:
            address = (other_pod.address(), port)
            return other_netns.call(socket.create_connection, address, probe_wait / 2)

        # Both serve (their first start), then scale down.
        mark = node_pod.mark(), other_pod.mark()
        assert b"MariaDB" in greet(lambda: from_node(node_pod)).server_version
        assert b"MariaDB" in greet(from_the_other_pod).server_version
        for run, index in zip((node_pod, other_pod), mark, strict=True):
            run.wait_for("scaled-down", after=index, timeout=SCALEDOWN + SCALEDOWN_BOUND)

        # From the node's address: sniffed for the probe wait (100 ms), then a wake.
        mark_node = node_pod.mark()
        greeted = greet(lambda: from_node(node_pod))
        assert b"MariaDB" in greeted.server_version and greeted.source == node_address()
        restore_ms, first_byte_ms = wake_report(node_pod, mark_node)
        assert first_byte_ms >= 95, "the node's client was not sniffed for the probe wait"
        assert greeted.ms - restore_ms < WAKE_SLACK_MS, (greeted, restore_ms)

        # From another pod: not a probe source, not sniffed, woken at once.
        mark_other = other_pod.mark()
        greeted = greet(from_the_other_pod)
        assert b"MariaDB" in greeted.server_version
        assert greeted.source == node_pod.address()
        restore_ms, first_byte_ms = wake_report(other_pod, mark_other)
        assert first_byte_ms - restore_ms < WAKE_SLACK_MS, (first_byte_ms, restore_ms)
        assert greeted.ms - restore_ms < WAKE_SLACK_MS, (greeted, restore_ms)
        for run, index in ((node_pod, mark_node), (other_pod, mark_other)):
            assert not [ev for ev in run.events()[index:] if ev["event"] in FAILURES]
    finally:
        other_netns.close()
