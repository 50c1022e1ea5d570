"""The netlink side of a local pod's network: netns file, veth, addresses, routes.

Only the netlink helper process runs this (see netns.plumber): pyroute2 costs
a long-lived activator some 20 MiB it would never give back, for work done
once per pod. The arguments and results are plain JSON values, since they
cross a pipe; netns.pod turns them back into a PodNetwork.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from dataclasses import asdict
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from netns import bridge, ipam
from netns.errors import NetnsError, PodError, PodExistsError
from netns.namespace import NetnsThread
from netns.pod import PodNetwork, host_ifname, netns_name, netns_path
from netns.runlock import locked

__all__ = ["create", "teardown"]

POD_IFNAME = "eth0"
# One lock for all bridges, not one per bridge: lock files cannot be removed
# safely (a waiter could hold a deleted one), and per-bridge ones would pile up.
BRIDGE_LOCK = "bridges"
NETNS_LOCK = "netns"


def _claim_netns(name: str) -> None:
    path = netns_path(name)
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


def create(name: str, subnet: str, bridge_name: str, owner_pid: int) -> dict[str, Any]:
    """Create pod `name`'s network (see netns.pod.create_pod); return its PodNetwork's fields."""
    ns = netns_name(name)
    pod_subnet = IPv4Network(subnet)
    # The namespace goes first: its exclusive creation is what makes this
    # pod name ours, so cleaning up after a failure can never destroy the
    # pod of another process that holds the same name.
    _claim_netns(name=ns)
    address: IPv4Address | None = None
    try:
        gateway = bridge.gateway_of(pod_subnet)
        address = ipam.allocate(
            name,
            pod_subnet,
            reserved=frozenset({gateway.ip}),
            owner_pid=owner_pid,
            on_reclaim=lambda lease: _delete_link(host_ifname(lease.pod)),
        )
        network = PodNetwork(
            name=name,
            netns_name=ns,
            netns_path=str(netns_path(ns)),
            address=address,
            prefixlen=pod_subnet.prefixlen,
            gateway=gateway.ip,
            host_ifname=host_ifname(name),
            bridge=bridge_name,
        )
        _plug(network, pod_subnet)
    except BaseException:
        _teardown(name, ns, host_ifname(name), bridge_name, address)
        raise
    return {key: str(value) for key, value in asdict(network).items()}


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
                    peer={
                        "ifname": POD_IFNAME,
                        "net_ns_fd": fd,
                        "address": pod_mac(network.address),
                    },
                )
            except NetlinkError as exc:
                raise PodError(
                    f"cannot create veth {network.host_ifname} for pod {network.name}: {exc}"
                ) from exc
            index = bridge.link_index(ipr, network.host_ifname)
            if index is None:
                raise PodError(f"veth {network.host_ifname} vanished right after its creation")
            bridge.attach(ipr, index, bridge_index)
            # The address may have belonged to a removed pod of an older
            # activator, with a MAC not made of its address (pod_mac): forget
            # it, or the host keeps sending to it until the entry goes stale.
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
    _announce(POD_IFNAME, pod_mac(network.address), network.address)


def pod_mac(address: IPv4Address) -> str:
    """The MAC of the pod on `address`, made of the address (locally
    administered, unicast): a pod that replaces another on its address has
    its MAC, so the ARP caches of the host and of other pods stay right. A
    gratuitous ARP alone does not do: Linux keeps an entry confirmed less than
    a second ago (locktime), and a client pod that had just talked to the old
    pod kept sending to its MAC for most of a minute."""
    return ":".join(f"{octet:02x}" for octet in (0x0A, 0x58, *address.packed))


def _announce(ifname: str, mac: str, address: IPv4Address) -> None:
    """Send a gratuitous ARP: the bridge learns the pod's port at once, and
    other pods that cached an earlier owner of the address with another MAC
    (see pod_mac) learn the new one, if their entry allows it."""
    hw = bytes.fromhex(mac.replace(":", ""))
    ip = address.packed
    ethernet = b"\xff" * 6 + hw + struct.pack("!H", 0x0806)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + ip + b"\0" * 6 + ip
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((ifname, 0))
        sock.send(ethernet + arp)


def teardown(name: str, ns: str, ifname: str, bridge_name: str, address: str | None) -> list[str]:
    """Remove whatever exists of a pod's network; return what failed."""
    return _teardown(
        name, ns, ifname, bridge_name, None if address is None else IPv4Address(address)
    )


def _teardown(
    name: str, ns: str, ifname: str, bridge_name: str, address: IPv4Address | None
) -> list[str]:
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
