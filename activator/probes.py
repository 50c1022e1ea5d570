"""Telling kubelet's health probes from real traffic, and answering them.

Pure functions over bytes: no sockets here. Only connections from a probe
source (the node's address, where kubelet probes come from) are sniffed at
all; everyone else is real traffic at once, so a client whose protocol has the
server speak first (MySQL, SMTP) never waits for a verdict. From a probe
source, a connection is:

- an HTTP probe if its request head carries `User-Agent: kube-probe/...`;
- a gRPC probe if it is an HTTP/2 `grpc.health.v1.Health/Check` call from
  `kube-probe/...` (see grpc_health.py; the activator must send its HTTP/2
  SETTINGS first, as kubelet's client waits for them);
- a TCP probe if it closes without sending anything;
- real traffic otherwise, including when it sends nothing within the probe
  wait (a server-first client on the node).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from http import HTTPStatus

from activator import grpc_health

# A request head longer than this is not a probe's.
MAX_HEAD = 8192
_METHODS = (b"GET ", b"HEAD ")


class Kind(enum.Enum):
    REAL = "real"
    HTTP_PROBE = "http-probe"
    GRPC_PROBE = "grpc-probe"
    TCP_PROBE = "tcp-probe"


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    path: str = ""  # the HTTP path, or the gRPC health service
    grpc: grpc_health.GrpcVerdict | None = None

    @property
    def key(self) -> str:
        """What the app's answer is remembered under, per port."""
        return f"grpc:{self.path}" if self.kind is Kind.GRPC_PROBE else self.path


REAL = Verdict(Kind.REAL)


def speaks_http2(head: bytes) -> bool:
    """The head is (so far) an HTTP/2 client preface."""
    n = min(len(head), len(grpc_health.CLIENT_PREFACE))
    return n > 0 and head[:n] == grpc_health.CLIENT_PREFACE[:n]


def classify(head: bytes, eof: bool, preface_sent: bool = False) -> Verdict | None:
    """What the first bytes of a connection from a probe source say it is.

    None means "not yet known": wait for more bytes (or the probe wait).
    """
    if not head:
        return Verdict(Kind.TCP_PROBE) if eof else None
    if speaks_http2(head):
        grpc = grpc_health.classify_grpc(head, eof, preface_sent=preface_sent)
        if grpc is None:
            return None
        return Verdict(Kind.GRPC_PROBE, grpc.service, grpc) if grpc.is_probe else REAL
    if not head.startswith(_METHODS):
        # Wait only while what came could still become "GET " or "HEAD ".
        prefix_of_method = any(m.startswith(head) for m in _METHODS)
        return None if prefix_of_method and not eof else REAL
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return REAL if eof or len(head) > MAX_HEAD else None
    lines = head[:end].split(b"\r\n")
    request = lines[0].split(b" ")
    if len(request) != 3 or not request[2].startswith(b"HTTP/1."):
        return REAL
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"user-agent":
            if value.strip().startswith(b"kube-probe/"):
                return Verdict(Kind.HTTP_PROBE, request[1].decode("latin-1"))
            return REAL
    return REAL


def response_status(first_bytes: bytes) -> int | None:
    """The status code of an HTTP/1.x response, from its first bytes."""
    parts = first_bytes.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1][:3].isdigit():
        return int(parts[1][:3])
    return None


@dataclass
class ProbeMemory:
    """What the app last answered each probe, per port: an HTTP status, or a
    gRPC serving status."""

    default_status: int = 200
    statuses: dict[tuple[int, str], int] = field(default_factory=dict)

    def remember(self, port: int, probe: Verdict, status: int) -> None:
        self.statuses[(port, probe.key)] = status

    def answer(self, port: int, probe: Verdict) -> bytes:
        remembered = self.statuses.get((port, probe.key))
        if probe.grpc is not None:
            if remembered is None:
                healthy = self.default_status < 400
                remembered = grpc_health.SERVING if healthy else grpc_health.NOT_SERVING
            return grpc_health.answer_grpc(probe.grpc, remembered)
        status = self.default_status if remembered is None else remembered
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        return (
            f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n"
            "X-Answered-By: pod-activator\r\n\r\n"
        ).encode()
