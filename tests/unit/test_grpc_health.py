"""gRPC health probes on bytes, checked against real grpcio clients and servers.

The peers are grpcio's (test-only dependency) on loopback. A grpcio client, as
kubelet's grpc-go one, sends its request only once the server's SETTINGS came:
the sniffer here does what the activator must, writes SERVER_PREFACE as soon as
the client preface is in, then reads until `classify_grpc` decides.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hpack import Encoder
from hypothesis import given
from hypothesis import strategies as st

from activator.grpc_health import (
    CLIENT_PREFACE,
    NOT_A_PROBE,
    NOT_SERVING,
    SERVER_PREFACE,
    SERVICE_UNKNOWN,
    SERVING,
    UNKNOWN,
    GrpcVerdict,
    answer_grpc,
    classify_grpc,
    drop_settings_ack,
    grpc_serving_status,
)

KUBE_PROBE = "kube-probe/1.35"
TIMEOUT = 5.0


# -- Real peers on loopback ------------------------------------------------------------------


class OneShot:
    """Accepts one connection on 127.0.0.1 and runs `handler` on it in a thread."""

    def __init__(self, handler: Callable[[socket.socket], Any]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(handler,), daemon=True)
        self.thread.start()

    def _run(self, handler: Callable[[socket.socket], Any]) -> None:
        try:
            self.listener.settimeout(TIMEOUT)
            conn, _ = self.listener.accept()
            self.listener.close()  # a client that reconnects is refused, not left hanging
            with conn:
                conn.settimeout(TIMEOUT)
                self.result = handler(conn)
        except BaseException as exc:
            self.error = exc
        finally:
            self.listener.close()

    def join(self) -> Any:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.result


def sniff(conn: socket.socket) -> tuple[bytes, GrpcVerdict]:
    """What the activator does while sniffing a connection from a probe source."""
    head = b""
    preface_sent = False
    while True:
        data = conn.recv(65536)
        head += data
        if not preface_sent and head.startswith(CLIENT_PREFACE):
            conn.sendall(SERVER_PREFACE)
            preface_sent = True
        if (verdict := classify_grpc(head, eof=not data, preface_sent=preface_sent)) is not None:
            return head, verdict


def check(
    port: int, service: str = "", user_agent: str | None = KUBE_PROBE
) -> health_pb2.HealthCheckResponse:
    options = [("grpc.primary_user_agent", user_agent)] if user_agent else []
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        return stub.Check(request, timeout=TIMEOUT)


def call_ignoring_failure(call: Callable[[], Any]) -> None:
    with contextlib.suppress(grpc.RpcError):  # the sniffer hangs up without answering
        call()


def capture(service: str = "", user_agent: str | None = KUBE_PROBE) -> tuple[bytes, GrpcVerdict]:
    server = OneShot(sniff)
    call_ignoring_failure(lambda: check(server.port, service, user_agent))
    head, verdict = server.join()
    return head, verdict


@pytest.fixture(scope="module")
def probe_bytes() -> bytes:
    head, verdict = capture("")
    assert verdict == GrpcVerdict(is_probe=True, service="", stream_id=1)
    return head


# -- A real client's probe -------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", "demo.Echo", "ünïcode/service"])
def test_a_real_kube_probe_health_check_is_a_probe(service: str) -> None:
    head, verdict = capture(service)
    assert verdict == GrpcVerdict(is_probe=True, service=service, stream_id=1)
    # Every prefix either waits or already knows: the verdict never changes.
    for end in range(len(head)):
        assert classify_grpc(head[:end], eof=False, preface_sent=True) in (None, verdict)


def test_a_real_client_waits_for_the_server_settings_before_its_request() -> None:
    def hold_back(conn: socket.socket) -> tuple[GrpcVerdict | None, GrpcVerdict]:
        conn.settimeout(0.3)
        head = b""
        try:
            while True:
                head += conn.recv(65536) or b""
        except TimeoutError:
            pass
        unprompted = classify_grpc(head, eof=False)
        conn.settimeout(TIMEOUT)
        conn.sendall(SERVER_PREFACE)
        while (verdict := classify_grpc(head, eof=False, preface_sent=True)) is None:
            head += conn.recv(65536)
        return unprompted, verdict

    server = OneShot(hold_back)
    call_ignoring_failure(lambda: check(server.port))
    unprompted, verdict = server.join()
    assert unprompted is None  # a preface and SETTINGS, but no request: it waits
    assert verdict.is_probe


def test_other_grpc_calls_are_not_probes() -> None:
    # A health check that is not kubelet's.
    assert capture(user_agent=None)[1] == NOT_A_PROBE
    assert capture(user_agent="grpc-health-probe/0.4")[1] == NOT_A_PROBE

    # kubelet's user agent, another method.
    def call(port: int, method: str) -> None:
        options = [("grpc.primary_user_agent", KUBE_PROBE)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            channel.unary_unary(method)(b"\x0a\x03svc", timeout=TIMEOUT)

    for method in ("/demo.Echo/Say", "/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health"):
        server = OneShot(sniff)
        call_ignoring_failure(lambda port=server.port, method=method: call(port, method))
        assert server.join()[1] == NOT_A_PROBE


def test_drop_settings_ack_takes_out_the_ack_of_the_injected_settings(probe_bytes: bytes) -> None:
    dropped = drop_settings_ack(probe_bytes)
    assert len(dropped) == len(probe_bytes) - 9
    assert b"\x00\x00\x00\x04\x01\x00\x00\x00\x00" in probe_bytes
    assert dropped == probe_bytes.replace(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00", b"", 1)
    assert classify_grpc(dropped, eof=False) == classify_grpc(probe_bytes, eof=False)
    assert drop_settings_ack(dropped) == dropped
    assert drop_settings_ack(b"GET / HTTP/1.1\r\n\r\n") == b"GET / HTTP/1.1\r\n\r\n"


# -- Answering a real client -----------------------------------------------------------------


@pytest.mark.parametrize("status", [SERVING, NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN])
def test_a_real_client_reads_the_answer(status: int) -> None:
    def answer(conn: socket.socket) -> GrpcVerdict:
        _, verdict = sniff(conn)
        assert verdict.is_probe
        conn.sendall(answer_grpc(verdict, status))
        # Half close and read until the client closes: closing with its unread
        # bytes (SETTINGS ACK, WINDOW_UPDATE, PING) would reset the connection.
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
        return verdict

    server = OneShot(answer)
    response = check(server.port, "demo.Echo")
    assert server.join() == GrpcVerdict(is_probe=True, service="demo.Echo", stream_id=1)
    assert response.status == status


def test_an_answer_says_its_own_status() -> None:
    for stream in (1, 3, 0x7FFFFFFF):
        for status in (UNKNOWN, SERVING, NOT_SERVING, SERVICE_UNKNOWN, 300):
            answer = answer_grpc(GrpcVerdict(is_probe=True, stream_id=stream), status)
            assert answer.startswith(SERVER_PREFACE)
            assert grpc_serving_status(answer) == status
    with pytest.raises(ValueError):
        answer_grpc(GrpcVerdict(is_probe=True, stream_id=1), -1)


# -- A real server's answer, through a relay -------------------------------------------------


@pytest.fixture(scope="module")
def app_port() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer.set("demo.Echo", health_pb2.HealthCheckResponse.SERVING)
    server.start()
    yield port
    server.stop(None)


def relay_to(app_port: int) -> Callable[[socket.socket], bytes]:
    """The activator while the app runs: sniff, then relay; what the app said, kept."""

    def relay(client: socket.socket) -> bytes:
        head, verdict = sniff(client)
        assert verdict.is_probe
        app = socket.create_connection(("127.0.0.1", app_port), timeout=TIMEOUT)
        app.sendall(drop_settings_ack(head))
        said = b""
        with app, selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ, app)
            selector.register(app, selectors.EVENT_READ, client)
            while True:
                for key, _ in selector.select(TIMEOUT):
                    source = key.fileobj
                    assert isinstance(source, socket.socket)
                    try:
                        data = source.recv(65536)
                        key.data.sendall(data)
                    except OSError:
                        data = b""
                    if not data:
                        return said
                    if source is app:
                        said += data

    return relay


@pytest.mark.parametrize(
    ("service", "status"),
    [("", NOT_SERVING), ("demo.Echo", SERVING), ("no.Such", SERVICE_UNKNOWN)],
)
def test_the_status_a_real_server_gave_is_read_from_its_bytes(
    app_port: int, service: str, status: int
) -> None:
    relay = OneShot(relay_to(app_port))
    try:
        response = check(relay.port, service)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND  # the servicer's "unknown service"
        assert status == SERVICE_UNKNOWN
    else:
        assert response.status == status  # the relayed client got the app's answer
    said = relay.join()
    assert grpc_serving_status(said) == status
    for end in range(len(said)):
        assert grpc_serving_status(said[:end]) in (None, status)


# -- Hand-made bytes -------------------------------------------------------------------------


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


SETTINGS = frame(4, 0, 0)
ACK = frame(4, 1, 0)
PROBE_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/grpc.health.v1.Health/Check"),
    (":authority", "10.0.0.5:8080"),
    ("content-type", "application/grpc"),
    ("user-agent", "kube-probe/1.35 grpc-go/1.72.0"),
    ("te", "trailers"),
    ("grpc-timeout", "999m"),
]
BLOCK = Encoder().encode(PROBE_HEADERS)
MESSAGE = b"\0\0\0\0\x05\x0a\x03svc"
PROBE = CLIENT_PREFACE + SETTINGS + ACK + frame(1, 4, 1, BLOCK) + frame(0, 1, 1, MESSAGE)
SVC = GrpcVerdict(is_probe=True, service="svc", stream_id=1)


def probe_with(request: bytes, compressed: bool = False) -> bytes:
    message = bytes([compressed]) + struct.pack(">I", len(request)) + request
    return CLIENT_PREFACE + SETTINGS + frame(1, 4, 1, BLOCK) + frame(0, 1, 1, message)


@pytest.mark.parametrize(
    ("head", "eof", "verdict"),
    [
        (PROBE, False, SVC),
        (PROBE, True, SVC),
        (b"", False, None),
        (b"", True, NOT_A_PROBE),
        (b"P", False, None),  # also the start of "POST": the HTTP/1 sniffer must wait too
        (b"PRI * HTTP/2.0\r\n", False, None),
        (b"PRI * HTTP/2.0\r\n", True, NOT_A_PROBE),
        (b"PO", False, NOT_A_PROBE),
        (b"GET /healthz HTTP/1.1\r\nUser-Agent: kube-probe/1.35\r\n\r\n", False, NOT_A_PROBE),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", False, NOT_A_PROBE),  # TLS
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False, None),
        (CLIENT_PREFACE + SETTINGS, True, NOT_A_PROBE),
        (CLIENT_PREFACE + SETTINGS + frame(1, 4, 1, BLOCK), False, None),
        (CLIENT_PREFACE + frame(8, 0, 0, b"\0\0\0\1") + SETTINGS, False, NOT_A_PROBE),
        (CLIENT_PREFACE + ACK, False, NOT_A_PROBE),
        # Ignored frames: PING, WINDOW_UPDATE, PRIORITY, an unknown type.
        (
            CLIENT_PREFACE
            + SETTINGS
            + frame(6, 0, 0, bytes(8))
            + frame(8, 0, 0, b"\0\0\1\0")
            + frame(2, 0, 1, bytes(5))
            + frame(0xFA, 0, 0, b"x")
            + frame(1, 4, 1, BLOCK)
            + frame(8, 0, 1, b"\0\0\1\0")
            + frame(0, 0, 1, MESSAGE),
            False,
            SVC,
        ),
        # The header block in CONTINUATION frames, padding, priority.
        (
            CLIENT_PREFACE
            + SETTINGS
            + frame(1, 0x28, 3, b"\x02" + bytes(5) + BLOCK[:7] + b"pp")
            + frame(9, 0, 3, BLOCK[7:20])
            + frame(9, 4, 3, BLOCK[20:])
            + frame(0, 8, 3, b"\x01" + MESSAGE[:6] + b"p")
            + frame(0, 0, 3, MESSAGE[6:]),
            False,
            GrpcVerdict(is_probe=True, service="svc", stream_id=3),
        ),
        (CLIENT_PREFACE + SETTINGS + frame(1, 0, 1, BLOCK[:7]) + SETTINGS, False, NOT_A_PROBE),
        (CLIENT_PREFACE + SETTINGS + frame(1, 5, 1, BLOCK), False, NOT_A_PROBE),  # no message
        (CLIENT_PREFACE + SETTINGS + frame(1, 4, 2, BLOCK), False, NOT_A_PROBE),  # even stream
        (CLIENT_PREFACE + SETTINGS + frame(0, 0, 1, MESSAGE), False, NOT_A_PROBE),
        (CLIENT_PREFACE + SETTINGS + frame(1, 4, 1, b"\xff\xff\xff"), False, NOT_A_PROBE),
        (probe_with(b"\x0a\x03svc", compressed=True), False, NOT_A_PROBE),
        (probe_with(b"\x12\x03svc"), False, GrpcVerdict(is_probe=True, stream_id=1)),
        (probe_with(b"\x12\x03svc\x0a\x01a\x0a\x01b"), False, GrpcVerdict(True, "b", 1)),
        (probe_with(b"\x08\x03"), False, NOT_A_PROBE),  # field 1 not a string
        (probe_with(b"\x0a\x03\xff\xfe\xfd"), False, NOT_A_PROBE),  # not UTF-8
        (probe_with(b"\x0a\x09svc"), False, NOT_A_PROBE),  # truncated
        (probe_with(b"\x0b\x0c"), False, NOT_A_PROBE),  # a group
        (PROBE.replace(frame(0, 1, 1, MESSAGE), frame(0, 1, 1, MESSAGE[:4])), False, NOT_A_PROBE),
        (PROBE.replace(frame(0, 1, 1, MESSAGE), frame(3, 0, 1, bytes(4))), False, NOT_A_PROBE),
        (PROBE[:-3], False, None),
        (PROBE[:-3], True, NOT_A_PROBE),
        (CLIENT_PREFACE + SETTINGS + frame(6, 0, 0, bytes(20000)), False, NOT_A_PROBE),
        (CLIENT_PREFACE + SETTINGS + frame(6, 0, 0, bytes(20000))[:100], False, NOT_A_PROBE),
        (CLIENT_PREFACE + SETTINGS + frame(6, 0, 0, bytes(8))[:10], False, None),
    ],
)
def test_classify_grpc(head: bytes, eof: bool, verdict: GrpcVerdict | None) -> None:
    assert classify_grpc(head, eof) == verdict


def test_with_the_preface_sent_a_verdict_waits_for_its_ack() -> None:
    without_ack = PROBE.replace(ACK, b"")
    assert classify_grpc(without_ack, eof=False) == SVC
    assert classify_grpc(without_ack, eof=False, preface_sent=True) is None
    assert classify_grpc(without_ack + ACK, eof=False, preface_sent=True) == SVC
    assert classify_grpc(without_ack, eof=True, preface_sent=True) == SVC
    watch = [(k, "/grpc.health.v1.Health/Watch" if k == ":path" else v) for k, v in PROBE_HEADERS]
    other = without_ack.replace(frame(1, 4, 1, BLOCK), frame(1, 4, 1, Encoder().encode(watch)))
    assert other != without_ack
    assert classify_grpc(other, eof=False, preface_sent=True) is None
    assert classify_grpc(other + ACK, eof=False, preface_sent=True) == NOT_A_PROBE


def test_serving_status_of_failed_calls() -> None:
    def trailers_only(code: bytes) -> bytes:
        block = Encoder().encode([(":status", "200"), ("grpc-status", code)])
        return SERVER_PREFACE + frame(1, 5, 1, block)

    assert grpc_serving_status(trailers_only(b"5")) == SERVICE_UNKNOWN
    assert grpc_serving_status(trailers_only(b"12")) == NOT_SERVING
    assert grpc_serving_status(trailers_only(b"0")) == NOT_SERVING  # OK without a message
    not_found = SERVER_PREFACE + frame(1, 4, 1, Encoder().encode([(":status", "404")]))
    assert grpc_serving_status(not_found) == NOT_SERVING
    assert grpc_serving_status(b"HTTP/1.1 400 Bad Request\r\n\r\n") is None
    assert grpc_serving_status(b"") is None


# -- Fuzz ------------------------------------------------------------------------------------

frames = st.lists(
    st.builds(
        frame,
        st.sampled_from([0, 1, 2, 3, 4, 6, 7, 8, 9, 0x20]),
        st.sampled_from([0, 1, 4, 5, 8, 0x20, 0x2C, 0xFF]),
        st.sampled_from([0, 1, 2, 3]),
        st.one_of(
            st.binary(max_size=40), st.just(BLOCK), st.just(MESSAGE), st.just(b"\x02" + BLOCK)
        ),
    ),
    max_size=8,
).map(b"".join)


@given(
    st.one_of(st.binary(max_size=300), frames.map(lambda f: CLIENT_PREFACE + f)),
    st.booleans(),
    st.booleans(),
)
def test_classify_grpc_never_fails_and_decides_at_eof(
    head: bytes, eof: bool, preface_sent: bool
) -> None:
    verdict = classify_grpc(head, eof, preface_sent=preface_sent)
    assert verdict is None or isinstance(verdict, GrpcVerdict)
    if eof:
        assert verdict is not None


@given(st.binary(max_size=100))
def test_a_known_verdict_does_not_change_with_more_bytes(extra: bytes) -> None:
    for head in (PROBE, b"GET / HTTP/1.1\r\n", b"\x16\x03", CLIENT_PREFACE + ACK):
        assert classify_grpc(head + extra, eof=False) == classify_grpc(head, eof=False)


@given(st.data())
def test_mangled_real_bytes_never_fail(probe_bytes: bytes, data: st.DataObject) -> None:
    mangled = bytearray(probe_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        mangled[data.draw(st.integers(0, len(mangled) - 1))] = data.draw(st.integers(0, 255))
    end = data.draw(st.integers(0, len(mangled)))
    classify_grpc(bytes(mangled[:end]), eof=data.draw(st.booleans()), preface_sent=True)
    answer = bytearray(answer_grpc(SVC, SERVING))
    answer[data.draw(st.integers(9, len(answer) - 1))] ^= data.draw(st.integers(1, 255))
    status = grpc_serving_status(bytes(answer))
    assert status is None or status >= 0


@given(st.one_of(st.binary(max_size=300), frames))
def test_grpc_serving_status_never_fails(response: bytes) -> None:
    status = grpc_serving_status(response)
    assert status is None or status >= 0
