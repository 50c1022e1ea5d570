"""One `activator run` as the integration tests drive it, and what it leaves behind.

`Activator` is one `activator run ... -- CMD` subprocess with its own events
file, state dir and log in a work dir, and the pods it manages (the one it
made, and any added to it). What differs between its users (the sample app in
test_activator.py, a real server's recipe in servers.py) is only the command,
its working directory and environment: parameters of `run_activator`.

Tests synchronise on the events file (polled with a deadline, never slept
on). `teardown` stops the activator by pid (SIGTERM, then SIGKILL after a
bound), then finds, reports and removes whatever is left of its pods:
processes (by pid, with their command), namespaces (and the nft table in a
netns left behind), veth, lease, state dir, agent socket, SysV shared memory.
No fixtures here (they are in conftest.py): bench/ uses this through servers.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netns.pod import host_ifname
from netns.proc import Process, descendants_of, members_of, ns_inode_of, nspid

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
ACTIVATOR = BIN / "activator"
PYTHON = BIN / "python"
RUN_DIR = Path("/run/pod-activator")
AGENTS_DIR = RUN_DIR / "agents"
IPAM_DIR = RUN_DIR / "ipam"
NETNS_DIR = Path("/run/netns")
APP_PORT = 8080  # the bundled sample app's (activator.sampleapp)

# For test modules that run `activator run`: `pytestmark = NEEDS_ROOT`.
NEEDS_ROOT = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, nftables, CRIU)"),
    pytest.mark.skipif(not ACTIVATOR.exists(), reason="no .venv/bin/activator: run scripts/setup"),
]

START_TIMEOUT = 30.0  # `activator run` to its pod's "running"
EVENT_TIMEOUT = 30.0  # one phase change (checkpoint, restore) on a busy 2-core machine
STATUS_TIMEOUT = 30.0  # one question to the activator's control socket
STOP_TIMEOUT = 30.0  # SIGTERM to exit; the activator gives each app 5 s

Event = dict[str, Any]


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --- the events file -----------------------------------------------------------------


def read_events(path: Path) -> list[Event]:
    """Every complete line of the events file (a line being written is skipped)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def detail(event: Event, key: str) -> Any:
    """A detail of an event, nested under "details" or at the top level."""
    nested = event.get("details")
    if isinstance(nested, dict) and key in nested:
        return nested[key]
    return event.get(key)


def phase_changes(events: list[Event]) -> list[str]:
    return [ev["event"] for ev in events if "previous" in ev]


def wait_for_event(
    path: Path,
    event: str | tuple[str, ...],
    after_index: int = 0,
    timeout: float = EVENT_TIMEOUT,
    *,
    pod: str | None = None,
    alive: Callable[[], bool] | None = None,
) -> tuple[int, Event]:
    """The first `event` (or any of several; of `pod`, if given) at index >= `after_index`.

    Polls the file until `timeout`; gives up early when `alive()` says the
    writer is gone. Raises AssertionError listing the events seen.
    """
    wanted = (event,) if isinstance(event, str) else event
    deadline = time.monotonic() + timeout
    while True:
        events = read_events(path)
        for index in range(after_index, len(events)):
            found = events[index]
            if found.get("event") in wanted and (pod is None or found.get("pod") == pod):
                return index, found
        if time.monotonic() > deadline or (alive is not None and not alive()):
            seen = [(i, ev.get("pod"), ev.get("event")) for i, ev in enumerate(events)]
            why = "timed out" if alive is None or alive() else "the activator exited"
            raise AssertionError(
                f"{why} waiting for event {event!r} (pod {pod}) after index {after_index}; "
                f"events: {seen}"
            )
        time.sleep(0.01)


# --- the host's view of a pod ----------------------------------------------------------


def ns_members(kind: str, inode: int) -> set[int]:
    """Host pids of every process in namespace `kind` with `inode`."""
    return set(members_of(kind, inode))


def netns_pids(pod: str) -> set[int]:
    """Host pids of every process in the pod's network namespace (none if it is gone)."""
    try:
        inode = os.stat(NETNS_DIR / f"pa-{pod}").st_ino
    except OSError:
        return set()
    return ns_members("net", inode)


def link_exists(ifname: str) -> bool:
    return (
        subprocess.run(["ip", "link", "show", "dev", ifname], capture_output=True).returncode == 0
    )


def leases_of(pod: str) -> list[Path]:
    found = []
    with contextlib.suppress(FileNotFoundError):
        for path in IPAM_DIR.iterdir():
            with contextlib.suppress(OSError, ValueError, KeyError):
                if not path.name.startswith(".") and json.loads(path.read_text())["pod"] == pod:
                    found.append(path)
    return found


def nft_table_in(pod: str) -> bool:
    """The activator's nft table exists in the pod's network namespace."""
    nft = shutil.which("nft") or "/usr/sbin/nft"
    netns = f"--net={NETNS_DIR / f'pa-{pod}'}"
    table = [nft, "list", "table", "ip", "pod_activator"]
    return subprocess.run(["nsenter", netns, *table], capture_output=True).returncode == 0


def describe_process(pid: int) -> str:
    """A process left behind, for the report (ps: parent, state, age, command)."""
    done = subprocess.run(
        ["ps", "-o", "ppid=,stat=,etime=,args=", "-p", str(pid)], capture_output=True, text=True
    )
    return done.stdout.strip() or "gone"


def sysv_shm() -> dict[int, tuple[int, int]]:
    """shmid -> (creator pid, attached count) of the host IPC namespace's segments."""
    found = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
            cols = line.split()
            found[int(cols[1])] = (int(cols[4]), int(cols[6]))
    return found


# --- one `activator run` ---------------------------------------------------------------


def run_activator(
    command: Sequence[str],
    workdir: Path,
    *,
    name: str,
    port: int,
    scaledown_after: str = "1s",
    flags: Sequence[str] = (),
    state_dir: Path,
    log_level: str = "info",
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `activator run --name NAME --port PORT ... -- COMMAND`, writing its events
    and log into `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(ACTIVATOR), "--log-level", log_level, "run", "--name", name, "--port", str(port),
        "--scaledown-after", scaledown_after, *flags,
        "--events", str(workdir / "events.jsonl"),
        "--state-dir", str(state_dir),
        "--", *command,
    ]  # fmt: skip
    with open(workdir / "activator.log", "wb") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            # A Ctrl-C on the test then reaches only the test, which stops it in order.
            start_new_session=new_session,
        )


@dataclass
class Activator:
    """One `activator run` (see `run_activator`) and what it made."""

    name: str  # the pod `activator run` made
    proc: subprocess.Popen[bytes]
    workdir: Path  # its events file and log
    state_dir: Path
    pods: list[str] = field(default_factory=list)  # every pod it manages, for teardown
    # Killed on purpose (SIGKILL): what it leaves is expected, and only removed.
    killed: bool = False
    _addresses: dict[str, str] = field(default_factory=dict)
    _tracked: set[Process] = field(default_factory=set)  # processes to look for at teardown

    def __post_init__(self) -> None:
        if self.name not in self.pods:
            self.pods.insert(0, self.name)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def events_path(self) -> Path:
        return self.workdir / "events.jsonl"

    @property
    def log_path(self) -> Path:
        return self.workdir / "activator.log"

    @property
    def agent_socket(self) -> Path:
        return AGENTS_DIR / f"{self.pid}.sock"

    @property
    def images(self) -> Path:
        """The CRIU image of the pod, while it is scaled down."""
        return self.state_dir / self.name / "images"

    def alive(self) -> bool:
        return self.proc.poll() is None

    # -- events --

    def events(self) -> list[Event]:
        return read_events(self.events_path)

    def mark(self) -> int:
        """The index the next event will have."""
        return len(self.events())

    def wait_for_indexed(
        self,
        event: str | tuple[str, ...],
        after: int = 0,
        timeout: float = EVENT_TIMEOUT,
        pod: str | None = None,
    ) -> tuple[int, Event]:
        """The first `event` (or any of several) of the pod at index >= `after`, and its
        index. AssertionError, with the events seen and the log, after `timeout`."""
        try:
            return wait_for_event(
                self.events_path, event, after, timeout, pod=pod or self.name, alive=self.alive
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nactivator log tail:\n{self.log_tail()}") from None

    def wait_for(
        self,
        event: str | tuple[str, ...],
        after: int = 0,
        timeout: float = EVENT_TIMEOUT,
        pod: str | None = None,
    ) -> Event:
        """The first `event` (or any of several) of the pod at index >= `after`."""
        return self.wait_for_indexed(event, after, timeout, pod)[1]

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    # -- its pods --

    def status(self, pod: str | None = None) -> Event:
        """The pod as its activator reports it (the status of `activator status --json`,
        asked of this activator alone: other activators on the machine are not waited for)."""
        from activator.control import ask

        pod = pod or self.name
        answer = ask(self.agent_socket, {"op": "status"}, STATUS_TIMEOUT)
        pods = [p for p in answer["pods"] if p["name"] == pod]
        assert len(pods) == 1, f"status lists pod {pod} {len(pods)} times: {answer}"
        found: Event = pods[0]
        return found

    def address(self, pod: str | None = None) -> str:
        pod = pod or self.name
        if pod not in self._addresses:
            self._addresses[pod] = str(self.status(pod)["address"])
        return self._addresses[pod]

    def pause(self, pod: str | None = None) -> int:
        """Host pid of the pod's pause: pid 1 of the pod's pid namespace."""
        pod = pod or self.name
        found = [pid for pid in netns_pids(pod) if nspid(pid)[1:] == [1]]
        assert len(found) == 1, f"pod {pod}: pause candidates {found}"
        return found[0]

    def pid_namespace(self, pod: str | None = None) -> int:
        inode = ns_inode_of(self.pause(pod), "pid")
        assert inode is not None
        return inode

    def app_pids(self, pod: str | None = None) -> set[int]:
        """Host pids of the processes in the pod's pid namespace but the pause."""
        pause = self.pause(pod)
        inode = ns_inode_of(pause, "pid")
        assert inode is not None
        pids = ns_members("pid", inode) - {pause}
        self._track(pids)
        return pids

    # -- teardown --

    def _track(self, pids: set[int]) -> None:
        for pid in pids:
            if (proc := Process.of(pid)) is not None:
                self._tracked.add(proc)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM by pid, wait with a bound, SIGKILL by pid if needed; the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(10)
                raise AssertionError(
                    f"activator pid {self.pid} did not exit within {timeout:.0f}s of "
                    f"SIGTERM: killed\n{self.log_tail()}"
                ) from None
        return self.proc.returncode

    def teardown(self) -> list[str]:
        """Stop, then find, report and remove whatever is left of the pods."""
        problems: list[str] = []
        self._track(descendants_of(self.pid) if self.alive() else set())
        for pod in self.pods:
            self._track(netns_pids(pod))
        try:
            status = self.stop()
            if status != 0:
                problems.append(f"activator exited {status}\n{self.log_tail()}")
        except AssertionError as exc:
            problems.append(str(exc))
        # The pauses first: the kernel ends the rest of each pod with them.
        for proc in sorted(self._tracked, key=lambda p: nspid(p.pid)[1:] != [1]):
            if proc.alive():
                problems.append(
                    f"process {proc.pid} survived the activator ({describe_process(proc.pid)})"
                )
                proc.kill()
        for pod in self.pods:
            problems += self._remove_left_of(pod)
        if self.agent_socket.exists():
            problems.append(f"agent socket {self.agent_socket} left behind")
            self.agent_socket.unlink(missing_ok=True)
        # SysV shared memory (PostgreSQL's) made by the pods' processes and now unused.
        ours = {p.pid for p in self._tracked}
        for shmid, (cpid, nattch) in sysv_shm().items():
            if cpid in ours and nattch == 0:
                problems.append(f"SysV shm {shmid} of process {cpid} left behind")
                subprocess.run(["ipcrm", "-m", str(shmid)], capture_output=True)
        return [] if self.killed else problems

    def _remove_left_of(self, pod: str) -> list[str]:
        problems = []
        netns = f"pa-{pod}"
        if (NETNS_DIR / netns).exists():
            problems.append(f"netns {netns} left behind")
            if nft_table_in(pod):
                problems.append(f"nft table pod_activator left behind in {netns}")
            subprocess.run(["ip", "netns", "delete", netns], capture_output=True)
        veth = host_ifname(pod)
        if link_exists(veth):
            problems.append(f"veth {veth} left behind")
            subprocess.run(["ip", "link", "delete", veth], capture_output=True)
        for lease in leases_of(pod):
            problems.append(f"lease {lease} left behind")
            lease.unlink(missing_ok=True)
        if (self.state_dir / pod).exists():
            problems.append(f"state dir {self.state_dir / pod} left behind")
            shutil.rmtree(self.state_dir / pod, ignore_errors=True)
        return problems


StartActivator = Callable[..., Activator]


def assert_nothing_left(activators: Sequence[Activator]) -> None:
    """Tear down every activator, the last started first; fail naming what was left."""
    problems = [problem for act in reversed(activators) for problem in act.teardown()]
    assert not problems, "left behind (now removed): " + "; ".join(problems)
