"""The shared host bridge that connects local pods, as a CNI bridge plugin would.

The bridge carries the first address of the pod subnet (the pods' gateway),
so the host reaches every pod by address through the connected route, and
pods reach each other at layer 2 without the host forwarding anything
(ip_forward stays as it is). Callers hold the bridge's host lock around
ensure/attach/delete, since another activator process may be adding or
removing ports at the same moment.
"""

from __future__ import annotations

import errno
import hashlib
import socket
from ipaddress import IPv4Interface, IPv4Network
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netns.errors import BridgeError
from netns.pod import DEFAULT_BRIDGE, DEFAULT_SUBNET

__all__ = [
    "DEFAULT_BRIDGE",
    "DEFAULT_SUBNET",
    "BridgeError",
    "attach",
    "delete_if_unused",
    "ensure_bridge",
    "gateway_of",
    "link_index",
]

_IFNAMSIZ = 15  # usable characters of a Linux interface name


def gateway_of(subnet: IPv4Network) -> IPv4Interface:
    """The bridge's address: the subnet's first host address, with its prefix."""
    if subnet.prefixlen > 30:
        raise BridgeError(f"pod subnet {subnet} is too small: use a /30 or larger")
    return IPv4Interface(f"{subnet.network_address + 1}/{subnet.prefixlen}")


def link_index(ipr: IPRoute, name: str) -> int | None:
    found: list[int] = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _bridge_mac(name: str) -> str:
    # A bridge without an address of its own takes the lowest MAC of its
    # ports and changes it as pods come and go, which leaves stale gateway
    # entries in the pods' ARP caches. Setting one pins it. Locally
    # administered (0x02) and derived from the name, so every process agrees.
    digest = hashlib.sha256(f"pod-activator bridge {name}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def _overlapping_routes(ipr: IPRoute, subnet: IPv4Network, ours: int | None) -> list[str]:
    found = []
    for route in ipr.route("dump", family=socket.AF_INET):
        dst_len: int = route["dst_len"]
        oif = route.get_attr("RTA_OIF")
        if dst_len == 0 or (ours is not None and oif == ours):
            continue  # default routes overlap everything; our own are expected
        dst = IPv4Network(f"{route.get_attr('RTA_DST')}/{dst_len}", strict=False)
        if dst.overlaps(subnet):
            dev = _ifname(ipr, oif) if oif is not None else "?"
            found.append(f"{dst} dev {dev} table {route.get_attr('RTA_TABLE')}")
    return found


def _ifname(ipr: IPRoute, index: int) -> str:
    links: Any = ipr.link("get", index=index)
    return str(links[0].get_attr("IFLA_IFNAME"))


def _addresses(ipr: IPRoute, index: int) -> list[IPv4Interface]:
    return [
        IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        for a in ipr.get_addr(family=socket.AF_INET, index=index)
    ]


def ensure_bridge(ipr: IPRoute, name: str, subnet: IPv4Network) -> int:
    """Create (or check) bridge `name` serving `subnet`; return its ifindex.

    Refuses a subnet that overlaps a host route that is not the bridge's
    own: pod addresses would shadow, or be shadowed by, real networks.
    """
    if not 0 < len(name) <= _IFNAMSIZ:
        raise BridgeError(f"bridge name {name!r} must be 1 to {_IFNAMSIZ} characters")
    gateway = gateway_of(subnet)
    index = link_index(ipr, name)
    clashes = _overlapping_routes(ipr, subnet, index)
    if clashes:
        raise BridgeError(
            f"pod subnet {subnet} overlaps host route(s) {', '.join(clashes)}; "
            "choose a pod subnet that is not in use on this host"
        )
    if index is None:
        try:
            ipr.link("add", ifname=name, kind="bridge", address=_bridge_mac(name))
        except NetlinkError as exc:
            raise BridgeError(f"cannot create bridge {name}: {exc}") from exc
        index = link_index(ipr, name)
        if index is None:
            raise BridgeError(f"bridge {name} vanished right after its creation")
    else:
        kind = _link_kind(ipr, index)
        if kind != "bridge":
            raise BridgeError(
                f"interface {name} exists but is a {kind or 'plain'} link, not a bridge; "
                "pick another bridge name"
            )
    present = _addresses(ipr, index)
    if gateway not in present:
        others = [str(a) for a in present]
        if others:
            raise BridgeError(
                f"bridge {name} has address(es) {', '.join(others)}, not {gateway}: "
                f"it serves another subnet; use that subnet or another bridge name"
            )
        ipr.addr("add", index=index, address=str(gateway.ip), prefixlen=gateway.network.prefixlen)
    ipr.link("set", index=index, state="up")
    return index


def _link_kind(ipr: IPRoute, index: int) -> str | None:
    link: Any = ipr.link("get", index=index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else str(info.get_attr("IFLA_INFO_KIND"))


def attach(ipr: IPRoute, port_index: int, bridge_index: int) -> None:
    """Make `port_index` a port of the bridge and bring it up."""
    ipr.link("set", index=port_index, master=bridge_index, state="up")


def delete_if_unused(ipr: IPRoute, name: str) -> bool:
    """Delete bridge `name` if no port is left on it; True if deleted."""
    index = link_index(ipr, name)
    if index is None:
        return False
    if ipr.get_links(master=index):
        return False
    try:
        ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:  # else someone removed it meanwhile
            raise BridgeError(f"cannot delete unused bridge {name}: {exc}") from exc
        return False
    return True
