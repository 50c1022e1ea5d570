"""A Kubernetes API server on loopback, as far as the sidecar uses it.

Real HTTPS (a CA and a certificate for `localhost` made per test, handed to
the client as a ServiceAccount's ca.crt), HTTP/1.1 through h11, a bearer
token checked on every request. It holds one pod and the Events about it,
and answers the calls the sidecar makes; everything it is sent is recorded.

Every request is checked twice, and each problem is recorded in
`violations` (the tests assert there are none) and answered as the real
server would refuse it:

- against RBAC: the verb, API group, resource and subresource must be
  allowed by the rules of deploy/base/rbac.yaml (the ClusterRole the
  sidecar's ServiceAccount is bound to), else 403;
- for its shape: the content type of each patch; label keys and values by
  Kubernetes' rules; a pod patch that touches only labels and our
  annotations; a resize that names only existing containers' cpu and
  memory requests; an Event with every field events.k8s.io/v1 requires
  (validated against the Kubernetes 1.35 schema too, strict), its limits
  (note 1 KiB, reportingInstance 128), a MicroTime as Go parses it, and
  `regarding` naming this pod with its uid; a series patch that touches
  only `series`, counting up.

What it does not do: admission, resourceVersion conflicts, the kubelet's
side of a resize (it applies the new requests at once), field managers.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import kubernetes_validate
import yaml

RBAC = Path(__file__).parents[2] / "deploy" / "base" / "rbac.yaml"
ROLE = "pod-activator-sidecar"

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# Go's time.Parse(RFC3339Micro): exactly six fractional digits.
_MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|k|M|G)?$")
_PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+)(?:/([^/]+))?)?$")
_EVENTS = re.compile(r"^/apis/events\.k8s\.io/v1/namespaces/([^/]+)/events(?:/([^/]+))?$")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    content_type: str | None
    body: Any
    verb: str
    group: str
    resource: str  # with its subresource: "pods/resize"
    status: int  # what the server answered


def sidecar_rules(path: Path = RBAC) -> list[dict[str, Any]]:
    """The rules of the sidecar's (Cluster)Role."""
    rules: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc["kind"] in ("ClusterRole", "Role") and doc["metadata"]["name"] == ROLE:
            rules.extend(doc["rules"])
    assert rules, f"no rules for {ROLE} in {path}"
    return rules


def allowed(rules: list[dict[str, Any]], verb: str, group: str, resource: str, name: str) -> bool:
    """RBAC's rule matching (a subresource is `resource/sub` in a rule)."""
    return any(
        (verb in rule["verbs"] or "*" in rule["verbs"])
        and (group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", []))
        and (resource in rule.get("resources", []) or "*" in rule.get("resources", []))
        and (not rule.get("resourceNames") or name in rule["resourceNames"])
        for rule in rules
    )


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class FakeApiServer:
    def __init__(self, pod: dict[str, Any], tls: Path, token: str) -> None:
        self.pod = pod
        self.namespace: str = pod["metadata"]["namespace"]
        self.name: str = pod["metadata"]["name"]
        self.tls = tls
        self.token = token
        self.rules = sidecar_rules()
        self.events: dict[str, dict[str, Any]] = {}
        self.requests: list[Request] = []
        self.violations: list[str] = []
        # (verb, resource) -> the status to answer instead, to play failures
        self.fail: dict[tuple[str, str], int] = {}
        self.port = 0
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.set_alpn_protocols(["http/1.1"])
        context.load_cert_chain(self.tls / "tls.crt", self.tls / "tls.key")
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def until(self, condition: Any, timeout: float = 10.0) -> None:
        """Wait until `condition()` holds, checked after each request."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    # -- what the tests read ---------------------------------------------------

    def made(self, verb: str, resource: str) -> list[Request]:
        return [r for r in self.requests if (r.verb, r.resource) == (verb, resource)]

    @property
    def labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.pod["metadata"].get("labels", {})
        return labels

    @property
    def annotations(self) -> dict[str, str]:
        found: dict[str, str] = self.pod["metadata"].get("annotations", {})
        return found

    def requests_of(self, container: str) -> dict[str, str]:
        (found,) = [c for c in self.pod["spec"]["containers"] if c["name"] == container]
        requests: dict[str, str] = found.get("resources", {}).get("requests", {})
        return requests

    # -- HTTP ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = bytearray()
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Request):
                    request, body = event, bytearray()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    status, answer = self._answer(request, bytes(body))
                    data = json.dumps(answer).encode()
                    headers = [
                        ("content-type", "application/json"),
                        ("content-length", str(len(data))),
                    ]
                    writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
                    writer.write(conn.send(h11.Data(data=data)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    self._changed.set()
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        break
                    conn.start_next_cycle()
                else:  # ConnectionClosed
                    break
        except (h11.ProtocolError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def _answer(self, request: h11.Request, body: bytes) -> tuple[int, Any]:
        method = request.method.decode()
        url = urlsplit(request.target.decode())
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        content_type = headers.get("content-type")
        verb, group, resource, name = "?", "?", "?", ""
        parsed: Any = None
        try:
            parsed = json.loads(body) if body else None
            if headers.get("authorization") != f"Bearer {self.token}":
                raise Refused(401, "no or a wrong bearer token")
            verb, group, resource, namespace, name = self._attributes(method, url.path, url.query)
            if not allowed(self.rules, verb, group, resource, name):
                raise Refused(
                    403,
                    f'{verb} {resource} in group "{group}" is not allowed by {RBAC.name} ({ROLE})',
                )
            if namespace != self.namespace:
                raise Refused(403, f"namespace {namespace}: the sidecar keeps to its pod's")
            if (verb, resource) in self.fail:
                status = self.fail[(verb, resource)]
                self._record(method, url.path, content_type, parsed, verb, group, resource, status)
                return status, _status(status, "played failure")
            status, answer = self._dispatch(verb, resource, name, content_type, parsed)
        except Refused as exc:
            self._record(method, url.path, content_type, parsed, verb, group, resource, exc.status)
            self.violations.append(f"{method} {url.path}: {exc}")
            return exc.status, _status(exc.status, str(exc))
        self._record(method, url.path, content_type, parsed, verb, group, resource, status)
        return status, answer

    def _record(self, *fields: Any) -> None:
        self.requests.append(Request(*fields))

    def _attributes(self, method: str, path: str, query: str) -> tuple[str, str, str, str, str]:
        if found := _PODS.match(path):
            namespace, name, sub = found.groups()
            group, resource = "", "pods" + (f"/{sub}" if sub else "")
        elif found := _EVENTS.match(path):
            namespace, name = found.groups()
            group, resource = "events.k8s.io", "events"
        else:
            raise Refused(404, f"no such path in this fake: {path}")
        watch = parse_qs(query).get("watch") == ["true"]
        verb = {
            "GET": "watch" if watch else ("get" if name else "list"),
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection",
        }[method]
        return verb, group, resource, namespace, name or ""

    def _dispatch(
        self, verb: str, resource: str, name: str, content_type: str | None, body: Any
    ) -> tuple[int, Any]:
        if resource.startswith("pods") and name != self.name:
            raise Refused(403, f"pod {name}: the sidecar touches only its own pod, {self.name}")
        match verb, resource:
            case "get", "pods":
                return 200, self.pod
            case "patch", "pods":
                _expect(content_type, "application/merge-patch+json")
                self._check_pod_patch(body)
                self.pod = merge_patch(self.pod, body)
                return 200, self.pod
            case "patch", "pods/resize":
                _expect(content_type, "application/strategic-merge-patch+json")
                self._apply_resize(body)
                return 200, self.pod
            case "create", "events":
                _expect(content_type, "application/json")
                self._check_event(body)
                if body["metadata"]["name"] in self.events:
                    return 409, _status(409, "already exists")
                self.events[body["metadata"]["name"]] = body
                return 201, body
            case "patch", "events":
                _expect(content_type, "application/merge-patch+json")
                if name not in self.events:
                    return 404, _status(404, f'events.events.k8s.io "{name}" not found')
                self._check_series_patch(self.events[name], body)
                self.events[name] = merge_patch(self.events[name], body)
                return 200, self.events[name]
        raise Refused(405, f"{verb} {resource}: the sidecar has no business doing that")

    # -- shape checks ------------------------------------------------------------

    def _check_pod_patch(self, body: Any) -> None:
        if not isinstance(body, dict) or set(body) != {"metadata"}:
            raise Refused(422, f"a pod patch touches metadata only, not {body}")
        metadata = body["metadata"]
        if not set(metadata) <= {"labels", "annotations"} or not metadata:
            raise Refused(422, f"a pod patch touches labels and annotations only: {metadata}")
        for key, value in metadata.get("labels", {}).items():
            _check_label(key, value)
        for key in metadata.get("annotations", {}):
            if not key.startswith("pod-activator.dev/"):
                raise Refused(422, f"annotation {key} is not ours")

    def _apply_resize(self, body: Any) -> None:
        if (
            not isinstance(body, dict)
            or set(body) != {"spec"}
            or set(body["spec"]) != {"containers"}
        ):
            raise Refused(422, f"a resize patch has spec.containers only: {body}")
        containers = {c["name"]: c for c in self.pod["spec"]["containers"]}
        for patch in body["spec"]["containers"]:
            if set(patch) != {"name", "resources"} or set(patch["resources"]) != {"requests"}:
                raise Refused(422, f"a resize names the container and its requests only: {patch}")
            if patch["name"] not in containers:
                raise Refused(422, f"no container {patch['name']}")
            requests = patch["resources"]["requests"]
            if not requests or not set(requests) <= {"cpu", "memory"}:
                raise Refused(422, f"a resize changes cpu and memory only: {requests}")
            for quantity in requests.values():
                if not _QUANTITY.match(quantity):
                    raise Refused(422, f"{quantity!r} is not a quantity")
            container = containers[patch["name"]]
            container.setdefault("resources", {}).setdefault("requests", {}).update(requests)

    def _check_event(self, body: Any) -> None:
        try:
            kubernetes_validate.validate(body, "1.35.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise Refused(422, f"Event: {exc.message} at {list(exc.path)}") from None
        for required in (
            "eventTime",
            "reportingController",
            "reportingInstance",
            "action",
            "reason",
            "type",
            "regarding",
        ):
            if not body.get(required):
                raise Refused(422, f"Event: {required} is required")
        if (body["apiVersion"], body["kind"]) != ("events.k8s.io/v1", "Event"):
            raise Refused(422, "not an events.k8s.io/v1 Event")
        metadata = body["metadata"]
        if not _DNS_SUBDOMAIN.match(metadata["name"]) or len(metadata["name"]) > 253:
            raise Refused(422, f"Event name {metadata['name']!r} is not a DNS subdomain")
        if metadata.get("namespace", self.namespace) != self.namespace:
            raise Refused(422, "the Event's namespace is not the URL's")
        _check_time(body["eventTime"], "eventTime")
        if body["type"] not in ("Normal", "Warning"):
            raise Refused(422, f"type {body['type']}")
        for key, limit in (("reason", 128), ("action", 128), ("reportingInstance", 128)):
            if len(body[key]) > limit:
                raise Refused(422, f"{key} is longer than {limit}")
        if len(body.get("note", "").encode()) > 1024:
            raise Refused(422, "note: must have at most 1024 bytes")
        prefix, _, controller = body["reportingController"].rpartition("/")
        if not _LABEL_NAME.match(controller) or (prefix and not _DNS_SUBDOMAIN.match(prefix)):
            raise Refused(422, "reportingController is not a qualified name")
        regarding = body["regarding"]
        containers = {c["name"] for c in self.pod["spec"]["containers"]}
        field_path = re.fullmatch(r"spec\.containers\{(.+)\}", regarding.get("fieldPath", ""))
        if (
            regarding.get("apiVersion") != "v1"
            or regarding.get("kind") != "Pod"
            or regarding.get("name") != self.name
            or regarding.get("namespace") != self.namespace
            or regarding.get("uid") != self.pod["metadata"]["uid"]
            or field_path is None
            or field_path.group(1) not in containers
        ):
            raise Refused(422, f"regarding does not name a container of this pod: {regarding}")
        if "series" in body:
            self._check_series(body["series"], 1)

    def _check_series_patch(self, event: dict[str, Any], body: Any) -> None:
        if not isinstance(body, dict) or set(body) != {"series"}:
            raise Refused(
                422, f"an Event patch touches its series only (the rest is immutable): {body}"
            )
        self._check_series(body["series"], event.get("series", {}).get("count", 1))

    def _check_series(self, series: Any, count_before: int) -> None:
        if set(series) != {"count", "lastObservedTime"}:
            raise Refused(422, f"series has count and lastObservedTime: {series}")
        if not isinstance(series["count"], int) or series["count"] < max(2, count_before + 1):
            raise Refused(422, f"series count {series['count']} after {count_before}")
        _check_time(series["lastObservedTime"], "series.lastObservedTime")


def _expect(content_type: str | None, wanted: str) -> None:
    if (content_type or "").split(";")[0].strip() != wanted:
        raise Refused(415, f"content type {content_type}, not {wanted}")


def _check_label(key: str, value: Any) -> None:
    prefix, _, name = key.rpartition("/")
    if (
        len(name) > 63
        or not _LABEL_NAME.match(name)
        or (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)))
    ):
        raise Refused(422, f"label key {key!r} is invalid")
    if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
        raise Refused(422, f"label value {value!r} is invalid")


def _check_time(value: Any, where: str) -> None:
    if not isinstance(value, str) or not _MICRO_TIME.match(value):
        raise Refused(422, f"{where} {value!r} is not a MicroTime (RFC 3339, 6 fraction digits)")


def _status(code: int, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "code": code,
    }
