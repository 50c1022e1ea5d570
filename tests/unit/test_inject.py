"""Sidecar injection: the contract the sidecar is built to, and every way it declines."""

from __future__ import annotations

import argparse
import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from activator import annotations as a
from activator import inject as inj
from activator import manifests
from activator.inject import Options, Status, inject

DATA = Path(__file__).parent / "data"
ZEROPOD = {
    a.PORTS_MAP: "web=8080",
    a.CONTAINER_NAMES: "web",
    a.SCALEDOWN_DURATION: "10s",
}


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "p",
            "annotations": dict(ZEROPOD if annotations is None else annotations),
        },
        "spec": {
            "containers": [
                {
                    "name": "web",
                    "image": "web:1",
                    "command": ["python3", "-m", "http.server"],
                    "args": ["8080"],
                    "ports": [{"containerPort": 8080}],
                },
                {"name": "log", "image": "log:1"},
            ],
            **spec,
        },
    }


def template_of(kind: str, template: dict[str, Any]) -> dict[str, Any]:
    body = {"metadata": template["metadata"], "spec": template["spec"]}
    if kind == "CronJob":
        return {
            "apiVersion": "batch/v1",
            "kind": kind,
            "metadata": {"name": "x"},
            "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": body}}},
        }
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": "x"},
        "spec": {"template": body},
    }


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    path = inj._TEMPLATE_PATHS[manifest["kind"]]
    node: Any = manifest
    for key in path:
        node = node[key]
    spec: dict[str, Any] = node["spec"]
    return spec


def sidecar(spec: dict[str, Any]) -> dict[str, Any]:
    (found,) = [c for c in spec["initContainers"] if c["name"] == "pod-activator"]
    return dict(found)


# -- the contract ------------------------------------------------------------


# CRIU's capabilities that are not among the runtime's defaults.
BEYOND_DEFAULTS = (
    "CHECKPOINT_RESTORE,SYS_PTRACE,SYS_ADMIN,SYS_RESOURCE,NET_ADMIN,DAC_READ_SEARCH,SYS_TIME"
)


def test_the_injected_pod() -> None:
    result = inject(pod(), Options(image="pod-activator:9.9", metrics_port=9464))
    assert result.status is Status.INJECTED
    assert result.managed == ("web",)
    assert result.warnings == ()
    spec = result.manifest["spec"]
    assert spec["shareProcessNamespace"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["pod-activator"] == {"name": "pod-activator", "emptyDir": {}}
    items = volumes["pod-activator-podinfo"]["downwardAPI"]["items"]
    assert {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}} in items
    assert [i["path"] for i in items] == ["annotations", "labels", "name", "namespace"]

    web, log = spec["containers"]
    assert web["command"] == [
        "/pod-activator/bin/holder",
        "--name",
        "web",
        "--",
        "python3",
        "-m",
        "http.server",
        "8080",
    ]
    assert "args" not in web
    assert {"name": "pod-activator", "mountPath": "/pod-activator"} in web["volumeMounts"]
    # CRIU runs in the managed container, as the holder's child
    assert web["securityContext"] == {
        "capabilities": {"add": list(inj.CRIU_CAPABILITIES)},
        "seccompProfile": {"type": "Unconfined"},
        "appArmorProfile": {"type": "Unconfined"},
    }
    # ... and the holder takes from the app what only CRIU needs
    assert web["env"] == [{"name": "POD_ACTIVATOR_APP_DROP_CAPS", "value": BEYOND_DEFAULTS}]
    assert log == {"name": "log", "image": "log:1"}  # not managed: untouched

    side = sidecar(spec)
    assert spec["initContainers"][0] is side or spec["initContainers"][0] == side
    assert side["image"] == "pod-activator:9.9"
    assert side["restartPolicy"] == "Always"
    assert side["args"] == [
        "sidecar",
        "--podinfo",
        "/etc/pod-activator/podinfo",
        "--shared",
        "/pod-activator",
    ]
    assert {
        "name": "pod-activator-podinfo",
        "mountPath": "/etc/pod-activator/podinfo",
        "readOnly": True,
    } in side["volumeMounts"]
    assert {"name": "pod-activator", "mountPath": "/pod-activator"} in side["volumeMounts"]
    assert side["startupProbe"]["exec"]["command"] == ["test", "-x", "/pod-activator/bin/holder"]
    env = {
        v["name"]: v.get("value") or v["valueFrom"]["fieldRef"]["fieldPath"] for v in side["env"]
    }
    assert env == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_IP": "status.podIP",
        "POD_ACTIVATOR_METRICS_PORT": "9464",
    }
    assert side["ports"] == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
    security = side["securityContext"]
    assert "privileged" not in security
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["capabilities"]["add"] == ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]
    assert security["capabilities"]["add"] == list(inj.SIDECAR_CAPABILITIES)
    assert "imagePullPolicy" not in side


def test_the_input_is_never_modified() -> None:
    original = pod()
    before = copy.deepcopy(original)
    inject(original)
    assert original == before


def test_injecting_twice_changes_nothing() -> None:
    once = inject(pod()).manifest
    twice = inject(once)
    assert twice.status is Status.ALREADY
    assert twice.manifest == once
    assert twice.warnings == ()


def test_a_pod_without_the_annotations_is_left_alone() -> None:
    plain = pod(annotations={"team": "blue"})
    result = inject(plain)
    assert result.status is Status.NOT_ASKED
    assert result.manifest == plain


@pytest.mark.parametrize(
    "annotations",
    [
        {a.PORTS_MAP: "web=8080"},
        {a.CONTAINER_NAMES: "web"},
        {a.CONTAINER_NAMES: "web", a.DISABLE_PROBE_DETECTION: "true"},
        {a.CONTAINER_NAMES: "web", a.CLOSE_IDLE_AFTER: "5m"},
    ],
)
def test_zeropods_keys_or_ours_ask_for_it(annotations: dict[str, str]) -> None:
    assert inject(pod(annotations)).status is Status.INJECTED


@pytest.mark.parametrize(
    "kind", ["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"]
)
def test_workloads_get_it_in_their_pod_template(kind: str) -> None:
    bare = pod()
    manifest = template_of(kind, bare)
    result = inject(manifest, Options(image="i:1"))
    assert result.status is Status.INJECTED
    assert result.name == f"{kind.lower()}/x"
    assert pod_spec(result.manifest) == inject(bare, Options(image="i:1")).manifest["spec"]


def test_other_kinds_pass_through() -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {}}
    result = inject(service)
    assert result.status is Status.NO_POD
    assert result.manifest == service


def test_the_api_servers_token_mount_is_given_to_the_sidecar_too() -> None:
    token = {
        "name": "kube-api-access-abcde",
        "readOnly": True,
        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
    }
    p = pod()
    p["spec"]["containers"][0]["volumeMounts"] = [token]
    side = sidecar(inject(p).manifest["spec"])
    assert token in side["volumeMounts"]
    assert token not in sidecar(inject(pod()).manifest["spec"])["volumeMounts"]


def test_a_managed_containers_own_capabilities_are_kept() -> None:
    p = pod()
    p["spec"]["containers"][0]["securityContext"] = {
        "capabilities": {"add": ["IPC_LOCK", "CAP_NET_ADMIN"], "drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }
    web = inject(p).manifest["spec"]["containers"][0]
    security = web["securityContext"]
    assert security["capabilities"] == {
        "add": ["IPC_LOCK", "NET_ADMIN", *(c for c in inj.CRIU_CAPABILITIES if c != "NET_ADMIN")],
        "drop": ["ALL"],
    }
    assert security["readOnlyRootFilesystem"] is True
    assert security["seccompProfile"] == {"type": "Unconfined"}
    # drop: [ALL]: the app keeps only what it added, NET_ADMIN among CRIU's
    assert web["env"] == [
        {
            "name": "POD_ACTIVATOR_APP_DROP_CAPS",
            "value": ",".join(c for c in inj.CRIU_CAPABILITIES if c != "NET_ADMIN"),
        }
    ]


@pytest.mark.parametrize(
    ("security", "dropped"),
    [
        ({}, BEYOND_DEFAULTS.split(",")),
        ({"capabilities": {}}, BEYOND_DEFAULTS.split(",")),
        # drops of defaults CRIU does not need change nothing here
        ({"capabilities": {"drop": ["NET_RAW", "MKNOD"]}}, BEYOND_DEFAULTS.split(",")),
        ({"capabilities": {"drop": ["ALL"]}}, list(inj.CRIU_CAPABILITIES)),
        ({"capabilities": {"drop": ["all"]}}, list(inj.CRIU_CAPABILITIES)),
        (
            {"capabilities": {"add": ["sys_ptrace", "CAP_SYS_TIME", "IPC_LOCK"]}},
            ["CHECKPOINT_RESTORE", "SYS_ADMIN", "SYS_RESOURCE", "NET_ADMIN", "DAC_READ_SEARCH"],
        ),
        (
            {"capabilities": {"drop": ["ALL"], "add": ["KILL", "SYS_ADMIN"]}},
            [c for c in inj.CRIU_CAPABILITIES if c not in ("KILL", "SYS_ADMIN")],
        ),
        ({"capabilities": {"add": ["ALL"]}}, []),
        ({"privileged": True}, []),
        ({"privileged": True, "capabilities": {"drop": ["ALL"]}}, []),
    ],
)
def test_the_app_loses_only_what_it_would_not_have_had(
    security: dict[str, Any], dropped: list[str]
) -> None:
    """The original set is the runtime's default set (containerd's, the
    largest) minus the container's drop, plus its add."""
    assert inj.app_drop_capabilities(security) == dropped


def test_nothing_to_drop_means_no_variable_and_the_apps_own_env_is_kept() -> None:
    p = pod()
    web = p["spec"]["containers"][0]
    web["securityContext"] = {"capabilities": {"add": ["ALL"]}}
    web["env"] = [
        {"name": "A", "value": "1"},
        {"name": "POD_ACTIVATOR_APP_DROP_CAPS", "value": "KILL"},
    ]
    assert inject(p).manifest["spec"]["containers"][0]["env"] == [{"name": "A", "value": "1"}]
    del web["securityContext"]
    assert inject(p).manifest["spec"]["containers"][0]["env"] == [
        {"name": "A", "value": "1"},
        {"name": "POD_ACTIVATOR_APP_DROP_CAPS", "value": BEYOND_DEFAULTS},
    ]


def test_zeropods_runtime_class_is_replaced() -> None:
    p = pod(runtimeClassName="zeropod")
    result = inject(p)
    assert result.status is Status.INJECTED
    assert "runtimeClassName" not in result.manifest["spec"]
    assert result.warnings == (
        "pod/p: runtimeClassName zeropod removed: the pod-activator sidecar replaces it",
    )
    other = inject(pod(runtimeClassName="gvisor")).manifest["spec"]
    assert other["runtimeClassName"] == "gvisor"


def test_another_metrics_port_is_told_to_the_sidecar() -> None:
    side = sidecar(inject(pod(), Options(metrics_port=19464)).manifest["spec"])
    assert side["ports"] == [{"name": "metrics", "containerPort": 19464, "protocol": "TCP"}]
    assert {"name": "POD_ACTIVATOR_METRICS_PORT", "value": "19464"} in side["env"]


def test_image_pull_policy_when_asked() -> None:
    side = sidecar(inject(pod(), Options(image_pull_policy="IfNotPresent")).manifest["spec"])
    assert side["imagePullPolicy"] == "IfNotPresent"


# -- declining: the pod as it was, the reason in an annotation and warnings ----


def skipped(result: inj.Injection, original: dict[str, Any]) -> str:
    """The reason annotation; and nothing else changed."""
    assert result.status is Status.SKIPPED
    manifest = copy.deepcopy(result.manifest)
    reason = manifest["metadata"]["annotations"].pop(inj.SKIPPED)
    assert manifest == original
    assert all(w.startswith("pod/p: not injected, left unchanged: ") for w in result.warnings)
    return str(reason)


def test_a_managed_container_without_command_is_not_injected() -> None:
    p = pod()
    del p["spec"]["containers"][0]["command"]
    result = inject(p)
    reason = skipped(result, p)
    assert "spec.containers[web].command: is not set" in reason
    assert "set command: (and args:) in the pod spec" in reason
    (warning,) = result.warnings
    assert "spec.containers[web].command" in warning and "set command:" in warning


def test_every_bad_annotation_is_named_with_its_fix() -> None:
    p = pod({a.PORTS_MAP: "web=eighty", a.SCALEDOWN_DURATION: "soon", a.CONTAINER_NAMES: "web"})
    result = inject(p)
    reason = skipped(result, p)
    assert len(result.warnings) == 2
    ports, duration = result.warnings
    assert f"{a.PORTS_MAP}: 'eighty' is not a TCP port; give a number from 1 to 65535" in ports
    assert f"{a.SCALEDOWN_DURATION}: 'soon' is not a duration" in duration
    assert "write it like 30s" in duration
    assert a.PORTS_MAP in reason and a.SCALEDOWN_DURATION in reason


def test_a_container_name_that_is_not_in_the_pod() -> None:
    p = pod({a.CONTAINER_NAMES: "wordpress"})
    reason = skipped(inject(p), p)
    assert f"{a.CONTAINER_NAMES}: names 'wordpress', which is not a container" in reason
    assert "name one of: web, log" in reason


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: s.update(hostPID=True), "spec.hostPID"),
        (lambda s: s.update(volumes=[{"name": "pod-activator", "emptyDir": {}}]), "spec.volumes"),
        (
            lambda s: s["containers"][1].update(ports=[{"containerPort": 9464}]),
            "spec.containers[log].ports",
        ),
        (
            lambda s: s["containers"][0].update(securityContext={"privileged": True}),
            "spec.containers[web].securityContext.privileged",
        ),
        (
            lambda s: s["containers"][0].update(
                volumeMounts=[{"name": "x", "mountPath": "/pod-activator"}]
            ),
            "spec.containers[web].volumeMounts",
        ),
        (lambda s: s.update(os={"name": "windows"}), "spec.os.name"),
        (
            lambda s: s["containers"][0].update(securityContext={"runAsUser": 33}),
            "spec.containers[web].securityContext.runAsUser",
        ),
        (
            lambda s: s.update(securityContext={"runAsNonRoot": True}),
            "spec.containers[web].securityContext.runAsUser",
        ),
        (
            lambda s: s["containers"][0].update(
                securityContext={"allowPrivilegeEscalation": False}
            ),
            "spec.containers[web].securityContext.allowPrivilegeEscalation",
        ),
        (
            lambda s: s["containers"][0].update(
                securityContext={"capabilities": {"drop": ["NET_RAW", "CAP_SYS_CHROOT", "KILL"]}}
            ),
            "spec.containers[web].securityContext.capabilities.drop",
        ),
    ],
)
def test_clashes_with_the_pod(change: Any, field: str) -> None:
    p = pod()
    change(p["spec"])
    reason = skipped(inject(p), p)
    assert reason.startswith(f"{field}: ")


def test_root_in_the_container_over_a_non_root_pod_is_fine() -> None:
    p = pod(securityContext={"runAsUser": 1000, "fsGroup": 1000})
    p["spec"]["containers"][0]["securityContext"] = {"runAsUser": 0}
    assert inject(p).status is Status.INJECTED


def test_dropped_capabilities_that_criu_does_not_need_are_fine() -> None:
    p = pod()
    p["spec"]["containers"][0]["securityContext"] = {"capabilities": {"drop": ["NET_RAW"]}}
    assert inject(p).status is Status.INJECTED


def test_a_fixed_pod_loses_the_old_reason() -> None:
    p = pod()
    p["metadata"]["annotations"][inj.SKIPPED] = "an old reason"
    result = inject(p)
    assert result.status is Status.INJECTED
    assert inj.SKIPPED not in result.manifest["metadata"]["annotations"]


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*a.KEYS, inj.SKIPPED, "other/key"]),
        st.one_of(
            st.sampled_from(["web", "web=8080", "log", "10s", "true", "503", "10.0.0.0/8", ""]),
            st.text(max_size=12),
        ),
    )
)
def test_any_annotations_give_all_or_nothing(annotations: dict[str, str]) -> None:
    """Whatever the annotations, the pod is injected whole, or left as it was
    (with at most the reason annotation), and inject never raises."""
    p = pod(annotations)
    result = inject(p)
    if result.status is Status.INJECTED:
        assert sidecar(result.manifest["spec"])["name"] == "pod-activator"
        assert inject(result.manifest).status is Status.ALREADY
    else:
        out = copy.deepcopy(result.manifest)
        out["metadata"]["annotations"].pop(inj.SKIPPED, None)
        p["metadata"]["annotations"].pop(inj.SKIPPED, None)
        assert out == p
        assert (result.status is Status.SKIPPED) == bool(result.warnings)


# -- activator inject FILE ------------------------------------------------------


def run_inject(argv: list[str], stdin: str = "") -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    manifests.add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["inject", *argv])
    out = io.StringIO()
    code = args.run(args, stdin=io.StringIO(stdin), stdout=out)
    return code, out.getvalue()


def test_inject_multi_document_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {}}
    deployment = template_of("Deployment", pod())
    lst = {"apiVersion": "v1", "kind": "List", "items": [pod()]}
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump_all([service, deployment, lst]))
    code, out = run_inject([str(path), "--image", "pa:1"])
    assert code == 0
    docs = list(yaml.safe_load_all(out))
    assert docs[0] == service
    assert docs[1] == inject(deployment, Options(image="pa:1")).manifest
    assert docs[2]["items"][0] == inject(pod(), Options(image="pa:1")).manifest
    err = capsys.readouterr().err
    assert "deployment/x: injected (web)" in err
    assert "pod/p: injected (web)" in err


def test_inject_reads_stdin_and_reports_skips(capsys: pytest.CaptureFixture[str]) -> None:
    p = pod()
    del p["spec"]["containers"][0]["command"]
    code, out = run_inject(["-"], stdin=yaml.safe_dump(p))
    assert code == 0
    (doc,) = yaml.safe_load_all(out)
    assert inj.SKIPPED in doc["metadata"]["annotations"]
    assert "warning: pod/p: not injected, left unchanged: spec.containers[web].command" in (
        capsys.readouterr().err
    )


def test_inject_keeps_scripts_readable(tmp_path: Path) -> None:
    source = (Path(__file__).parents[2] / "deploy/examples/wordpress/wordpress.yaml").read_text()
    code, out = run_inject(["-"], stdin=source)
    assert code == 0
    assert "- |\n" in out  # the init container's script stays a literal block
    deployment = next(iter(yaml.safe_load_all(out)))
    assert deployment["spec"]["template"]["spec"]["shareProcessNamespace"]


@pytest.mark.parametrize(
    ("content", "message"),
    [("kind: Pod\n  bad: [\n", "app.yaml: line 2"), (None, "cannot read")],
)
def test_inject_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "app.yaml"
    if content is not None:
        path.write_text(content)
    code, out = run_inject([str(path)])
    assert code == 1
    assert out == ""
    assert message in capsys.readouterr().err


def test_inject_gives_what_the_golden_files_hold() -> None:
    """The pods the webhook tests expect are what `activator inject` makes."""
    for name in ("wordpress", "mysql"):
        review = json.loads((DATA / f"admission-{name}-pod.json").read_text())
        expected = json.loads((DATA / f"admission-{name}-pod.injected.json").read_text())
        code, out = run_inject(
            ["-", "--image", "pod-activator:0.1.0"], stdin=json.dumps(review["request"]["object"])
        )
        assert code == 0
        assert yaml.safe_load(out) == expected
