"""The pod's TCP connections, as the kernel lists them (sock_diag over netlink).

Called on the pod's NetnsThread: a netlink socket sees the network namespace
of the thread that made it.
"""

from __future__ import annotations

import socket
from collections.abc import Collection

# Every TCP state of a connection that is not over: all but LISTEN, TIME_WAIT
# and CLOSE (bit n is state n, as the kernel numbers them).
_LISTEN, _TIME_WAIT, _CLOSE = 10, 6, 7
_NOT_OVER = ((1 << 12) - 1) & ~((1 << _LISTEN) | (1 << _TIME_WAIT) | (1 << _CLOSE))


def open_connections(ports: Collection[int]) -> int:
    """Connections to `ports` from outside the pod (loopback peers are the
    activator's own relays to the app) that are not over yet."""
    from pyroute2 import DiagSocket  # 23 MiB of imports: only for pods that ask

    with DiagSocket() as diag:
        diag.bind()
        found = diag.get_sock_stats(family=socket.AF_INET, states=_NOT_OVER)
    return sum(
        1
        for sock in found
        if sock["idiag_sport"] in ports and not sock["idiag_dst"].startswith("127.")
    )
