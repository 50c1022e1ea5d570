"""Sidecar injection: an annotated pod in, a pod the activator manages out.

One pure transformation behind both the admission webhook (webhook.py) and
`activator inject FILE` (manifests in, patched manifests on stdout, like
`linkerd inject`). A pod asks for it with zeropod's annotations or ours (see
annotations.py); it then gets:

- `shareProcessNamespace: true`, so the sidecar sees the app's processes;
- the volumes `pod-activator` (an emptyDir: the holder binary and the
  holder's control sockets) and `pod-activator-podinfo` (the Downward API:
  the pod's annotations, labels, name and namespace);
- the sidecar, a native one (an init container with `restartPolicy: Always`)
  named `pod-activator`, whose startup probe passes once it has copied the
  holder into the shared volume, so that no app container starts before;
- for each managed container, the holder as its first process:
  `command: [/pod-activator/bin/holder, --name, NAME, --, CMD..., ARGS...]`.
  The holder stays while the app is checkpointed, so the container runtime
  never sees the container's first process exit. CRIU runs there too, as
  the holder's child, so the container also gets the capabilities CRIU
  needs (CRIU_CAPABILITIES) and unconfined seccomp and AppArmor profiles;
  those it would not have had otherwise are named in APP_DROP_CAPS_ENV, and
  the holder takes them from the app (see app_drop_capabilities).

It never half-injects: when the pod cannot be managed safely (a bad
annotation; a managed container without `command:`, whose image entrypoint
cannot be known here; a clash with what the pod has), the pod is left as it
was, except for the annotation `pod-activator.dev/injection-skipped` saying
why, and each reason comes back as a warning naming the field and the fix.
A pod that has the sidecar already is left alone (injecting twice is a no-op).
"""

from __future__ import annotations

import copy
import enum
import importlib.metadata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from activator import annotations as pod_annotations
from activator.config import ConfigError, FieldError

SIDECAR = "pod-activator"
SHARED_VOLUME = "pod-activator"
PODINFO_VOLUME = "pod-activator-podinfo"
SHARED_PATH = "/pod-activator"
PODINFO_PATH = "/etc/pod-activator/podinfo"
HOLDER = f"{SHARED_PATH}/bin/holder"
SKIPPED = pod_annotations.OURS + "injection-skipped"
METRICS_PORT = 9464
SERVICE_ACCOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"

# Annotations that ask for the activator. zeropod's four keep their meaning;
# any of ours does too, except the one this module writes.
_ZEROPOD_KEYS = (
    pod_annotations.PORTS_MAP,
    pod_annotations.CONTAINER_NAMES,
    pod_annotations.SCALEDOWN_DURATION,
    pod_annotations.DISABLE_PROBE_DETECTION,
)

# Capabilities, each with the reason it is needed. CRIU runs where the app
# runs: the sidecar has the holder start it as the holder's child, inside the
# managed container (its mount namespace and cgroup; a restored app is then
# the holder's child again), so CRIU has that container's capabilities,
# seccomp filter and AppArmor profile, and they are added there. Whatever the
# app holds, CRIU (in the same container) holds too, so it can give restored
# tasks their capabilities back. The sidecar keeps only what it does itself.
# deploy/README.md repeats both tables for operators; a test checks it.
CRIU_CAPABILITIES: Mapping[str, str] = {
    "CHECKPOINT_RESTORE": "CRIU: restore tasks with their own pids (clone3 set_tid), "
    "read /proc/PID/map_files, set the restored exe link",
    "SYS_PTRACE": "CRIU: seize the app's tasks and read their memory (ptrace, "
    "process_vm_readv, kcmp) whatever their uid",
    "SYS_ADMIN": "CRIU: its own /proc and tmpfs mounts in the work dir, restoring "
    "namespaces' state, fanotify and other kernel objects",
    "SYS_RESOURCE": "CRIU: read and restore rlimits of tasks of another uid (prlimit), "
    "prctl(PR_SET_MM) on restore",
    "NET_ADMIN": "CRIU: TCP_REPAIR, to dump and restore the app's TCP sockets",
    "DAC_READ_SEARCH": "CRIU: open_by_handle_at for inotify and fanotify watches",
    # In the runtime's default set; listed so that a container that drops
    # them (drop: [ALL]) still gets them, since CRIU cannot do without.
    "SETUID": "CRIU: restored tasks get their uids back",
    "SETGID": "CRIU: restored tasks get their gids and groups back",
    "SETPCAP": "CRIU: restored tasks get their capability bounding set back",
    "KILL": "CRIU: stop and end the app's tasks whatever their uid",
    "DAC_OVERRIDE": "CRIU: open and recreate the app's files whatever their owner and mode",
    "FOWNER": "CRIU: restore modes and times of files it recreates (ghost files, "
    "unix socket files) owned by another uid",
    "CHOWN": "CRIU: give recreated files back their owners",
    "FSETID": "CRIU: keep setuid/setgid bits on files it recreates",
    "SYS_CHROOT": "CRIU: restore the tasks' root directories",
    "SYS_TIME": "CRIU: set the clock offsets of the time namespace it restores the app "
    "into (tests/k8s: restores fail with 'Unable to set a monotonic clock offset' without it)",
}
SIDECAR_CAPABILITIES: Mapping[str, str] = {
    "NET_ADMIN": "nftables: the table that moves the app's ports behind the activator, "
    "in the pod's network namespace",
    "SYS_ADMIN": "setns into the pod's network namespace, for the thread that owns "
    "the nft table (setns needs it even into the namespace one is in)",
    "SYS_PTRACE": "read /proc/PID of the app's processes whatever their uid "
    "(pre-flight before a checkpoint: their open files, io_uring)",
}

# The capabilities a container has when its securityContext names none:
# containerd's and Docker's defaults, the largest set in common use (CRI-O's
# has fewer). The app is given back only what it would have had, and assuming
# the larger set can only leave it a capability it might not have had on a
# runtime with fewer, never take one it had.
RUNTIME_DEFAULT_CAPABILITIES = frozenset(
    {
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    }
)
# Tells the holder which capabilities to drop from the app it starts
# (comma-separated); CRIU, its other child, keeps them.
APP_DROP_CAPS_ENV = "POD_ACTIVATOR_APP_DROP_CAPS"

# How a kind nests its pod template.
_TEMPLATE_PATHS: Mapping[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def _package_version() -> str:
    try:
        return importlib.metadata.version("pod-activator")
    except importlib.metadata.PackageNotFoundError:  # running from a bare source tree
        return "latest"


DEFAULT_IMAGE = f"pod-activator:{_package_version()}"


class Status(enum.Enum):
    INJECTED = "injected"
    SKIPPED = "skipped"  # asked for, but not safe: left as it was, with the reasons
    ALREADY = "already injected"
    NOT_ASKED = "not annotated"
    NO_POD = "no pod template"


@dataclass(frozen=True)
class Options:
    image: str = DEFAULT_IMAGE
    image_pull_policy: str | None = None  # None: Kubernetes' default for the tag
    metrics_port: int = METRICS_PORT


@dataclass(frozen=True)
class Injection:
    """What `inject` made of one manifest."""

    manifest: dict[str, Any]  # a new object: the input is never modified
    status: Status
    name: str  # kind/name, for messages
    managed: tuple[str, ...] = ()  # the containers put under the holder
    warnings: tuple[str, ...] = ()


def requested(annotations: Mapping[str, str]) -> bool:
    """Whether the pod's annotations ask for the activator."""
    return any(
        key in _ZEROPOD_KEYS or (key.startswith(pod_annotations.OURS) and key != SKIPPED)
        for key in annotations
    )


def inject(manifest: Mapping[str, Any], options: Options | None = None) -> Injection:
    """The manifest with the sidecar injected into its pod (template), if asked for."""
    options = options or Options()
    out = copy.deepcopy(dict(manifest))
    kind = str(out.get("kind", ""))
    metadata = out.get("metadata") or {}
    name = f"{kind.lower() or 'object'}/{metadata.get('name') or metadata.get('generateName', '')}"
    path = _TEMPLATE_PATHS.get(kind)
    template: Any = out
    for key in path or ():
        template = template.get(key) if isinstance(template, dict) else None
    if path is None or not isinstance(template, dict):
        return Injection(out, Status.NO_POD, name)
    status, managed, warnings = _inject_template(template, options)
    if status is Status.SKIPPED:
        warnings = [f"{name}: not injected, left unchanged: {w}" for w in warnings]
    else:
        warnings = [f"{name}: {w}" for w in warnings]
    return Injection(out, status, name, managed, tuple(warnings))


def _inject_template(
    template: dict[str, Any], options: Options
) -> tuple[Status, tuple[str, ...], list[str]]:
    """Inject into a pod or pod template in place; the template is a copy."""
    metadata = template.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    spec = template.get("spec")
    if not requested(annotations) or not isinstance(spec, dict):
        return Status.NOT_ASKED, (), []
    containers = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
    init_containers = [c for c in spec.get("initContainers") or [] if isinstance(c, dict)]
    if any(c.get("name") == SIDECAR for c in containers + init_containers):
        return Status.ALREADY, (), []

    errors: list[FieldError] = []
    try:
        settings = pod_annotations.parse({str(k): str(v) for k, v in annotations.items()})
        managed = settings.managed
        names_field = (
            pod_annotations.CONTAINER_NAMES
            if settings.container_names
            else pod_annotations.PORTS_MAP
        )
    except ConfigError as exc:
        errors.extend(exc.errors)
        managed, names_field = (), pod_annotations.CONTAINER_NAMES
    by_name = {c.get("name"): c for c in containers}
    for name in managed:
        if name not in by_name:
            errors.append(
                FieldError(
                    names_field,
                    f"names {name!r}, which is not a container of this pod",
                    f"name one of: {', '.join(map(str, by_name)) or 'no containers'}",
                )
            )
    errors.extend(_clashes(spec, [by_name[n] for n in managed if n in by_name], options))
    if errors:
        reasons = [str(err) for err in errors]
        template.setdefault("metadata", {}).setdefault("annotations", {})[SKIPPED] = "; ".join(
            reasons
        )
        return Status.SKIPPED, (), reasons

    warnings: list[str] = []
    if SKIPPED in annotations:  # left by an earlier try whose cause is now fixed
        del annotations[SKIPPED]
    if spec.get("runtimeClassName") == "zeropod":
        # zeropod's shim would checkpoint the same processes behind our back.
        del spec["runtimeClassName"]
        spec.pop("overhead", None)  # set from that RuntimeClass, gone with it
        warnings.append("runtimeClassName zeropod removed: the pod-activator sidecar replaces it")
    apps = [by_name[name] for name in managed]
    for container in apps:
        _hold(container)
    spec["shareProcessNamespace"] = True
    spec["volumes"] = [*(spec.get("volumes") or []), *_volumes()]
    spec["initContainers"] = [_sidecar(apps, options), *(spec.get("initContainers") or [])]
    return Status.INJECTED, tuple(managed), warnings


def _clashes(
    spec: Mapping[str, Any], apps: list[dict[str, Any]], options: Options
) -> Iterable[FieldError]:
    """What in the pod keeps the sidecar from managing it, each with the fix."""
    pod_security = spec.get("securityContext") or {}
    if spec.get("hostPID"):
        yield FieldError(
            "spec.hostPID",
            "is true, and a pod cannot both use the host's pid namespace and share its own",
            "drop hostPID, or the activator's annotations",
        )
    if (spec.get("os") or {}).get("name") == "windows":
        yield FieldError("spec.os.name", "is windows", "the activator runs on Linux nodes only")
    for volume in spec.get("volumes") or []:
        if volume.get("name") in (SHARED_VOLUME, PODINFO_VOLUME):
            yield FieldError(
                "spec.volumes",
                f"has a volume named {volume['name']!r}, which the sidecar needs",
                "rename that volume",
            )
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for port in container.get("ports") or []:
            if port.get("containerPort") == options.metrics_port:
                yield FieldError(
                    f"spec.containers[{container.get('name')}].ports",
                    f"uses port {options.metrics_port}, where the sidecar serves its metrics",
                    "give the sidecar another with --metrics-port",
                )
    for app in apps:
        field = f"spec.containers[{app.get('name')}]"
        if not app.get("command"):
            yield FieldError(
                f"{field}.command",
                "is not set, and the image's entrypoint cannot be known here",
                "set command: (and args:) in the pod spec to what the image runs, "
                "e.g. command: [docker-entrypoint.sh, apache2-foreground]",
            )
        security = app.get("securityContext") or {}
        if security.get("privileged"):
            yield FieldError(
                f"{field}.securityContext.privileged",
                "is true, and the activator manages unprivileged containers only",
                "run it unprivileged with the capabilities it needs, or do not manage it",
            )
        user = security.get("runAsUser", pod_security.get("runAsUser"))
        if (user is not None and user != 0) or security.get(
            "runAsNonRoot", pod_security.get("runAsNonRoot")
        ):
            yield FieldError(
                f"{field}.securityContext.runAsUser",
                "is not root, and CRIU runs in this container (as the holder's child) as root",
                "leave the container's user to its image; entrypoints like the official "
                "images' drop to their own user for the app",
            )
        if security.get("allowPrivilegeEscalation") is False:
            yield FieldError(
                f"{field}.securityContext.allowPrivilegeEscalation",
                "is false, which the API refuses with CAP_SYS_ADMIN, which CRIU needs here",
                "remove it",
            )
        dropped = {_cap(c) for c in (security.get("capabilities") or {}).get("drop") or []}
        if needed := sorted(dropped & set(CRIU_CAPABILITIES)):
            yield FieldError(
                f"{field}.securityContext.capabilities.drop",
                f"drops {', '.join(needed)}, which CRIU needs in this container",
                "drop ALL instead (the activator adds back what CRIU needs) or keep them",
            )
        if any(m.get("mountPath") == SHARED_PATH for m in app.get("volumeMounts") or []):
            yield FieldError(
                f"{field}.volumeMounts",
                f"mounts something at {SHARED_PATH}, where the holder lives",
                "mount it elsewhere",
            )


def _hold(container: dict[str, Any]) -> None:
    """The holder becomes the container's first process, the app its child."""
    name = str(container["name"])
    command = [*container.get("command", []), *container.pop("args", [])]
    container["command"] = [HOLDER, "--name", name, "--", *command]
    container["volumeMounts"] = [
        *(container.get("volumeMounts") or []),
        {"name": SHARED_VOLUME, "mountPath": SHARED_PATH},
    ]
    security = container.setdefault("securityContext", {})
    env = [e for e in container.get("env") or [] if e.get("name") != APP_DROP_CAPS_ENV]
    if drop := app_drop_capabilities(security):
        env.append({"name": APP_DROP_CAPS_ENV, "value": ",".join(drop)})
    if env:
        container["env"] = env
    caps = security.setdefault("capabilities", {})
    added = [_cap(c) for c in caps.get("add") or []]
    caps["add"] = [*added, *(c for c in CRIU_CAPABILITIES if c not in added)]
    security.update(_UNCONFINED)


def app_drop_capabilities(security: Mapping[str, Any]) -> list[str]:
    """Which of CRIU's capabilities a container with this (original)
    securityContext would not have had: it had the runtime's defaults minus
    its drop (none left with drop: [ALL]), plus its add (every one with
    add: [ALL]).

    A privileged container has every capability: nothing to drop. (The
    injection declines privileged containers today; this stays true.)
    """
    if security.get("privileged"):
        return []
    caps = security.get("capabilities") or {}
    added = {_cap(c) for c in caps.get("add") or []}
    dropped = {_cap(c) for c in caps.get("drop") or []}
    if "ALL" in added:
        return []
    had = added | (set() if "ALL" in dropped else RUNTIME_DEFAULT_CAPABILITIES - dropped)
    return [c for c in CRIU_CAPABILITIES if c not in had]


def _cap(name: object) -> str:
    """A capability as Kubernetes names it: "SYS_ADMIN" for "CAP_SYS_ADMIN" or "sys_admin"."""
    return str(name).upper().removeprefix("CAP_")


# CRIU needs syscalls the runtime's RuntimeDefault seccomp profile allows only
# in part (clone3 with set_tid, kcmp, open_by_handle_at, arbitrary personality
# values, installing the app's own seccomp filters), and AppArmor's default
# profile denies mounts and ptrace across profiles. Filters and profiles are
# inherited, so they are lifted where CRIU runs, and in the sidecar, which
# reads the app's /proc entries. Neither container is privileged: no host
# devices, /proc and /sys stay masked.
_UNCONFINED: Mapping[str, Any] = {
    "seccompProfile": {"type": "Unconfined"},
    "appArmorProfile": {"type": "Unconfined"},
}


def _volumes() -> list[dict[str, Any]]:
    return [
        {"name": SHARED_VOLUME, "emptyDir": {}},
        {
            "name": PODINFO_VOLUME,
            "downwardAPI": {
                "items": [
                    {"path": field, "fieldRef": {"fieldPath": f"metadata.{field}"}}
                    for field in ("annotations", "labels", "name", "namespace")
                ]
            },
        },
    ]


def _sidecar(apps: list[dict[str, Any]], options: Options) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = [
        {"name": PODINFO_VOLUME, "mountPath": PODINFO_PATH, "readOnly": True},
        {"name": SHARED_VOLUME, "mountPath": SHARED_PATH},
    ]
    # The API server's ServiceAccount plugin mounts the token into every
    # container before webhooks run, so it missed ours: mount the same one
    # (the sidecar labels its pod and writes events).
    for app in apps:
        token = [
            m for m in app.get("volumeMounts") or [] if m.get("mountPath") == SERVICE_ACCOUNT_PATH
        ]
        if token:
            mounts.append(dict(token[0]))
            break
    sidecar: dict[str, Any] = {
        "name": SIDECAR,
        "image": options.image,
        "restartPolicy": "Always",
        "args": ["sidecar", "--podinfo", PODINFO_PATH, "--shared", SHARED_PATH],
        "env": [
            {"name": env, "valueFrom": {"fieldRef": {"fieldPath": path}}}
            for env, path in (
                ("POD_NAME", "metadata.name"),
                ("POD_NAMESPACE", "metadata.namespace"),
                ("POD_IP", "status.podIP"),
            )
        ]
        # where to serve the metrics: the port below, which --metrics-port may move
        + [{"name": "POD_ACTIVATOR_METRICS_PORT", "value": str(options.metrics_port)}],
        "ports": [{"name": "metrics", "containerPort": options.metrics_port, "protocol": "TCP"}],
        "volumeMounts": mounts,
        # App containers start only once this passes: the holder is in place.
        "startupProbe": {
            "exec": {"command": ["test", "-x", HOLDER]},
            "periodSeconds": 1,
            "failureThreshold": 120,
        },
        # Requests only: a memory limit could kill the sidecar mid-restore.
        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}},
        "securityContext": {
            # Root: nft, setns and the app's /proc entries.
            "runAsUser": 0,
            "runAsNonRoot": False,
            # allowPrivilegeEscalation stays unset: the API refuses false with SYS_ADMIN.
            "capabilities": {"drop": ["ALL"], "add": list(SIDECAR_CAPABILITIES)},
            **_UNCONFINED,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if options.image_pull_policy:
        sidecar["imagePullPolicy"] = options.image_pull_policy
    return sidecar
