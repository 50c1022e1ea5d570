"""Telling kubelet's health probes from real traffic, and answering them.

Pure functions over bytes: no sockets here. Only connections from a probe
source (the node's address, where kubelet probes come from) are sniffed at
all; everyone else is real traffic at once, so a client whose protocol has the
server speak first (MySQL, SMTP) never waits for a verdict. From a probe
source, a connection is:

- an HTTP probe if its request head carries `User-Agent: kube-probe/...`;
- a TCP probe if it closes without sending anything;
- real traffic otherwise, including when it sends nothing within the probe
  wait (a server-first client on the node).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from http import HTTPStatus

# A request head longer than this is not a probe's.
MAX_HEAD = 8192
_METHODS = (b"GET ", b"HEAD ")


class Kind(enum.Enum):
    REAL = "real"
    HTTP_PROBE = "http-probe"
    TCP_PROBE = "tcp-probe"


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    path: str = ""


REAL = Verdict(Kind.REAL)


def classify(head: bytes, eof: bool) -> Verdict | None:
    """What the first bytes of a connection from a probe source say it is.

    None means "not yet known": wait for more bytes (or the probe wait).
    """
    if not head:
        return Verdict(Kind.TCP_PROBE) if eof else None
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
    """The status the app last gave each probe path, per port."""

    default_status: int = 200
    statuses: dict[tuple[int, str], int] = field(default_factory=dict)

    def remember(self, port: int, path: str, status: int) -> None:
        self.statuses[(port, path)] = status

    def answer(self, port: int, path: str) -> bytes:
        status = self.statuses.get((port, path), self.default_status)
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        return (
            f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n"
            "X-Answered-By: pod-activator\r\n\r\n"
        ).encode()
