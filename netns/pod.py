"""Local pod networks, laid out the way a kubelet with a bridge CNI lays them out.

A pod is a named network namespace (/run/netns/pa-NAME) with `lo` up and an
`eth0` that is one end of a veth pair; the other end is a port of the shared
host bridge. Its address is leased from the pod subnet (ipam), its default
route goes via the bridge's address. The pause process and the applications
are in netns.process; this module re-exports them so pod users need one import.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from netns import bridge, ipam, proc
from netns.errors import NetnsError, PodError, PodExistsError, PodNameError
from netns.namespace import NetnsThread
from netns.process import (
    Fallback,
    Pause,
    PauseError,
    SpawnError,
    become_subreaper,
    is_subreaper,
    spawn_in_pod,
    start_pause,
)
from netns.runlock import locked

__all__ = [
    "NETNS_DIR",
    "Fallback",
    "Pause",
    "PauseError",
    "PodError",
    "PodExistsError",
    "PodNameError",
    "PodNetwork",
    "SpawnError",
    "StalePod",
    "become_subreaper",
    "create_pod",
    "destroy_pod",
    "host_ifname",
    "is_subreaper",
    "netns_name",
    "remove_stale_pod",
    "spawn_in_pod",
    "stale_pod",
    "start_pause",
    "validate_pod_name",
]

NETNS_DIR = Path("/run/netns")
POD_IFNAME = "eth0"
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_NAME_MAX = 40
# One lock for all bridges, not one per bridge: lock files cannot be removed
# safely (a waiter could hold a deleted one), and per-bridge ones would pile up.
BRIDGE_LOCK = "bridges"
NETNS_LOCK = "netns"


@dataclass(frozen=True)
class PodNetwork:
    name: str
    netns_name: str
    netns_path: str
    address: IPv4Address
    prefixlen: int
    gateway: IPv4Address  # the bridge's address on the host
    host_ifname: str
    bridge: str

    @property
    def interface(self) -> IPv4Interface:
        return IPv4Interface(f"{self.address}/{self.prefixlen}")


def validate_pod_name(name: str) -> str:
    """Return `name` if it is a DNS-label-like pod name, else raise PodNameError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or len(name) > _NAME_MAX:
        raise PodNameError(
            f"invalid pod name {name!r}: use 1 to {_NAME_MAX} characters of a-z, 0-9 "
            "and '-', starting and ending with a letter or digit"
        )
    return name


def netns_name(pod: str) -> str:
    return f"pa-{pod}"


def host_ifname(pod: str) -> str:
    """The host end of a pod's veth: "pa" + 13 hex digits, the 15 that fit IFNAMSIZ.

    Derived from the name, so any process can find (and clean up) it, and
    hashed because pod names are longer than interface names may be.
    """
    return "pa" + hashlib.sha256(pod.encode()).hexdigest()[:13]


def _netns_path(name: str) -> Path:
    return NETNS_DIR / name


def _claim_netns(name: str) -> None:
    path = _netns_path(name)
    try:
        # Locked because a creation in progress also looks like a bare file
        # (created, not yet mounted): it must not be mistaken for a stale one.
        with locked(NETNS_LOCK):
            if path.exists() and not _is_mounted_ns(path):
                # A bare file: left by a reboot (when /run is not a tmpfs) or
                # a creation that died half-way; it holds no namespace.
                path.unlink(missing_ok=True)
            pyroute2_netns.create(name)
    except FileExistsError as exc:
        raise PodExistsError(
            f"network namespace {path} already exists: a pod with this name is "
            "running on this host; stop it (or `ip netns delete` it if it is stale) "
            "or pick another name"
        ) from exc
    except OSError as exc:
        raise PodError(f"cannot create network namespace {path}: {exc}") from exc


def _is_mounted_ns(path: Path) -> bool:
    # A bound namespace lives on nsfs, another device than its directory.
    try:
        return path.stat().st_dev != path.parent.stat().st_dev
    except FileNotFoundError:
        return False


def create_pod(
    name: str,
    *,
    subnet: IPv4Network = bridge.DEFAULT_SUBNET,
    bridge_name: str = bridge.DEFAULT_BRIDGE,
    owner_pid: int | None = None,
) -> PodNetwork:
    """Create pod `name`'s network: netns, address lease, veth, routes.

    Everything created is undone if a later step fails. `owner_pid` is the
    process that owns the address lease (default: this one); the lease may
    be reclaimed once that process is gone.
    """
    validate_pod_name(name)
    ns = netns_name(name)
    # The namespace goes first: its exclusive creation is what makes this
    # pod name ours, so cleaning up after a failure can never destroy the
    # pod of another process that holds the same name.
    _claim_netns(name=ns)
    address: IPv4Address | None = None
    try:
        gateway = bridge.gateway_of(subnet)
        address = ipam.allocate(
            name,
            subnet,
            reserved=frozenset({gateway.ip}),
            owner_pid=owner_pid,
            on_reclaim=lambda lease: _delete_link(host_ifname(lease.pod)),
        )
        network = PodNetwork(
            name=name,
            netns_name=ns,
            netns_path=str(_netns_path(ns)),
            address=address,
            prefixlen=subnet.prefixlen,
            gateway=gateway.ip,
            host_ifname=host_ifname(name),
            bridge=bridge_name,
        )
        _plug(network, subnet)
    except BaseException:
        _teardown(name, ns, host_ifname(name), bridge_name, address)
        raise
    return network


def _plug(network: PodNetwork, subnet: IPv4Network) -> None:
    fd = os.open(network.netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with IPRoute() as ipr, locked(BRIDGE_LOCK):
            # Under the lock from bridge check to attach: another process
            # deleting the bridge as its last port leaves must not do so
            # between the two.
            bridge_index = bridge.ensure_bridge(ipr, network.bridge, subnet)
            try:
                # The peer is born inside the pod as eth0: no rename, and no
                # clash with the host's own eth0.
                ipr.link(
                    "add",
                    ifname=network.host_ifname,
                    kind="veth",
                    peer={"ifname": POD_IFNAME, "net_ns_fd": fd},
                )
            except NetlinkError as exc:
                raise PodError(
                    f"cannot create veth {network.host_ifname} for pod {network.name}: {exc}"
                ) from exc
            index = bridge.link_index(ipr, network.host_ifname)
            if index is None:
                raise PodError(f"veth {network.host_ifname} vanished right after its creation")
            bridge.attach(ipr, index, bridge_index)
            # The address may have belonged to a removed pod: forget its MAC,
            # or the host keeps sending to it until the entry goes stale.
            with contextlib.suppress(NetlinkError):
                ipr.neigh("del", dst=str(network.address), ifindex=bridge_index)
    finally:
        os.close(fd)
    with NetnsThread(network.netns_path) as inside:
        inside.call(_configure_inside, network)


def _configure_inside(network: PodNetwork) -> None:
    """Runs in the pod's netns: lo up, eth0 address and up, default route."""
    with IPRoute() as ipr:
        lo = bridge.link_index(ipr, "lo")
        eth0 = bridge.link_index(ipr, POD_IFNAME)
        if lo is None or eth0 is None:
            raise PodError(f"pod {network.name}: no lo or {POD_IFNAME} in {network.netns_path}")
        ipr.link("set", index=lo, state="up")
        ipr.addr("add", index=eth0, address=str(network.address), prefixlen=network.prefixlen)
        ipr.link("set", index=eth0, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=str(network.gateway), oif=eth0)
        mac = ipr.get_links(eth0)[0].get_attr("IFLA_ADDRESS")
    _announce(POD_IFNAME, mac, network.address)


def _announce(ifname: str, mac: str, address: IPv4Address) -> None:
    """Send a gratuitous ARP, so that other pods that cached the previous
    owner of a reused address learn the new MAC at once."""
    hw = bytes.fromhex(mac.replace(":", ""))
    ip = address.packed
    ethernet = b"\xff" * 6 + hw + struct.pack("!H", 0x0806)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + ip + b"\0" * 6 + ip
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((ifname, 0))
        sock.send(ethernet + arp)


def destroy_pod(
    network: PodNetwork, pause: Pause | None = None, *, reap_children: bool = False
) -> None:
    """Tear pod `network` down, with its pause process. Idempotent.

    Safe after a partial create_pod and on parts already gone; what really
    fails is reported in one PodError after every step has been tried.
    Close NetnsThreads of the pod first: they keep the namespace alive
    (though no longer reachable by name). The pod's applications are our
    children and must be reaped for the pause to exit: see Pause.stop.
    """
    problems: list[str] = []
    if pause is not None:
        # First, so that no application of the pod still uses the network we
        # take away: when pid 1 of the pod exits the kernel kills the rest.
        try:
            pause.stop(reap_children=reap_children)
        except (OSError, NetnsError) as exc:
            problems.append(f"stop pause pid {pause.pid}: {exc}")
    problems += _teardown(
        network.name, network.netns_name, network.host_ifname, network.bridge, network.address
    )
    if problems:
        raise PodError(f"pod {network.name} not fully destroyed: {'; '.join(problems)}")


def _teardown(
    name: str, ns: str, ifname: str, bridge_name: str, address: IPv4Address | None
) -> list[str]:
    """Remove whatever exists of a pod's network; return what failed."""
    problems: list[str] = []
    # The veth before the lease: the address must be off the bridge before
    # another pod can lease it, or two pods would answer for it.
    try:
        _delete_link(ifname)
    except (OSError, NetlinkError, NetnsError) as exc:
        problems.append(f"delete veth {ifname}: {exc}")
    if address is not None:
        try:
            ipam.release(address, name)
        except (OSError, NetnsError) as exc:
            problems.append(f"release lease of {address}: {exc}")
    try:
        with IPRoute() as ipr, locked(BRIDGE_LOCK):
            bridge.delete_if_unused(ipr, bridge_name)
    except (OSError, NetlinkError, NetnsError) as exc:
        problems.append(f"delete unused bridge {bridge_name}: {exc}")
    # The name last: while it exists, no other process can create a pod of
    # the same name and have its veth or lease removed by this teardown.
    try:
        # Locked like its creation: a half-removed name looks stale to _claim_netns.
        with locked(NETNS_LOCK):
            pyroute2_netns.remove(ns)
    except FileNotFoundError:
        pass
    except (OSError, NetnsError) as exc:
        problems.append(f"remove network namespace {ns}: {exc}")
    return problems


def _delete_link(ifname: str) -> None:
    """Delete a link of the host namespace (both ends, for a veth) if it exists."""
    with IPRoute() as ipr:
        index = bridge.link_index(ipr, ifname)
        if index is None:
            return
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise


@dataclass(frozen=True)
class StalePod:
    """A pod whose activator is gone (killed): its network and processes remain."""

    name: str
    address: IPv4Address | None
    pids: tuple[int, ...]  # every process in its network namespace, pause included


def stale_pod(name: str) -> StalePod | None:
    """The pod `name` if it exists and no live activator owns it; None if it does
    not exist. Raises PodExistsError if a live activator owns it."""
    path = _netns_path(netns_name(name))
    if not path.exists():
        return None
    lease = next((lease for lease in ipam.leases() if lease.pod == name), None)
    if lease is not None and lease.owner_alive():
        raise PodExistsError(
            f"pod {name} is managed by the activator with pid {lease.pid}: stop it first"
        )
    inode = os.stat(path).st_ino
    return StalePod(name, lease.address if lease else None, tuple(proc.members_of("net", inode)))


def remove_stale_pod(stale: StalePod, *, timeout: float = 5.0) -> None:
    """End a stale pod's processes (by pid) and remove its network. Idempotent."""
    proc.end(filter(None, map(proc.Process.of, stale.pids)), timeout)
    problems = _teardown(
        stale.name,
        netns_name(stale.name),
        host_ifname(stale.name),
        bridge.DEFAULT_BRIDGE,
        stale.address,
    )
    if problems:
        raise PodError(f"stale pod {stale.name}: " + "; ".join(problems))
