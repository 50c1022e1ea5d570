"""Privileged tests of the netns package against the real kernel.

Each test builds its own bridge and /24 (random names and addresses), so it
can check that everything it made is gone again, and cannot disturb pods of
a running activator or of another test. Everything is cleaned up in
fixtures, processes are only ever killed by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, veth, nftables)"),
]

pytest.importorskip("pyroute2")
pytest.importorskip("nftables")

from pyroute2 import IPRoute  # noqa: E402
from pyroute2 import netns as pyroute2_netns  # noqa: E402

from netns import bridge, ipam, nft, pod, process  # noqa: E402
from netns.namespace import NamespaceError, NetnsThread, NetnsWorker, ns_inode  # noqa: E402

TIMEOUT = 5.0
REPO = Path(__file__).resolve().parents[2]


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def _free_subnet() -> IPv4Network:
    """A random 10.250.X.0/24 that no host route touches yet."""
    with IPRoute() as ipr:
        routes = [
            IPv4Network(f"{r.get_attr('RTA_DST')}/{r['dst_len']}", strict=False)
            for r in ipr.route("dump", family=socket.AF_INET)
            if r["dst_len"]
        ]
    for _ in range(100):
        subnet = IPv4Network(f"10.250.{random.randrange(256)}.0/24")
        if not any(subnet.overlaps(r) for r in routes):
            return subnet
    raise RuntimeError("no free 10.250.X.0/24 on this host")


def _link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _ns(pid: int, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def _nspid(pid: int) -> list[int]:
    """A process's pid in each pid namespace it is in, outermost first."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(n) for n in line.split()[1:]]
    raise AssertionError(f"no NSpid for pid {pid}")


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found.update(int(c) for c in (task / "children").read_text().split())
    return found


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _kill_and_reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class Lab:
    """Pods on one private bridge; tears down everything it made, in reverse."""

    def __init__(self) -> None:
        self.bridge = _unique("pt")
        self.subnet = _free_subnet()
        self._cleanups: list[Callable[[], None]] = []
        self._live: set[int] = set()

    def defer(self, cleanup: Callable[[], None]) -> None:
        self._cleanups.append(cleanup)

    def new_pod(self, *, pause: bool = False) -> tuple[pod.PodNetwork, pod.Pause | None]:
        name = _unique("t-")
        network = pod.create_pod(name, subnet=self.subnet, bridge_name=self.bridge)
        started = pod.start_pause(network.netns_path) if pause else None
        self.defer(lambda: pod.destroy_pod(network, started))
        return network, started

    def thread(self, network: pod.PodNetwork) -> NetnsThread:
        thread = NetnsThread(network.netns_path)
        self.defer(thread.close)
        return thread

    def spawned(self, pid: int) -> int:
        """Track a child: killed and reaped at teardown unless the test reaps it first."""
        self._live.add(pid)
        self.defer(lambda: self._kill_if_live(pid))
        return pid

    def _kill_if_live(self, pid: int) -> None:
        if pid in self._live:
            self._live.discard(pid)
            _kill_and_reap(pid)

    def forget(self, pid: int) -> None:
        """A tracked child was reaped elsewhere: never kill its (recyclable) pid."""
        self._live.discard(pid)

    def wait(self, pid: int) -> int:
        """Reap a tracked child; return its wait status."""
        _, status = os.waitpid(pid, 0)
        # Forget it: its pid may be recycled, and must never be killed again.
        self._live.discard(pid)
        return status

    def close(self) -> None:
        errors = []
        for cleanup in reversed(self._cleanups):
            try:
                cleanup()
            except Exception as exc:  # keep cleaning; report at the end
                errors.append(exc)
        self._cleanups.clear()
        if errors:
            raise errors[0]


@pytest.fixture
def lab() -> Iterator[Lab]:
    made = Lab()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def subreaper() -> None:
    pod.become_subreaper()


def _listen(thread: NetnsThread, address: str = "0.0.0.0") -> socket.socket:
    server = thread.socket()
    server.bind((address, 0))
    server.listen()
    server.settimeout(TIMEOUT)
    return server


def _echo_once(server: socket.socket) -> threading.Thread:
    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(conn.recv(1024))

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    return worker


def _accepts(server: socket.socket, client: socket.socket, target: tuple[str, int]) -> bool:
    """Connect client to target; True if `server` is the one that accepts it."""
    client.settimeout(TIMEOUT)
    client.connect(target)
    server.settimeout(0.5)
    try:
        conn, _ = server.accept()
    except TimeoutError:
        return False
    conn.close()
    return True


# --- namespaces -------------------------------------------------------------


def test_netns_thread_sockets_live_in_the_pod(lab: Lab) -> None:
    network, _ = lab.new_pod()
    thread = lab.thread(network)
    inside = [name for _, name in thread.call(socket.if_nameindex)]
    assert sorted(inside) == ["eth0", "lo"]
    with thread.socket() as sock:
        # The socket stays in the pod once handed out: it can bind the pod's address.
        sock.bind((str(network.address), 0))
    assert ns_inode(network.netns_path) == thread.call(
        lambda: os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino
    )


def test_netns_thread_reraises_and_serves_asyncio(lab: Lab) -> None:
    network, _ = lab.new_pod()
    thread = lab.thread(network)
    with pytest.raises(ZeroDivisionError):
        thread.call(lambda: 1 // 0)
    assert asyncio.run(thread.acall(pow, 2, 10)) == 1024
    thread.close()
    thread.close()
    with pytest.raises(NamespaceError, match="closed"):
        thread.call(int)


def test_netns_threads_share_a_worker_each_call_in_its_own_pod(lab: Lab) -> None:
    (a, _), (b, _) = lab.new_pod(), lab.new_pod()
    worker = NetnsWorker("test-shared")
    lab.defer(worker.stop)
    in_a, in_b = NetnsThread(a.netns_path, worker=worker), NetnsThread(b.netns_path, worker=worker)
    lab.defer(in_a.close)
    lab.defer(in_b.close)

    def where() -> tuple[int, int]:
        tid = threading.get_native_id()
        return tid, os.stat(f"/proc/self/task/{tid}/ns/net").st_ino

    (tid_a, ns_a), (tid_b, ns_b) = in_a.call(where), in_b.call(where)
    assert tid_a == tid_b, "one thread serves both"
    assert (ns_a, ns_b) == (ns_inode(a.netns_path), ns_inode(b.netns_path))
    # Between calls it is back home: it keeps no pod's namespace alive.
    assert os.stat(f"/proc/self/task/{tid_a}/ns/net").st_ino == ns_inode("/proc/self/ns/net")
    with in_b.socket() as sock:
        sock.bind((str(b.address), 0))
    in_a.close()
    with pytest.raises(NamespaceError, match="closed"):
        in_a.call(int)
    assert in_b.call(where)[1] == ns_b, "closing one leaves the other served"
    # A call for another namespace from inside a call would wait on itself.
    again = NetnsThread(a.netns_path, worker=worker)
    lab.defer(again.close)
    with pytest.raises(NamespaceError, match="another namespace"):
        in_b.call(again.call, int)


def test_netns_thread_names_the_path_it_cannot_enter() -> None:
    missing = f"/run/netns/{_unique('missing-')}"
    with pytest.raises(NamespaceError, match=missing):
        NetnsThread(missing)
    with pytest.raises(NamespaceError, match="/proc/self/ns/uts"):
        NetnsThread("/proc/self/ns/uts")  # a namespace, but not a network one
    with pytest.raises(NamespaceError, match=missing):
        ns_inode(missing)


# --- pod networking ---------------------------------------------------------


def test_pods_reach_each_other_by_address(lab: Lab) -> None:
    a, _ = lab.new_pod()
    b, _ = lab.new_pod()
    assert a.address != b.address
    server = _listen(lab.thread(a))
    worker = _echo_once(server)
    with lab.thread(b).socket() as client:
        client.settimeout(TIMEOUT)
        client.connect((str(a.address), server.getsockname()[1]))
        client.sendall(b"ping")
        assert client.recv(1024) == b"ping"
    worker.join(TIMEOUT)
    server.close()


def test_a_pod_that_just_talked_to_an_address_reaches_its_new_owner_at_once(lab: Lab) -> None:
    """A pod is replaced on its address (adoption, the lowest free address
    first) right after a client pod talked to it: the client's ARP entry was
    confirmed less than a second ago, and Linux then ignores a new MAC for it
    (locktime), gratuitous ARP included; the client would send to the old MAC
    until that entry expired (most of a minute)."""
    client, _ = lab.new_pod()
    old, _ = lab.new_pod()

    def echo_through(server_pod: pod.PodNetwork) -> None:
        server = _listen(lab.thread(server_pod))
        worker = _echo_once(server)
        with lab.thread(client).socket() as sock:
            sock.settimeout(3.0)
            sock.connect((str(server_pod.address), server.getsockname()[1]))
            sock.sendall(b"ping")
            assert sock.recv(1024) == b"ping"
        worker.join(TIMEOUT)
        server.close()

    echo_through(old)
    pod.destroy_pod(old)
    new, _ = lab.new_pod()
    assert new.address == old.address, "the freed address was not reused"
    echo_through(new)


def test_host_reaches_pod_by_address(lab: Lab) -> None:
    network, _ = lab.new_pod()
    server = _listen(lab.thread(network))
    worker = _echo_once(server)
    with socket.create_connection((str(network.address), server.getsockname()[1]), TIMEOUT) as c:
        c.sendall(b"hello")
        assert c.recv(1024) == b"hello"
    worker.join(TIMEOUT)
    server.close()


def test_pod_layout(lab: Lab) -> None:
    network, _ = lab.new_pod()
    assert network.netns_name == f"pa-{network.name}"
    assert network.netns_path == f"/run/netns/{network.netns_name}"
    assert network.gateway == lab.subnet.network_address + 1
    assert network.address in lab.subnet
    assert len(network.host_ifname) <= 15
    with IPRoute() as ipr:
        (host_end,) = ipr.get_links(ifname=network.host_ifname)
        (br,) = ipr.link_lookup(ifname=lab.bridge)
        assert host_end.get_attr("IFLA_MASTER") == br
    lease = ipam.lease_of(network.address)
    assert lease is not None
    assert (lease.pod, lease.pid) == (network.name, os.getpid())


def test_second_pod_of_the_same_name_is_refused_and_the_first_survives(lab: Lab) -> None:
    network, _ = lab.new_pod()
    with pytest.raises(pod.PodExistsError, match=network.netns_name):
        pod.create_pod(network.name, subnet=lab.subnet, bridge_name=lab.bridge)
    assert network.netns_name in _netns_names()
    assert _link_exists(network.host_ifname)
    assert ipam.lease_of(network.address) is not None


@pytest.mark.parametrize("name", ["", "UPPER", "-lead", "trail-", "a_b", "a.b", "x" * 41])
def test_invalid_pod_names(name: str) -> None:
    with pytest.raises(pod.PodNameError):
        pod.create_pod(name)


def test_subnet_overlapping_a_foreign_route_is_refused(lab: Lab) -> None:
    dummy = _unique("ptd")
    with IPRoute() as ipr:
        ipr.link("add", ifname=dummy, kind="bridge")  # any device; dummy may be missing
        lab.defer(lambda: _delete_link(dummy))
        (index,) = ipr.link_lookup(ifname=dummy)
        ipr.addr("add", index=index, address=str(lab.subnet.network_address + 9), prefixlen=24)
        ipr.link("set", index=index, state="up")
    name = _unique("t-")
    overlapping = IPv4Network(f"{lab.subnet.network_address}/25")
    with pytest.raises(bridge.BridgeError, match=f"{lab.subnet}.*dev {dummy}"):
        pod.create_pod(name, subnet=overlapping, bridge_name=lab.bridge)
    # Nothing of the failed pod is left behind.
    assert pod.netns_name(name) not in _netns_names()
    assert not _link_exists(pod.host_ifname(name))
    assert not _link_exists(lab.bridge)
    assert all(lease.pod != name for lease in ipam.leases())


def _delete_link(name: str) -> None:
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=name):
            ipr.link("del", index=index)


def test_destroy_leaves_nothing_behind(lab: Lab, subreaper: None) -> None:
    network, pause = lab.new_pod(pause=True)
    assert pause is not None
    app = lab.spawned(pod.spawn_in_pod(pause.pid, ["sleep", "60"]))
    thread = lab.thread(network)
    nft.Redirector(thread).install({8080: 18080})
    thread.close()  # a live thread would keep the namespace (and table) alive
    pod.destroy_pod(network, pause, reap_children=True)
    lab.forget(app)  # reaped by destroy_pod

    assert network.netns_name not in _netns_names()
    assert not Path(network.netns_path).exists()
    assert not _link_exists(network.host_ifname)
    assert not _link_exists(lab.bridge)  # its last port is gone
    assert ipam.lease_of(network.address) is None
    assert pause.popen.returncode == 0  # the pause obeyed SIGTERM
    assert not Path(f"/proc/{pause.pid}").exists()
    assert app not in _children(os.getpid())
    # The table lived in the pod's namespace, which is gone (no holder left).
    with pytest.raises(NamespaceError):
        NetnsThread(network.netns_path)
    pod.destroy_pod(network, pause)  # idempotent (and the fixture does it once more)


def test_destroy_names_the_apps_we_must_reap(lab: Lab, subreaper: None) -> None:
    network, pause = lab.new_pod(pause=True)
    assert pause is not None
    app = lab.spawned(pod.spawn_in_pod(pause.pid, ["sleep", "60"]))
    # The pause exits and the kernel kills the app, our child; the pause
    # cannot finish until we reap it, and destroy_pod says so at once.
    started = time.monotonic()
    with pytest.raises(pod.PodError, match=rf"\[{app}\].*reaped"):
        pod.destroy_pod(network, pause)
    assert time.monotonic() - started < 2.0
    status = lab.wait(app)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    pod.destroy_pod(network, pause)
    assert not Path(f"/proc/{pause.pid}").exists()
    assert network.netns_name not in _netns_names()


def test_destroy_after_partial_create_and_of_unknown_pods() -> None:
    name = _unique("t-")
    pyroute2_netns.create(pod.netns_name(name))  # as if create_pod died after step one
    partial = pod.PodNetwork(
        name=name,
        netns_name=pod.netns_name(name),
        netns_path=f"/run/netns/{pod.netns_name(name)}",
        address=IPv4Address("10.250.255.254"),
        prefixlen=24,
        gateway=IPv4Address("10.250.255.1"),
        host_ifname=pod.host_ifname(name),
        bridge=_unique("pt"),
    )
    try:
        pod.destroy_pod(partial)
        assert partial.netns_name not in _netns_names()
        pod.destroy_pod(partial)  # nothing left at all
    finally:
        with contextlib.suppress(FileNotFoundError):
            pyroute2_netns.remove(partial.netns_name)


def test_concurrent_activators_share_the_bridge_safely(lab: Lab) -> None:
    # Separate processes, as separate activators would be: they race on the
    # bridge (create, attach, delete when empty) and on the address leases.
    script = textwrap.dedent(
        f"""
        import json, sys, uuid
        from ipaddress import IPv4Network
        from netns import pod
        seen = []
        for _ in range(3):
            network = pod.create_pod(
                "t-" + uuid.uuid4().hex[:8],
                subnet=IPv4Network("{lab.subnet}"),
                bridge_name="{lab.bridge}",
            )
            seen.append(str(network.address))
            pod.destroy_pod(network)
        print(json.dumps(seen))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
        for _ in range(4)
    ]
    for worker in workers:
        lab.defer(functools.partial(_kill_and_reap_popen, worker))
    for worker in workers:
        out, _ = worker.communicate(timeout=60)
        assert worker.returncode == 0
        assert len(json.loads(out)) == 3
    assert not _link_exists(lab.bridge)


def _kill_and_reap_popen(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# --- address leases -----------------------------------------------------------


def test_concurrent_allocations_are_unique(tmp_path: Path) -> None:
    root = tmp_path / "ipam"
    subnet = IPv4Network("10.250.0.0/24")
    results: dict[str, IPv4Address] = {}

    def take(name: str) -> None:
        results[name] = ipam.allocate(name, subnet, reserved=frozenset({subnet[1]}), root=root)

    workers = [threading.Thread(target=take, args=(f"p{i}",)) for i in range(16)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(TIMEOUT)
    assert len(set(results.values())) == 16
    assert subnet[1] not in results.values()
    assert ipam.release(results["p0"], "p1", root=root) is False  # never another pod's lease
    assert ipam.release(results["p0"], "p0", root=root) is True
    assert ipam.lease_of(results["p0"], root=root) is None
    assert ipam.release(results["p0"], "p0", root=root) is False


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _fake_lease(root: Path, address: IPv4Address, pod_name: str, pid: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    (root / str(address)).write_text(
        json.dumps({"pod": pod_name, "pid": pid, "start_time": 1, "boot_id": boot_id})
    )


def test_leases_of_dead_owners_are_reclaimed(tmp_path: Path) -> None:
    root = tmp_path / "ipam"
    subnet = IPv4Network("10.250.0.0/29")  # hosts .1 to .6; .1 is the gateway
    gateway = frozenset({subnet[1]})
    dead = _dead_pid()
    reclaimed: list[str] = []

    def allocate(name: str) -> IPv4Address:
        return ipam.allocate(
            name,
            subnet,
            reserved=gateway,
            root=root,
            on_reclaim=lambda lease: reclaimed.append(lease.pod),
        )

    # A dead earlier incarnation of the same pod gives its address back at once.
    _fake_lease(root, subnet[2], "same", dead)
    assert allocate("same") == subnet[2]
    assert reclaimed == ["same"]
    # Another pod's dead lease is reused only once no never-used address is left.
    _fake_lease(root, subnet[6], "other", dead)
    assert [allocate(f"live{i}") for i in (3, 4, 5)] == [subnet[3], subnet[4], subnet[5]]
    assert reclaimed == ["same"]
    assert allocate("new") == subnet[6]
    assert reclaimed == ["same", "other"]
    with pytest.raises(ipam.IpamError, match="no free address"):
        allocate("one-too-many")


# --- nftables -------------------------------------------------------------------


def test_redirect_sends_outside_traffic_to_the_shadow_port_only(lab: Lab) -> None:
    network, _ = lab.new_pod()
    thread = lab.thread(network)
    app = _listen(thread)
    shadow = _listen(thread)
    app_port, shadow_port = app.getsockname()[1], shadow.getsockname()[1]
    redirector = nft.Redirector(thread)
    redirector.install({app_port: shadow_port})
    try:
        # From the host (prerouting): redirected to the shadow listener.
        with socket.socket() as client:
            assert _accepts(shadow, client, (str(network.address), app_port))
        # From another pod, too.
        other, _ = lab.new_pod()
        with lab.thread(other).socket() as client:
            assert _accepts(shadow, client, (str(network.address), app_port))
        # From inside the pod over loopback (output path): the app itself.
        with thread.socket() as client:
            assert _accepts(app, client, ("127.0.0.1", app_port))
        # Without the table, outside traffic reaches the app again.
        redirector.remove()
        with socket.socket() as client:
            assert _accepts(app, client, (str(network.address), app_port))
    finally:
        app.close()
        shadow.close()


def test_redirector_works_with_fds_above_1024(lab: Lab) -> None:
    """libnftables aborts the process on a change once its socket's fd passes
    1023 (select): the activator holds that many with a hundred pods. In a
    child process, which an abort does not take the test run with."""
    network, _ = lab.new_pod()
    script = textwrap.dedent(
        f"""
        import os
        from netns import nft
        from netns.namespace import NetnsThread
        held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
        thread = NetnsThread({str(network.netns_path)!r})
        redirector = nft.Redirector(thread)
        redirector.install({{8080: 18080}})
        redirector.switch({{8080: 18080}}, ())
        assert redirector.installed() == {{}}, "open: the port is counted, not redirected"
        redirector.switch({{8080: 18080}}, None)
        assert redirector.installed() == {{8080: 18080}}
        redirector.remove()
        thread.close()
        print("ok", max(held))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "ok" and int(done.stdout.split()[1]) > 1024


def test_redirector_install_replaces_and_reads_back(lab: Lab) -> None:
    network, _ = lab.new_pod()
    redirector = nft.Redirector(lab.thread(network))
    assert redirector.installed() == {}
    redirector.remove()  # nothing to remove: fine
    redirector.install({8080: 18080, 9090: 19090})
    redirector.install({8080: 18080, 9090: 19090})
    assert redirector.installed() == {8080: 18080, 9090: 19090}
    redirector.install({7000: 17000})
    assert redirector.installed() == {7000: 17000}
    with pytest.raises(nft.NftError, match="port"):
        redirector.install({0: 1})
    assert redirector.installed() == {7000: 17000}  # a refused install changes nothing
    redirector.remove()
    redirector.remove()
    assert redirector.installed() == {}
    # The table is the pod's: the host has none.
    host = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    assert nft.TABLE not in host.stdout


def test_nft_batches_match_the_libnftables_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import nftables

    schema = json.loads((Path(nftables.__file__).parent / "schema.json").read_text())
    # Its $schema names no draft ("http://json-schema.org/schema#"), which
    # jsonschema guesses at with a warning: the draft is chosen here.
    validator = jsonschema.Draft7Validator(schema)
    probes = (IPv4Network("10.0.0.1/32"),)  # the fast path's batches too
    validator.validate(nft.install_batch({80: 8080}))
    validator.validate(nft.install_batch({80: 8080}, probes))
    validator.validate(nft.switch_batch({80: 8080}, probes))
    validator.validate(nft.remove_batch())


# --- processes ------------------------------------------------------------------


def test_spawn_in_pod_joins_the_pause_as_our_child_and_session_leader(
    lab: Lab, subreaper: None
) -> None:
    network, pause = lab.new_pod(pause=True)
    assert pause is not None
    assert _ns(pause.pid, "net") == ns_inode(network.netns_path)
    assert _ns(pause.pid, "pid") != _ns(os.getpid(), "pid")
    # The pause is pid 1 of its own pid namespace.
    assert _nspid(pause.pid) == [pause.pid, 1]

    pid = lab.spawned(pod.spawn_in_pod(pause.pid, ["sleep", "60"]))
    assert _ns(pid, "pid") == _ns(pause.pid, "pid")
    assert _ns(pid, "net") == _ns(pause.pid, "net")
    assert _ns(pid, "mnt") == _ns(os.getpid(), "mnt")  # no mount namespace for CRIU to dump
    assert os.getsid(pid) == pid
    assert len(_nspid(pid)) == 2 and _nspid(pid)[1] > 1
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid == os.getpid()


def test_apps_get_the_open_files_limit_we_were_started_with(
    lab: Lab, subreaper: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    started_with = (min(soft, 1024), hard)
    monkeypatch.setattr(process, "_app_open_files", None)
    resource.setrlimit(resource.RLIMIT_NOFILE, started_with)
    try:
        pod.raise_open_files_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        _, pause = lab.new_pod(pause=True)
        assert pause is not None
        pid = lab.spawned(pod.spawn_in_pod(pause.pid, ["sleep", "60"]))
        limits = Path(f"/proc/{pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert line.split()[3:5] == [str(n) for n in started_with], line
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_spawn_passes_fds_env_and_cwd(lab: Lab, subreaper: None, tmp_path: Path) -> None:
    _, pause = lab.new_pod(pause=True)
    assert pause is not None
    out_r, out_w = os.pipe()
    try:
        pid = lab.spawned(
            pod.spawn_in_pod(
                pause.pid,
                ["sh", "-c", 'echo "$GREETING $(pwd) $$"'],
                stdout=out_w,
                env={"GREETING": "hi", "PATH": os.environ["PATH"]},
                cwd=tmp_path,
            )
        )
        os.close(out_w)
        out_w = -1
        status = lab.wait(pid)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        greeting, cwd, inner_pid = os.read(out_r, 4096).decode().split()
        assert (greeting, cwd) == ("hi", str(tmp_path))
        assert int(inner_pid) > 1 and int(inner_pid) != pid  # a pid of the pod's namespace
    finally:
        os.close(out_r)
        if out_w >= 0:
            os.close(out_w)


def test_spawn_of_a_missing_command_raises_spawn_error(lab: Lab, subreaper: None) -> None:
    _, pause = lab.new_pod(pause=True)
    assert pause is not None
    missing = _unique("no-such-command-")
    children_before = _children(os.getpid())
    with pytest.raises(pod.SpawnError, match=missing) as raised:
        pod.spawn_in_pod(pause.pid, [missing])
    assert raised.value.errno == errno.ENOENT
    with pytest.raises(pod.SpawnError, match="/no/such/dir") as raised:
        pod.spawn_in_pod(pause.pid, ["true"], cwd="/no/such/dir")
    assert raised.value.errno == errno.ENOENT
    # No failed child is left for us to reap.
    assert _children(os.getpid()) == children_before


def test_pause_reaps_orphans_and_stops_on_sigterm(lab: Lab, subreaper: None) -> None:
    _, pause = lab.new_pod(pause=True)
    assert pause is not None
    # sh leaves a background sleep behind; orphaned inside the pod, it goes to the pause.
    pid = lab.spawned(pod.spawn_in_pod(pause.pid, ["sh", "-c", "sleep 0.2 & exit 0"]))
    lab.wait(pid)
    _wait_for(lambda: len(_children(pause.pid)) == 1, "the orphan to reach the pause")
    _wait_for(lambda: not _children(pause.pid), "the pause to reap the orphan")
    started = time.monotonic()
    pause.stop()
    assert time.monotonic() - started < 2.0  # SIGTERM did it, no SIGKILL fallback
    assert pause.popen.returncode == 0


def test_pause_fails_open_with_fds_above_1024(lab: Lab, subreaper: None) -> None:
    """The pause gets the activator's fd numbers, past 1024 with many pods."""
    lifeline_r, lifeline_w = os.pipe()
    output_r, output_w = os.pipe()
    high = [os.dup2(fd, 1500 + i) for i, fd in enumerate((lifeline_r, output_r))]
    for fd in (lifeline_r, output_r):
        os.close(fd)
    try:
        network = pod.create_pod(_unique("t-"), subnet=lab.subnet, bridge_name=lab.bridge)
        fallback = pod.Fallback(high[0], high[1], _unique("t"))
        pause = pod.start_pause(network.netns_path, fallback=fallback)
        lab.defer(lambda: pod.destroy_pod(network, pause))
    finally:
        for fd in high:
            os.close(fd)
    os.close(lifeline_w)  # as if the activator died
    os.set_blocking(output_w, False)
    drained = 0
    deadline = time.monotonic() + 10
    while drained < 1 << 20 and time.monotonic() < deadline:  # more than a pipe holds
        with contextlib.suppress(BlockingIOError):
            drained += os.write(output_w, b"x" * 65536)
    os.close(output_w)
    assert drained >= 1 << 20, "the pause does not drain the app's output"
    assert pause.popen.poll() is None, "the pause ended"


def test_pause_in_a_missing_namespace_says_why() -> None:
    missing = f"/run/netns/{_unique('missing-')}"
    with pytest.raises(pod.PauseError, match=rf"{missing}.*exited before it was ready.*nsenter"):
        pod.start_pause(missing)


def test_spawn_into_a_stopped_pod_raises_spawn_error(lab: Lab, subreaper: None) -> None:
    _, pause = lab.new_pod(pause=True)
    assert pause is not None
    pause.stop()
    with pytest.raises(pod.SpawnError, match=f"namespaces of pause pid {pause.pid}"):
        pod.spawn_in_pod(pause.pid, ["true"])
