"""Pod address leases, unique across every activator process on the host.

One file per leased address under IPAM_DIR (`/run/pod-activator/ipam/10.244.0.7`)
holding who took it: pod name, owner pid, the owner's start time and the boot
id. A lease
appears with link(2) of a fully written temporary file, which fails if the
address is taken, so a reader never sees a half-written lease and two
processes can never take the same address. A lease whose owner is dead
(pid gone, or reused by another process: the start time tells) may be
reclaimed; reclaiming happens under a host lock so two reclaimers cannot
both win. The boot id matters because /run is not always a tmpfs (it is not
on the machines we measured): leases may outlive a reboot, their owners not.

Owner pids are host pids: the processes sharing a lease directory must
share a pid namespace, or live owners would look dead.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from netns import proc
from netns.errors import IpamError
from netns.runlock import RUN_DIR, locked

__all__ = ["IPAM_DIR", "IpamError", "Lease", "allocate", "lease_of", "leases", "release"]

IPAM_DIR = RUN_DIR / "ipam"
_LOCK = "ipam"


@dataclass(frozen=True)
class Lease:
    address: IPv4Address
    pod: str
    pid: int
    start_time: int  # of the owner, in clock ticks since boot (/proc/PID/stat field 22)
    boot_id: str

    def owner_alive(self) -> bool:
        return self.boot_id == _boot_id() and proc.start_time_of(self.pid) == self.start_time


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _lease_path(root: Path, address: IPv4Address) -> Path:
    return root / str(address)


def _read(path: Path) -> Lease | None:
    try:
        data = json.loads(path.read_text())
        return Lease(
            address=IPv4Address(path.name),
            pod=str(data["pod"]),
            pid=int(data["pid"]),
            start_time=int(data["start_time"]),
            boot_id=str(data["boot_id"]),
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise IpamError(
            f"lease file {path} is corrupt ({exc}); remove it if no pod uses that address"
        ) from exc


def leases(root: Path = IPAM_DIR) -> Iterator[Lease]:
    """Every lease currently on file."""
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(root.iterdir()):
            if entry.name.startswith("."):
                continue  # a temporary file being written
            lease = _read(entry)
            if lease is not None:
                yield lease


def lease_of(address: IPv4Address, root: Path = IPAM_DIR) -> Lease | None:
    return _read(_lease_path(root, address))


def _try_take(root: Path, address: IPv4Address, content: bytes) -> bool:
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".lease-")
    try:
        # No fsync: a lease means nothing after a reboot (see boot_id).
        os.write(fd, content)
        try:
            # link(2) fails with EEXIST instead of replacing: the atomic claim.
            os.link(tmp, _lease_path(root, address))
        except FileExistsError:
            return False
        return True
    finally:
        os.close(fd)
        os.unlink(tmp)


def allocate(
    pod: str,
    subnet: IPv4Network,
    *,
    reserved: frozenset[IPv4Address] = frozenset(),
    owner_pid: int | None = None,
    on_reclaim: Callable[[Lease], None] | None = None,
    root: Path = IPAM_DIR,
) -> IPv4Address:
    """Lease the lowest free host address of `subnet` to `pod`.

    `reserved` (the bridge's own address) is never handed out. Before a
    dead owner's lease is dropped, `on_reclaim` runs under the lock, so the
    caller can take that stale pod off the network first. Dead leases of
    the same pod name (an earlier incarnation) are dropped at once; others
    only when the subnet has no never-used address left, because a crashed
    activator's pod may still answer on its address.
    """
    pid = os.getpid() if owner_pid is None else owner_pid
    start = proc.start_time_of(pid)
    if start is None:
        raise IpamError(f"owner pid {pid} does not exist; pass a live owner_pid")
    owner = {"pod": pod, "pid": pid, "start_time": start, "boot_id": _boot_id()}
    content = json.dumps(owner).encode()
    root.mkdir(mode=0o755, parents=True, exist_ok=True)

    def reclaim(lease: Lease) -> None:
        if on_reclaim is not None:
            on_reclaim(lease)
        _lease_path(root, lease.address).unlink(missing_ok=True)

    with locked(_LOCK, run_dir=root.parent):
        current = list(leases(root))
        stale = [lease for lease in current if not lease.owner_alive()]
        for lease in stale:
            if lease.pod == pod:
                reclaim(lease)
        taken = {lease.address for lease in current if lease.pod != pod or lease not in stale}
        stale = [lease for lease in stale if lease.pod != pod]
        for address in subnet.hosts():
            if address in reserved or address in taken:
                continue
            if _try_take(root, address, content):
                return address
        for lease in stale:
            reclaim(lease)
            if _try_take(root, lease.address, content):
                return lease.address
    raise IpamError(
        f"no free address left in {subnet} for pod {pod!r}: {len(current)} leases "
        f"under {root}; destroy unused pods or configure a larger subnet"
    )


def release(address: IPv4Address, pod: str, *, root: Path = IPAM_DIR) -> bool:
    """Drop `pod`'s lease on `address`; True if it was there. Never drops another pod's."""
    with locked(_LOCK, run_dir=root.parent):
        lease = _read(_lease_path(root, address))
        if lease is None or lease.pod != pod:
            return False
        _lease_path(root, address).unlink(missing_ok=True)
        return True
