"""CRIU's kernel-feature cache, made where CRIU would not make it itself.

Every CRIU call first probes the kernel's features (about 25 ms here). CRIU
caches the result in /run/criu.kdat, but writes it only when /run is a tmpfs
(it is not on these machines: "Can't keep kdat cache on non-tempfs"); it
reads it from any filesystem. So the activator has `criu check` write it in a
private mount namespace whose /run is a tmpfs and installs it at
/run/criu.kdat (bench/results/REPORT.md: a 16 MiB wake 61 -> 37 ms).

A tmpfs cache dies with the boot; this one would not, so it is stamped with
the boot id and made again after a reboot (the kernel may have changed).
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CACHE = Path("/run/criu.kdat")
STAMP = Path("/run/pod-activator/criu.kdat.boot-id")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def ensure_cache(criu: Path, cache: Path = CACHE, stamp: Path = STAMP) -> bool:
    """Make sure `cache` holds CRIU's kernel features for this boot. Best
    effort: without it CRIU only probes on every call. True if it is there."""
    boot_id = BOOT_ID.read_text().strip()
    if cache.exists() and stamp.exists() and stamp.read_text().strip() == boot_id:
        return True
    if _on_tmpfs(cache.parent):
        # CRIU keeps its own cache there; nothing to do but let it.
        return False
    # Within the private namespace /run is the new tmpfs: the cache comes out
    # on stdout. CRIU's output goes to its own stderr, dropped.
    script = (
        'mount -t tmpfs -o size=1m tmpfs /run && "$0" check >/dev/null 2>&1; cat /run/criu.kdat'
    )
    try:
        made = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(criu)],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("no CRIU kernel-feature cache (every call probes): %s", exc)
        return False
    if made.returncode != 0 or not made.stdout:
        log.warning(
            "no CRIU kernel-feature cache (every call probes): %s",
            made.stderr.decode(errors="replace").strip() or f"exit status {made.returncode}",
        )
        return False
    stamp.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache.parent, delete=False) as tmp:
        tmp.write(made.stdout)
    os.replace(tmp.name, cache)  # atomically: a CRIU starting now reads all or nothing
    stamp.write_text(boot_id + "\n")
    log.info("CRIU kernel-feature cache made at %s", cache)
    return True


def _on_tmpfs(path: Path, mounts: Path = Path("/proc/self/mounts")) -> bool:
    """Whether the filesystem holding `path` is a tmpfs (the longest mount point wins)."""
    best, fstype = "", ""
    target = str(path.resolve())
    for line in mounts.read_text().splitlines():
        fields = line.split()
        point = fields[1]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype == "tmpfs"
