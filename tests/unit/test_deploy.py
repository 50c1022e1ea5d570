"""deploy/ against the Kubernetes 1.35 schemas, offline, and what it promises.

The schemas are those bundled in the kubernetes-validate wheel
(kubernetes-json-schema v1.35.0, "strict": unknown fields are errors; the
OpenAPI they come from has no enums, so a misspelt enum value would pass).
cert-manager's Issuer and Certificate are CRDs, which those schemas do not
cover: they are checked against a small schema of the fields used here.
Every YAML file in deploy/ is either a kustomization, a resource validated
as it is, or a patch; the kustomize builds (kubectl's built-in kustomize,
when kubectl is on PATH) are validated whole, and so is what `activator
inject` makes of the WordPress example.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from activator import inject as inj
from activator.manifests import inject_all

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = "1.35.0"
KUSTOMIZATIONS = sorted(DEPLOY.rglob("kustomization.yaml"))

# cert-manager.io/v1, the fields deploy/ uses (not the whole CRD).
_CERT_MANAGER: dict[str, Any] = {
    "Issuer": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "metadata": {"type": "object", "required": ["name", "namespace"]},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "maxProperties": 1,
                "properties": {"selfSigned": {"type": "object"}, "ca": {"type": "object"}},
            },
        },
    },
    "Certificate": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "metadata": {"type": "object", "required": ["name", "namespace"]},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["secretName", "issuerRef"],
                "properties": {
                    "secretName": {"type": "string"},
                    "dnsNames": {"type": "array", "items": {"type": "string"}},
                    "duration": {"type": "string", "pattern": r"^(\d+h)?(\d+m)?(\d+s)?$"},
                    "renewBefore": {"type": "string", "pattern": r"^(\d+h)?(\d+m)?(\d+s)?$"},
                    "privateKey": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": {"type": "integer"},
                        },
                    },
                    "issuerRef": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                            "group": {"type": "string"},
                        },
                    },
                },
            },
        },
    },
}


def validate(doc: dict[str, Any], where: str) -> None:
    if doc.get("apiVersion") == "cert-manager.io/v1":
        jsonschema.validate(doc, _CERT_MANAGER[doc["kind"]])
        return
    try:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{where}: {doc['kind']} {exc.message} at {list(exc.path)}") from None


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomization_files() -> tuple[set[Path], set[Path], set[Path]]:
    """Resources, patches and transformer configurations named by the kustomizations."""
    resources: set[Path] = set()
    patches: set[Path] = set()
    configurations: set[Path] = set()
    for k in KUSTOMIZATIONS:
        (spec,) = load(k)
        for name in spec.get("resources", []):
            path = (k.parent / name).resolve()
            if path.is_file():
                resources.add(path)
        patches.update(
            (k.parent / p["path"]).resolve() for p in spec.get("patches", []) if "path" in p
        )
        configurations.update((k.parent / c).resolve() for c in spec.get("configurations", []))
    return resources, patches, configurations


def test_every_yaml_file_in_deploy_is_accounted_for() -> None:
    resources, patches, configurations = kustomization_files()
    kustomizations = {k.resolve() for k in KUSTOMIZATIONS}
    for path in DEPLOY.rglob("*.yaml"):
        assert path.resolve() in resources | patches | configurations | kustomizations, (
            f"{path.relative_to(ROOT)} is in no kustomization: validate it or remove it"
        )


@pytest.mark.parametrize(
    "path",
    sorted(kustomization_files()[0]),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_each_resource_file_validates(path: Path) -> None:
    docs = load(path)
    assert docs
    for doc in docs:
        validate(doc, str(path.relative_to(ROOT)))


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl (with its built-in kustomize) is not on PATH: files checked one by one"
        )
    built = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    return [d for d in yaml.safe_load_all(built.stdout) if d is not None]


@pytest.mark.parametrize(
    "directory", [k.parent for k in KUSTOMIZATIONS], ids=lambda d: str(d.relative_to(DEPLOY))
)
def test_each_kustomize_build_validates(directory: Path) -> None:
    docs = kustomize(directory)
    assert docs
    for doc in docs:
        validate(doc, f"kustomize build {directory.relative_to(ROOT)}")


@pytest.mark.parametrize("overlay", ["k3s", "kind"])
def test_overlays_set_the_image_for_the_webhook_and_the_sidecars_it_injects(overlay: str) -> None:
    (deployment,) = [
        d for d in kustomize(DEPLOY / "overlays" / overlay) if d["kind"] == "Deployment"
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["POD_ACTIVATOR_SIDECAR_IMAGE"] == container["image"]
    assert env["POD_ACTIVATOR_SIDECAR_PULL_POLICY"] == "IfNotPresent"
    assert container["imagePullPolicy"] == "IfNotPresent"


def test_an_images_override_reaches_the_injected_sidecar(tmp_path: Path) -> None:
    """A user's overlay on top of ours, as the README tells."""
    (tmp_path / "deploy").symlink_to(DEPLOY)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/kustomization.yaml").write_text(
        "resources: [../deploy/overlays/k3s]\n"
        "images: [{name: pod-activator, newName: my-registry/pod-activator, newTag: '2.0'}]\n"
    )
    (deployment,) = [d for d in kustomize(tmp_path / "mine") if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert (
        container["image"] == env["POD_ACTIVATOR_SIDECAR_IMAGE"] == "my-registry/pod-activator:2.0"
    )


def test_the_injected_wordpress_example_validates() -> None:
    """The sidecar as injected (native sidecar, capabilities, probes, Downward
    API) is a valid 1.35 pod template, in each of the example's workloads."""
    docs = [d for f in sorted((DEPLOY / "examples/wordpress").glob("*.yaml")) for d in load(f)]
    docs = [d for d in docs if d.get("kind") != "Kustomization"]
    out, injections = inject_all(docs, inj.Options(image="pod-activator:0.1.0"))
    assert {i.name: i.status for i in injections if i.status is not inj.Status.NO_POD} == {
        "deployment/php": inj.Status.INJECTED,
        "statefulset/mysql": inj.Status.INJECTED,
    }
    for doc in out:
        validate(doc, "activator inject deploy/examples/wordpress")


def test_the_example_keeps_the_articles_annotations() -> None:
    wanted = {
        "php": {"ports-map": "wordpress=80", "container-names": "wordpress"},
        "mysql": {"ports-map": "mysql=3306", "container-names": "mysql"},
    }
    for name, keys in wanted.items():
        (workload,) = [
            d
            for f in (DEPLOY / "examples/wordpress").glob("*.yaml")
            for d in load(f)
            if d.get("metadata", {}).get("name") == name and "template" in d.get("spec", {})
        ]
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {
            **{f"zeropod.ctrox.dev/{k}": v for k, v in keys.items()},
            "zeropod.ctrox.dev/scaledown-duration": "10s",
        }


def test_rbac_is_least_privilege() -> None:
    docs = [d for f in sorted((DEPLOY / "base").glob("*.yaml")) for d in load(f) if "kind" in d]
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["pods/resize"], "verbs": ["patch"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    ]
    # The webhook asks the API for nothing: no binding, no token.
    assert not [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding", "Role")]
    (account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert account["automountServiceAccountToken"] is False
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    (container,) = pod["containers"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_the_webhook_fails_open_and_is_opt_in() -> None:
    (config,) = load(DEPLOY / "base/mutatingwebhookconfiguration.yaml")
    for hook in config["webhooks"]:
        assert hook["failurePolicy"] == "Ignore"
        assert hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["rules"] == [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]
        selectors = [hook.get("namespaceSelector", {}), hook.get("objectSelector", {})]
        assert {"pod-activator.dev/inject": "enabled"} in [s.get("matchLabels") for s in selectors]
        assert hook["clientConfig"]["service"]["path"] == "/mutate"
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        "pod-activator/pod-activator-webhook"
    )


@pytest.mark.parametrize(
    ("heading", "table"),
    [
        ("### In each managed container", inj.CRIU_CAPABILITIES),
        ("### In the sidecar", inj.SIDECAR_CAPABILITIES),
    ],
)
def test_every_capability_is_documented_with_its_reason(
    heading: str, table: dict[str, str]
) -> None:
    readme = (DEPLOY / "README.md").read_text()
    section = readme.split(heading, 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (.+) \|$", section, re.MULTILINE)
    assert rows == list(table.items()), f"deploy/README.md {heading!r}: the table differs"


def test_images_are_named_without_a_registry_host() -> None:
    images: list[str] = []
    for path in DEPLOY.rglob("*.yaml"):
        images += re.findall(r"^\s*(?:-\s+)?(?:image|newName):\s*(\S+)", path.read_text(), re.M)
    images += re.findall(r"^FROM\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert images
    for image in images:
        first = image.split("/")[0]
        assert "/" not in image or not ("." in first or ":" in first or first == "localhost"), image
