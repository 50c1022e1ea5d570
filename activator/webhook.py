"""The mutating admission webhook: pods in, the sidecar injected by JSONPatch.

The API server POSTs an AdmissionReview (admission.k8s.io/v1) for each pod
created in an opted-in namespace (deploy/base/mutatingwebhookconfiguration.yaml);
the answer allows it, with a JSONPatch made from the same transformation as
`activator inject` (inject.py) and warnings saying why a pod was left as it
was. It fails open on every error: it always allows, and an answer it cannot
give (a request that is no AdmissionReview) is an HTTP error, which the API
server's `failurePolicy: Ignore` turns into admitting the pod unchanged.

HTTP/1.1 is h11's (sans-IO, as our lifecycle is), over asyncio's TLS; the
certificate files are read again when they change (cert-manager renews them).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h11

from activator.inject import DEFAULT_IMAGE, METRICS_PORT, Options, Status, inject

log = logging.getLogger(__name__)

# A pod is at most ~1.5 MiB in etcd; the review carries it once on CREATE.
MAX_BODY = 8 * 1024 * 1024
# The API server keeps connections for reuse; an idle one is closed after this.
IDLE_TIMEOUT = 120.0
# A request under way must arrive within this (the API server's own timeout is 5 s).
READ_TIMEOUT = 15.0
CERT_CHECK_INTERVAL = 10.0
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


class BadReview(ValueError):
    """Not an AdmissionReview request: answered with HTTP 400, and the API
    server admits the pod unchanged (failurePolicy: Ignore)."""


# -- the admission decision (pure) ----------------------------------------------


def admit(review: Any, options: Options) -> dict[str, Any]:
    """The AdmissionReview response to `review`; always allowed."""
    request = review.get("request") if isinstance(review, dict) else None
    if (
        not isinstance(review, dict)
        or review.get("kind") != "AdmissionReview"
        or not isinstance(request, dict)
        or not request.get("uid")
    ):
        raise BadReview("expected an AdmissionReview (admission.k8s.io/v1) with request.uid")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    try:
        patch, warnings = _mutation(request, options)
    except Exception as exc:  # fail open: a bug here must never stop a pod
        log.exception("review %s: internal error, admitting unchanged", request["uid"])
        patch, warnings = [], [f"pod-activator: internal error, pod admitted unchanged: {exc}"]
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    if warnings:
        # One line each: the API server passes them on as HTTP Warning headers.
        response["warnings"] = [" ".join(w.split()) for w in warnings]
    return {
        "apiVersion": review.get("apiVersion") or "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }


def _mutation(request: Mapping[str, Any], options: Options) -> tuple[list[Any], list[str]]:
    kind = request.get("kind") or {}
    pod = request.get("object")
    if (
        kind.get("group", "") != ""
        or kind.get("kind") != "Pod"
        or request.get("operation") != "CREATE"
        or request.get("subResource")
        or not isinstance(pod, dict)
    ):
        return [], []
    pod = {"apiVersion": "v1", "kind": "Pod", **pod}
    injection = inject(pod, options)
    metadata = pod.get("metadata") or {}
    where = (
        f"pod {request.get('namespace', '')}/{metadata.get('name') or metadata.get('generateName')}"
    )
    if injection.status is Status.INJECTED:
        log.info("%s: injected (%s)", where, ", ".join(injection.managed))
    elif injection.status is Status.SKIPPED:
        log.warning("%s: not injected: %s", where, "; ".join(injection.warnings))
    return json_patch(pod, injection.manifest), list(injection.warnings)


def json_patch(src: Any, dst: Any, path: str = "") -> list[dict[str, Any]]:
    """RFC 6902 operations that turn `src` into `dst`: objects key by key,
    anything else (lists too) replaced whole, so that each operation reads as
    one field the webhook set."""
    if isinstance(src, dict) and isinstance(dst, dict):
        ops: list[dict[str, Any]] = [
            {"op": "remove", "path": f"{path}/{_escape(key)}"} for key in src if key not in dst
        ]
        for key, value in dst.items():
            where = f"{path}/{_escape(key)}"
            if key not in src:
                ops.append({"op": "add", "path": where, "value": value})
            elif src[key] != value or type(src[key]) is not type(value):
                ops.extend(json_patch(src[key], value, where))
        return ops
    if src == dst and type(src) is type(dst):
        return []
    return [{"op": "replace", "path": path, "value": dst}]


def _escape(key: str) -> str:
    """A JSON Pointer reference token (RFC 6901): `~` and `/` escaped."""
    return str(key).replace("~", "~0").replace("/", "~1")


# -- HTTPS ------------------------------------------------------------------------


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # h11 speaks HTTP/1.1 only; the API server's client then does not try HTTP/2.
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(cert, key)
    return context


class WebhookServer:
    """Serves POST /mutate and GET /healthz over TLS. `port` is the bound one
    (tests bind port 0)."""

    def __init__(self, options: Options, context: ssl.SSLContext) -> None:
        self.options = options
        self.context = context
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._connection, host, port, ssl=self.context, ssl_handshake_timeout=10.0
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, end open connections; safe to call twice."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        conn = h11.Connection(h11.SERVER)
        try:
            while await self._exchange(conn, reader, writer):
                conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError, ssl.SSLError, TimeoutError) as exc:
            log.debug("webhook connection ended: %r", exc)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _exchange(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """One request and its answer; whether the connection may carry another."""
        request = await _next_event(conn, reader, IDLE_TIMEOUT)
        if not isinstance(request, h11.Request):
            return False
        length = dict(request.headers).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            await _respond(conn, writer, 413, b"request too large\n", close=True)
            return False
        body = bytearray()
        while not isinstance(
            event := await _next_event(conn, reader, READ_TIMEOUT), h11.EndOfMessage
        ):
            if not isinstance(event, h11.Data):
                return False
            body += event.data
            if len(body) > MAX_BODY:
                await _respond(conn, writer, 413, b"request too large\n", close=True)
                return False
        status, payload, content_type = self._route(request, bytes(body))
        await _respond(conn, writer, status, payload, content_type=content_type)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    def _route(self, request: h11.Request, body: bytes) -> tuple[int, bytes, str]:
        path = request.target.split(b"?", 1)[0]
        if path == b"/healthz" and request.method in (b"GET", b"HEAD"):
            return 200, b"ok\n", "text/plain"
        if path != b"/mutate":
            return 404, b"not found: the webhook serves POST /mutate\n", "text/plain"
        if request.method != b"POST":
            return 405, b"POST an AdmissionReview to /mutate\n", "text/plain"
        try:
            answer = admit(json.loads(body), self.options)
        except (ValueError, RecursionError) as exc:  # BadReview and JSON errors
            log.warning("webhook: bad request: %s", exc)
            return 400, f"{exc}\n".encode(), "text/plain"
        return 200, json.dumps(answer).encode(), "application/json"


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader, timeout: float) -> Any:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await asyncio.wait_for(reader.read(65536), timeout))
    return event


async def _respond(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    payload: bytes,
    *,
    content_type: str = "text/plain",
    close: bool = False,
) -> None:
    headers = [("content-type", content_type), ("content-length", str(len(payload)))]
    if close:
        headers.append(("connection", "close"))
    writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
    writer.write(conn.send(h11.Data(data=payload)))
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()


async def reload_certificates(
    context: ssl.SSLContext, cert: Path, key: Path, interval: float = CERT_CHECK_INTERVAL
) -> None:
    """Load the certificate again when its files change: new handshakes use it."""

    def stamp() -> tuple[float, float]:
        return cert.stat().st_mtime, key.stat().st_mtime

    seen = stamp()
    while True:
        await asyncio.sleep(interval)
        try:
            now = stamp()
            if now != seen:
                context.load_cert_chain(cert, key)
                seen = now
                log.info("webhook: certificate reloaded from %s", cert)
        except (OSError, ssl.SSLError) as exc:  # mid-rotation: keep the old one, try again
            log.warning("webhook: cannot reload the certificate yet: %s", exc)


# -- the command line -----------------------------------------------------------


def add_parsers(sub: Any) -> None:
    """`activator webhook` and `activator webhook-cert`, on the CLI's subparsers."""
    web = sub.add_parser("webhook", help="serve the admission webhook that injects the sidecar")
    web.add_argument("--cert", type=Path, required=True, help="TLS certificate (PEM)")
    web.add_argument("--key", type=Path, required=True, help="its private key (PEM)")
    web.add_argument("--port", type=int, default=8443, help="HTTPS port (8443)")
    web.add_argument("--host", default="0.0.0.0", help="address to listen on (all)")
    web.add_argument(
        "--sidecar-image",
        default=os.environ.get("POD_ACTIVATOR_SIDECAR_IMAGE") or DEFAULT_IMAGE,
        help=f"image of the injected sidecar ($POD_ACTIVATOR_SIDECAR_IMAGE, else {DEFAULT_IMAGE})",
    )
    web.add_argument(
        "--sidecar-pull-policy",
        default=os.environ.get("POD_ACTIVATOR_SIDECAR_PULL_POLICY") or None,
        help="its imagePullPolicy: Always, IfNotPresent or Never "
        "($POD_ACTIVATOR_SIDECAR_PULL_POLICY, else Kubernetes' default for the tag)",
    )
    web.add_argument(
        "--metrics-port",
        type=int,
        default=METRICS_PORT,
        help=f"the sidecar's metrics port ({METRICS_PORT})",
    )
    web.set_defaults(run=run_webhook)

    cert = sub.add_parser(
        "webhook-cert",
        help="make a CA and the webhook's serving certificate (instead of cert-manager)",
    )
    cert.add_argument("--out", type=Path, required=True, help="directory for ca.crt, tls.*")
    cert.add_argument("--service", default="pod-activator-webhook", help="the webhook's Service")
    cert.add_argument("--namespace", default="pod-activator", help="the Service's namespace")
    cert.add_argument("--days", type=int, default=365, help="validity (365)")
    cert.set_defaults(run=run_webhook_cert)


def run_webhook(args: argparse.Namespace) -> int:
    if args.sidecar_pull_policy is not None and args.sidecar_pull_policy not in PULL_POLICIES:
        print(
            f"activator: error: --sidecar-pull-policy: {args.sidecar_pull_policy!r} is not "
            f"one of {', '.join(PULL_POLICIES)}",
            file=sys.stderr,
        )
        return 2
    try:
        context = server_context(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        print(
            f"activator: error: --cert/--key: cannot load {args.cert} and {args.key}: {exc}; "
            "give a PEM certificate and its key (activator webhook-cert makes a pair)",
            file=sys.stderr,
        )
        return 1
    options = Options(
        image=args.sidecar_image,
        image_pull_policy=args.sidecar_pull_policy,
        metrics_port=args.metrics_port,
    )
    import uvloop

    uvloop.run(serve(options, context, args.host, args.port, args.cert, args.key))
    return 0


async def serve(
    options: Options, context: ssl.SSLContext, host: str, port: int, cert: Path, key: Path
) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = WebhookServer(options, context)
    await server.start(host, port)
    reloader = asyncio.ensure_future(reload_certificates(context, cert, key))
    log.info("webhook: serving on %s:%d, injecting %s", host, server.port, options.image)
    try:
        await stop.wait()
    finally:
        reloader.cancel()
        await asyncio.wait_for(server.close(), 5.0)
    log.info("webhook: stopped")


def run_webhook_cert(args: argparse.Namespace) -> int:
    from activator import certs  # cryptography: only for this command (7 MiB otherwise)

    names = certs.service_dns_names(args.service, args.namespace)
    try:
        certs.write(certs.make(names, args.days), args.out)
    except OSError as exc:
        print(
            f"activator: error: --out: cannot write to {args.out}: {exc.strerror}", file=sys.stderr
        )
        return 1
    ca = base64.b64encode((args.out / "ca.crt").read_bytes()).decode()
    print(f"wrote {args.out}/ca.crt, tls.crt and tls.key for {names[0]}", file=sys.stderr)
    print(
        f"next: kubectl -n {args.namespace} create secret tls pod-activator-webhook-tls "
        f"--cert {args.out}/tls.crt --key {args.out}/tls.key, and set caBundle in both "
        "webhooks of the MutatingWebhookConfiguration to the line below",
        file=sys.stderr,
    )
    print(ca)
    return 0
