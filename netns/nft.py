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

libnftables talks netlink on sockets of the calling thread's namespace, so
the Nftables context is created and used on the pod's NetnsThread only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import nftables

from netns.errors import NftError
from netns.namespace import NetnsThread

__all__ = ["CHAIN", "TABLE", "NftError", "Redirector", "install_batch", "remove_batch"]

TABLE = "pod_activator"
CHAIN = "prerouting"
_FAMILY = "ip"
# NF_IP_PRI_NAT_DST, the priority `dstnat` names; libnftables 1.0.6's JSON
# parser takes numbers only.
_PRIO_DSTNAT = -100

_Json = dict[str, Any]


def _table() -> _Json:
    return {"family": _FAMILY, "name": TABLE}


def _check_port(port: object, what: str) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise NftError(f"{what} {port!r} is not a TCP port number (1-65535)")
    return port


def install_batch(redirects: Mapping[int, int]) -> _Json:
    """One transaction that makes the table hold exactly `redirects` (app port -> shadow port).

    add + delete + add replaces the table whatever it held before, chains
    included (a flush keeps chains, and a chain left by another version with
    another hook or priority would make `add chain` fail). libnftables runs
    a batch as one kernel transaction: readers see the old table or the new
    one, never none, and packets are never let through unredirected.
    """
    rules = []
    for app, shadow in sorted(redirects.items()):
        _check_port(app, "application port")
        _check_port(shadow, "shadow port")
        if app == shadow:
            raise NftError(f"port {app} cannot be redirected to itself")
        rules.append(
            {
                "add": {
                    "rule": {
                        "family": _FAMILY,
                        "table": TABLE,
                        "chain": CHAIN,
                        "expr": [
                            {
                                "match": {
                                    "op": "==",
                                    "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                    "right": app,
                                }
                            },
                            {"redirect": {"port": shadow}},
                        ],
                    }
                }
            }
        )
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
            *rules,
        ]
    }


def remove_batch() -> _Json:
    """Delete the table if present: the add makes the delete succeed when it is not."""
    return {"nftables": [{"add": {"table": _table()}}, {"delete": {"table": _table()}}]}


def _parse_rule(rule: _Json) -> tuple[int, int]:
    try:
        match, redirect = rule["expr"]
        left = match["match"]["left"]["payload"]
        if left != {"protocol": "tcp", "field": "dport"} or match["match"]["op"] != "==":
            raise ValueError(left)
        return int(match["match"]["right"]), int(redirect["redirect"]["port"])
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

    def _run(self, what: str, command: _Json) -> Any:
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

    def install(self, redirects: Mapping[int, int]) -> None:
        """Make the table redirect exactly `redirects` (app port -> shadow port). Idempotent."""
        self._run(f"install table {_FAMILY} {TABLE}", install_batch(redirects))

    def remove(self) -> None:
        """Delete the table. Idempotent."""
        self._run(f"remove table {_FAMILY} {TABLE}", remove_batch())

    def installed(self) -> dict[int, int]:
        """The redirects the table holds now; {} when there is no table."""
        tables = self._run("list tables", {"nftables": [{"list": {"tables": {}}}]})
        present = any(
            item.get("table", {}).get("family") == _FAMILY
            and item.get("table", {}).get("name") == TABLE
            for item in tables.get("nftables", [])
        )
        if not present:
            return {}
        listing = self._run(
            f"list table {_FAMILY} {TABLE}", {"nftables": [{"list": {"table": _table()}}]}
        )
        redirects: dict[int, int] = {}
        for item in listing.get("nftables", []):
            if "rule" in item:
                app, shadow = _parse_rule(item["rule"])
                redirects[app] = shadow
        return redirects
