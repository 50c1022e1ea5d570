"""Probe detection on bytes: table of cases, and a fuzz of the sniffer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from activator.probes import REAL, Kind, ProbeMemory, Verdict, classify, response_status

PROBE = (
    b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.5:8080\r\n"
    b"User-Agent: kube-probe/1.35\r\nAccept: */*\r\n\r\n"
)


@pytest.mark.parametrize(
    ("head", "eof", "verdict"),
    [
        (PROBE, False, Verdict(Kind.HTTP_PROBE, "/healthz")),
        (PROBE.replace(b"GET", b"HEAD"), False, Verdict(Kind.HTTP_PROBE, "/healthz")),
        (b"", True, Verdict(Kind.TCP_PROBE)),
        (b"", False, None),  # nothing yet: wait (bounded by the probe wait)
        (b"GE", False, None),
        (b"GET /healthz HTTP/1.1\r\nUser-Agent: kube-probe/1.35\r\n", False, None),
        (b"GET / HTTP/1.1\r\nUser-Agent: curl/8.0\r\n\r\n", False, REAL),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, REAL),
        (b"POST /healthz HTTP/1.1\r\nUser-Agent: kube-probe/1.35\r\n\r\n", False, REAL),
        (b"\x16\x03\x01\x02\x00", False, REAL),  # TLS: not sniffable, real at once
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", False, REAL),  # PostgreSQL startup
        (b"GET /healthz HTTP/1.1\r\nUser-Agent: kube-probe/1.35\r\n", True, REAL),
        (b"GET " + b"a" * 9000, False, REAL),
        (b"GET /x HTTP/2\r\nUser-Agent: kube-probe/1.35\r\n\r\n", False, REAL),
    ],
)
def test_classify(head: bytes, eof: bool, verdict: Verdict | None) -> None:
    assert classify(head, eof) == verdict


@given(st.binary(max_size=200), st.booleans())
def test_classify_never_fails_and_decides_at_eof(head: bytes, eof: bool) -> None:
    verdict = classify(head, eof)
    assert verdict is None or isinstance(verdict, Verdict)
    if eof:
        assert verdict is not None


@given(st.binary(max_size=100))
def test_a_known_verdict_does_not_change_with_more_bytes(extra: bytes) -> None:
    for head in (PROBE, b"GET / HTTP/1.1\r\nUser-Agent: curl\r\n\r\n", b"\x16\x03"):
        assert classify(head + extra, eof=False) == classify(head, eof=False)


def test_response_status() -> None:
    assert response_status(b"HTTP/1.1 503 Service Unavailable\r\n") == 503
    assert response_status(b"HTTP/1.0 200 OK\r\n") == 200
    assert response_status(b"SSH-2.0-OpenSSH") is None
    assert response_status(b"HTTP/1.1") is None


def test_probe_memory_answers_the_last_status_per_port_and_path() -> None:
    memory = ProbeMemory(default_status=200)
    ready = Verdict(Kind.HTTP_PROBE, "/ready")
    assert memory.answer(80, ready).startswith(b"HTTP/1.1 200 OK\r\n")
    memory.remember(80, ready, 503)
    assert memory.answer(80, ready).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert memory.answer(81, ready).startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 0\r\n" in memory.answer(80, ready)


def test_http2_prefixes_wait_for_the_grpc_sniffer() -> None:
    assert classify(b"P", eof=False) is None
    assert classify(b"PRI * HTTP/2.0\r\n", eof=False) is None
    assert classify(b"PRI * HTTP/2.0\r\n", eof=True) == REAL
    assert classify(b"POST / HTTP/1.1\r\n\r\n", eof=False) == REAL
