"""Dumps of apps sharing a working directory go one at a time, across
threads and across activator processes alike (CRIU's parasite makes a
directory there named after the task's pid; two at once fail with EEXIST)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from activator.criu import Criu

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the locks live under /run")

HOLD = 0.3


def test_dumps_in_one_directory_go_one_at_a_time_across_threads() -> None:
    criu = Criu(Path("criu"))
    spans: list[tuple[float, float]] = []

    def dump() -> None:
        with criu._dump_lock(os.getpid()):
            start = time.monotonic()
            time.sleep(HOLD)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=dump) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (_, a_end), (b_start, _) = sorted(spans)
    assert b_start >= a_end


def test_a_dump_waits_for_another_activators_dump_in_the_same_directory() -> None:
    # Another process (another activator) holds the lock for our directory.
    code = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from activator.criu import Criu\n"
        "with Criu(Path('criu'))._dump_lock(os.getpid()):\n"
        "    print('held', flush=True)\n"
        f"    time.sleep({HOLD})\n"
    )
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=os.getcwd())
    try:
        assert other.stdout is not None and other.stdout.readline() == b"held\n"
        started = time.monotonic()
        with Criu(Path("criu"))._dump_lock(os.getpid()):
            waited = time.monotonic() - started
        assert waited >= HOLD / 2, waited
    finally:
        other.wait(10)
        if other.stdout is not None:
            other.stdout.close()
