"""Benchmark (not a test): lol-rl next to TRL on the same model, rows, batches and steps.

    pip install -e ".[bench]"                          # trl>=1.0,<2 (keeps the installed torch)
    python scripts/bench_vs_trl.py                     # tiny GPT-2 (4 layers, 128 wide), 2 CPU threads
    python scripts/bench_vs_trl.py model.n_layer=6 model.n_embd=256 model.n_head=8
    python scripts/bench_vs_trl.py --repeats 3         # interleaved rounds: mean (min..max) of each figure
    python scripts/bench_vs_trl.py --json vs_trl.json  # also write every measurement as JSON

Table 1, DPO: TRL's DPOTrainer as TRL runs it by default (a second model copy computes the
reference log-probs every step), TRL with `precompute_ref_log_probs=True`, TRL with that and the
Trainer's length-grouped sampler (`train_sampling_strategy="group_by_length"`, given a length
column: TRL's nearest to length buckets), and lol-rl's `dpo` (reference log-probs cached once,
as the advantage stage caches them) with `rl.length_buckets` 1 and 8, each pair one sequence with
its prompt once (`rl.share_prompt`, the default), and at k=8 with a row per response too (the
layout TRL's concatenated forward uses). Target: lol-rl DPO (k=8, shared prompt) >= 1.5x the
pairs/s of TRL with precompute + group_by_length (issue 19: TRL as an expert runs it); the ratios
to the other TRL rows are printed too.
Table 2, single-response steps: lol-rl `nll`, lol-rl `alol` (cached reference log-probs) and
TRL's SFTTrainer on the chosen responses (prompt-completion data: loss on the completion only,
TRL's default for that format). Target: A-LOL's step <= 1.05x NLL's.

Alike for every contender: one GPT-2 built from config and a tokenizer trained offline, saved to
one temp dir that both frameworks load (TRL loads its reference copy from the same path); every
train row of the embedded task (formatted prompt, " " + chosen, " " + rejected, EOS; both sides
get the same token ids, checked and printed; no row is long enough to be truncated); batch
`rl.batch_size` pairs/responses; AdamW at `rl.lr`, weight decay `rl.weight_decay`, schedule
`rl.schedule` with `rl.warmup_steps`, grad clip `rl.grad_clip`; shuffled passes; fp32; `threads`
CPU threads. TRL: no eval, logging, saving or progress bar, dataloader workers 0, `use_cpu`;
gradient checkpointing and bf16, both on by TRL's default, are off (lol-rl uses neither on a
CPU); its optimizer is its default fused AdamW. lol-rl runs the body of `train.optimize`
(sample, `loss_on_batch`, backward, clip, finiteness check, AdamW from `make_optimizer`,
scheduler) minus its logging, validation and checkpoints, which TRL has off here too.

Each contender runs in its own long-lived worker process of this script (`--only NAME`), so
that its peak memory is its own (Linux). The workers are set up one after another (tokenizing,
the one-off reference pass, `--warmup` steps), then wait; the parent tells them in turn to run
one segment of `--steps` timed steps, A B C ..., then ... C B A, for `--repeats` rounds
(scripts/benchlib.py), so that drift in the machine's load hits every row alike. A row's rate
is its batch over its mean step time in each round (the steps of a segment, from the parent's
go to the end of the last step: batching and data loading are in); every figure is the mean over
rounds (min..max), and a ratio of two rows is taken per round. A target is met only if every
round meets it; "inconclusive" when the spread crosses it. The length-grouped TRL row's segment
is one whole mega-batch of its sampler (46 batches at 6000 rows), after one as warm-up: the
sampler serves each mega-batch longest first, so a shorter window would favour it. The one-off
costs are printed apart: tokenizing the rows (TRL's dataset preparation / lol-rl's
`encode_rows`) and the reference log-probs of every train row (TRL's precompute, at its default
batch = the training batch / lol-rl's cache of both response groups at `advantage.batch_size`).
Memory, per worker: peak RSS; its growth over the whole run, from a baseline taken after the
imports and loading the task rows (models, reference copy or cache, tokenized data, optimizer
state, activations); and its growth over the training steps alone (from the first step, after
the one-off stages). The thread count printed is the one inside the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import benchlib  # first: it imports lol_rl, whose OpenMP wait policy must be set before torch loads OpenMP
import torch
from transformers import get_scheduler

from bench_step_cost import algo_config
from bench_tricks import peak_memory, reset_peak_memory
from lol_rl.stages.reference import reference_logprobs, train_rewards
from lol_rl.algorithms import algorithm
from lol_rl.data import encode_rows
from lol_rl.logprobs import shares_prompts, to_device
from lol_rl.losses import LOSSES
from lol_rl.models import initial_policy, load_policy, make_optimizer, save_reference
from lol_rl.tasks import build_task
from lol_rl.loop import NonFiniteError
from lol_rl.offline import BatchSource, loss_on_batch

CPU = torch.device("cpu")
DPO_ROWS = {
    "trl_dpo": "TRL DPOTrainer, reference: a second model copy each step (TRL's default)",
    "trl_dpo_precompute": "TRL DPOTrainer, precompute_ref_log_probs=True",
    "trl_dpo_grouped": "TRL DPOTrainer, precompute_ref_log_probs=True, train_sampling_strategy=group_by_length",
    "lolrl_dpo_k1": "lol-rl dpo, cached reference log-probs, length_buckets=1, prompt shared (rl.share_prompt)",
    "lolrl_dpo_k8_separate": "lol-rl dpo, cached reference log-probs, length_buckets=8, a row per response",
    "lolrl_dpo_k8": "lol-rl dpo, cached reference log-probs, length_buckets=8, prompt shared (rl.share_prompt)",
}
STEP_ROWS = {
    "lolrl_nll": "lol-rl nll",
    "lolrl_alol": "lol-rl alol, cached reference log-probs",
    "trl_sft": "TRL SFTTrainer, prompt-completion (loss on the completion)",
}
# issue 19's targets: DPO pairs/s >= 1.5x TRL (against TRL tuned by an expert too), A-LOL's step <= 1.02x NLL's
DPO_TARGET, ALOL_TARGET = 1.5, 1.02
ONE_OFF: dict[str, float] = defaultdict(float)  # seconds of the one-off stages inside TRL's trainers


def rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class Memory:
    """Peak RSS of the whole run (from after the imports and the task rows) and of the steps alone."""

    def __init__(self):
        reset_peak_memory(CPU)
        self.baseline = rss_bytes()

    def steps_begin(self) -> None:
        self.setup_peak = peak_memory(CPU)
        reset_peak_memory(CPU)
        self.steps_start = rss_bytes()

    def report(self) -> dict:
        steps_peak = peak_memory(CPU)
        run_peak = max(self.setup_peak, steps_peak)
        return {"peak_rss_mib": run_peak / 2**20, "run_growth_mib": (run_peak - self.baseline) / 2**20,
                "steps_growth_mib": (steps_peak - self.steps_start) / 2**20}


def timed(method, key: str):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            ONE_OFF[key] += time.perf_counter() - started
    return wrapper


def run_lolrl(name: str, overrides: list[str], model_dir: str, steps: int, warmup: int, repeats: int) -> dict:
    """lol-rl's rl stage on the saved policy: encode, cache, warm-up, then a segment of the
    optimize loop's steps each time the parent says go."""
    cfg = algo_config({"lolrl_nll": "nll", "lolrl_alol": "alol"}.get(name, "dpo"), overrides)
    torch.manual_seed(0)
    task = build_task(cfg.task)
    examples = task.splits["train"]
    rewards = torch.tensor(train_rewards(task, examples)[0], dtype=torch.float32)
    memory = Memory()
    model, tokenizer = load_policy(model_dir, CPU, cfg.model)
    started = time.perf_counter()
    rows = encode_rows(tokenizer, task, examples, cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
    tokenize_s = time.perf_counter() - started
    algo = algorithm(cfg.algo)
    groups = rows.expand(algo.groups)
    started = time.perf_counter()
    model.eval()
    ragged = {g: reference_logprobs(model, rows, cfg.advantage.batch_size, CPU, g) for g in groups} \
        if algo.reads_reference else {}
    reference_s = time.perf_counter() - started if ragged else 0.0
    row_tensors = {"advantages": rewards - rewards.mean()}  # V(x) = the mean: the values do not change the cost
    # shuffled passes over every row for each algorithm, so nll and alol see the same batches
    source = BatchSource(rows, row_tensors, ragged, torch.arange(len(rows)), None, cfg.rl.batch_size, seed=0,
                         groups=groups, shuffle=True, length_buckets=1 if name == "lolrl_dpo_k1" else 8,
                         share_prompt=name != "lolrl_dpo_k8_separate" and shares_prompts(model))
    optimizer = make_optimizer(model, cfg.rl)
    scheduler = get_scheduler(cfg.rl.schedule, optimizer, num_warmup_steps=cfg.rl.warmup_steps,
                              num_training_steps=warmup + repeats * steps)
    loss_fn, params, running = LOSSES[cfg.algo.loss], dict(cfg.algo.params), {}
    memory.steps_begin()

    def run_step() -> None:  # train.optimize's step, without logging/validation/checkpoints
        model.train()
        _, batch = source.sample()
        loss, metrics = loss_on_batch(model, to_device(batch, CPU), source.groups, loss_fn, params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], cfg.rl.grad_clip)
        if not torch.isfinite(loss.detach() + grad_norm):
            raise NonFiniteError(f"{name}: non-finite loss or gradient")
        optimizer.step()
        for key, value in {"loss": loss.detach(), "grad_norm": grad_norm, **metrics}.items():
            running[key] = running.get(key, 0.0) + value.detach().float()
        scheduler.step()

    for _ in range(warmup):
        run_step()
    benchlib.report({"tokenize_s": tokenize_s, "reference_s": reference_s})
    benchlib.serve(steps, run_step)
    return final(name, cfg, model, memory, same_tokens=True)


def run_trl(name: str, overrides: list[str], model_dir: str, steps: int, warmup: int, repeats: int) -> dict:
    """TRL's DPOTrainer / SFTTrainer on the same saved policy and rows; its step callback
    reports after the warm-up and after each segment, and waits for the parent's go."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    class SegmentCallback(TrainerCallback):
        def __init__(self, memory: Memory):
            self.memory, self.clock, self.done, self.segment_end = memory, benchlib.SegmentClock(), 0, warmup

        def on_train_begin(self, args, state, control, **kwargs):
            self.memory.steps_begin()

        def on_step_end(self, args, state, control, **kwargs):
            self.done += 1
            self.clock.step_done()
            if self.done < self.segment_end:
                return
            if self.done == warmup:
                benchlib.report({"tokenize_s": ONE_OFF["tokenize"], "reference_s": ONE_OFF["reference"]})
            else:
                benchlib.report({"step_seconds": self.clock.step_seconds(), "threads": torch.get_num_threads()})
            if benchlib.wait_for_go():
                self.clock.start()
                self.segment_end += steps
            else:
                control.should_training_stop = True

    cfg = algo_config("dpo" if name.startswith("trl_dpo") else "nll", overrides)
    torch.manual_seed(0)
    task = build_task(cfg.task)
    examples = task.splits["train"]
    columns = {"prompt": [task.format_prompt(e.prompt) for e in examples]}
    if name.startswith("trl_dpo"):
        columns["chosen"] = [task.response_prefix + e.response for e in examples]
        columns["rejected"] = [task.response_prefix + e.rejected for e in examples]
    else:
        columns["completion"] = [task.response_prefix + e.response for e in examples]
    dataset = Dataset.from_dict(columns)
    memory = Memory()
    model, tokenizer = load_policy(model_dir, CPU, cfg.model)
    grouped = name == "trl_dpo_grouped"
    if grouped:  # the Trainer's LengthGroupedSampler reads a length column (TRL's DPO rows have no input_ids)
        # it sorts mega-batches of this many batches, serving each longest first: time one whole one, after one
        warmup = steps = max(min(len(examples) // (4 * cfg.rl.batch_size), 50), 1)
        started = time.perf_counter()
        dataset = dataset.add_column("length", pair_lengths(tokenizer, columns))
        ONE_OFF["tokenize"] += time.perf_counter() - started
    # one step more than the rounds need: the run ends when the parent says so, not before
    common = dict(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=cfg.rl.batch_size,
                  max_steps=warmup + repeats * steps + 1, learning_rate=cfg.rl.lr, weight_decay=cfg.rl.weight_decay,
                  lr_scheduler_type=cfg.rl.schedule, warmup_steps=cfg.rl.warmup_steps, max_grad_norm=cfg.rl.grad_clip,
                  max_length=cfg.model.max_prompt_tokens + cfg.model.max_response_tokens, gradient_checkpointing=False,
                  bf16=False, use_cpu=True, report_to="none", logging_strategy="no", save_strategy="no",
                  eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    clock = SegmentCallback(memory)
    if name.startswith("trl_dpo"):
        trainer_class = type("TimedDPOTrainer", (DPOTrainer,), {
            "_prepare_dataset": timed(DPOTrainer._prepare_dataset, "tokenize"),
            "_precompute_ref_logps": timed(DPOTrainer._precompute_ref_logps, "reference")})
        # remove_unused_columns=False keeps the length column, which the Trainer drops before building its sampler
        sampling = dict(train_sampling_strategy="group_by_length", remove_unused_columns=False) if grouped else {}
        args = DPOConfig(beta=cfg.algo.params.beta, precompute_ref_log_probs=name != "trl_dpo", **sampling, **common)
    else:
        trainer_class = type("TimedSFTTrainer", (SFTTrainer,), {
            "_prepare_dataset": timed(SFTTrainer._prepare_dataset, "tokenize")})
        args = SFTConfig(**common)
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[clock])
    trainer.train()
    out = final(name, cfg, model, memory)
    rows = encode_rows(tokenizer, task, examples, cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
    prepared = trainer.train_dataset
    if name.startswith("trl_dpo"):
        out["same_tokens"] = (prepared["prompt_ids"] == rows.prompt_ids and prepared["chosen_ids"] == rows.response_ids
                              and prepared["rejected_ids"] == rows.group("rejected"))
    else:
        out["same_tokens"] = prepared["input_ids"] == [p + r for p, r in zip(rows.prompt_ids, rows.response_ids)]
    return out


def pair_lengths(tokenizer, columns: dict[str, list[str]]) -> list[int]:
    """Tokens of prompt + the longer response + EOS, as TRL tokenizes them."""
    def count(key: str) -> list[int]:
        texts = [p + c + tokenizer.eos_token for p, c in zip(columns["prompt"], columns[key])]
        return [len(ids) for ids in tokenizer(texts)["input_ids"]]
    return [max(a, b) for a, b in zip(count("chosen"), count("rejected"))]


def final(name, cfg, model, memory: Memory, same_tokens=None) -> dict:
    """A worker's closing report: its memory and what the tables print beside the rates."""
    return {"name": name, **memory.report(), "batch_size": cfg.rl.batch_size, "threads": torch.get_num_threads(),
            "same_tokens": same_tokens, "parameters": sum(p.numel() for p in model.parameters())}


def versions() -> dict:
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                            capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"torch": torch.__version__, "transformers": version("transformers"), "trl": version("trl"),
            "lol-rl": commit, "python": platform.python_version(), "cpu": cpu}


def one_off_and_memory(r: dict) -> str:
    return (f"{r['tokenize_s']:.1f} | {r['reference_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['run_growth_mib']:.0f} | "
            f"{r['steps_growth_mib']:.0f}")


def print_tables(results: dict, rounds: dict[str, list[float]], info: dict, args) -> dict:
    """`rounds`: each row's mean step seconds per round."""
    first = results["lolrl_nll"]
    batch = first["batch_size"]
    rate = {name: benchlib.Spread.of([batch / s for s in seconds]) for name, seconds in rounds.items()}
    step_ms = {name: benchlib.Spread.of([1000 * s for s in seconds]) for name, seconds in rounds.items()}

    def speed_up(name: str, over: str) -> benchlib.Spread:  # rate ratio per round = inverse step-time ratio
        return benchlib.ratios(rounds[over], rounds[name])

    print(f"GPT-2 {first['parameters'] / 1e6:.2f}M parameters, batch {batch}, {info['worker_threads']} CPU threads "
          f"(in the workers), {args.repeats} interleaved rounds of {args.steps} timed steps per row after "
          f"{args.warmup} warm-up (TRL group_by_length: {results['trl_dpo_grouped']['segment_steps']} after as many), "
          f"one worker process per row; mean (min..max over rounds); "
          f"same token ids in TRL and lol-rl: {all(r['same_tokens'] for r in results.values())}")
    print(", ".join(f"{k} {v}" for k, v in info.items() if k != "worker_threads"))
    memory = "peak RSS (MiB) | growth, whole run (MiB) | growth, steps (MiB)"
    print(f"\n| DPO | pairs/s | x TRL default | tokenize (s) | reference log-probs (s) | {memory} |")
    print("|---" * 8 + "|")
    for name, label in DPO_ROWS.items():
        print(f"| {label} | {rate[name].format(1)} | {speed_up(name, 'trl_dpo').format(2)} | "
              f"{one_off_and_memory(results[name])} |")
    print(f"\n| single response | ms/step | samples/s | x lol-rl nll | tokenize (s) | reference log-probs (s) | {memory} |")
    print("|---" * 9 + "|")
    for name, label in STEP_ROWS.items():
        print(f"| {label} | {step_ms[name].format(1)} | {rate[name].format(1)} | "
              f"{benchlib.ratios(rounds[name], rounds['lolrl_nll']).format(3)} | {one_off_and_memory(results[name])} |")
    ratios = {"lolrl_dpo_k8_over_trl_dpo": speed_up("lolrl_dpo_k8", "trl_dpo"),
              "lolrl_dpo_k8_over_trl_dpo_precompute": speed_up("lolrl_dpo_k8", "trl_dpo_precompute"),
              "lolrl_dpo_k8_over_trl_dpo_grouped": speed_up("lolrl_dpo_k8", "trl_dpo_grouped"),
              "alol_over_nll_step": benchlib.ratios(rounds["lolrl_alol"], rounds["lolrl_nll"]),
              "dpo_shared_over_separate": speed_up("lolrl_dpo_k8", "lolrl_dpo_k8_separate")}
    print()
    print(f"lol-rl DPO (k=8), prompt shared / a row per response, pairs/s: "
          f"{ratios['dpo_shared_over_separate'].format(2)}x")
    for key, label in [("lolrl_dpo_k8_over_trl_dpo", "lol-rl DPO (k=8) / TRL DPO (default) pairs/s"),
                       ("lolrl_dpo_k8_over_trl_dpo_precompute", "lol-rl DPO (k=8) / TRL DPO (precompute) pairs/s"),
                       ("lolrl_dpo_k8_over_trl_dpo_grouped",
                        "lol-rl DPO (k=8) / TRL DPO (precompute + group_by_length) pairs/s")]:
        print(benchlib.target_line(label, ratios[key], DPO_TARGET, at_most=False, digits=2))
    print(benchlib.target_line("lol-rl A-LOL / NLL step time", ratios["alol_over_nll_step"], ALOL_TARGET,
                               at_most=True))
    for ours, theirs in [("lolrl_dpo_k8", "trl_dpo_grouped"), ("lolrl_dpo_k1", "trl_dpo_precompute"),
                         ("lolrl_nll", "trl_sft"), ("lolrl_alol", "trl_sft")]:
        a, b = results[ours]["peak_rss_mib"], results[theirs]["peak_rss_mib"]
        print(f"peak RSS {ours} {a:.0f} MiB / {theirs} {b:.0f} MiB, target <= TRL's: {'met' if a <= b else 'missed'}")
    return {key: vars(spread) for key, spread in ratios.items()}


def worker_command(name: str, model_dir: str, args) -> list[str]:
    return [sys.executable, __file__, "--only", name, "--model-dir", model_dir, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--repeats", str(args.repeats), *args.overrides]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32, help="timed optimizer steps per row per round")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (8: whole groups of 8 buckets)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds over every row (A B C ..., ... C B A, ...)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--only", choices=[*DPO_ROWS, *STEP_ROWS], help=argparse.SUPPRESS)  # one row: a worker
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.n_layer=6 rl.batch_size=64")
    args = parser.parse_args()
    cfg = algo_config("dpo", args.overrides)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    if args.only:
        run = run_trl if args.only.startswith("trl_") else run_lolrl
        benchlib.report(run(args.only, args.overrides, args.model_dir, args.steps, args.warmup, args.repeats))
        return

    torch.manual_seed(0)
    task = build_task(cfg.task)
    texts = [task.format_prompt(e.prompt) + task.response_prefix + e.response for e in task.splits["train"]]
    model, tokenizer = initial_policy(cfg.model, texts)
    names = [*DPO_ROWS, *STEP_ROWS]
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as model_dir, benchlib.LoadWindow() as load:
        save_reference(model, tokenizer, model_dir, cfg.model)  # what the sft stage writes: both load this
        workers = benchlib.Workers({name: worker_command(name, model_dir, args) for name in names},
                                   env={"HF_HUB_OFFLINE": "1", **os.environ})
        try:
            segments = workers.interleaved(args.repeats)
            closing = workers.finish()
        finally:
            workers.close()
    results = {name: {**workers.ready[name], **closing[name], "segment_steps": len(segments[name][0]["step_seconds"])}
               for name in names}
    rounds = {name: benchlib.segment_means(segments[name]) for name in names}
    info = {**versions(), **load.summary(), "worker_threads": benchlib.threads_used(segments)}
    ratios = print_tables(results, rounds, info, args)
    if args.json:
        args.json.write_text(json.dumps({"versions": info, "ratios": ratios, "results": results, "rounds": rounds,
                                         "segments": segments}, indent=2))

if __name__ == "__main__":
    main()
