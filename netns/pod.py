"""Local pod networks, laid out the way a kubelet with a bridge CNI lays them out.

A pod is a named network namespace (/run/netns/pa-NAME) with `lo` up and an
`eth0` that is one end of a veth pair; the other end is a port of the shared
host bridge. Its address is leased from the pod subnet (ipam), its default
route goes via the bridge's address. The netlink work (netns.links) runs in
a short-lived helper process (netns.plumber), so that pyroute2 never weighs
on a long-lived activator. The pause process and the applications are in
netns.process; this module re-exports them so pod users need one import.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from netns import ipam, plumber, proc
from netns.errors import NetnsError, PodError, PodExistsError, PodNameError
from netns.process import (
    Fallback,
    Pause,
    PauseError,
    SpawnError,
    become_subreaper,
    is_subreaper,
    raise_open_files_limit,
    spawn_in_pod,
    start_pause,
)

__all__ = [
    "DEFAULT_BRIDGE",
    "DEFAULT_SUBNET",
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
    "netns_path",
    "raise_open_files_limit",
    "remove_stale_pod",
    "spawn_in_pod",
    "stale_pod",
    "start_pause",
    "validate_pod_name",
]

NETNS_DIR = Path("/run/netns")
# The shared host bridge of local pods and the subnet pods get addresses from
# (netns.bridge creates it), as a bridge CNI's config would name them.
DEFAULT_BRIDGE = "pa0"
DEFAULT_SUBNET = IPv4Network("10.244.0.0/16")
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_NAME_MAX = 40


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


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def create_pod(
    name: str,
    *,
    subnet: IPv4Network = DEFAULT_SUBNET,
    bridge_name: str = DEFAULT_BRIDGE,
    owner_pid: int | None = None,
) -> PodNetwork:
    """Create pod `name`'s network: netns, address lease, veth, routes.

    Everything created is undone if a later step fails. `owner_pid` is the
    process that owns the address lease (default: this one); the lease may
    be reclaimed once that process is gone. The netlink work is done by this
    process's netlink helper (netns.plumber), which raises its errors here.
    """
    validate_pod_name(name)
    fields = plumber.call(
        "create",
        name=name,
        subnet=str(subnet),
        bridge_name=bridge_name,
        owner_pid=os.getpid() if owner_pid is None else owner_pid,
    )
    return PodNetwork(
        name=fields["name"],
        netns_name=fields["netns_name"],
        netns_path=fields["netns_path"],
        address=IPv4Address(fields["address"]),
        prefixlen=int(fields["prefixlen"]),
        gateway=IPv4Address(fields["gateway"]),
        host_ifname=fields["host_ifname"],
        bridge=fields["bridge"],
    )


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
    """Remove whatever exists of a pod's network (in the netlink helper); return what failed."""
    try:
        problems: list[str] = plumber.call(
            "teardown",
            name=name,
            ns=ns,
            ifname=ifname,
            bridge_name=bridge_name,
            address=None if address is None else str(address),
        )
    except NetnsError as exc:
        return [str(exc)]
    return problems


@dataclass(frozen=True)
class StalePod:
    """A pod whose activator is gone (killed): its network and processes remain."""

    name: str
    address: IPv4Address | None
    pids: tuple[int, ...]  # every process in its network namespace, pause included


def stale_pod(name: str) -> StalePod | None:
    """The pod `name` if it exists and no live activator owns it; None if it does
    not exist. Raises PodExistsError if a live activator owns it."""
    path = netns_path(netns_name(name))
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
        DEFAULT_BRIDGE,
        stale.address,
    )
    if problems:
        raise PodError(f"stale pod {stale.name}: " + "; ".join(problems))
