"""What verifying a cached artifact costs: write_manifest (at build) and check_complete (before
every reuse) on an artifact of one file of `--mb` MB of random bytes, best of `--repeats`.

    python scripts/bench_cache.py --mb 500
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from lol_rl.cache import check_complete, write_manifest


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp)
        with open(artifact / "model.safetensors", "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        load_before = os.getloadavg()[0]
        build = best_seconds(lambda: write_manifest(artifact), args.repeats)
        reuse = best_seconds(lambda: check_complete(artifact), args.repeats)
    print(f"load average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}")
    print(f"{args.mb} MB artifact: manifest at build {build:.2f} s, check before reuse {reuse:.2f} s "
          f"({args.mb / reuse / 1024:.2f} GB/s)")


if __name__ == "__main__":
    main()
