"""Copy what the GPU machine's image lacks for scripts/gpu_check.sh into one dir, from the
packages installed here (no registry, no download): hydra-core, omegaconf and antlr4 (pure
Python, imported by lol_rl.config) and bitsandbytes (4-bit NF4, paged AdamW), each with its
dist-info, since transformers asks importlib.metadata whether bitsandbytes is there.
bitsandbytes ships one native library per CUDA version (about 20 MB each); only the CPU one and
those named by --cuda are kept, so that the dir fits the 64 MiB a working tree may carry.

    python scripts/gpu_check_deps.py [--out .gpu-deps] [--cuda 130 132]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
from pathlib import Path

PACKAGES = ["hydra-core", "omegaconf", "antlr4-python3-runtime", "bitsandbytes"]
NATIVE = re.compile(r"libbitsandbytes_(\w+?)\.(so|dll|dylib)$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / ".gpu-deps")
    parser.add_argument("--cuda", nargs="+", default=["130", "132"],
                        help="bitsandbytes CUDA libraries to keep, by torch.version.cuda without the dot "
                             "(the GPU image's torch 2.11 is cu130)")
    args = parser.parse_args()
    keep = {"cpu", *(f"cuda{version}" for version in args.cuda)}
    shutil.rmtree(args.out, ignore_errors=True)
    total = 0
    for package in PACKAGES:
        dist = importlib.metadata.distribution(package)
        for file in dist.files or []:
            match = NATIVE.search(file.name)
            if file.suffix == ".pyc" or ".." in file.parts or (match and match.group(1) not in keep):
                continue
            target = args.out / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(dist.locate_file(file), target)
            total += target.stat().st_size
        print(f"{package} {dist.version}")
    print(f"{args.out}: {total / 2**20:.1f} MiB (bitsandbytes native libraries kept: {sorted(keep)})")


if __name__ == "__main__":
    main()
