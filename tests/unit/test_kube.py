"""The sidecar's labels, Events and resizes, against a fake API server.

The reporter is fed the reports a real lifecycle emits (as test_metrics.py
does), or a real PodDriver's (fakepod.py); what reaches the fake API server
(fakeapi.py: HTTPS, a ServiceAccount token, every request checked against
deploy/base/rbac.yaml and for its shape) is what is asserted. No real API
server runs here: what a kubelet does with a resize, and how a real API
server's admission and validation answer, are not tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import uvloop

from activator import annotations as a
from activator import certs
from activator import events as e
from activator.config import PodConfig
from activator.criu import CriuError, log_tail
from activator.kube import status as st
from activator.kube.api import KubeApi
from activator.kube.reporter import KubeReporter
from activator.lifecycle import Phase
from activator.pod import PodDriver
from tests.unit.reporting import Clock, Pod, Recorder, feed

from .fakeapi import FakeApiServer, allowed, sidecar_rules
from .fakepod import FakeCriu, FakeSandbox, free_port, get, until

NAME, NAMESPACE, UID = "shop-7d9f8b6c4-x2x9q", "shop", "0f6c2b1e-8c1d-4f0e-9a5b-3c2d1e0f9a8b"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.the-sidecar"
LABEL = "phase.pod-activator.dev/web"


def pod_json(**annotations: str) -> dict[str, Any]:
    """The pod as the API server returns it, after injection (trimmed)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": NAME,
            "namespace": NAMESPACE,
            "uid": UID,
            "labels": {"app": "shop", "pod-activator.dev/inject": "enabled"},
            "annotations": {a.PORTS_MAP: "web=8080", **annotations},
        },
        "spec": {
            "shareProcessNamespace": True,
            "initContainers": [
                {
                    "name": "pod-activator",
                    "image": "pod-activator:0.1.0",
                    "restartPolicy": "Always",
                    "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}},
                }
            ],
            "containers": [
                {
                    "name": "web",
                    "image": "shop:1",
                    "resources": {
                        "requests": {"cpu": "500m", "memory": "256Mi"},
                        "limits": {"memory": "512Mi"},
                    },
                },
                {
                    "name": "db",
                    "image": "mariadb:11",
                    "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}},
                },
            ],
        },
        "status": {"phase": "Running", "qosClass": "Burstable"},
    }


RESIZING = {a.RESIZE_WHEN_SCALED_DOWN: "true"}


def boot(reporter: KubeReporter, pod: Pod) -> None:
    feed(reporter, pod, e.Boot(0))
    feed(reporter, pod, e.AppStarted(1))


def scale_down(reporter: KubeReporter, pod: Pod, at: float = 11) -> None:
    feed(reporter, pod, e.IdleTimerFired(at))
    feed(reporter, pod, e.CheckpointDone(at + 0.2, duration_ms=120.0, image_bytes=10_000_000))


def wake(reporter: KubeReporter, pod: Pod, at: float = 20, conn: int = 1) -> None:
    feed(reporter, pod, e.ConnectionOpened(at, conn=conn, port=8080))
    feed(reporter, pod, e.RestoreDone(at + 0.05, duration_ms=50.0))
    feed(reporter, pod, e.ConnectionClosed(at + 0.1, conn=conn))


def criu_failure(tmp_path: Path, op: str, lines: int = 8) -> str:
    """A CriuError's message as criu.py makes it: the error and its log's tail."""
    log = tmp_path / f"{op}.log"
    log.write_text(
        "".join(f"({i:.6f}) pie: {i}: restoring the app's memory\n" for i in range(lines))
        + f"({lines}.0) Error (criu/{op}.c:2112): the last words of CRIU\n"
    )
    return f"criu {op} failed: {CriuError('(00.012345) error')}{log_tail(log)}"


# -- the fake API server and the reporter's connection to it ------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    certs.write(certs.make(["localhost"]), directory)
    return directory


@pytest.fixture
def account(tmp_path: Path, tls: Path) -> Path:
    """The ServiceAccount's files, as the kubelet mounts them."""
    directory = tmp_path / "serviceaccount"
    directory.mkdir()
    (directory / "token").write_text(TOKEN)
    (directory / "namespace").write_text(NAMESPACE)
    (directory / "ca.crt").write_bytes((tls / "ca.crt").read_bytes())
    return directory


@dataclass
class Setup:
    tls: Path
    account: Path
    monkeypatch: pytest.MonkeyPatch


@pytest.fixture
def setup(tls: Path, account: Path, monkeypatch: pytest.MonkeyPatch) -> Setup:
    return Setup(tls, account, monkeypatch)


@contextlib.asynccontextmanager
async def api_server(setup: Setup, pod: dict[str, Any]) -> AsyncIterator[FakeApiServer]:
    """The fake API server where the ServiceAccount's environment points."""
    server = FakeApiServer(pod, setup.tls, TOKEN)
    await server.start()
    setup.monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "localhost")
    setup.monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
    try:
        yield server
    finally:
        await server.close()
    assert server.violations == []


def reporter(
    setup: Setup, then: Any = None, clock: Callable[[], float] | None = None
) -> KubeReporter:
    return KubeReporter(
        st.PodRef(NAME, NAMESPACE),
        then,
        connect=lambda: KubeApi.in_cluster(NAME, NAMESPACE, service_account=setup.account),
        clock=clock or Clock(),
        settle=0,
    )


def run(main: Callable[[], Any]) -> None:
    asyncio.run(main())


# -- labels ------------------------------------------------------------------------


def test_the_phase_label_follows_the_container(setup: Setup) -> None:
    async def main() -> None:
        async with api_server(setup, pod_json()) as server:
            then = Recorder()
            kube, pod = reporter(setup, then), Pod("web")
            boot(kube, pod)
            await server.until(lambda: server.labels.get(LABEL) == "running")
            scale_down(kube, pod)
            await server.until(lambda: server.labels.get(LABEL) == "scaled-down")
            wake(kube, pod)
            await kube.close()
            assert server.labels[LABEL] == "running"
            # The pod's own labels are left alone (a merge patch).
            assert server.labels["app"] == "shop"
            for patch in server.made("patch", "pods"):
                assert patch.content_type == "application/merge-patch+json"
                assert set(patch.body["metadata"]) == {"labels"}
            # Reports pass on, all of them, in order.
            assert then.reports == [
                "starting",
                "running",
                "checkpointing",
                "scaled-down",
                "restoring",
                "running",
            ]
            # No resize unless the pod asks for it.
            assert server.made("patch", "pods/resize") == []

    run(main)


def test_a_burst_of_changes_is_one_patch_with_the_latest(setup: Setup) -> None:
    async def main() -> None:
        async with api_server(setup, pod_json()) as server:
            kube, web, db = reporter(setup), Pod("web"), Pod("db")
            boot(kube, web)
            boot(kube, db)
            scale_down(kube, web)
            await kube.close()
            (patch,) = server.made("patch", "pods")
            assert patch.body == {
                "metadata": {
                    "labels": {LABEL: "scaled-down", "phase.pod-activator.dev/db": "running"}
                }
            }

    run(main)


def test_the_settle_delay_gathers_changes_that_come_apart() -> None:
    async def main() -> None:
        sent: list[dict[str, Any]] = []

        class Api:
            async def get_pod(self) -> dict[str, Any]:
                return pod_json()

            async def patch_pod(self, patch: dict[str, Any]) -> None:
                sent.append(patch)

            async def create_event(self, body: dict[str, Any]) -> None:
                pass

            async def close(self) -> None:
                pass

        kube = KubeReporter(st.PodRef(NAME, NAMESPACE), connect=Api, settle=0.2)  # type: ignore[arg-type]
        pod = Pod("web")
        feed(kube, pod, e.Boot(0))
        await asyncio.sleep(0.05)  # within the settle delay: joins the same patch
        feed(kube, pod, e.AppStarted(1))
        await kube.close()
        assert sent == [{"metadata": {"labels": {LABEL: "running"}}}]

    run(main)


# -- events ------------------------------------------------------------------------


def events_by_reason(server: FakeApiServer) -> dict[str, dict[str, Any]]:
    return {event["reason"]: event for event in server.events.values()}


def test_scaled_down_and_woken_are_events_regarding_the_container(setup: Setup) -> None:
    async def main() -> None:
        async with api_server(setup, pod_json()) as server:
            kube, pod = reporter(setup), Pod("web")
            boot(kube, pod)  # a cold start is no Woken event
            scale_down(kube, pod)
            wake(kube, pod)
            await kube.close()
            events = events_by_reason(server)
            assert set(events) == {"ScaledDown", "Woken"}
            scaled_down = events["ScaledDown"]
            assert scaled_down["type"] == "Normal"
            assert scaled_down["action"] == "Checkpoint"
            assert scaled_down["regarding"] == {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": NAME,
                "namespace": NAMESPACE,
                "uid": UID,
                "fieldPath": "spec.containers{web}",
            }
            assert scaled_down["reportingController"] == "pod-activator.dev/sidecar"
            assert scaled_down["reportingInstance"] == NAME
            assert scaled_down["eventTime"] == "2027-01-15T08:00:00.000001Z"
            assert "series" not in scaled_down
            assert re.fullmatch(re.escape(NAME) + r"\.[0-9a-f]+", scaled_down["metadata"]["name"])
            assert events["Woken"]["action"] == "Restore"
            assert "restored" in events["Woken"]["note"]

    run(main)


def test_failures_are_warnings_with_the_tail_of_criu_s_log(setup: Setup, tmp_path: Path) -> None:
    async def main() -> None:
        async with api_server(setup, pod_json()) as server:
            kube, pod = reporter(setup), Pod("web")
            boot(kube, pod)
            feed(kube, pod, e.IdleTimerFired(11))
            feed(kube, pod, e.CheckpointFailed(12, criu_failure(tmp_path, "dump")))
            scale_down(kube, pod, at=40)
            feed(kube, pod, e.ConnectionOpened(50, conn=1, port=8080))
            # A long log: the note keeps its first line and the end, in 1 KiB.
            feed(kube, pod, e.RestoreFailed(51, criu_failure(tmp_path, "restore", lines=200)))
            await kube.close()
            events = events_by_reason(server)
            checkpoint = events["CheckpointFailed"]
            assert checkpoint["type"] == "Warning"
            assert checkpoint["action"] == "Checkpoint"
            assert checkpoint["note"].startswith("container web: checkpoint failed")
            assert "criu dump failed" in checkpoint["note"]
            assert checkpoint["note"].endswith("Error (criu/dump.c:2112): the last words of CRIU")
            restore = events["RestoreFailed"]
            assert restore["type"] == "Warning"
            assert restore["action"] == "Restore"
            assert len(restore["note"].encode()) <= 1024
            assert restore["note"].startswith("container web: restore failed")
            assert restore["note"].endswith("Error (criu/restore.c:2112): the last words of CRIU")

    run(main)


def test_a_repeated_event_is_a_series_until_it_rests(setup: Setup) -> None:
    async def main() -> None:
        async with api_server(setup, pod_json()) as server:
            clock = Clock()
            kube, pod = reporter(setup, clock=clock), Pod("web")
            boot(kube, pod)
            for cycle in range(3):
                clock.now += 60
                scale_down(kube, pod, at=100 * cycle + 11)
                wake(kube, pod, at=100 * cycle + 20)
                await kube.close()
            assert len(server.made("create", "events")) == 2  # ScaledDown and Woken
            assert [r.body for r in server.made("patch", "events")][-2:] == [
                {"series": {"count": 3, "lastObservedTime": "2027-01-15T08:03:00.000001Z"}}
            ] * 2
            # Over the series window later: a new Event.
            clock.now += st.SERIES_WINDOW + 1
            scale_down(kube, pod, at=1000)
            await kube.close()
            assert len(server.made("create", "events")) == 3
            scaled_down = [v for v in server.events.values() if v["reason"] == "ScaledDown"]
            assert sorted(v.get("series", {}).get("count", 1) for v in scaled_down) == [1, 3]

    run(main)


def test_an_expired_event_starts_a_new_one(setup: Setup) -> None:
    async def main() -> None:
        async with api_server(setup, pod_json()) as server:
            kube, pod = reporter(setup), Pod("web")
            boot(kube, pod)
            scale_down(kube, pod)
            await kube.close()
            server.events.clear()  # the API server's TTL (1 h by default)
            wake(kube, pod)
            scale_down(kube, pod, at=40)
            await kube.close()
            assert [r.status for r in server.made("patch", "events")] == [404]
            assert {v["reason"] for v in server.events.values()} == {"ScaledDown", "Woken"}
            assert all("series" not in v for v in server.events.values())

    run(main)


# -- in-place resize -----------------------------------------------------------------


def test_requests_go_down_while_scaled_down_and_back_on_wake(setup: Setup) -> None:
    async def main() -> None:
        async with api_server(setup, pod_json(**RESIZING)) as server:
            kube, pod = reporter(setup), Pod("web")
            boot(kube, pod)
            scale_down(kube, pod)
            await kube.close()
            # The floor: cpu 1m; memory unchanged (see ResizeFloor); db untouched.
            assert server.requests_of("web") == {"cpu": "1m", "memory": "256Mi"}
            assert server.requests_of("db") == {"cpu": "250m", "memory": "1Gi"}
            (down,) = server.made("patch", "pods/resize")
            assert down.content_type == "application/strategic-merge-patch+json"
            assert down.body == {
                "spec": {"containers": [{"name": "web", "resources": {"requests": {"cpu": "1m"}}}]}
            }
            # The originals were on record before the requests went down.
            order = [(r.verb, r.resource) for r in server.requests]
            recorded = next(
                i
                for i, r in enumerate(server.requests)
                if r.body and st.SAVED_REQUESTS in r.body["metadata"].get("annotations", {})
            )
            assert recorded < order.index(("patch", "pods/resize"))
            assert json.loads(server.annotations[st.SAVED_REQUESTS]) == {"web": {"cpu": "500m"}}

            first = len(server.requests)
            wake(kube, pod)
            await kube.close()
            assert server.requests_of("web") == {"cpu": "500m", "memory": "256Mi"}
            assert st.SAVED_REQUESTS not in server.annotations
            # The requests go back first, before the labels and events.
            after = server.requests[first:]
            assert (after[0].verb, after[0].resource) == ("patch", "pods/resize")
            assert after[0].body["spec"]["containers"][0]["resources"]["requests"] == {
                "cpu": "500m"
            }

    run(main)


def test_a_wake_right_after_the_checkpoint_leaves_the_requests_alone(setup: Setup) -> None:
    async def main() -> None:
        async with api_server(setup, pod_json(**RESIZING)) as server:
            kube, pod = reporter(setup), Pod("web")
            boot(kube, pod)
            scale_down(kube, pod)
            wake(kube, pod)  # before the background task ran
            await kube.close()
            assert server.made("patch", "pods/resize") == []
            assert server.requests_of("web") == {"cpu": "500m", "memory": "256Mi"}

    run(main)


def test_a_restarted_sidecar_puts_the_requests_back(setup: Setup) -> None:
    async def main() -> None:
        pod = pod_json(**RESIZING, **{st.SAVED_REQUESTS: '{"web":{"cpu":"500m"}}'})
        pod["spec"]["containers"][0]["resources"]["requests"]["cpu"] = "1m"
        async with api_server(setup, pod) as server:
            kube = reporter(setup)
            boot(kube, Pod("web"))
            await kube.close()
            assert server.requests_of("web") == {"cpu": "500m", "memory": "256Mi"}
            assert st.SAVED_REQUESTS not in server.annotations

    run(main)


def test_requests_that_cannot_go_down_are_left(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        pod = pod_json(**RESIZING)
        pod["spec"]["containers"][0]["resizePolicy"] = [
            {"resourceName": "cpu", "restartPolicy": "RestartContainer"}
        ]
        async with api_server(setup, pod) as server:
            kube, web = reporter(setup), Pod("web")
            boot(kube, web)
            scale_down(kube, web)
            await kube.close()
            assert server.made("patch", "pods/resize") == []
            assert st.SAVED_REQUESTS not in server.annotations

    caplog.set_level(logging.INFO, "activator.kube")
    run(main)
    assert "requests not lowered while scaled down: nothing to lower: kept cpu" in caplog.text


def test_a_refused_resize_is_logged_and_the_record_written_off(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with api_server(setup, pod_json(**RESIZING)) as server:
            server.fail[("patch", "pods/resize")] = 404  # a cluster before 1.33
            kube, pod = reporter(setup), Pod("web")
            boot(kube, pod)
            scale_down(kube, pod)
            await kube.close()  # the round after the refusal writes the record off
            assert st.SAVED_REQUESTS not in server.annotations
            assert server.labels[LABEL] == "scaled-down"

    run(main)
    assert "no pods/resize here (Kubernetes before 1.33)" in caplog.text


# -- without an API server -----------------------------------------------------------


def test_api_server_down_costs_the_lifecycle_nothing(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        setup.monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "localhost")
        setup.monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(free_port()))  # nobody there
        then = Recorder()
        kube, pod = reporter(setup, then), Pod("web")
        boot(kube, pod)
        scale_down(kube, pod)
        wake(kube, pod)
        await kube.close()
        assert then.reports[-1] == "running"
        assert pod.lifecycle.phase is Phase.RUNNING

    caplog.set_level(logging.WARNING)
    run(main)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings
    assert "cannot reach the API server at https://localhost:" in caplog.text
    assert "the activator goes on without it" in caplog.text
    # One warning per kind of call while it lasts, not one per request.
    assert len(warnings) <= 3


def test_forbidden_says_which_role_to_bind(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with api_server(setup, pod_json()) as server:
            server.fail[("patch", "pods")] = 403
            kube, pod = reporter(setup), Pod("web")
            boot(kube, pod)
            await kube.close()

    run(main)
    assert "bind the ClusterRole pod-activator-sidecar" in caplog.text


def test_outside_a_pod_reports_only_pass_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        monkeypatch.delenv("POD_NAME", raising=False)
        then = Recorder()
        kube, pod = KubeReporter.from_env(then), Pod("web")
        boot(kube, pod)
        await kube.close()
        assert then.reports == ["starting", "running"]

    run(main)
    assert caplog.text.count("POD_NAME and POD_NAMESPACE are not set") == 1


def test_no_service_account_token(
    setup: Setup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        kube = KubeReporter(
            st.PodRef(NAME, NAMESPACE),
            connect=lambda: KubeApi.in_cluster(NAME, NAMESPACE, service_account=tmp_path / "none"),
        )
        boot(kube, Pod("web"))
        await kube.close()

    run(main)
    assert "automountServiceAccountToken" in caplog.text


# -- a real pod driver -----------------------------------------------------------------


def test_a_pod_driver_s_reports(setup: Setup, tmp_path: Path) -> None:
    """The fakes of fakepod.py: a real app on loopback, checkpointed and woken."""

    async def main() -> None:
        async with api_server(setup, pod_json(**RESIZING)) as server:
            port = free_port()
            kube = reporter(setup)
            config = PodConfig(
                name="web", ports=(port,), command=("sampleapp", str(port)), scaledown_after=0.3
            )
            driver = PodDriver(
                config, FakeSandbox(), FakeCriu("sampleapp", port), tmp_path / "web", kube
            )  # type: ignore[arg-type]
            await driver.start()
            try:
                await until(lambda: driver.lifecycle.phase is Phase.SCALED_DOWN)
                await server.until(lambda: server.requests_of("web").get("cpu") == "1m")
                answer = await get(driver.listeners[0].shadow_port)
                assert answer.startswith(b"HTTP/1.1 200 OK")
                await server.until(lambda: server.requests_of("web").get("cpu") == "500m")
                await server.until(lambda: server.labels.get(LABEL) == "running")
            finally:
                driver.stop()
                await asyncio.wait_for(driver.stopped.wait(), 30)
                await kube.close()
            assert server.labels[LABEL] == "stopped"
            assert {"ScaledDown", "Woken"} <= set(events_by_reason(server))

    uvloop.run(main())


# -- RBAC: what the sidecar does is what the Role allows, and no more -----------------------


def test_every_rule_of_the_role_is_used(setup: Setup, tmp_path: Path) -> None:
    """Least privilege: a cycle with resizing uses each verb the Role grants."""
    used: set[tuple[str, str, str]] = set()

    async def main() -> None:
        async with api_server(setup, pod_json(**RESIZING)) as server:
            clock = Clock()
            kube, pod = reporter(setup, clock=clock), Pod("web")
            boot(kube, pod)
            for cycle in range(2):
                scale_down(kube, pod, at=100 * cycle + 11)
                await kube.close()
                wake(kube, pod, at=100 * cycle + 20)
                await kube.close()
            used.update((r.verb, r.group, r.resource) for r in server.requests)

    run(main)
    granted = {
        (verb, group, resource)
        for rule in sidecar_rules()
        for verb in rule["verbs"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert used == granted


def test_the_rbac_check_refuses_what_the_role_does_not_grant() -> None:
    rules = sidecar_rules()
    assert allowed(rules, "patch", "", "pods/resize", NAME)
    assert allowed(rules, "create", "events.k8s.io", "events", "")
    assert not allowed(rules, "create", "", "events", "")  # core Events: not ours
    assert not allowed(rules, "update", "", "pods", NAME)
    assert not allowed(rules, "patch", "", "pods/status", NAME)
    assert not allowed(rules, "list", "", "pods", "")


# -- the pure part ----------------------------------------------------------------------


def test_label_keys_and_values_follow_kubernetes_rules() -> None:
    assert st.phase_label("web") == "phase.pod-activator.dev/web"
    assert st.phase_label("a" * 63) == "phase.pod-activator.dev/" + "a" * 63
    for bad in ("a" * 64, "-web", "web app", ""):
        with pytest.raises(st.KubeStatusError, match="cannot name a label"):
            st.phase_label(bad)
    for phase in Phase:
        st.metadata_patch({LABEL: phase.value}, None)  # every phase is a valid value
    with pytest.raises(st.KubeStatusError):
        st.metadata_patch({LABEL: "not a value"}, None)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1m", "0.001"), ("500m", "0.5"), ("2", "2"), ("1.5", "1.5"), ("64Mi", "67108864"),
     ("1G", "1000000000"), ("1e3", "1000"), ("1E3", "1000"), ("100u", "0.0001")],
)  # fmt: skip
def test_quantities(text: str, value: str) -> None:
    from decimal import Decimal

    assert st.parse_quantity(text) == Decimal(value)


def test_a_bad_quantity_is_named() -> None:
    with pytest.raises(st.KubeStatusError, match="'lots' is not a Kubernetes quantity"):
        st.parse_quantity("lots")


def test_micro_time_always_has_six_digits() -> None:
    assert st.micro_time(1_800_000_000.0) == "2027-01-15T08:00:00.000001Z"
    assert st.micro_time(1_800_000_000.25) == "2027-01-15T08:00:00.250000Z"


def test_clip_note_keeps_the_first_line_and_the_end() -> None:
    text = "checkpoint failed: criu said\n" + "".join(f"line {i}\n" for i in range(500)) + "é" * 3
    note = st.clip_note(text)
    assert len(note.encode()) <= st.NOTE_LIMIT
    assert note.startswith("checkpoint failed: criu said\n  [...]\n")
    assert note.endswith("line 499\néé" + "é")
    assert st.clip_note("short") == "short"


def pod_facts(**changes: Any) -> st.PodFacts:
    pod = pod_json()
    for container in pod["spec"]["containers"]:
        container.update(changes.get(container["name"], {}))
    if "qos" in changes:
        pod["status"]["qosClass"] = changes["qos"]
    return st.pod_facts(pod)


@pytest.mark.parametrize(
    ("facts", "floor", "expected"),
    [
        (pod_facts(), st.ResizeFloor(), st.Lowering("web", {"cpu": "500m"}, {"cpu": "1m"})),
        (
            pod_facts(),
            st.ResizeFloor(memory="32Mi"),
            st.Lowering("web", {"cpu": "500m", "memory": "256Mi"}, {"cpu": "1m", "memory": "32Mi"}),
        ),
        (pod_facts(qos="Guaranteed"), st.ResizeFloor(), "QoS class is Guaranteed"),
        (pod_facts(web={"resources": {}}), st.ResizeFloor(), "nothing to lower"),
        (
            pod_facts(web={"resources": {"requests": {"cpu": "1m"}}}),
            st.ResizeFloor(),
            "nothing to lower",
        ),
    ],
)
def test_plan_lowering(facts: st.PodFacts, floor: st.ResizeFloor, expected: Any) -> None:
    plan = st.plan_lowering(facts, "web", floor)
    if isinstance(expected, str):
        assert isinstance(plan, str) and expected in plan
    else:
        assert plan == expected
    assert st.plan_lowering(facts, "nginx", floor) == "the pod has no container nginx"


def test_a_damaged_record_of_requests_is_reported() -> None:
    facts = st.pod_facts(pod_json(**{st.SAVED_REQUESTS: "{not json"}))
    assert facts.saved == {}
    assert "requests lowered by an earlier sidecar are not put back" in facts.problems[0]


def test_the_event_body_is_a_valid_events_k8s_io_v1_event() -> None:
    spec = st.EventSpec("web", "Warning", "RestoreFailed", "Restore", "x" * 5000)
    body = st.event_body(
        spec, st.PodRef(NAME, NAMESPACE, UID), "n.1", "i" * 300, 1.0, series=(2, 2.0)
    )
    kubernetes_validate.validate(copy.deepcopy(body), "1.35.0", strict=True)
    assert len(body["note"].encode()) <= 1024
    assert len(body["reportingInstance"]) == 128
    assert body["series"] == {"count": 2, "lastObservedTime": "1970-01-01T00:00:02.000001Z"}


def test_resize_patch_names_only_cpu_and_memory() -> None:
    with pytest.raises(st.KubeStatusError, match="not ephemeral-storage"):
        st.resize_patch("web", {"ephemeral-storage": "1Gi"})


def test_no_lightkube_for_local_pods() -> None:
    """`activator run` never loads the Kubernetes client (nor this package)."""
    import subprocess
    import sys

    code = (
        "import sys, activator.runtime, activator.cli, activator.pod, activator.metrics;"
        "print(any(m.split('.')[0] in ('lightkube', 'httpx2') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
