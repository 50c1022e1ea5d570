"""The webhook over real TLS, fed the AdmissionReviews the API server sends.

tests/unit/data holds AdmissionReview requests for the article's WordPress
pod (made by the `php` Deployment's ReplicaSet: generateName, no name yet)
and MySQL pod (mysql-0 of the StatefulSet), written in the shape the API
server sends after its defaulting and its ServiceAccount and toleration
plugins (no cluster runs here, so they are not captured from one), and the
pods they must become. The JSONPatch is applied with the `jsonpatch`
library, an implementation that is not ours.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import os
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import h11
import jsonpatch
import pytest

from activator import annotations as a
from activator import certs, webhook
from activator import inject as inj
from activator.inject import Options

DATA = Path(__file__).parent / "data"
SERVICE = "pod-activator-webhook.pod-activator.svc"
OPTIONS = Options(image="pod-activator:0.1.0")


def review(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DATA / f"admission-{name}-pod.json").read_text())
    return loaded


def expected(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DATA / f"admission-{name}-pod.injected.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a serving certificate for the webhook's Service name, made here."""
    directory = tmp_path_factory.mktemp("tls")
    certs.write(
        certs.make(certs.service_dns_names("pod-activator-webhook", "pod-activator")), directory
    )
    return directory


def client_context(tls: Path) -> ssl.SSLContext:
    """As the API server checks the webhook: against caBundle, by the Service's DNS name."""
    context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    context.set_alpn_protocols(["h2", "http/1.1"])  # the API server's Go client offers both
    return context


class Client:
    """An HTTP/1.1 client over one TLS connection (h11), reused for every request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = [("host", SERVICE), ("content-length", str(len(body)))]
        if body:
            headers.append(("content-type", "application/json"))
        self.writer.write(self.conn.send(h11.Request(method=method, target=path, headers=headers)))
        self.writer.write(self.conn.send(h11.Data(data=body)))
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()
        status, payload = 0, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await asyncio.wait_for(self.reader.read(65536), 10))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                payload += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, payload
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed")

    async def admit(self, body: dict[str, Any]) -> dict[str, Any]:
        status, payload = await self.request(
            "POST", "/mutate?timeout=5s", json.dumps(body).encode()
        )
        assert status == 200, payload
        answer: dict[str, Any] = json.loads(payload)
        return answer


@contextlib.asynccontextmanager
async def serving(tls: Path, options: Options = OPTIONS) -> AsyncIterator[tuple[Client, int]]:
    server = webhook.WebhookServer(
        options, webhook.server_context(tls / "tls.crt", tls / "tls.key")
    )
    await server.start("127.0.0.1", 0)
    try:
        client = await connect(tls, server.port)
        try:
            yield client, server.port
        finally:
            client.writer.close()
    finally:
        await server.close()


async def connect(tls: Path, port: int) -> Client:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context(tls), server_hostname=SERVICE
    )
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    return Client(reader, writer)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


def patched(request: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """The pod as the API server stores it: the request's, with the patch applied."""
    response = answer["response"]
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert response["uid"] == request["request"]["uid"]
    assert response["allowed"] is True
    if "patch" not in response:
        return copy.deepcopy(request["request"]["object"])
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    result: dict[str, Any] = jsonpatch.apply_patch(request["request"]["object"], ops)
    return result


# -- the article's pods ---------------------------------------------------------


@pytest.mark.parametrize("name", ["wordpress", "mysql"])
def test_the_articles_pods_become_managed_pods(tls: Path, name: str) -> None:
    async def test() -> None:
        async with serving(tls) as (client, _):
            request = review(name)
            answer = await client.admit(request)
            pod = patched(request, answer)
            assert pod == expected(name)
            # the same transformation as `activator inject` (and test_inject
            # checks that `activator inject` gives these very files)
            assert pod == inj.inject(request["request"]["object"], OPTIONS).manifest
            assert "warnings" not in answer["response"]

    run(test)


def test_the_patch_says_field_by_field_what_changed(tls: Path) -> None:
    async def test() -> None:
        async with serving(tls) as (client, _):
            answer = await client.admit(review("wordpress"))
        ops = json.loads(base64.b64decode(answer["response"]["patch"]))
        assert [(op["op"], op["path"]) for op in ops] == [
            ("replace", "/spec/volumes"),
            ("replace", "/spec/initContainers"),
            ("replace", "/spec/containers"),
            ("add", "/spec/shareProcessNamespace"),
        ]

    run(test)


def test_many_reviews_on_one_connection(tls: Path) -> None:
    """The API server keeps its connection to the webhook and reuses it."""

    async def test() -> None:
        async with serving(tls) as (client, _):
            for name in ["wordpress", "mysql"] * 3:
                request = review(name)
                assert patched(request, await client.admit(request)) == expected(name)
            assert await client.request("GET", "/healthz") == (200, b"ok\n")

    run(test)


# -- admitted unchanged, and why ------------------------------------------------


def test_a_pod_without_command_is_admitted_unchanged_with_the_fix(tls: Path) -> None:
    async def test() -> None:
        request = review("wordpress")
        container = request["request"]["object"]["spec"]["containers"][0]
        del container["command"], container["args"]
        async with serving(tls) as (client, _):
            answer = await client.admit(request)
        pod = patched(request, answer)
        reason = pod["metadata"]["annotations"].pop(inj.SKIPPED)
        assert pod == request["request"]["object"]  # nothing else changed
        assert "spec.containers[wordpress].command: is not set" in reason
        (warning,) = answer["response"]["warnings"]
        assert warning.startswith("pod/php-5d8f7c9b6d-: not injected, left unchanged: ")
        assert "spec.containers[wordpress].command" in warning
        assert "set command: (and args:) in the pod spec" in warning
        ops = json.loads(base64.b64decode(answer["response"]["patch"]))
        assert ops == [
            {
                "op": "add",
                "path": "/metadata/annotations/pod-activator.dev~1injection-skipped",
                "value": reason,
            }
        ]

    run(test)


def test_malformed_annotations_are_admitted_unchanged_each_named_with_its_fix(tls: Path) -> None:
    async def test() -> None:
        request = review("mysql")
        annotations = request["request"]["object"]["metadata"]["annotations"]
        annotations[a.PORTS_MAP] = "mysql=33o6"
        annotations[a.DISABLE_PROBE_DETECTION] = "yes"
        async with serving(tls) as (client, _):
            answer = await client.admit(request)
        pod = patched(request, answer)
        reason = pod["metadata"]["annotations"].pop(inj.SKIPPED)
        assert pod == request["request"]["object"]
        ports, probes = answer["response"]["warnings"]
        assert f"{a.PORTS_MAP}: '33o6' is not a TCP port; give a number from 1 to 65535" in ports
        assert f"{a.DISABLE_PROBE_DETECTION}: 'yes' is not a boolean; write \"true\"" in probes
        assert a.PORTS_MAP in reason and a.DISABLE_PROBE_DETECTION in reason

    run(test)


def test_an_injected_pod_is_not_touched_again(tls: Path) -> None:
    async def test() -> None:
        request = review("mysql")
        request["request"]["object"] = expected("mysql")
        async with serving(tls) as (client, _):
            answer = await client.admit(request)
        assert answer["response"] == {"uid": request["request"]["uid"], "allowed": True}

    run(test)


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.update(operation="UPDATE"),
        lambda r: r.update(kind={"group": "apps", "version": "v1", "kind": "Deployment"}),
        lambda r: r.update(subResource="ephemeralcontainers"),
        lambda r: r["object"]["metadata"].update(annotations={}),
    ],
)
def test_what_is_not_a_pod_creation_asking_for_it_is_allowed_as_is(
    tls: Path, change: Callable[[dict[str, Any]], None]
) -> None:
    async def test() -> None:
        request = review("wordpress")
        change(request["request"])
        async with serving(tls) as (client, _):
            answer = await client.admit(request)
        assert answer["response"] == {"uid": request["request"]["uid"], "allowed": True}

    run(test)


def test_an_internal_error_admits_the_pod_unchanged(
    tls: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(webhook, "inject", broken)

    async def test() -> None:
        request = review("wordpress")
        async with serving(tls) as (client, _):
            answer = await client.admit(request)
        assert answer["response"] == {
            "uid": request["request"]["uid"],
            "allowed": True,
            "warnings": ["pod-activator: internal error, pod admitted unchanged: a bug"],
        }

    run(test)


def test_what_is_no_admission_review_gets_an_http_error(tls: Path) -> None:
    """The API server then applies failurePolicy: Ignore and admits the pod."""

    async def test() -> None:
        async with serving(tls) as (client, _):
            status, body = await client.request("POST", "/mutate", b"{not json")
            assert status == 400
            status, body = await client.request("POST", "/mutate", b'{"kind": "Pod"}')
            assert (status, body) == (
                400,
                b"expected an AdmissionReview (admission.k8s.io/v1) with request.uid\n",
            )
            assert (await client.request("GET", "/mutate"))[0] == 405
            assert (await client.request("GET", "/"))[0] == 404
            # and the connection still serves
            request = review("mysql")
            assert patched(request, await client.admit(request)) == expected("mysql")

    run(test)


def test_a_body_too_large_is_refused(tls: Path) -> None:
    async def test() -> None:
        async with serving(tls) as (client, _):
            headers = [("host", SERVICE), ("content-length", str(webhook.MAX_BODY + 1))]
            client.writer.write(
                client.conn.send(h11.Request(method="POST", target="/mutate", headers=headers))
            )
            await client.writer.drain()
            while not isinstance(event := client.conn.next_event(), h11.Response):
                if event is h11.NEED_DATA:
                    client.conn.receive_data(await client.reader.read(65536))
            assert event.status_code == 413

    run(test)


def test_a_ca_bundle_from_another_ca_does_not_trust_it(tls: Path, tmp_path: Path) -> None:
    """A caBundle from another CA does not validate the webhook: real TLS."""
    certs.write(certs.make([SERVICE]), tmp_path)

    async def test() -> None:
        server = webhook.WebhookServer(
            OPTIONS, webhook.server_context(tls / "tls.crt", tls / "tls.key")
        )
        await server.start("127.0.0.1", 0)
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                await connect(tmp_path, server.port)
        finally:
            await server.close()

    run(test)


def test_renewed_certificates_are_used_for_new_connections(tls: Path, tmp_path: Path) -> None:
    """cert-manager renews the Secret; the webhook reads the files again."""
    certs.write(certs.make([SERVICE]), tmp_path)
    context = webhook.server_context(tmp_path / "tls.crt", tmp_path / "tls.key")

    async def test() -> None:
        server = webhook.WebhookServer(OPTIONS, context)
        await server.start("127.0.0.1", 0)
        reloader = asyncio.ensure_future(
            webhook.reload_certificates(
                context, tmp_path / "tls.crt", tmp_path / "tls.key", interval=0.05
            )
        )
        try:
            (await connect(tmp_path, server.port)).writer.close()
            renewed = tmp_path / "renewed"
            certs.write(certs.make([SERVICE]), renewed)
            for name in ("tls.key", "tls.crt"):
                os.replace(renewed / name, tmp_path / name)
            for _ in range(100):
                try:
                    (await connect(renewed, server.port)).writer.close()
                    break
                except ssl.SSLCertVerificationError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the renewed certificate was never served")
        finally:
            reloader.cancel()
            await server.close()

    run(test)


def test_webhook_cert_writes_a_usable_pair(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    webhook.add_parsers(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["webhook-cert", "--out", str(tmp_path / "certs")])
    assert args.run(args) == 0
    out = capsys.readouterr().out.strip()
    assert base64.b64decode(out) == (tmp_path / "certs/ca.crt").read_bytes()
    assert (tmp_path / "certs/tls.key").stat().st_mode & 0o777 == 0o600

    async def test() -> None:
        async with serving(tmp_path / "certs") as (client, _):
            assert await client.request("GET", "/healthz") == (200, b"ok\n")

    run(test)


def test_json_patch_escapes_keys_and_replaces_lists() -> None:
    src = {"a/b": 1, "c~d": [1, 2], "gone": True, "same": {"x": 1}}
    dst = {"a/b": 2, "c~d": [1, 2, 3], "new": None, "same": {"x": 1}}
    ops = webhook.json_patch(src, dst)
    assert ops == [
        {"op": "remove", "path": "/gone"},
        {"op": "replace", "path": "/a~1b", "value": 2},
        {"op": "replace", "path": "/c~0d", "value": [1, 2, 3]},
        {"op": "add", "path": "/new", "value": None},
    ]
    assert jsonpatch.apply_patch(src, ops) == dst
    assert webhook.json_patch({"x": 1}, {"x": True}) == [
        {"op": "replace", "path": "/x", "value": True}
    ]
