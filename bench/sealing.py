"""What sealing images at rest costs: seal and unseal time per image size.

The checkpoint pays `seal` on top of CRIU's dump, the wake pays `unseal` on
top of CRIU's restore (bench/results/REPORT.md has those). Images are made of
random bytes (incompressible, like real memory pages); the plain directory is
in /dev/shm as in the product. Writes bench/results/sealing.md.

    .venv/bin/python -m bench.sealing [--sizes 16,128,512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from activator.sealed import seal, unseal

RESULTS = Path(__file__).parent / "results"


def measure(size_mib: int, repeats: int) -> tuple[float, float]:
    key = os.urandom(32)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm, tempfile.TemporaryDirectory() as disk:
        plain, sealed_dir, opened = Path(shm) / "plain", Path(disk) / "sealed", Path(shm) / "opened"
        plain.mkdir()
        (plain / "pages-1.img").write_bytes(os.urandom(size_mib << 20))
        (plain / "core-1.img").write_bytes(os.urandom(4096))
        seals, unseals = [], []
        for _ in range(repeats):
            shutil.rmtree(sealed_dir, ignore_errors=True)
            shutil.rmtree(opened, ignore_errors=True)
            started = time.perf_counter()
            seal(plain, sealed_dir, key)
            seals.append(time.perf_counter() - started)
            started = time.perf_counter()
            unseal(sealed_dir, opened, key)
            unseals.append(time.perf_counter() - started)
    return statistics.median(seals) * 1000, statistics.median(unseals) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,128,512")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = [
        "| image MiB | seal ms (checkpoint adds) | unseal ms (wake adds) | unseal MiB/s |",
        "|---:|---:|---:|---:|",
    ]
    for size in (int(s) for s in args.sizes.split(",")):
        sealing, opening = measure(size, args.repeats)
        rows.append(f"| {size} | {sealing:.0f} | {opening:.0f} | {size / opening * 1000:.0f} |")
        print(rows[-1])
    RESULTS.mkdir(exist_ok=True)
    text = "# Sealed images: what AES-256-GCM at rest costs\n\n" + __doc__.split("\n\n")[1] + "\n\n"
    text += (
        f"Medians of {args.repeats} runs, one core of this machine.\n\n" + "\n".join(rows) + "\n"
    )
    (RESULTS / "sealing.md").write_text(text)


if __name__ == "__main__":
    main()
