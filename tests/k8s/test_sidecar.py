"""The sidecar against the real container runtime (containerd + runc over CRI).

A pod is laid out as kubelet lays it out: pause, then the activator's
sidecar, then the app container, whose first process is the holder with the
stateful counter as its child. The sidecar runs as a process joined to the
pod's network, pid, IPC and UTS namespaces with its own /proc and /run
(what its container would give it), since its own image cannot be built here (no image
builder for a Python image without a registry).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from activator.inject import (
    APP_DROP_CAPS_ENV,
    CRIU_CAPABILITIES,
    METRICS_PORT,
    app_drop_capabilities,
)
from netns import proc
from tests.integration.harness import ACTIVATOR, read_events, wait_for_event
from tests.k8s.runtime import REPO, Containerd, Mount, Pod

APP_PORT = 8080
START_TIMEOUT = 60.0
# Capability numbers (linux/capability.h) of what CRIU needs, to leave out
# what this machine's root lacks itself (CAP_SYS_RESOURCE, DESIGN.md).
_CAP_NUMBERS = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "DAC_READ_SEARCH": 2,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "SETPCAP": 8,
    "NET_ADMIN": 12,
    "SYS_CHROOT": 18,
    "SYS_PTRACE": 19,
    "SYS_ADMIN": 21,
    "SYS_RESOURCE": 24,
    "SYS_TIME": 25,
    "CHECKPOINT_RESTORE": 40,
}


def grantable(capabilities: list[str]) -> list[str]:
    status = Path("/proc/self/status").read_text()
    bounding = int(
        next(line for line in status.splitlines() if line.startswith("CapBnd:")).split()[1], 16
    )
    return [c for c in capabilities if bounding >> _CAP_NUMBERS[c] & 1]


def capability_sets(pid: int) -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd and CapAmb of a process, as bit sets."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        key: int(value, 16)
        for key, value in (line.split(":\t") for line in status.splitlines())
        if key.startswith("Cap")
    }


# What the injection takes from the app of a container without a securityContext.
APP_DROPPED = app_drop_capabilities({})


def assert_app_lacks_criu_capabilities(app: int, holder: int) -> None:
    """The app lacks the capabilities added for CRIU alone, which the holder
    (and CRIU, its child) has."""
    dropped = sum(1 << _CAP_NUMBERS[c] for c in APP_DROPPED)
    assert capability_sets(holder)["CapEff"] & dropped, "the container lacks them: test is blind"
    caps = capability_sets(app)
    for key in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert caps[key] & dropped == 0, f"{key} of the app: {caps[key]:x}"
    assert caps["CapEff"] & 1 << _CAP_NUMBERS["KILL"], "a default capability was taken"


def cgroups(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def app_processes(holder: int) -> list[int]:
    """The holder's children once the CRIU that just ran has gone: the sidecar
    closes CRIU's socket after a dump or restore, and CRIU ends (and the
    holder reaps it) a moment later."""
    deadline = time.monotonic() + 20

    def going(pid: int) -> bool:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
            return b"swrk" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return False

    while True:
        children = proc.children_of(holder)
        if not any(going(pid) for pid in children):
            return children
        assert time.monotonic() < deadline, f"CRIU still runs in the app container: {children}"
        time.sleep(0.01)


def run_sidecar(pod: Pod, workdir: Path) -> subprocess.Popen[bytes]:
    """The activator's sidecar as its container would run it, joined to `pod`;
    its log goes on after an earlier one's."""
    with open(workdir / "sidecar.log", "ab") as log:
        return subprocess.Popen(
            [
                *pod.nsenter(),
                "unshare",
                "--mount-proc",
                "--propagation",
                "private",
                "--",
                # A /run of its own, as its container would have: its
                # control socket stays out of the host's.
                "sh",
                "-c",
                'mount -t tmpfs -o mode=0755 tmpfs /run && exec "$@"',
                "sidecar",
                ACTIVATOR,
                "sidecar",
                "--podinfo",
                str(workdir / "podinfo"),
                "--shared",
                str(workdir / "shared"),
                "--events",
                str(workdir / "events.jsonl"),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@dataclass
class ManagedPod:
    pod: Pod
    sidecar: subprocess.Popen[bytes]
    workdir: Path

    @property
    def shared(self) -> Path:
        return self.workdir / "shared"

    @property
    def events(self) -> Path:
        return self.workdir / "events.jsonl"

    def mark(self) -> int:
        return len(read_events(self.events))

    def wait_for(self, event: str, after: int = 0, timeout: float = 20.0) -> dict[str, object]:
        try:
            return wait_for_event(
                self.events, event, after, timeout, alive=lambda: self.sidecar.poll() is None
            )[1]
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nsidecar log:\n{self.sidecar_log()}") from None

    def sidecar_log(self) -> str:
        return (self.workdir / "sidecar.log").read_text(errors="replace")[-4000:]

    def get(self) -> tuple[int, str]:
        """(count, boot) from the counter, through the pod's address."""
        with urllib.request.urlopen(f"http://{self.pod.ip}:{APP_PORT}/", timeout=30) as answer:
            fields = dict(part.split("=") for part in answer.read().decode().split())
        return int(fields["count"]), fields["boot"]

    def stop_sidecar(self) -> int:
        """SIGTERM the activator (nsenter's child: nsenter forwards no signal);
        its exit status, which nsenter passes on."""
        for pid in proc.children_of(self.sidecar.pid):
            os.kill(pid, signal.SIGTERM)
        return self.sidecar.wait(30)

    def crash_sidecar(self) -> None:
        """SIGKILL the activator, as a crash or an OOM kill would end it."""
        (activator,) = proc.children_of(self.sidecar.pid)
        os.kill(activator, signal.SIGKILL)
        self.sidecar.wait(30)

    def restart_sidecar(self) -> None:
        """What kubelet does after the sidecar's container ended."""
        self.sidecar = run_sidecar(self.pod, self.workdir)


StartPod = Callable[..., ManagedPod]

# zeropod's annotations, as a user writes them.
MANAGED = {
    "zeropod.ctrox.dev/ports-map": f"app={APP_PORT}",
    "zeropod.ctrox.dev/scaledown-duration": "1s",
}


@pytest.fixture
def managed_pod(containerd: Containerd, tmp_path: Path) -> Iterator[StartPod]:
    made: list[ManagedPod] = []

    def start(annotations: dict[str, str]) -> ManagedPod:
        name = f"sc-{uuid.uuid4().hex[:8]}"
        workdir = tmp_path / name
        (workdir / "shared").mkdir(parents=True)
        (workdir / "podinfo").mkdir()
        # The Downward API's format: key="value", the value a Go string literal.
        (workdir / "podinfo" / "annotations").write_text(
            "".join(f"{k}={json.dumps(v)}\n" for k, v in sorted(annotations.items()))
        )
        pod = containerd.run_pod(name, (), annotations=annotations)
        managed = ManagedPod(pod, run_sidecar(pod, workdir), workdir)
        made.append(managed)
        # A native sidecar is started (its startup probe: the holder is in
        # place) before the app containers.
        deadline = time.monotonic() + START_TIMEOUT
        while not (managed.shared / "bin" / "holder").exists():
            assert managed.sidecar.poll() is None, managed.sidecar_log()
            assert time.monotonic() < deadline, "the sidecar did not install the holder"
            time.sleep(0.05)
        pod.start_container(
            containerd.app_container(
                command=["/pod-activator/bin/holder", "--name", "app", "--", "/counter"],
                mounts=[Mount(managed.shared, "/pod-activator")],
                capabilities=grantable(list(CRIU_CAPABILITIES)),
                # as the injection sets it for a container without a securityContext
                env={APP_DROP_CAPS_ENV: ",".join(APP_DROPPED)},
            )
        )
        return managed

    yield start
    for managed in made:
        managed.stop_sidecar()
        managed.pod.stop(grace=1)


def running(managed_pod: StartPod) -> tuple[ManagedPod, proc.Process]:
    """A managed pod whose app runs, and its holder."""
    managed = managed_pod(MANAGED)
    managed.wait_for("running", timeout=START_TIMEOUT)
    holder = proc.Process.of(managed.pod.containers["app"].pid)
    assert holder is not None
    return managed, holder


def test_app_container_scales_to_zero_and_wakes_three_times_with_state_and_log(
    managed_pod: StartPod,
) -> None:
    """Three cycles: the counter's memory survives, containerd reports the app
    container running throughout, its first process (the holder) never
    exits, and the app's output after each wake reaches the container log.
    The app, started cold or restored, lacks the capabilities only CRIU needs."""
    managed, holder = running(managed_pod)
    (cold,) = proc.children_of(holder.pid)
    assert_app_lacks_criu_capabilities(cold, holder.pid)
    count, boot = managed.get()
    for _ in range(3):
        mark = managed.mark()
        managed.wait_for("scaled-down", after=mark)
        assert managed.pod.state("app") == "CONTAINER_RUNNING"
        assert app_processes(holder.pid) == [], "the app's processes are not gone"
        woke = managed.mark()
        next_count, next_boot = managed.get()
        assert (next_count, next_boot) == (count + 1, boot), "the app restarted cold"
        assert managed.wait_for("running", after=woke).get("previous") == "restoring"
        count = next_count
        assert holder.alive() and managed.pod.state("app") == "CONTAINER_RUNNING"
        # Restored inside the container: the holder's child, in its cgroups.
        (app,) = app_processes(holder.pid)
        assert cgroups(app) == cgroups(holder.pid)
        assert_app_lacks_criu_capabilities(app, holder.pid)  # CRIU gave back what it dumped
    deadline = time.monotonic() + 10
    while f"request {count}" not in managed.pod.log_messages("app"):
        assert time.monotonic() < deadline, managed.pod.log_messages("app")[-5:]
        time.sleep(0.05)
    # The sidecar's Prometheus metrics, on the pod's address as a scraper sees them.
    metrics_url = f"http://{managed.pod.ip}:{METRICS_PORT}/metrics"
    with urllib.request.urlopen(metrics_url, timeout=10) as answer:
        metrics = answer.read().decode()
    assert 'pod_activator_restore_duration_seconds_count{pod="app"} 3.0' in metrics, metrics


def test_the_container_stop_signal_reaches_the_app_and_its_status_the_runtime(
    managed_pod: StartPod,
) -> None:
    """While the app runs, stopping its container (SIGTERM to the holder, as
    kubelet does) ends the app, and the container exits with the app's status
    (the counter does not catch SIGTERM: 128 + 15). A restored app too."""
    managed = managed_pod(MANAGED)
    managed.wait_for("running", timeout=START_TIMEOUT)
    managed.get()
    managed.wait_for("scaled-down", after=managed.mark())
    woke = managed.mark()
    managed.get()
    managed.wait_for("running", after=woke)
    managed.pod.cri.stop_container(managed.pod.containers["app"].id, 10)
    assert managed.pod.status("app").exit_code == 128 + signal.SIGTERM


def test_a_bad_annotation_leaves_the_pod_running_unmanaged(managed_pod: StartPod) -> None:
    managed = managed_pod(
        {
            "zeropod.ctrox.dev/ports-map": "app=80x80",
            "zeropod.ctrox.dev/scaledown-duration": "1s",
        }
    )
    unmanaged = managed.wait_for("unmanaged", timeout=START_TIMEOUT)
    assert "zeropod.ctrox.dev/ports-map" in str(unmanaged["message"])
    assert "80x80" in str(unmanaged["message"])
    # Reported before the app container starts: its app listens a moment later.
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            first, boot = managed.get()
            break
        except urllib.error.URLError:
            assert time.monotonic() < deadline, "the unmanaged app never served"
            time.sleep(0.05)
    time.sleep(2.5)  # more than the scale-down duration: nothing happens
    assert managed.get() == (first + 1, boot)
    assert [e["event"] for e in read_events(managed.events)] == ["unmanaged"]
    assert managed.pod.state("app") == "CONTAINER_RUNNING"
    assert managed.sidecar.poll() is None, "the sidecar must stay (a native sidecar restarts)"


def test_stopping_the_pod_as_kubelet_does_leaves_nothing(managed_pod: StartPod) -> None:
    """kubelet stops the app containers, then the sidecar, then the sandbox:
    no process, no image, no nft table is left."""
    managed = managed_pod(MANAGED)
    managed.wait_for("running", timeout=START_TIMEOUT)
    managed.get()
    managed.wait_for("scaled-down", after=managed.mark())
    assert list((managed.shared / "state").iterdir()), "no image to clean up: test is blind"
    assert (managed.shared / "run" / "app.app").exists(), "no record to clean up: test is blind"
    pause = managed.pod.pause_pid
    managed.pod.cri.stop_container(managed.pod.containers["app"].id, 5)
    assert managed.pod.status("app").exit_code == 0
    assert managed.stop_sidecar() == 0, managed.sidecar_log()
    tables = subprocess.run(
        ["nsenter", "-t", str(pause), "-n", "nft", "list", "tables"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "pod_activator" not in tables.stdout
    assert not any((managed.shared / "state").iterdir()), "images left behind"
    assert not (managed.shared / "run" / "app.app").exists(), "the app's record left behind"
    managed.pod.stop(grace=1)
    assert managed.pod.leftovers() == []
    assert os.path.exists(managed.shared / "bin" / "holder")  # the volume is kubelet's to remove


def test_a_restarted_sidecar_takes_back_a_scaled_down_app_with_its_state(
    managed_pod: StartPod,
) -> None:
    """The sidecar dies (SIGKILL) while the app is checkpointed; the next one
    finds the holder with no app and the image in the shared volume: the pod
    comes back scaled down, and the next connection restores the same memory."""
    managed, holder = running(managed_pod)
    count, boot = managed.get()
    managed.wait_for("scaled-down", after=managed.mark())
    managed.crash_sidecar()
    assert (managed.shared / "state" / "app" / "images").is_dir(), "no image: test is blind"
    back = managed.mark()
    managed.restart_sidecar()
    adopted = managed.wait_for("scaled-down", after=back, timeout=START_TIMEOUT)
    assert adopted.get("previous") == "created"
    assert app_processes(holder.pid) == [], "the app was started cold"
    woke = managed.mark()
    assert managed.get() == (count + 1, boot), "the app's memory was lost"
    assert managed.wait_for("running", after=woke).get("previous") == "restoring"
    assert holder.alive() and managed.pod.state("app") == "CONTAINER_RUNNING"
    # The app the new sidecar restored is managed as before: it scales down and wakes.
    managed.wait_for("scaled-down", after=managed.mark())
    assert managed.get() == (count + 2, boot)


def test_a_restarted_sidecar_takes_back_a_running_app_as_it_runs(
    managed_pod: StartPod,
) -> None:
    """The sidecar dies while the app runs; the next one watches that app (no
    cold start, no checkpoint on the way in), then scales it down and wakes it."""
    managed, holder = running(managed_pod)
    count, boot = managed.get()
    managed.crash_sidecar()
    back = managed.mark()
    managed.restart_sidecar()
    managed.wait_for("running", after=back, timeout=START_TIMEOUT)
    # A checkpoint the dead sidecar began (its idle time is short) kept the
    # state too; the app is then a restored one.
    assert managed.get() == (count + 1, boot), "the app restarted cold"
    managed.wait_for("scaled-down", after=managed.mark())
    assert app_processes(holder.pid) == []
    woke = managed.mark()
    assert managed.get() == (count + 2, boot)
    assert managed.wait_for("running", after=woke).get("previous") == "restoring"


def test_a_sidecar_killed_while_criu_checkpoints_loses_no_state(managed_pod: StartPod) -> None:
    """SIGKILL as soon as the journal names the checkpoint's CRIU (the holder's
    child, in the pod's pid namespace, which the next sidecar shares). Where
    the kill lands varies: before CRIU touched the app (it runs on and is
    watched), or during or after the dump (the image is taken); none may lose
    the counter's memory."""
    managed = managed_pod(MANAGED)
    managed.wait_for("running", timeout=START_TIMEOUT)
    count, boot = managed.get()
    state = managed.shared / "state" / "app"
    deadline = time.monotonic() + START_TIMEOUT
    # Or its image, if the whole checkpoint went by between two looks.
    while not ((state / "operation.json").exists() or (state / "images").exists()):
        assert time.monotonic() < deadline, f"no checkpoint began\n{managed.sidecar_log()}"
        time.sleep(0.001)
    managed.crash_sidecar()
    back = managed.mark()
    managed.restart_sidecar()
    managed.wait_for("scaled-down", after=back, timeout=START_TIMEOUT)
    assert managed.get() == (count + 1, boot), "the app's memory was lost"


def host_pid_of(pid_in_pod: int, among: list[int]) -> int | None:
    """Which of `among` (host pids) is `pid_in_pod` in the pod's pid namespace."""
    for pid in among:
        with contextlib.suppress(FileNotFoundError):
            status = Path(f"/proc/{pid}/status").read_text()
            nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
            if int(nspid.split()[-1]) == pid_in_pod:
                return pid
    return None


def mount_points(pid: int) -> set[str]:
    return {line.split()[4] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()}


def test_a_sidecar_killed_while_criu_restores_brings_the_app_back_with_its_state(
    managed_pod: StartPod,
) -> None:
    """A connection wakes the app; as soon as the journal names the restore's
    CRIU and CRIU has begun (its log is there), the test stops that CRIU
    (SIGSTOP) and SIGKILLs the sidecar, so the kill lands in the middle of
    the restore every time. (A kill before CRIU read its request ends that
    CRIU at once: the pod comes back scaled down with the image.) The next sidecar waits
    for that CRIU (let go once it does); the restore completes with nobody to
    hand the app to, so the app is the holder's only child: the new sidecar
    hands it over and serves it with its memory. No CRIU and no mount of
    CRIU's is left, and the app scales down and wakes again."""
    managed, holder = running(managed_pod)
    mounts = mount_points(holder.pid)
    count, boot = managed.get()
    managed.wait_for("scaled-down", after=managed.mark())
    journal = managed.shared / "state" / "app" / "operation.json"
    # CRIU opens its log once it has the request: from then on the restore
    # goes on without the sidecar.
    restoring = managed.shared / "state" / "app" / "images" / "restore.log"
    waking = socket.create_connection((managed.pod.ip, APP_PORT), timeout=30)
    criu = None
    try:
        waking.sendall(b"GET / HTTP/1.0\r\n\r\n")
        deadline = time.monotonic() + START_TIMEOUT
        while criu is None:
            assert time.monotonic() < deadline, f"no restore began\n{managed.sidecar_log()}"
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
                named = json.loads(journal.read_text())["criu"]["pid"]
                if restoring.exists():
                    criu = host_pid_of(named, proc.children_of(holder.pid))
            time.sleep(0.001)
        os.kill(criu, signal.SIGSTOP)
        managed.crash_sidecar()
        assert journal.exists(), "the restore was over before the kill: test is blind"
        back = managed.mark()
        managed.restart_sidecar()
        deadline = time.monotonic() + START_TIMEOUT
        while "waiting for the restore the killed activator left running" not in (
            managed.sidecar_log()
        ):
            assert managed.sidecar.poll() is None, managed.sidecar_log()
            assert time.monotonic() < deadline, managed.sidecar_log()
            time.sleep(0.05)
    finally:
        waking.close()
        if criu is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(criu, signal.SIGCONT)
    managed.wait_for("running", after=back, timeout=START_TIMEOUT)
    image_left = (managed.shared / "state" / "app" / "images").exists()
    if "checkpointing" not in [e["event"] for e in read_events(managed.events)[back:]]:
        assert not image_left, "the image the app came back from is still there"
    assert "taking the app the last sidecar restored" in managed.sidecar_log()
    assert managed.get() == (count + 1, boot), "the app's memory was lost"
    assert not os.path.exists(f"/proc/{criu}"), "the restore's CRIU is still there"
    (app,) = app_processes(holder.pid)
    assert cgroups(app) == cgroups(holder.pid)
    assert mount_points(holder.pid) == mounts, "CRIU left a mount in the app container"
    assert holder.alive() and managed.pod.state("app") == "CONTAINER_RUNNING"
    # The app the new sidecar took is managed as before: it scales down and wakes.
    managed.wait_for("scaled-down", after=managed.mark())
    assert app_processes(holder.pid) == []
    woke = managed.mark()
    assert managed.get() == (count + 2, boot)
    assert managed.wait_for("running", after=woke).get("previous") == "restoring"


def holder_run(managed: ManagedPod, *argv: str) -> int:
    """Make the holder run `argv` as its child, as a sidecar runs CRIU; its pid
    in the pod. Stands for the app's orphans, which the holder (their
    subreaper) also gets."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as control:
        control.connect(str(managed.shared / "run" / "app.sock"))
        control.send("\0".join(["exec", "", *argv]).encode())
        kind, pid = control.recv(4096).decode().split()
    assert kind == "exec" and int(pid), f"the holder did not run {argv}"
    return int(pid)


def test_a_restarted_sidecar_leaves_the_holders_other_children_alone(
    managed_pod: StartPod,
) -> None:
    """The sidecar dies while the app is checkpointed, and the holder has two
    children that are not the app. The next sidecar knows the app by the pid
    it recorded: those two run on untouched, the pod comes back scaled down,
    and the next connection restores the app with its state."""
    managed, holder = running(managed_pod)
    count, boot = managed.get()
    managed.wait_for("scaled-down", after=managed.mark())
    managed.crash_sidecar()
    others = {holder_run(managed, "/bin/sleep", "1000") for _ in range(2)}
    back = managed.mark()
    managed.restart_sidecar()
    assert managed.wait_for("scaled-down", after=back, timeout=START_TIMEOUT).get("previous") == (
        "created"
    )
    assert "are not the app" in managed.sidecar_log()
    woke = managed.mark()
    assert managed.get() == (count + 1, boot), "the app's memory was lost"
    assert managed.wait_for("running", after=woke).get("previous") == "restoring"
    in_pod = {host_pid_of(pid, proc.children_of(holder.pid)) for pid in others}
    assert None not in in_pod, "a child that is not the app was ended"
    assert len(app_processes(holder.pid)) == 3  # the app and those two


def test_a_holder_child_nothing_tells_from_the_app_leaves_the_pod_unmanaged_and_open(
    managed_pod: StartPod,
) -> None:
    """Without the app's recorded pid (a sidecar from before it was recorded),
    children of a holder with no app cannot be told apart: nothing is guessed
    or killed. The container is reported unmanaged with the cause and the fix,
    and its port is no longer redirected to a sidecar port nobody serves."""
    managed, holder = running(managed_pod)
    managed.get()
    managed.wait_for("scaled-down", after=managed.mark())
    managed.crash_sidecar()
    (managed.shared / "run" / "app.app").unlink()
    holder_run(managed, "/bin/sleep", "1000")
    tables = ["nsenter", "-t", str(managed.pod.pause_pid), "-n", "nft", "list", "tables"]
    assert "pod_activator" in subprocess.run(tables, capture_output=True, text=True).stdout
    back = managed.mark()
    managed.restart_sidecar()
    unmanaged = managed.wait_for("unmanaged", after=back, timeout=START_TIMEOUT)
    assert unmanaged["pod"] == "app"
    assert "restart the container" in str(unmanaged["message"])
    assert "ERROR pod app: left running unmanaged" in managed.sidecar_log()
    assert "pod_activator" not in subprocess.run(tables, capture_output=True, text=True).stdout
    assert len(proc.children_of(holder.pid)) == 1, "the child was ended"
    assert holder.alive() and managed.pod.state("app") == "CONTAINER_RUNNING"
    assert managed.sidecar.poll() is None, "the sidecar must stay (it manages other containers)"
