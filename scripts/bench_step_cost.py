"""Benchmark (not a test): the cost of one optimizer step of each offline algorithm, relative
to NLL, on the same rows of the embedded task.

    python scripts/bench_step_cost.py                      # the default tiny model
    python scripts/bench_step_cost.py model.n_layer=8 model.n_embd=256   # any config override
    python scripts/bench_step_cost.py --json ratios.json   # also write {algo: {mean, min, max} ratio to nll}

Each step is the training loop's own: build the batch of the algorithm's response groups
and its cached reference log-probs, one policy forward, the loss, backward, clip, AdamW.
Algorithms are timed in interleaved rounds, A B, B A, ... (scripts/benchlib.py: drift in the
machine's load hits all of them alike); each round's figure is its mean step time, a ratio to
NLL is taken per round, and every figure is printed as the mean over rounds (min..max). A
target is met only if every round meets it ("inconclusive" when the spread crosses it).
Targets: every A-LOL variant, rlol, wbc and gold <= 1.05x NLL (no reference forward in
training); dpo, dpo_ref_free and kto <= 2.1x (two responses per row; KTO's second is the
mismatched pair).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchlib import LoadWindow, Spread, interleaved, mean_step_seconds, ratios, verdict  # scripts/; before torch

import torch
from hydra import compose, initialize_config_dir

from lol_rl.stages.reference import reference_logprobs, train_rewards
from lol_rl.algorithms import algorithm, split_threshold
from lol_rl.cli import CONF_DIR
from lol_rl.config import validate
from lol_rl.data import MISMATCHED, encode_rows
from lol_rl.losses import LOSSES
from lol_rl.models import initial_policy
from lol_rl.tasks import build_task
from lol_rl.logprobs import shares_prompts
from lol_rl.offline import BatchSource, loss_on_batch

ALGOS = ["nll", "wbc", "gold", "rlol", "alol", "alol_ref_free", "alol_seq", "alol_kl", "dpo", "dpo_ref_free", "pro",
         "kto"]
TARGETS = {**{a: 1.05 for a in ["wbc", "gold", "rlol", "alol", "alol_ref_free", "alol_seq", "alol_kl"]},
           "dpo": 2.1, "dpo_ref_free": 2.1, "kto": 2.1}


def algo_config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):  # validated: the schema's defaults
        return validate(compose("config", overrides=[f"algo={name}", *overrides]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (A B, B A, ...)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per algorithm per round")
    parser.add_argument("--algos", nargs="+", choices=ALGOS, default=ALGOS, help="these only (nll is always timed)")
    parser.add_argument("--json", type=Path, help="also write {algo: {mean, min, max} ratio to nll} here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.n_layer=8 rl.batch_size=64")
    args = parser.parse_args()
    algos = ["nll", *(a for a in ALGOS if a in args.algos and a != "nll")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    cfg = algo_config("nll", args.overrides)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    torch.manual_seed(0)
    task = build_task(cfg.task)
    train = task.splits["train"]
    model, tokenizer = initial_policy(cfg.model, [task.format_prompt(e.prompt) + " " + e.response for e in train])
    rows = encode_rows(tokenizer, task, train, cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
    # the advantage cache, as the advantage stage writes it (rewards real, V set to the mean)
    rewards = torch.tensor(train_rewards(task, train)[0], dtype=torch.float32)
    model.eval()
    ragged = {g: reference_logprobs(model, rows, 256, "cpu", g) for g in [*rows.groups, MISMATCHED]}
    ranking_rewards = torch.stack([rewards, rewards - 0.5, rewards - 1.0], dim=1)
    row_tensors = {"rewards": rewards, "advantages": (rewards - rewards.mean()).clamp(min=0.01),
                   "ranking_rewards": ranking_rewards}
    fixed_rows = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[: cfg.rl.batch_size]
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}

    setups = {}
    for name in algos:
        algo = algorithm(algo_config(name, args.overrides).algo)
        groups = rows.expand(algo.groups)
        # the same rows every step: a shuffled pass over exactly one batch
        source = BatchSource(rows, row_tensors, {g: ragged[g] for g in groups}, fixed_rows, None, len(fixed_rows),
                             seed=0, groups=groups, shuffle=True, share_prompt=cfg.rl.share_prompt and shares_prompts(model))
        params = dict(algo.params)
        if "threshold" in params:  # a null one resolved from the train rewards, as the rl stage does
            params["threshold"] = split_threshold(name, rewards, params["threshold"])
        setups[name] = (source, LOSSES[algo.loss], params)

    def run_steps(name: str, n: int) -> list[float]:
        source, loss_fn, params = setups[name]
        model.load_state_dict(initial_state)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.rl.lr)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            _, batch = source.sample()
            loss, _ = loss_on_batch(model, batch, source.groups, loss_fn, params)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.rl.grad_clip)
            optimizer.step()
            times.append(time.perf_counter() - start)
        return times

    for name in algos:  # warm-up
        run_steps(name, 2)
    with LoadWindow():
        rounds = interleaved({name: (lambda name=name: mean_step_seconds(run_steps(name, args.steps)))
                              for name in algos}, args.rounds)
    step = {name: Spread.of(seconds) for name, seconds in rounds.items()}
    to_nll = {name: ratios(rounds[name], rounds["nll"]) for name in algos}

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {cfg.model.name} ({n_params / 1e6:.2f}M parameters), batch {len(fixed_rows)}, "
          f"{torch.get_num_threads()} threads in the timing process, {args.rounds} interleaved rounds x {args.steps} "
          f"steps per algorithm; mean (min..max over rounds)")
    print("| algo | mean step ms | x NLL | target |")
    print("|---|---|---|---|")
    for name in algos:
        target = TARGETS.get(name)
        verdict_cell = "" if target is None else f"<= {target} {verdict(to_nll[name], target, at_most=True)}"
        ms = Spread(1000 * step[name].mean, 1000 * step[name].low, 1000 * step[name].high)
        print(f"| {name} | {ms.format(1)} | {to_nll[name].format(3)} | {verdict_cell} |")
    if args.json:
        args.json.write_text(json.dumps({name: {"mean": r.mean, "min": r.low, "max": r.high}
                                         for name, r in to_nll.items()}, indent=2))

if __name__ == "__main__":
    main()
