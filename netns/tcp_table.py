"""The TCP connections of the calling thread's network namespace, as the kernel
lists them in /proc/thread-self/net/tcp.

Called on a thread inside the pod's namespace (see namespace.py). sock_diag
over netlink would give the same; pyroute2's client for it costs the
activator about 20 MiB, and this table is a few lines per pod.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

TABLE = Path("/proc/thread-self/net/tcp")
# The kernel's TCP states that mean no connection, or one that is over.
_LISTEN, _TIME_WAIT, _CLOSE = 0x0A, 0x06, 0x07
_OVER = {_LISTEN, _TIME_WAIT, _CLOSE}
_LOOPBACK_NET = 0x7F  # 127.0.0.0/8: the first byte of the address


def open_connections(ports: Collection[int]) -> int:
    """Connections to `ports` from outside the pod (loopback peers are the
    activator's own relays to the app) that are not over yet."""
    count = 0
    with TABLE.open() as table:
        next(table)  # the header
        for line in table:
            # "sl local_address rem_address st ...", addresses as hex
            # "0100007F:1F90" (the IPv4 address in host byte order: little-endian).
            _, local, remote, state, *_ = line.split(None, 4)
            port = int(local.partition(":")[2], 16)
            peer_first_byte = int(remote[6:8], 16)
            if port in ports and int(state, 16) not in _OVER and peer_first_byte != _LOOPBACK_NET:
                count += 1
    return count
