"""The harness itself against the real runtime: pods run through CRI have the
shape a Kubernetes node gives them, and leave nothing behind.

What the sidecar tests rely on is shown here: the app container's first
process is a child of the pod's shim, in the pod's pid namespace where pause
is pid 1; the app answers on the pod IP from the host, and on 127.0.0.1 from
a process joined to the pod's namespaces with nsenter; its stdout reaches
the CRI log file; stopping the pod as kubelet does removes every process,
the netns and the containers.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from netns.proc import Process, ns_inode_of, nspid, parent_of
from tests.k8s.conftest import PodFactory
from tests.k8s.runtime import APP_PORT, Containerd, ContainerSpec, Mount, wait_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (containerd, runc, namespaces)"),
]


def get(url: str, wait: float = 10.0) -> dict[str, str]:
    """GET the counter app: {'count': 'N', 'boot': 'ID'}; a container just
    started may not listen yet (refused connections are retried for `wait` s)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body: str = resp.read().decode()
            return dict(field.split("=", 1) for field in body.split())
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def test_app_container_runs_in_the_pods_namespaces_under_its_shim(pod: PodFactory) -> None:
    p = pod()
    app = p.containers["app"].pid
    assert p.sandbox_state() == "SANDBOX_READY"
    assert p.state("app") == "CONTAINER_RUNNING"

    # Both the pause process and the app's first process are children of
    # the pod's shim (one shim per pod in containerd 1.6).
    shim = parent_of(app)
    assert shim is not None and shim == parent_of(p.pause_pid)
    argv = cmdline(shim)
    assert Path(argv[0]).name == "containerd-shim-runc-v2"
    assert argv[argv.index("-id") + 1] == p.id

    # One pid namespace for the pod (shareProcessNamespace): pause is pid 1.
    assert ns_inode_of(app, "pid") == ns_inode_of(p.pause_pid, "pid") == p.pidns_inode
    assert nspid(p.pause_pid)[-1] == 1
    assert nspid(app)[0] == app and nspid(app)[-1] > 1
    # The pod's network and IPC namespaces; a mount namespace of its own.
    for kind in ("net", "ipc"):
        assert ns_inode_of(app, kind) == ns_inode_of(p.pause_pid, kind)
    assert ns_inode_of(app, "mnt") != ns_inode_of(p.pause_pid, "mnt")
    assert ns_inode_of(app, "net") != ns_inode_of(os.getpid(), "net")
    assert os.stat(p.netns).st_ino == ns_inode_of(app, "net")
    # The image's files through the process's root, from the host.
    assert Path(f"/proc/{app}/root/counter").is_file()


def test_app_answers_on_the_pod_ip_and_logs_each_request(pod: PodFactory) -> None:
    p = pod()
    url = f"http://{p.ip}:{APP_PORT}/"
    answers = [get(url) for _ in range(3)]
    assert [a["count"] for a in answers] == ["1", "2", "3"]
    assert len({a["boot"] for a in answers}) == 1

    def logged() -> list[str] | None:
        requests = [m for m in p.log_messages("app") if m.startswith("request ")]
        return requests if len(requests) == 3 else None

    assert wait_for("3 requests in the log", logged, 5) == ["request 1", "request 2", "request 3"]
    # The raw CRI format: TIME STREAM P|F MESSAGE.
    assert " stdout F request 1\n" in p.log("app")
    assert p.containers["app"].log_path.is_relative_to(p.log_dir)


def test_a_process_joined_to_the_pod_reaches_the_app_on_loopback(pod: PodFactory) -> None:
    p = pod()
    first = get(f"http://{p.ip}:{APP_PORT}/")
    # How a sidecar runs as a process: the pod's net and pid namespaces,
    # the host's mount namespace (so the host's binaries and /proc).
    assert p.nsenter() == ["nsenter", "-t", str(p.pause_pid), "-n", "-p", "-i", "-u", "--"]
    joined = subprocess.run(
        [*p.nsenter(), "curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{APP_PORT}/"],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    second = dict(f.split("=", 1) for f in joined.stdout.split())
    assert second == {"count": "2", "boot": first["boot"]}

    # In the pod's pid namespace, under a pod pid; /proc stays the host's.
    inside = subprocess.run(
        [*p.nsenter(), "sh", "-c", "grep NSpid /proc/self/status; readlink /proc/self/ns/pid"],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    nspids, pidns = inside.stdout.split("\n")[0].split()[1:], inside.stdout.split()[-1]
    assert len(nspids) == 2 and int(nspids[1]) > 1
    assert pidns == f"pid:[{p.pidns_inode}]"

    # With the app container's mount namespace, paths are the image's.
    in_image = subprocess.run(
        [*p.nsenter("app", mount=True), "/bin/busybox", "ls", "/counter"],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    assert in_image.stdout.strip() == "/counter"


def test_containers_get_command_env_mounts_and_sidecars_start_first(
    containerd: Containerd, pod: PodFactory, tmp_path: Path
) -> None:
    (tmp_path / "annotations").write_text('ports-map="app=8080"\n')
    shell = (
        "cat /etc/podinfo/annotations; echo greeting=$GREETING;"
        " touch /etc/podinfo/x 2>/dev/null && echo rw || echo ro; exec sleep 3600"
    )
    sidecar = ContainerSpec(
        name="sidecar",
        image=containerd.app.ref,
        command=["/bin/sh", "-c"],
        args=[shell],
        env={"GREETING": "hello"},
        mounts=[Mount(tmp_path, "/etc/podinfo", readonly=True)],
        capabilities=["SYS_PTRACE"],
        sidecar=True,
    )
    annotations = {"zeropod.ctrox.dev/ports-map": "app=8080"}
    p = pod(containerd.app_container(), sidecar, annotations=annotations, labels={"app": "t"})
    assert list(p.containers) == ["sidecar", "app"]  # native sidecars first
    assert p.state("sidecar") == p.state("app") == "CONTAINER_RUNNING"
    wait_for("the sidecar's output", lambda: len(p.log_messages("sidecar")) >= 3, 5)
    assert p.log_messages("sidecar") == ['ports-map="app=8080"', "greeting=hello", "ro"]
    status, _ = containerd.cri.pod_sandbox_status(p.id)
    assert dict(status.annotations) == annotations
    assert status.labels["app"] == "t" and status.labels["io.kubernetes.pod.name"] == p.name
    # Both containers in the pod's pid namespace: each sees the other.
    assert ns_inode_of(p.containers["sidecar"].pid, "pid") == p.pidns_inode
    cap_eff = int(
        next(
            line.split()[1]
            for line in Path(f"/proc/{p.containers['sidecar'].pid}/status").read_text().splitlines()
            if line.startswith("CapEff:")
        ),
        16,
    )
    assert cap_eff & (1 << 19)  # CAP_SYS_PTRACE


def test_exit_and_stop_grace_are_reported_as_kubelet_sees_them(
    containerd: Containerd, pod: PodFactory
) -> None:
    busybox = containerd.app.ref
    exits = ContainerSpec(name="exits", image=busybox, command=["/bin/sh", "-c", "exit 3"])
    stubborn = ContainerSpec(
        name="stubborn",
        image=busybox,
        command=["/bin/sh", "-c", "trap '' TERM; while :; do sleep 1; done"],
    )
    p = pod(exits, stubborn)
    wait_for("the container to exit", lambda: p.state("exits") == "CONTAINER_EXITED", 5)
    assert p.status("exits").exit_code == 3
    started = time.monotonic()
    containerd.cri.stop_container(p.containers["stubborn"].id, grace=1)
    assert 0.9 < time.monotonic() - started < 5  # SIGTERM ignored, SIGKILL after the grace
    assert p.state("stubborn") == "CONTAINER_EXITED"
    assert p.status("stubborn").exit_code == 137


def test_stopping_the_pod_leaves_nothing(containerd: Containerd, pod: PodFactory) -> None:
    p = pod()
    get(f"http://{p.ip}:{APP_PORT}/")
    procs = [Process.of(p.pause_pid), Process.of(p.containers["app"].pid)]
    assert all(x is not None and x.alive() for x in procs)
    assert containerd.netns_mounted(p.netns_inode)

    p.stop()

    assert p.leftovers() == []
    assert not any(x is not None and x.alive() for x in procs)
    assert not containerd.netns_mounted(p.netns_inode)
    assert containerd.cri.list_containers(p.id) == []
    assert containerd.cri.list_pod_sandboxes(p.id) == []
    p.stop()  # idempotent
