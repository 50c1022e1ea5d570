"""Telling kubelet's gRPC health probes from real traffic, and answering them.

Pure functions over bytes, like probes.py. Kubelet's gRPC prober calls
`/grpc.health.v1.Health/Check` over cleartext HTTP/2 with prior knowledge, with
a user agent starting with `kube-probe/`. Its client (grpc-go; grpcio's C core
does the same) sends the connection preface and its SETTINGS and then waits
for the server's SETTINGS before it sends the request: a sniffer must write
`SERVER_PREFACE` once it has seen `CLIENT_PREFACE`, or no request ever comes.
If the connection is then relayed to the app (real traffic, or a probe while
the app runs), the client's ACK of those injected SETTINGS must not reach the
app (grpcio's, Go's and nghttp2's servers take an unsolicited ACK for a protocol
error): `drop_settings_ack` takes it out of the sniffed bytes.

The two messages, written by hand (grpc/health/v1/health.proto):
    HealthCheckRequest  { string service = 1; }            field 1, wire type 2
    HealthCheckResponse { ServingStatus status = 1; }      field 1, wire type 0
each sent as a gRPC message: 1 byte compressed flag, 4 bytes big-endian length.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hpack import Decoder, Encoder, HPACKError

CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEALTH_CHECK_PATH = b"/grpc.health.v1.Health/Check"
# What a probe's bytes may come to before its request is complete.
MAX_HEAD = 16384

# HealthCheckResponse.ServingStatus
UNKNOWN, SERVING, NOT_SERVING, SERVICE_UNKNOWN = 0, 1, 2, 3
# gRPC status codes (grpc-status trailer)
_GRPC_OK, _GRPC_NOT_FOUND = 0, 5

# Frame types and flags (RFC 9113 section 6)
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
_PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Frames that say nothing about the request: skipped while sniffing.
_IGNORED = frozenset({_PRIORITY, _SETTINGS, _PING, _WINDOW_UPDATE})


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


# An empty SETTINGS frame: the server's connection preface (all defaults).
SERVER_PREFACE = _frame(_SETTINGS, 0, 0)


@dataclass(frozen=True)
class GrpcVerdict:
    is_probe: bool
    service: str = ""  # HealthCheckRequest.service; "" for the server overall
    stream_id: int = 0  # the request's stream, which the answer goes on


NOT_A_PROBE = GrpcVerdict(is_probe=False)


@dataclass(frozen=True)
class _Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes


def _frames(data: bytes) -> tuple[list[_Frame], int]:
    """The complete frames in `data`, in order, and the length `data` must
    reach for the next one to be complete."""
    frames: list[_Frame] = []
    at = 0
    while len(data) - at >= 9:
        length = int.from_bytes(data[at : at + 3], "big")
        if len(data) - at - 9 < length:
            return frames, at + 9 + length
        kind, flags, stream = struct.unpack_from(">BBI", data, at + 3)
        frames.append(_Frame(kind, flags, stream & 0x7FFFFFFF, data[at + 9 : at + 9 + length]))
        at += 9 + length
    return frames, at + 9 if at < len(data) else at


class _Malformed(Exception):
    """Bytes that are not (this part of) a well-formed HTTP/2 gRPC exchange."""


def _unpad(frame: _Frame) -> bytes:
    """A DATA or HEADERS frame's content without padding (and priority fields)."""
    payload = frame.payload
    if frame.flags & _PADDED:
        if not payload or payload[0] >= len(payload):
            raise _Malformed("padding")
        payload = payload[1 : len(payload) - payload[0]]
    if frame.kind == _HEADERS and frame.flags & _PRIORITY_FLAG:
        if len(payload) < 5:
            raise _Malformed("priority")
        payload = payload[5:]
    return payload


def _decode(decoder: Decoder, block: bytes) -> dict[bytes, bytes]:
    try:
        return {bytes(name): bytes(value) for name, value in decoder.decode(block, raw=True)}
    except (HPACKError, ValueError, IndexError) as exc:
        raise _Malformed("hpack") from exc


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """A protobuf varint at `at`: (value, where the next thing starts)."""
    value = 0
    for shift in range(0, 64, 7):
        if at >= len(data):
            break
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
    raise _Malformed("varint")


def _proto_fields(message: bytes) -> dict[int, int | bytes]:
    """A protobuf message's fields by number (the last of each wins).

    Varints as int, the others (length-delimited, fixed 32 and 64 bit) as bytes.
    """
    fields: dict[int, int | bytes] = {}
    at = 0
    while at < len(message):
        key, at = _varint(message, at)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, at = _varint(message, at)
        elif wire in (1, 2, 5):
            size = 8 if wire == 1 else 4
            if wire == 2:
                size, at = _varint(message, at)
            if at + size > len(message):
                raise _Malformed("truncated field")
            value, at = message[at : at + size], at + size
        else:
            raise _Malformed("wire type")  # groups (3, 4) are not in these messages
        if number == 0:
            raise _Malformed("field 0")
        fields[number] = value
    return fields


def _grpc_message(body: bytes) -> bytes | None:
    """The first gRPC message in a stream's DATA, or None while incomplete."""
    if len(body) < 5:
        return None
    if body[0] != 0:
        raise _Malformed("compressed")  # neither kubelet nor a health server does it
    length = int.from_bytes(body[1:5], "big")
    if length > MAX_HEAD:
        raise _Malformed("message size")
    return body[5 : 5 + length] if len(body) >= 5 + length else None


def classify_grpc(head: bytes, eof: bool, *, preface_sent: bool = False) -> GrpcVerdict | None:
    """What the first bytes a client sent say: a gRPC health probe, or not.

    None means "not yet known": wait for more bytes. With `preface_sent` (the
    sniffer wrote SERVER_PREFACE), a verdict also waits for the client's ACK of
    it (any HTTP/2 client sends one at once), so that `drop_settings_ack` can
    take it out before the bytes are relayed.
    """
    if len(head) < len(CLIENT_PREFACE):
        return None if CLIENT_PREFACE.startswith(head) and not eof else NOT_A_PROBE
    if not head.startswith(CLIENT_PREFACE):
        return NOT_A_PROBE
    frames, needed = _frames(head[len(CLIENT_PREFACE) :])
    try:
        verdict = _sniff(frames)
    except _Malformed:
        return NOT_A_PROBE
    if preface_sent and not eof and not any(f.kind == _SETTINGS and f.flags & _ACK for f in frames):
        verdict = None
    if verdict is None and (eof or len(CLIENT_PREFACE) + needed > MAX_HEAD):
        return NOT_A_PROBE  # what is missing cannot come, or not within the bound
    return verdict


def _sniff(frames: list[_Frame]) -> GrpcVerdict | None:
    """A verdict on the frames after the client preface; None if more are needed."""
    if frames and (frames[0].kind != _SETTINGS or frames[0].flags & _ACK):
        return NOT_A_PROBE  # the client preface ends with a SETTINGS frame
    stream = 0  # the request's stream, once its HEADERS came
    block: bytes | None = None  # its header block, while CONTINUATION frames come
    body = b""
    for frame in frames:
        if block is not None:  # only the block's CONTINUATION frames may come now
            if frame.kind != _CONTINUATION or frame.stream != stream:
                return NOT_A_PROBE
            block += frame.payload
        elif frame.kind in _IGNORED or frame.kind > _CONTINUATION:  # unknown types too
            continue
        elif frame.kind == _HEADERS and not stream:
            if frame.stream % 2 == 0 or frame.flags & _END_STREAM:
                return NOT_A_PROBE  # a unary request has a message after its headers
            stream, block = frame.stream, _unpad(frame)
        elif frame.kind == _DATA and frame.stream == stream != 0:
            body += _unpad(frame)
            message = _grpc_message(body)
            if message is not None:
                return _request(message, stream)
            if frame.flags & _END_STREAM:
                return NOT_A_PROBE
            continue
        else:
            return NOT_A_PROBE  # DATA first, another stream, RST_STREAM, GOAWAY...
        if frame.flags & _END_HEADERS:
            headers = _decode(Decoder(max_header_list_size=MAX_HEAD), block)
            if not _is_probe_request(headers):
                return NOT_A_PROBE
            block = None
    return None


def _is_probe_request(headers: dict[bytes, bytes]) -> bool:
    return (
        headers.get(b":method") == b"POST"
        and headers.get(b":path") == HEALTH_CHECK_PATH
        and headers.get(b"content-type", b"").startswith(b"application/grpc")
        and headers.get(b"user-agent", b"").startswith(b"kube-probe/")
    )


def _request(message: bytes, stream: int) -> GrpcVerdict:
    service = _proto_fields(message).get(1, b"")
    if not isinstance(service, bytes):
        return NOT_A_PROBE
    try:
        return GrpcVerdict(is_probe=True, service=service.decode(), stream_id=stream)
    except UnicodeDecodeError:
        return NOT_A_PROBE


def drop_settings_ack(head: bytes) -> bytes:
    """The client's bytes without its first SETTINGS ACK (of an injected SERVER_PREFACE)."""
    if not head.startswith(CLIENT_PREFACE):
        return head
    at = len(CLIENT_PREFACE)
    for frame in _frames(head[at:])[0]:
        end = at + 9 + len(frame.payload)
        if frame.kind == _SETTINGS and frame.flags & _ACK:
            return head[:at] + head[end:]
        at = end
    return head


def answer_grpc(verdict: GrpcVerdict, status: int) -> bytes:
    """The server's side of a whole health check: HealthCheckResponse{status}
    on the probe's stream, then GOAWAY.

    The client answers these frames (SETTINGS ACK, WINDOW_UPDATE, PING): after
    writing, half close and read until it closes, since a close with its bytes
    unread resets the connection, which may take the answer with it.
    """
    if not 0 <= status < 1 << 31:
        raise ValueError(f"not a serving status: {status}")
    stream = verdict.stream_id
    encoder = Encoder()
    message = b"\x08" + _encode_varint(status) if status else b""  # proto3: 0 is not written
    headers = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    trailers = [(b"grpc-status", b"0")]
    return b"".join(
        (
            SERVER_PREFACE,
            _frame(_SETTINGS, _ACK, 0),  # of the client's SETTINGS
            _frame(_HEADERS, _END_HEADERS, stream, encoder.encode(headers)),
            _frame(_DATA, 0, stream, b"\0" + struct.pack(">I", len(message)) + message),
            _frame(_HEADERS, _END_HEADERS | _END_STREAM, stream, encoder.encode(trailers)),
            _frame(_GOAWAY, 0, 0, struct.pack(">II", stream, 0)),  # NO_ERROR
        )
    )


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def grpc_serving_status(response: bytes) -> int | None:
    """The ServingStatus an app answered a health check with, from the bytes it
    sent back on the connection; None if not (yet) known.

    The call's outcome is known at its trailers. A call that failed counts as
    kubelet sees it, as a failure: NOT_FOUND (the health server does not know
    the service; grpcio sends an empty message before it) as SERVICE_UNKNOWN,
    any other error as NOT_SERVING.
    """
    try:
        return _serving_status(response)
    except _Malformed:
        return None


def _serving_status(response: bytes) -> int | None:
    decoder = Decoder(max_header_list_size=1 << 20)
    decoder.max_allowed_table_size = 1 << 20  # whatever the client's SETTINGS allowed
    stream = 0  # the call's stream: the first one the app answers on
    block: bytes | None = None
    block_flags = 0
    body = b""
    for frame in _frames(response)[0]:
        if block is not None:
            if frame.kind != _CONTINUATION:
                return None
            block += frame.payload
        elif frame.kind == _HEADERS and frame.stream:
            block, block_flags = _unpad(frame), frame.flags
            stream = stream or frame.stream
        elif frame.kind in (_CONTINUATION, _PUSH_PROMISE):
            return None  # out of place, or an HPACK state that is not followed here
        elif frame.kind == _DATA and frame.stream == stream != 0:
            body += _unpad(frame)
            continue
        else:
            continue
        if frame.flags & _END_HEADERS:
            headers = _decode(decoder, block)  # every block, to keep the HPACK state
            block = None
            if frame.stream == stream and (ended := _outcome(headers, block_flags, body)):
                return ended[0]
    return None


def _outcome(headers: dict[bytes, bytes], flags: int, body: bytes) -> tuple[int] | None:
    """What the call's response headers or trailers say of it, if it is over."""
    if headers.get(b":status", b"200") != b"200":
        return (NOT_SERVING,)
    if not flags & _END_STREAM:
        return None
    code = headers.get(b"grpc-status")
    if code == b"%d" % _GRPC_NOT_FOUND:
        return (SERVICE_UNKNOWN,)
    message = _grpc_message(body) if code == b"%d" % _GRPC_OK else None
    if message is None:
        return (NOT_SERVING,)  # an error, or OK without a message (an error to a client)
    status = _proto_fields(message).get(1, UNKNOWN)
    return (status,) if isinstance(status, int) else None
