"""What verifying a cached artifact costs: write_manifest (at build) and check_complete (before
every reuse) on an artifact of one file of `--mb` MB of random bytes, the two interleaved for
`--repeats` rounds (scripts/benchlib.py): mean seconds (min..max over rounds), the load average
before and after.

    python scripts/bench_cache.py --mb 500
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchlib import LoadWindow, Spread, interleaved  # scripts/benchlib.py
from lol_rl.cache import check_complete, write_manifest


def seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


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
        with LoadWindow():
            rounds = interleaved({"build": lambda: seconds(lambda: write_manifest(artifact)),
                                  "reuse": lambda: seconds(lambda: check_complete(artifact))}, args.repeats)
    build, reuse = Spread.of(rounds["build"]), Spread.of(rounds["reuse"])
    print(f"{args.mb} MB artifact, {args.repeats} interleaved rounds, mean (min..max): manifest at build "
          f"{build.format(2)} s, check before reuse {reuse.format(2)} s ({args.mb / reuse.mean / 1024:.2f} GB/s)")

if __name__ == "__main__":
    main()
