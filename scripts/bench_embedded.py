"""Benchmark (not a test): the default embedded chain for several seeds, from an empty cache.

    python scripts/bench_embedded.py                # seeds 1 2 3, prints a table
    python scripts/bench_embedded.py --json out.json --seeds 1 2

Each seed runs `lol-rl train -m algo=alol,nll,nll_kept` with seed, sft.seed and value.seed
set to it, so the whole chain (reference policy included) varies with the seed. Prints per
stage wall seconds, the test reward of pi_ref, NLL, NLL on the A > 0 rows and A-LOL (mean +-
std over seeds), the drop's precision / recall against the ground-truth bad rows, and
whether each target of the issue is met. Times are per seed (each seed is one repeat, run one
after another) with the mean (min..max) over seeds and the load average before and after
(scripts/benchlib.py); a time target is met only if every seed meets it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from benchlib import Spread, add_seed_arguments, mean_std, over_seeds, sweep_jobs, verdict  # scripts/benchlib.py

ALGOS = ("nll", "nll_kept", "alol")


def run_seed(seed: int, workdir: Path, extra: list[str]) -> dict:
    runs = {algo: {"eval": json.loads((job / "eval.json").read_text()),
                   "stages": json.loads((job / "stages.json").read_text()),
                   "threads": OmegaConf.load(job / "config.yaml").threads}
            for algo, job in sweep_jobs(seed, ALGOS, workdir, extra).items()}
    audit_dir = Path(runs["alol"]["stages"]["advantage"]["dir"])
    value_dir = Path(runs["alol"]["stages"]["value"]["dir"])
    return {"runs": runs, "audit": json.loads((audit_dir / "audit.json").read_text()),
            "value": json.loads((value_dir / "report.json").read_text())}


def built_seconds(runs: dict, stage: str) -> float:
    """Seconds that built the A-LOL chain's `stage` artifact, in whichever job of the sweep built it."""
    artifact = runs["alol"]["stages"][stage]["dir"]
    return max(run["stages"][stage]["seconds"] for run in runs.values()
               if run["stages"].get(stage, {}).get("dir") == artifact)


def describe(values: list[float | None]) -> str:
    """mean +- std, or n/a where the audit could not measure it (nothing dropped, no bad row)."""
    if None in values:
        return "n/a"
    m, s = mean_std(values)
    return f"{m:.3f} +- {s:.3f}"


def beats_by_two_std(ours: list[float], theirs: list[float]) -> str:
    """'met' if the gap of the means exceeds twice the larger of the two standard deviations;
    'inconclusive' with one seed, which has no standard deviation to exceed."""
    if min(len(ours), len(theirs)) < 2:
        return "inconclusive (one seed: no std)"
    (m1, s1), (m2, s2) = mean_std(ours), mean_std(theirs)
    return "met" if m1 - m2 > 2 * max(s1, s2) else "missed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_seed_arguments(parser, "task=toy_clean")
    args = parser.parse_args()
    results = over_seeds(run_seed, args.seeds, args.overrides, "lol-rl-bench-")

    # per-stage seconds of the A-LOL chain: each stage is built by whichever job of the seed's sweep
    # came to it first (later jobs reuse it, 0 s), so a stage's time is that of its artifact dir
    chain_stages = list(results[args.seeds[0]]["runs"]["alol"]["stages"])
    stage_seconds = {stage: [built_seconds(r["runs"], stage) for r in results.values()] for stage in chain_stages}
    chain_seconds = [sum(stage_seconds[s][i] for s in chain_stages) for i in range(len(args.seeds))]
    rewards = {"pi_ref": [r["runs"]["alol"]["eval"]["reference"]["reward"] for r in results.values()]}
    for algo in ALGOS:
        rewards[algo] = [r["runs"][algo]["eval"]["policy"]["reward"] for r in results.values()]
    components = {name: {c: [r["runs"][name if name != "pi_ref" else "alol"]["eval"]["reference" if name == "pi_ref" else "policy"]["rewards"][c]
                             for r in results.values()]
                         for c in results[args.seeds[0]]["runs"]["alol"]["eval"]["policy"]["rewards"]}
                  for name in rewards}
    precision = [r["audit"]["drop_precision"] for r in results.values()]
    recall = [r["audit"]["drop_recall"] for r in results.values()]
    max_reward = 3.0

    threads = sorted({run["threads"] for r in results.values() for run in r["runs"].values()})
    print(f"seeds: {args.seeds}, threads (the runs' config): {'/'.join(map(str, threads))}")
    print("\nwall seconds per stage (A-LOL chain)")
    print("| stage | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|" + "---|" * len(args.seeds))
    for stage in chain_stages:
        print(f"| {stage} | " + " | ".join(f"{v:.1f}" for v in stage_seconds[stage]) + " |")
    print("| whole chain | " + " | ".join(f"{v:.1f}" for v in chain_seconds) + " |")
    chain = Spread.of(chain_seconds)
    print(f"whole chain, mean (min..max) over seeds: {chain.format(1)} s")
    print("\ntest reward (mean +- std over seeds)")
    names = list(components["pi_ref"])
    print("| policy | reward | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for name, values in rewards.items():
        m, s = mean_std(values)
        cells = [f"{mean_std(components[name][c])[0]:.3f}" for c in names]
        print(f"| {name} | {m:.3f} +- {s:.3f} | " + " | ".join(cells) + " |")
    print(f"\ndrop precision {describe(precision)}, recall {describe(recall)}")
    value_mse = [r["value"]["heldout_mse"] for r in results.values()]
    constant_mse = [r["value"]["constant_baseline_mse"] for r in results.values()]
    print(f"value head held-out MSE {mean_std(value_mse)[0]:.4f} +- {mean_std(value_mse)[1]:.4f} "
          f"(constant-mean baseline {mean_std(constant_mse)[0]:.4f} +- {mean_std(constant_mse)[1]:.4f})")

    targets = {
        "whole chain <= 600 s per seed": verdict(chain, 600, at_most=True),
        "A-LOL > pi_ref by > 2 std": beats_by_two_std(rewards["alol"], rewards["pi_ref"]),
        "A-LOL > NLL by > 2 std": beats_by_two_std(rewards["alol"], rewards["nll"]),
        "no policy at the ceiling": all(max(v) < max_reward - 0.05 for v in rewards.values()),
        "drop precision >= 0.9": None not in precision and min(precision) >= 0.9,
    }
    print("\ntargets")
    for name, ok in targets.items():
        print(f"- {name}: {ok if isinstance(ok, str) else 'met' if ok else 'missed'}")
    if args.json:
        args.json.write_text(json.dumps({
            "seeds": args.seeds, "stage_seconds": stage_seconds, "chain_seconds": chain_seconds,
            "rewards": rewards, "components": components, "drop_precision": precision, "drop_recall": recall,
            "value_heldout_mse": value_mse, "value_constant_baseline_mse": constant_mse,
            "targets": targets}, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
