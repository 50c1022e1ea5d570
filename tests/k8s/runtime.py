"""A Kubernetes node without kubelet: Debian's containerd + runc, driven over CRI.

The tests play kubelet: `Containerd` starts a private containerd, imports
images built here without a registry, and runs pods over the CRI API
(runtime v1, the calls kubelet makes) as `Pod` objects. Facts this rests on
(measured on these machines) are in shared/CONTAINERD.md.

Isolation from the host, and from a second run on the same machine:
- everything containerd, its shims and runc write lives under one private
  folder, /tmp/pa-k8s-SLOT (config, root, state, socket, runc state, CNI
  results and leases, container logs);
- containerd runs in a private mount namespace where that folder's run/ is
  bind-mounted over /run (containerd 1.6 hard-codes its shim sockets under
  /run/containerd/s) and its cni/ over /var/lib/cni (libcni's result cache,
  not configurable in 1.6). Mounts made there, overlay root filesystems and
  the pods' netns bind mounts included, are invisible from the host;
- SLOT (0-31) is held by a lock for the instance's life and names the CNI
  bridge (pak8sSLOT), the pod subnet (10.250.SLOT.0/24, clear of the
  project's 10.244.0.0/16) and the pods' cgroup parent (/pa-k8s-SLOT), so a
  run can clean what a killed run on the same slot left behind.
Closing stops every pod through CRI, then containerd, then kills by pid
whatever is still there (shims, container processes), deletes the bridge,
the cgroups and the folder, and raises `Leftovers` if it had to force
anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, TypeVar

from netns.proc import Process, ns_inode_of, pids

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
IMAGES_SRC = HERE / "images"
PROTO = HERE / "cri.proto"
CACHE = Path(os.environ.get("POD_ACTIVATOR_K8S_CACHE", "/var/cache/pod-activator/k8s"))
CNI_BIN = Path("/usr/lib/cni")
BUSYBOX = Path("/bin/busybox")
SLOTS = 32
APP_PORT = 8080
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Command -> Debian package, for the message when one is missing.
TOOLS = {
    "containerd": "containerd",
    "ctr": "containerd",
    "containerd-shim-runc-v2": "containerd",
    "runc": "runc",
    "umoci": "umoci",
    "skopeo": "skopeo",
    "gcc": "gcc",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "ip": "iproute2",
    "nft": "nftables",
}
CNI_PLUGINS = ("bridge", "host-local", "loopback")


# Run by `unshare --mount --propagation private sh -c _PRIVATE_MOUNTS DIR` in
# containerd's new mount namespace. First drop the copies of the host's mounts
# under /run and of every nsfs mount (the host's named netns): a copy would
# keep the host's namespaces alive, and their veths on the host, after the
# host unmounts its own. Then the private folder's run/ over /run and cni/lib
# over /var/lib/cni, and containerd.
_PRIVATE_MOUNTS = r"""
awk '{ split($0, a, " - "); split(a[2], b, " ");
       if ($5 ~ "^/run/" || b[1] == "nsfs") print $5 }' /proc/self/mountinfo |
    sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
mount --bind "$0/run" /run || exit 1
mount --bind "$0/cni/lib" /var/lib/cni || exit 1
exec containerd --config "$0/config.toml"
"""


class RuntimeUnavailable(Exception):
    """containerd cannot run on this machine (the message says why and the fix)."""


class Leftovers(Exception):
    """Closing had to force something away that should have gone by itself."""


def missing_tools() -> list[str]:
    """What scripts/setup-containerd would install, as 'command (package)'."""
    found = [f"{cmd} (package {pkg})" for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None]
    found += [
        f"{CNI_BIN / p} (package containernetworking-plugins)"
        for p in CNI_PLUGINS
        if not (CNI_BIN / p).exists()
    ]
    if not BUSYBOX.exists():
        found.append(f"{BUSYBOX} (package busybox-static)")
    return found


def kernel_problems() -> list[str]:
    """What this kernel lacks for containers at all (not fixable by installing)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root")
    filesystems = Path("/proc/filesystems").read_text()
    if "overlay" not in filesystems:
        problems.append("no overlayfs in /proc/filesystems (containerd's snapshotter)")
    if (
        not Path("/sys/fs/cgroup/memory").is_dir()
        and not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    ):
        problems.append("no memory cgroup mounted under /sys/fs/cgroup")
    return problems


# ------------------------------------------------------------------ cache


@contextlib.contextmanager
def _cache_lock(name: str) -> Iterator[Path]:
    """An exclusive lock on CACHE/NAME.lock, for one build at a time per machine."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield CACHE


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def _run(cmd: Sequence[str | os.PathLike[str]], **kw: Any) -> str:
    """Run a command; on failure raise with its output."""
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False, **kw)
    if done.returncode != 0:
        output = done.stderr.strip() or done.stdout.strip()
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {done.returncode}: {output}")
    return str(done.stdout)


# -------------------------------------------------------------------- CRI


_cri_modules: tuple[ModuleType, ModuleType] | None = None


def cri_modules() -> tuple[ModuleType, ModuleType]:
    """(cri_pb2, cri_pb2_grpc) for tests/k8s/cri.proto, compiled with
    grpcio-tools into the cache on first use (keyed by the proto and tools)."""
    global _cri_modules
    if _cri_modules is not None:
        return _cri_modules
    from importlib.metadata import version

    key = _digest(PROTO.read_bytes(), version("grpcio-tools"), version("protobuf"))
    out = CACHE / f"cri-{key}"
    if not (out / "cri_pb2_grpc.py").exists():
        with _cache_lock("cri"):
            if not (out / "cri_pb2_grpc.py").exists():
                from grpc_tools import protoc  # type: ignore[import-untyped]

                tmp = Path(tempfile.mkdtemp(prefix=f"cri-{key}.", dir=CACHE))
                rc = protoc.main(
                    [
                        "protoc",
                        f"-I{PROTO.parent}",
                        f"--python_out={tmp}",
                        f"--grpc_python_out={tmp}",
                        str(PROTO),
                    ]
                )
                if rc != 0:
                    raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
                tmp.rename(out)
    loaded = []
    for name in ("cri_pb2", "cri_pb2_grpc"):
        spec = importlib.util.spec_from_file_location(name, out / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # cri_pb2_grpc imports cri_pb2 by that name
        spec.loader.exec_module(module)
        loaded.append(module)
    _cri_modules = (loaded[0], loaded[1])
    return _cri_modules


class CRI:
    """A CRI runtime v1 client over containerd's socket: kubelet's calls, no more.

    `pb` is the generated messages module (pb.ContainerConfig, ...), for
    callers building their own requests."""

    def __init__(self, socket: Path, timeout: float = 60.0) -> None:
        import grpc  # type: ignore[import-untyped,unused-ignore]

        self.pb, grpc_mod = cri_modules()
        self._channel = grpc.insecure_channel(f"unix://{socket}")
        self.runtime = grpc_mod.RuntimeServiceStub(self._channel)
        self.images = grpc_mod.ImageServiceStub(self._channel)
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def version(self, timeout: float | None = None) -> Any:
        return self.runtime.Version(
            self.pb.VersionRequest(version="v1"), timeout=timeout or self.timeout
        )

    def image_status(self, image: str) -> Any:
        return self.images.ImageStatus(
            self.pb.ImageStatusRequest(image=self.pb.ImageSpec(image=image)), timeout=self.timeout
        ).image

    def run_pod_sandbox(self, config: Any) -> str:
        return str(
            self.runtime.RunPodSandbox(
                self.pb.RunPodSandboxRequest(config=config), timeout=self.timeout
            ).pod_sandbox_id
        )

    def pod_sandbox_status(self, pod_id: str) -> tuple[Any, dict[str, Any]]:
        """(PodSandboxStatus, containerd's verbose info: pid, runtimeSpec, ...)."""
        resp = self.runtime.PodSandboxStatus(
            self.pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True),
            timeout=self.timeout,
        )
        return resp.status, json.loads(resp.info.get("info", "{}"))

    def stop_pod_sandbox(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(
            self.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout
        )

    def remove_pod_sandbox(self, pod_id: str) -> None:
        self.runtime.RemovePodSandbox(
            self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout
        )

    def list_pod_sandboxes(self, pod_id: str = "") -> list[Any]:
        req = self.pb.ListPodSandboxRequest(filter=self.pb.PodSandboxFilter(id=pod_id))
        return list(self.runtime.ListPodSandbox(req, timeout=self.timeout).items)

    def create_container(self, pod_id: str, config: Any, sandbox_config: Any) -> str:
        return str(
            self.runtime.CreateContainer(
                self.pb.CreateContainerRequest(
                    pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config
                ),
                timeout=self.timeout,
            ).container_id
        )

    def start_container(self, container_id: str) -> None:
        self.runtime.StartContainer(
            self.pb.StartContainerRequest(container_id=container_id), timeout=self.timeout
        )

    def stop_container(self, container_id: str, grace: int) -> None:
        """StopContainer: SIGTERM (or the image's stop signal), SIGKILL after `grace` s."""
        self.runtime.StopContainer(
            self.pb.StopContainerRequest(container_id=container_id, timeout=grace),
            timeout=self.timeout + grace,
        )

    def remove_container(self, container_id: str) -> None:
        self.runtime.RemoveContainer(
            self.pb.RemoveContainerRequest(container_id=container_id), timeout=self.timeout
        )

    def container_status(self, container_id: str) -> tuple[Any, dict[str, Any]]:
        """(ContainerStatus, containerd's verbose info: pid, runtimeSpec, ...)."""
        resp = self.runtime.ContainerStatus(
            self.pb.ContainerStatusRequest(container_id=container_id, verbose=True),
            timeout=self.timeout,
        )
        return resp.status, json.loads(resp.info.get("info", "{}"))

    def list_containers(self, pod_id: str = "") -> list[Any]:
        req = self.pb.ListContainersRequest(filter=self.pb.ContainerFilter(pod_sandbox_id=pod_id))
        return list(self.runtime.ListContainers(req, timeout=self.timeout).containers)


# ----------------------------------------------------------------- images


@dataclass(frozen=True)
class Image:
    """An image archive (docker-archive tar) and the reference it imports as."""

    ref: str  # e.g. local/app:0123abcd (containerd adds its default registry)
    archive: Path


def build_image(
    name: str,
    files: Mapping[str, Path],
    entrypoint: Sequence[str],
    *,
    cmd: Sequence[str] = (),
    busybox: bool = True,
    env: Mapping[str, str] | None = None,
) -> Image:
    """An OCI image from `files` (path in the image -> file on the host, copied
    with its mode), over a busybox-static root filesystem unless `busybox` is
    false, built with umoci and turned into a docker-archive with skopeo (no
    registry). Cached under CACHE by a digest of everything that goes in."""
    env = {"PATH": DEFAULT_PATH, **(env or {})}
    parts: list[bytes | str] = [
        "image-recipe-1",
        name,
        json.dumps([list(entrypoint), list(cmd), sorted(env.items()), busybox]),
    ]
    for dest, src in sorted(files.items()):
        parts += [dest, str(src.stat().st_mode & 0o7777), src.read_bytes()]
    if busybox:
        parts.append(BUSYBOX.read_bytes())
    tag = _digest(*parts)
    image = Image(f"local/{name}:{tag}", CACHE / "images" / f"{name}-{tag}.tar")
    if image.archive.exists():
        return image
    with _cache_lock("images"):
        if image.archive.exists():
            return image
        image.archive.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{name}.", dir=image.archive.parent) as tmp:
            layout, bundle = Path(tmp) / "oci", Path(tmp) / "bundle"
            ref = f"{layout}:{tag}"
            _run(["umoci", "init", "--layout", layout])
            _run(["umoci", "new", "--image", ref])
            _run(["umoci", "unpack", "--image", ref, bundle])
            rootfs = bundle / "rootfs"
            for d in ("bin", "dev", "etc", "proc", "sys", "usr/bin", "usr/local/bin", "var"):
                (rootfs / d).mkdir(parents=True, exist_ok=True)
            (rootfs / "tmp").mkdir(mode=0o1777, exist_ok=True)
            os.chmod(rootfs / "tmp", 0o1777)
            if busybox:
                shutil.copy2(BUSYBOX, rootfs / "bin/busybox")
                for applet in _run([BUSYBOX, "--list-full"]).split():
                    link = rootfs / applet
                    if not link.exists() and not link.is_symlink():
                        link.parent.mkdir(parents=True, exist_ok=True)
                        link.symlink_to("/bin/busybox")
            for dest, src in files.items():
                target = rootfs / dest.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
            _run(["umoci", "repack", "--image", ref, bundle])
            config = ["umoci", "config", "--image", ref]
            config += [f"--config.entrypoint={a}" for a in entrypoint]
            config += [f"--config.cmd={a}" for a in cmd]
            config += [f"--config.env={k}={v}" for k, v in env.items()]
            _run(config)
            tar = Path(tmp) / "image.tar"
            _run(
                [
                    "skopeo",
                    "--insecure-policy",
                    "copy",
                    "-q",
                    f"oci:{ref}",
                    f"docker-archive:{tar}:local/{name}:{tag}",
                ]
            )
            tar.rename(image.archive)
    return image


def compile_static(source: Path) -> Path:
    """gcc -static SOURCE, cached by the source's digest and gcc's version."""
    gcc = _run(["gcc", "--version"]).splitlines()[0]
    out = CACHE / "bin" / f"{source.stem}-{_digest(source.read_bytes(), gcc)}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    _run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", tmp, source])
    tmp.rename(out)
    return out


def pause_image() -> Image:
    """The pod's pid 1 (tests/k8s/images/pause.c), alone in its image."""
    pause = compile_static(IMAGES_SRC / "pause.c")
    return build_image("pause", {"/pause": pause}, ["/pause"], busybox=False)


def app_image() -> Image:
    """busybox + /counter (tests/k8s/images/counter.c), entrypoint /counter
    (port argument, default 8080)."""
    counter = compile_static(IMAGES_SRC / "counter.c")
    return build_image("app", {"/counter": counter}, ["/counter"])


# ------------------------------------------------------------------- TOML


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # TOML basic strings escape like JSON
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def toml_dumps(doc: Mapping[str, Any], prefix: str = "") -> str:
    """The TOML of a dict of scalars, lists of scalars and tables (what
    containerd's config holds)."""
    lines = [
        f"{_toml_key(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)
    ]
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in doc.items():
        if isinstance(v, dict):
            name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
            out += f"\n[{name}]\n" + toml_dumps(v, name)
    return out


# ------------------------------------------------------------------- pods


@dataclass(frozen=True)
class Mount:
    host: Path
    container: str
    readonly: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    """One container of a pod, as kubelet passes it to CreateContainer.

    `sidecar`: a native sidecar (an init container with restartPolicy
    Always): started before the regular containers, stopped after them.
    The harness never restarts a container that exits (no kubelet)."""

    name: str
    image: str
    command: Sequence[str] = ()
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: Sequence[Mount] = ()
    capabilities: Sequence[str] = ()  # added, e.g. ("SYS_PTRACE", "SYS_ADMIN")
    privileged: bool = False
    sidecar: bool = False
    working_dir: str = ""


@dataclass
class Container:
    name: str
    id: str
    pid: int  # host pid of the container's first process
    log_path: Path  # the CRI log file, on the host


T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 20.0) -> T:
    """Poll `check` until it answers something other than None/False."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


class Pod:
    """A pod run as kubelet runs one: a sandbox (pause, pid 1 of the pod's
    shared pid namespace; network and IPC namespaces of the pod) and its
    containers.

    pid, pause_pid: host pids. netns: /proc/PAUSE/ns/net, a path valid on the
    host while the pod runs (the runtime's own netns mount lives in
    containerd's private mount namespace: `netns_runtime_path`)."""

    def __init__(
        self,
        runtime: Containerd,
        name: str,
        sandbox_id: str,
        sandbox_config: Any,
        log_dir: Path,
    ) -> None:
        self.runtime = runtime
        self.cri: CRI = runtime.cri
        self.name = name
        self.id = sandbox_id
        self.sandbox_config = sandbox_config
        self.log_dir = log_dir
        self.containers: dict[str, Container] = {}
        self._specs: dict[str, ContainerSpec] = {}
        self._stopped = False
        status, info = self.cri.pod_sandbox_status(sandbox_id)
        self.ip: str = status.network.ip
        self.pause_pid: int = int(info["pid"])
        self.netns = f"/proc/{self.pause_pid}/ns/net"
        self.netns_inode: int = os.stat(self.netns).st_ino
        self.pidns_inode: int = os.stat(f"/proc/{self.pause_pid}/ns/pid").st_ino
        self.netns_runtime_path: str = next(
            (
                ns.get("path", "")
                for ns in info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", [])
                if ns.get("type") == "network"
            ),
            "",
        )
        self.pause = Process.of(self.pause_pid)

    def __repr__(self) -> str:
        return f"<Pod {self.name} {self.id[:12]} ip={self.ip} pause={self.pause_pid}>"

    def start_container(self, spec: ContainerSpec) -> Container:
        """CreateContainer + StartContainer, as kubelet does for each container."""
        pb = self.cri.pb
        if spec.name in self.containers:
            raise ValueError(f"pod {self.name} already has a container {spec.name}")
        log_rel = f"{spec.name}/0.log"
        ns = pb.NamespaceOption(network=pb.POD, pid=pb.POD, ipc=pb.POD)
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=spec.name, attempt=0),
            image=pb.ImageSpec(image=spec.image),
            command=list(spec.command),
            args=list(spec.args),
            working_dir=spec.working_dir,
            envs=[pb.KeyValue(key=k, value=v) for k, v in spec.env.items()],
            mounts=[
                pb.Mount(container_path=m.container, host_path=str(m.host), readonly=m.readonly)
                for m in spec.mounts
            ],
            labels={
                "io.kubernetes.container.name": spec.name,
                "io.kubernetes.pod.name": self.name,
                "io.kubernetes.pod.namespace": self.sandbox_config.metadata.namespace,
                "io.kubernetes.pod.uid": self.sandbox_config.metadata.uid,
            },
            annotations={"io.kubernetes.container.restartCount": "0"},
            log_path=log_rel,
            linux=pb.LinuxContainerConfig(
                security_context=pb.LinuxContainerSecurityContext(
                    capabilities=pb.Capability(add_capabilities=list(spec.capabilities)),
                    privileged=spec.privileged,
                    namespace_options=ns,
                )
            ),
        )
        container_id = self.cri.create_container(self.id, config, self.sandbox_config)
        try:
            self.cri.start_container(container_id)
        except Exception:
            with contextlib.suppress(Exception):
                self.cri.remove_container(container_id)
            raise
        _, info = self.cri.container_status(container_id)
        container = Container(spec.name, container_id, int(info["pid"]), self.log_dir / log_rel)
        self.containers[spec.name] = container
        self._specs[spec.name] = spec
        return container

    def status(self, name: str) -> Any:
        """The CRI ContainerStatus (state, exit_code, reason, started_at, ...)."""
        status, _ = self.cri.container_status(self.containers[name].id)
        return status

    def state(self, name: str) -> str:
        """'CONTAINER_RUNNING', 'CONTAINER_EXITED', ... as containerd reports it."""
        return str(self.cri.pb.ContainerState.Name(self.status(name).state))

    def sandbox_state(self) -> str:
        status, _ = self.cri.pod_sandbox_status(self.id)
        return str(self.cri.pb.PodSandboxState.Name(status.state))

    def log(self, name: str) -> str:
        """The CRI log file's text: lines of 'TIME STREAM P|F MESSAGE'."""
        path = self.containers[name].log_path
        return path.read_text() if path.exists() else ""

    def log_messages(self, name: str) -> list[str]:
        """The log's messages, partial lines (P) joined to the full one (F)."""
        out, partial = [], ""
        for line in self.log(name).splitlines():
            parts = line.split(" ", 3)
            if len(parts) < 3:
                continue
            text = parts[3] if len(parts) == 4 else ""
            if parts[2] == "P":
                partial += text
            else:
                out.append(partial + text)
                partial = ""
        return out

    def nsenter(self, container: str | None = None, *, mount: bool = False) -> list[str]:
        """The argv prefix that runs a command joined to the pod: its net,
        pid, IPC and UTS namespaces (entered through pause, or through
        `container`'s first process), and with `mount` that container's mount
        namespace too, where the command's path is looked up in the image."""
        pid = self.containers[container].pid if container else self.pause_pid
        argv = ["nsenter", "-t", str(pid), "-n", "-p", "-i", "-u"]
        if mount:
            if container is None:
                raise ValueError("mount: name the container whose mount namespace to enter")
            argv.append("-m")
        return [*argv, "--"]

    def stop(self, grace: int = 5) -> None:
        """What kubelet does when the pod is deleted: StopContainer on every
        regular container (in parallel, `grace` seconds each), then the
        native sidecars in reverse order, StopPodSandbox, then (as its
        garbage collector) RemoveContainer each and RemovePodSandbox.
        Idempotent."""
        if self._stopped:
            return
        regular = [c for n, c in self.containers.items() if not self._specs[n].sidecar]
        sidecars = [c for n, c in self.containers.items() if self._specs[n].sidecar]
        errors: list[BaseException] = []

        def stop_one(c: Container) -> None:
            try:
                self.cri.stop_container(c.id, grace)
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=stop_one, args=(c,)) for c in regular]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in reversed(sidecars):
            stop_one(c)
        self.cri.stop_pod_sandbox(self.id)
        for c in self.containers.values():
            self.cri.remove_container(c.id)
        self.cri.remove_pod_sandbox(self.id)
        self._stopped = True
        self.runtime._forget(self)
        if errors:
            raise errors[0]

    def leftovers(self) -> list[str]:
        """What of this pod is still there (after stop(), nothing should be)."""
        found = []
        if self.cri.list_pod_sandboxes(self.id):
            found.append(f"sandbox {self.id[:12]}")
        found += [f"container {c.id[:12]}" for c in self.cri.list_containers(self.id)]
        if self.pause is not None and self.pause.alive():
            found.append(f"pause process {self.pause.pid}")
        for c in self.containers.values():
            p = Process.of(c.pid)
            if p is not None and ns_inode_of(c.pid, "pid") == self.pidns_inode:
                found.append(f"process {c.pid} of container {c.name}")
        for pid in pids():
            if ns_inode_of(pid, "pid") == self.pidns_inode:
                found.append(f"process {pid} in the pod's pid namespace")
            elif ns_inode_of(pid, "net") == self.netns_inode:
                found.append(f"process {pid} in the pod's netns")
        if self.runtime.netns_mounted(self.netns_inode):
            found.append(f"the netns mount {self.netns_runtime_path}")
        return found


# -------------------------------------------------------------- containerd


class Containerd:
    """A private containerd serving CRI, for the life of a `with` block.

    After __enter__: `socket`, `cri` (a CRI client), `pid` (containerd's host
    pid), `dir` (the private folder), `bridge`, `subnet`, `cgroup_parent`,
    `pause` and `app` (the imported images)."""

    def __init__(self, extra_images: Sequence[Image] = ()) -> None:
        self._extra_images = list(extra_images)
        self._slot_lock: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pods: dict[str, Pod] = {}
        self._ip_forward_before: str | None = None
        self._cri: CRI | None = None
        self.pid = 0

    @property
    def cri(self) -> CRI:
        """The CRI client (while open)."""
        if self._cri is None:
            raise RuntimeError("containerd is not running")
        return self._cri

    # -- set-up

    def __enter__(self) -> Containerd:
        try:
            self._start()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _take_slot(self) -> int:
        (CACHE / "slots").mkdir(parents=True, exist_ok=True)
        for slot in range(SLOTS):
            lock = open(CACHE / "slots" / f"{slot}.lock", "a")  # noqa: SIM115 (held until close)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            self._slot_lock = lock
            return slot
        raise RuntimeUnavailable(f"all {SLOTS} slots are taken ({CACHE / 'slots'})")

    def _start(self) -> None:
        problems = kernel_problems()
        if problems:
            raise RuntimeUnavailable("; ".join(problems))
        missing = missing_tools()
        if missing:
            raise RuntimeUnavailable(
                f"missing: {', '.join(missing)}; run scripts/setup-containerd (as root)"
            )
        images = [pause_image(), app_image()]
        self.pause, self.app = images
        cri_modules()

        self.slot = self._take_slot()
        self.dir = Path(f"/tmp/pa-k8s-{self.slot}")
        self.bridge = f"pak8s{self.slot}"
        self.subnet = ipaddress.ip_network(f"10.250.{self.slot}.0/24")
        self.cgroup_parent = f"/pa-k8s-{self.slot}"
        self.socket = self.dir / "containerd.sock"
        stale = self._clean_slot(stale=True)
        if stale:
            print(
                f"k8s runtime: removed a killed run's leftovers: {'; '.join(stale)}",
                file=sys.stderr,
            )

        for d in (
            "root",
            "state",
            "run",
            "runc",
            "cni/net.d",
            "cni/lib",
            "cni/ipam",
            "pods",
            "opt",
        ):
            (self.dir / d).mkdir(parents=True)
        self._write_cni_config()
        config = self.dir / "config.toml"
        config.write_text(toml_dumps(self._config()))
        # libcni caches results in /var/lib/cni: bind our folder there (the
        # mount point has to exist on the host; an empty folder is left).
        Path("/var/lib/cni").mkdir(parents=True, exist_ok=True)
        self._ip_forward_before = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()

        log = open(self.dir / "containerd.log", "ab")  # noqa: SIM115 (the child keeps it)
        with log:
            self._proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    _PRIVATE_MOUNTS,
                    self.dir,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.pid = self._proc.pid
        self._cri = CRI(self.socket)
        wait_for("containerd's CRI to answer", self._ready, timeout=30)
        for image in [*images, *self._extra_images]:
            self.import_image(image)

    def _ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"containerd exited {self._proc.returncode}: {self.log_tail()}")
        if not self.socket.exists():
            return False
        try:
            self.cri.version(timeout=2)
        except Exception:
            return False
        return True

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.dir / "containerd.log").read_text().splitlines()[-lines:])
        return ""

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = tomllib.loads(_run(["containerd", "config", "default"]))
        d = self.dir
        config["root"] = str(d / "root")
        config["state"] = str(d / "state")
        config["grpc"]["address"] = str(self.socket)
        plugins = config["plugins"]
        plugins["io.containerd.internal.v1.opt"]["path"] = str(d / "opt")
        cri = plugins["io.containerd.grpc.v1.cri"]
        cri["sandbox_image"] = self.pause.ref
        # No CAP_SYS_RESOURCE in this sandbox: runc may not lower the pause
        # container's oom_score_adj (see shared/CONTAINERD.md).
        cri["restrict_oom_score_adj"] = True
        cri["cni"]["bin_dir"] = str(CNI_BIN)
        cri["cni"]["conf_dir"] = str(d / "cni/net.d")
        runc = cri["containerd"]["runtimes"]["runc"]
        runc["options"]["Root"] = str(d / "runc")
        return config

    def _write_cni_config(self) -> None:
        net = {
            "cniVersion": "0.4.0",
            "name": f"pa-k8s-{self.slot}",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    # The bridge holds the gateway address, so the host reaches
                    # pods; no masquerade (no iptables rules), no default route
                    # (pods talk to the host and each other only).
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(self.subnet)}]],
                        "dataDir": str(self.dir / "cni/ipam"),
                    },
                }
            ],
        }
        (self.dir / "cni/net.d/10-pa-k8s.conflist").write_text(json.dumps(net, indent=2))

    def import_image(self, image: Image) -> None:
        """ctr -n k8s.io images import, then wait until CRI sees it."""
        self.ctr("images", "import", str(image.archive))
        cri = self.cri
        wait_for(f"CRI to see {image.ref}", lambda: cri.image_status(image.ref).id != "", 10)

    def ctr(self, *args: str) -> str:
        """ctr against this containerd, in CRI's namespace (k8s.io)."""
        return _run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args])

    # -- pods

    def app_container(self, name: str = "app", port: int = APP_PORT, **more: Any) -> ContainerSpec:
        """The counter app: GET / on `port` answers 'count=N boot=ID'."""
        return ContainerSpec(name=name, image=self.app.ref, args=[str(port)], **more)

    def run_pod(
        self,
        name: str,
        containers: Sequence[ContainerSpec] = (),
        *,
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        namespace: str = "default",
    ) -> Pod:
        """RunPodSandbox (network, pid and IPC namespaces of the pod, i.e.
        shareProcessNamespace: true), then each container in order, native
        sidecars first, as kubelet starts them. On failure the pod is removed."""
        pb = self.cri.pb
        uid = str(uuid.uuid4())
        log_dir = self.dir / "pods" / f"{namespace}_{name}_{uid}"
        log_dir.mkdir(parents=True)
        privileged = any(c.privileged for c in containers)
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
            hostname=name,
            log_directory=str(log_dir),
            labels={
                "io.kubernetes.pod.name": name,
                "io.kubernetes.pod.namespace": namespace,
                "io.kubernetes.pod.uid": uid,
                **(labels or {}),
            },
            annotations=dict(annotations or {}),
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"{self.cgroup_parent}/pod{uid}",
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.POD, ipc=pb.POD),
                    privileged=privileged,
                ),
            ),
        )
        sandbox_id = self.cri.run_pod_sandbox(config)
        try:
            pod = Pod(self, name, sandbox_id, config, log_dir)
        except BaseException:
            with contextlib.suppress(Exception):
                self.cri.stop_pod_sandbox(sandbox_id)
                self.cri.remove_pod_sandbox(sandbox_id)
            raise
        self._pods[sandbox_id] = pod
        try:
            for spec in sorted(containers, key=lambda c: not c.sidecar):
                pod.start_container(spec)
        except BaseException:
            with contextlib.suppress(Exception):
                pod.stop(grace=0)
            raise
        return pod

    def _forget(self, pod: Pod) -> None:
        self._pods.pop(pod.id, None)

    def netns_mounted(self, inode: int) -> bool:
        """Whether containerd's mount namespace still holds a netns mount of `inode`."""
        with contextlib.suppress(OSError):
            return f"net:[{inode}]" in Path(f"/proc/{self.pid}/mountinfo").read_text()
        return False

    def processes(self) -> list[int]:
        """Every process of this runtime but containerd: shims (by their
        -address, this slot's socket) and container processes (in this
        slot's cgroups). Not by mount namespace: its inode number may be
        reused by another namespace once ours is gone."""
        return [
            pid
            for pid in pids()
            if pid != self.pid and (self._in_our_cgroups(pid) or self._ours_by_cmdline(pid))
        ]

    def _in_our_cgroups(self, pid: int) -> bool:
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return False
        return any(
            line.split(":", 2)[2].startswith(self.cgroup_parent + "/")
            for line in text.splitlines()
            if line.count(":") >= 2
        )

    def _ours_by_cmdline(self, pid: int) -> bool:
        """containerd or a shim of this slot's folder (a killed run's leftovers)."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        ours = (str(self.socket).encode(), str(self.dir / "config.toml").encode())
        return any(a in ours or a == str(self.dir).encode() for a in argv)

    # -- tear-down

    def close(self) -> None:
        """Stop everything, remove everything; idempotent. Raises Leftovers
        if anything had to be forced (after removing it)."""
        forced: list[str] = []
        errors: list[str] = []
        if self._cri is not None:
            # Pods the harness started and no one stopped: stopped as kubelet
            # would (documented, not forced); any other sandbox is a leftover.
            for pod in list(self._pods.values()):
                try:
                    pod.stop(grace=0)
                except Exception as e:
                    errors.append(f"stopping pod {pod.name}: {e}")
            try:
                for sandbox in self.cri.list_pod_sandboxes():
                    forced.append(f"sandbox {sandbox.metadata.name} not stopped by its test")
                    with contextlib.suppress(Exception):
                        self.cri.stop_pod_sandbox(sandbox.id)
                        self.cri.remove_pod_sandbox(sandbox.id)
            except Exception as e:
                if self._proc is not None and self._proc.poll() is None:
                    errors.append(f"listing sandboxes: {e}")
            self._cri.close()
            self._cri = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:
                    forced.append(f"containerd {self.pid} ignored SIGTERM")
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._slot_lock is not None:
            forced += self._clean_slot(stale=False)
            self._slot_lock.close()
            self._slot_lock = None
        if errors or forced:
            raise Leftovers("; ".join(errors + forced))

    def _clean_slot(self, stale: bool) -> list[str]:
        """Kill this slot's processes by pid, remove its bridge, cgroups, nft
        rules and folder. `stale`: before starting, for a killed run's leftovers.
        Answers what it found."""
        found: list[str] = []
        # Shims exit by themselves once their last container is removed; give
        # them a moment before killing anything.
        with contextlib.suppress(TimeoutError):
            wait_for("the shims to exit", lambda: not self.processes(), 0 if stale else 3)
        for _ in range(50):
            procs = [p for p in map(Process.of, self.processes()) if p is not None]
            if not procs:
                break
            for p in procs:
                found.append(f"process {p.pid} ({_comm(p.pid)})")
                p.kill()
            time.sleep(0.1)
        else:
            found.append("processes that would not die")
        if Path(f"/sys/class/net/{self.bridge}").exists():
            # CNI's DEL removes a pod's veth, never the bridge: ours to delete.
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
        found += self._clean_nft()
        found += self._clean_cgroups()
        if self._ip_forward_before == "0":
            with contextlib.suppress(OSError):
                Path("/proc/sys/net/ipv4/ip_forward").write_text("0\n")
        if self.dir.exists():
            # containerd's log outlives the folder, for a failure's post-mortem.
            with contextlib.suppress(OSError):
                shutil.copy(self.dir / "containerd.log", CACHE / f"containerd-{self.slot}.last.log")
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.dir.exists():
                found.append(f"{self.dir} could not be removed")
        return sorted(set(found))

    def _clean_cgroups(self) -> list[str]:
        found = []
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            top = hierarchy / self.cgroup_parent.lstrip("/")
            if not top.is_dir():
                continue
            for d in [*sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True), top]:
                if d.is_dir():
                    try:
                        d.rmdir()
                    except OSError as e:
                        found.append(f"cgroup {d}: {e.strerror}")
        return found

    def _clean_nft(self) -> list[str]:
        """Delete any rule naming our bridge or subnet (CNI adds none with
        ipMasq false; this is the check that it stays so)."""
        done = subprocess.run(
            ["nft", "-a", "list", "ruleset"], capture_output=True, text=True, check=False
        )
        found = []
        table = chain = ""
        for line in done.stdout.splitlines():
            words = line.split()
            if words[:1] == ["table"]:
                table = " ".join(words[1:3])
            elif words[:1] == ["chain"]:
                chain = words[1]
            elif (self.bridge in line or str(self.subnet) in line) and "# handle" in line:
                handle = line.rsplit("# handle", 1)[1].strip()
                subprocess.run(
                    ["nft", "delete", "rule", *table.split(), chain, "handle", handle],
                    capture_output=True,
                    check=False,
                )
                found.append(f"nft rule in {table} {chain}: {line.strip()}")
        return found


def _comm(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return "?"
