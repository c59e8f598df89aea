"""Benchmark (not a test): online PPO next to A-LOL on the embedded task, from an empty cache.

    python scripts/bench_ppo.py                      # seeds 1 2 3, prints a table
    python scripts/bench_ppo.py --seeds 1 --json out.json algo.params.step_multiple=1.0

Each seed runs `lol-rl train -m algo=alol,ppo` with seed, sft.seed and value.seed set to it,
so both start from the same pi_ref (which varies with the seed). Prints, as mean +- std over
seeds, the test reward per component, length and distinct-1/2/3 of pi_ref, A-LOL and PPO,
and the rl stage's wall time per 1,000 training sequences: an offline step trains on
rl.batch_size logged responses, a PPO update generates rl.batch_size responses and trains on
them for its epochs (generation, scoring and validation included in both). Each seed is one
repeat (A-LOL and PPO of a seed run in one sweep, one after the other); times are printed as the
mean (min..max) over seeds, PPO's cost per sequence over A-LOL's is taken per seed, and the load
average is printed before and after (scripts/benchlib.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from omegaconf import OmegaConf

from benchlib import Spread, add_seed_arguments, mean_std, over_seeds, ratios, sweep_jobs  # scripts/benchlib.py

ALGOS = ("alol", "ppo")


def run_seed(seed: int, workdir: Path, extra: list[str]) -> dict:
    runs = {}
    for algo, job in sweep_jobs(seed, ALGOS, workdir, extra).items():
        config = OmegaConf.load(job / "config.yaml")
        stages = json.loads((job / "stages.json").read_text())
        summary = json.loads((Path(stages["rl"]["dir"]) / "summary.json").read_text())
        runs[algo] = {
            "eval": json.loads((job / "eval.json").read_text()),
            "rl_seconds": stages["rl"]["seconds"],
            "sequences": summary["steps"] * config.rl.batch_size,
            "rollout_seconds": summary.get("rollout_seconds"),
            "threads": config.threads,
        }
    return runs


def describe(values: list[float]) -> str:
    return "{:.3f} +- {:.3f}".format(*mean_std(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_seed_arguments(parser, "algo.params.step_multiple=1.0")
    args = parser.parse_args()
    results = over_seeds(run_seed, args.seeds, args.overrides, "lol-rl-bench-ppo-")

    rows = {"pi_ref": [r["alol"]["eval"]["reference"] for r in results.values()]}
    rows.update({algo: [r[algo]["eval"]["policy"] for r in results.values()] for algo in ALGOS})
    components = list(rows["pi_ref"][0]["rewards"])
    threads = sorted({r[algo]["threads"] for r in results.values() for algo in ALGOS})
    print(f"seeds: {args.seeds}, threads (the runs' config): {'/'.join(map(str, threads))}\n\n"
          f"test split (mean +- std over seeds)")
    print("| policy | reward | " + " | ".join(components) + " | length | distinct-1 | distinct-2 | distinct-3 |")
    print("|---|---|" + "---|" * (len(components) + 4))
    for name, metrics in rows.items():
        cells = [describe([m["reward"] for m in metrics]),
                 *(f"{statistics.mean(m['rewards'][c] for m in metrics):.3f}" for c in components),
                 describe([m["length"] for m in metrics]),
                 *(describe([m["distinct"][n] for m in metrics]) for n in range(3))]
        print(f"| {name} | " + " | ".join(cells) + " |")

    print("\nrl stage wall time")
    print("| algo | training sequences | rl seconds, mean (min..max) | seconds per 1000 sequences | of which rollouts |")
    print("|---|---|---|---|---|")
    timing = {}
    for algo in ALGOS:
        per_seed = [r[algo] for r in results.values()]
        per_1000 = [1000 * r["rl_seconds"] / r["sequences"] for r in per_seed]
        rollouts = [r["rollout_seconds"] / r["rl_seconds"] for r in per_seed if r["rollout_seconds"] is not None]
        timing[algo] = {"per_1000": per_1000, "rollout_share": rollouts}
        print(f"| {algo} | {per_seed[0]['sequences']} | {Spread.of([r['rl_seconds'] for r in per_seed]).format(1)} | "
              f"{Spread.of(per_1000).format(2)} | {f'{statistics.mean(rollouts):.0%}' if rollouts else '-'} |")
    per_sequence = ratios(timing["ppo"]["per_1000"], timing["alol"]["per_1000"])
    print(f"PPO / A-LOL seconds per training sequence, per seed: {per_sequence.format(2)}x")
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "test": rows, "timing": timing}, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
