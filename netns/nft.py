"""The pod's nftables table: move an application's public ports behind the activator.

Inside the pod's network namespace one table, owned by the activator and by
nothing else, holds a nat chain at prerouting that redirects each
application port to the activator's shadow port:

    table ip pod_activator {
        chain prerouting {
            type nat hook prerouting priority dstnat; policy accept;
            tcp dport 8080 redirect to :18080
        }
    }

Only traffic arriving from outside the pod passes prerouting. Connections
made inside the pod (the activator reaching the application on 127.0.0.1)
take the output path and are left alone: that is how the activator gets to
the application without being redirected to itself.

With the fast path open (after a wake), only probes are redirected; other
new connections go to the application directly and are counted:

        ip saddr { 10.44.0.1 } tcp dport 8080 redirect to :18080
        tcp dport 8080 counter name "direct"

libnftables talks netlink on sockets of the calling thread's namespace, so
the Nftables context is created and used on the pod's NetnsThread only. It
reads the table; changes go through the `nft` program, started from that
thread and so in the pod's namespace: libnftables waits for the answer to a
change with select(), and glibc aborts the whole process when select is given
an fd above 1023, which its socket gets once the activator holds a thousand
fds (a hundred pods with their connections). A read waits without select.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from functools import cache
from ipaddress import IPv4Network
from typing import Any

import nftables

from netns.errors import NftError
from netns.namespace import NetnsThread

__all__ = [
    "CHAIN",
    "COUNTER",
    "TABLE",
    "NftError",
    "Redirector",
    "install_batch",
    "remove_batch",
    "switch_batch",
]

TABLE = "pod_activator"
CHAIN = "prerouting"
_FAMILY = "ip"
# NF_IP_PRI_NAT_DST, the priority `dstnat` names; libnftables 1.0.6's JSON
# parser takes numbers only.
_PRIO_DSTNAT = -100
# Connections let through to the app directly (the fast path), counted.
COUNTER = "direct"

_Json = dict[str, Any]


def _table() -> _Json:
    return {"family": _FAMILY, "name": TABLE}


def _counter() -> _Json:
    """The fast path's counter, as a table object."""
    return {"family": _FAMILY, "table": TABLE, "name": COUNTER}


def _check_port(port: object, what: str) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise NftError(f"{what} {port!r} is not a TCP port number (1-65535)")
    return port


def _redirect_rules(
    redirects: Mapping[int, int], direct_except: tuple[IPv4Network, ...] | None
) -> list[_Json]:
    """The chain's rules: each app port redirected to its shadow port; with
    `direct_except` (the fast path), only connections from those sources are,
    and the others go straight to the app, counted by the table's COUNTER."""
    rules = []
    for app, shadow in sorted(redirects.items()):
        _check_port(app, "application port")
        _check_port(shadow, "shadow port")
        if app == shadow:
            raise NftError(f"port {app} cannot be redirected to itself")
        dport = {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                "right": app,
            }
        }
        redirect = {"redirect": {"port": shadow}}
        if direct_except is None:
            rules.append(_rule([dport, redirect]))
            continue
        if direct_except:
            sources = {
                "match": {
                    "op": "==",
                    "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                    "right": {
                        "set": [
                            {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
                            for net in direct_except
                        ]
                    },
                }
            }
            rules.append(_rule([sources, dport, redirect]))
        # A nat chain sees the first packet of a connection only: the counter
        # counts connections. The ct match is there for its side effect too:
        # without a ct or nat expression the namespace tracks no connections,
        # and a nat chain then sees no packet at all.
        new_connection = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["new"]}}
        rules.append(_rule([new_connection, dport, {"counter": COUNTER}]))
    return rules


def _rule(expr: list[_Json]) -> _Json:
    return {"add": {"rule": {"family": _FAMILY, "table": TABLE, "chain": CHAIN, "expr": expr}}}


def install_batch(
    redirects: Mapping[int, int], direct_except: tuple[IPv4Network, ...] | None = None
) -> _Json:
    """One transaction that makes the table hold exactly `redirects` (app port -> shadow port).

    add + delete + add replaces the table whatever it held before, chains
    included (a flush keeps chains, and a chain left by another version with
    another hook or priority would make `add chain` fail). libnftables runs
    a batch as one kernel transaction: readers see the old table or the new
    one, never none, and packets are never let through unredirected.
    """
    chain = {
        "family": _FAMILY,
        "table": TABLE,
        "name": CHAIN,
        "type": "nat",
        "hook": "prerouting",
        "prio": _PRIO_DSTNAT,
        "policy": "accept",
    }
    return {
        "nftables": [
            {"add": {"table": _table()}},
            {"delete": {"table": _table()}},
            {"add": {"table": _table()}},
            {"add": {"chain": chain}},
            {"add": {"counter": _counter()}},
            *_redirect_rules(redirects, direct_except),
        ]
    }


def switch_batch(
    redirects: Mapping[int, int], direct_except: tuple[IPv4Network, ...] | None
) -> _Json:
    """Replace the chain's rules in one transaction, keeping the table and its
    counter: opening or closing the fast path loses no count."""
    chain = {"family": _FAMILY, "table": TABLE, "name": CHAIN}
    return {"nftables": [{"flush": {"chain": chain}}, *_redirect_rules(redirects, direct_except)]}


def remove_batch() -> _Json:
    """Delete the table if present: the add makes the delete succeed when it is not."""
    return {"nftables": [{"add": {"table": _table()}}, {"delete": {"table": _table()}}]}


@cache
def _nft_program() -> str:
    found = shutil.which("nft")
    if found is None:
        raise NftError("the nft program is not in PATH: install nftables")
    return found


def _parse_rule(rule: _Json) -> tuple[int, int] | None:
    """(app port, shadow port) of a redirect rule; None for a fast path's counting rule."""
    try:
        *_, match, action = rule["expr"]  # the dport match is the last before the action
        left = match["match"]["left"]["payload"]
        if left != {"protocol": "tcp", "field": "dport"} or match["match"]["op"] != "==":
            raise ValueError(left)
        if action == {"counter": COUNTER}:
            return None
        return int(match["match"]["right"]), int(action["redirect"]["port"])
    except (KeyError, TypeError, ValueError) as exc:
        raise NftError(
            f"table {_FAMILY} {TABLE} holds a rule the activator did not write: {rule}; "
            f"remove the table (`nft delete table {_FAMILY} {TABLE}` in the pod) and reinstall"
        ) from exc


class Redirector:
    """The activator's nftables table in the namespace of `thread`.

    Methods block until libnftables answers (a millisecond or so); from
    asyncio, `await thread.acall(redirector.install, ports)`.
    """

    def __init__(self, thread: NetnsThread) -> None:
        self._thread = thread

    def _read(self, what: str, command: _Json) -> Any:
        def run() -> Any:
            # A context per command, made in the pod's namespace: commands are
            # rare, and a context kept per pod costs memory (density).
            nft = nftables.Nftables()
            nft.set_json_output(True)
            rc, output, error = nft.json_cmd(command)
            if rc != 0:
                raise NftError(f"nft could not {what} in {self._thread.path}: {str(error).strip()}")
            return output

        return self._thread.call(run)

    def _change(self, what: str, batch: _Json) -> None:
        """Run `batch` as one transaction, with the `nft` program (see above)."""

        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [_nft_program(), "-j", "-f", "-"],
                input=json.dumps(batch).encode(),
                capture_output=True,
                check=False,
            )

        done = self._thread.call(run)
        if done.returncode != 0:
            error = done.stderr.decode(errors="replace").strip()
            raise NftError(f"nft could not {what} in {self._thread.path}: {error}")

    def install(self, redirects: Mapping[int, int]) -> None:
        """Make the table redirect exactly `redirects` (app port -> shadow port). Idempotent."""
        self._change(f"install table {_FAMILY} {TABLE}", install_batch(redirects))

    def switch(
        self, redirects: Mapping[int, int], direct_except: tuple[IPv4Network, ...] | None
    ) -> None:
        """Open the fast path (`direct_except`: the sources still redirected)
        or close it (None), on the installed table."""
        what = "open the fast path" if direct_except is not None else "close the fast path"
        self._change(what, switch_batch(redirects, direct_except))

    def direct_connections(self) -> int:
        """How many connections the fast path let through since the table was made."""
        listing = self._read(
            "read the fast path's counter",
            {"nftables": [{"list": {"counter": _counter()}}]},
        )
        for item in listing.get("nftables", []):
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise NftError(f"table {_FAMILY} {TABLE} has no counter {COUNTER!r}: reinstall it")

    def remove(self) -> None:
        """Delete the table. Idempotent."""
        self._change(f"remove table {_FAMILY} {TABLE}", remove_batch())

    def installed(self) -> dict[int, int]:
        """The redirects the table holds now; {} when there is no table."""
        tables = self._read("list tables", {"nftables": [{"list": {"tables": {}}}]})
        present = any(
            item.get("table", {}).get("family") == _FAMILY
            and item.get("table", {}).get("name") == TABLE
            for item in tables.get("nftables", [])
        )
        if not present:
            return {}
        listing = self._read(
            f"list table {_FAMILY} {TABLE}", {"nftables": [{"list": {"table": _table()}}]}
        )
        redirects: dict[int, int] = {}
        for item in listing.get("nftables", []):
            if "rule" in item and (redirect := _parse_rule(item["rule"])) is not None:
                redirects[redirect[0]] = redirect[1]
        return redirects
