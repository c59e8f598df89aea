"""Benchmark (not a test): what each speed trick of the A-LOL training step buys, switched on
in turn, in the style of torchtune's README table.

    python scripts/bench_tricks.py                               # embedded task, tiny model, CPU
    python scripts/bench_tricks.py model.n_layer=6 model.n_embd=256 model.n_head=8
    python scripts/bench_tricks.py model=gpt2 model.path=/path/to/gpt2 device=cuda   # adds the bf16 row
    python scripts/bench_tricks.py --vocab-only                  # just the 32K / 128K vocabulary log-prob rows (~2 min)

Rows, each adding one trick to the row above:
  1. pi_ref's log-probs recomputed every step by a second, frozen copy of the model (the
     paper's code does this, with a second 4-bit copy);
  2. ... recomputed by the policy itself with its LoRA adapter disabled (no second copy);
  3. read from the advantage stage's cache (no reference forward at all);
  4. length-bucketed batches (`rl.length_buckets=8`);
  5. bf16 weights and autocast (GPU only; rows 1-4 run in fp32 there).
Then the log-probs at large vocabularies (`--vocab-only` runs just these): a small LLaMA built
from config (2 layers, hidden 256, vocabularies of 32K and 128K tokens, LoRA r 16), one A-LOL
step on 8 rows of 64 prompt + 64 response tokens, before (logits at every position, one fp32
log_softmax over the vocabulary) and after (the head on response positions only, the selective
log-softmax in pieces: logprobs.response_logprobs), peak RSS and step time, each in its own
subprocess.
Every row trains the same LoRA adapter (`model.lora`, r 16 over all linear layers unless the
model config sets one) with A-LOL's loss on batches of `rl.batch_size` drawn by advantage, so
rows 1 and 2 compare like with like. Each row runs in its own long-lived worker process of this
script, so that its peak memory is its own: peak RSS on a CPU (Linux), peak allocated memory on
a GPU, both over the training steps only (loading and the one-off caching are reported apart).
The workers run `--steps` timed steps in turn, row 1 row 2 ... row 1 row 2 ..., for `--repeats`
rounds (scripts/benchlib.py; the large-vocabulary rows alternate before / after within a
vocabulary); a rate is the batch over the mean step time of a round, every figure the mean over
rounds (min..max), a ratio to row 1 (or to "before") taken per round. The load average is
printed before and after, the thread count is the workers' own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import benchlib  # scripts/benchlib.py; before torch (lol_rl's OpenMP wait policy)

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from lol_rl import offline as train_loop
from lol_rl.stages.reference import reference_logprobs, train_rewards
from lol_rl.cli import CONF_DIR
from lol_rl.data import encode_rows
from lol_rl.logprobs import response_logprobs, to_device
from lol_rl.losses import LOSSES
from lol_rl.models import initial_policy, load_base, reference_policy, resolve_device
from lol_rl.tasks import build_task
from peak_memory import peak_memory, reset_peak_memory  # scripts/peak_memory.py

ROWS = {
    "copy": "reference: a second model copy, recomputed each step",
    "disabled": "reference: the adapter disabled, recomputed each step",
    "cached": "reference log-probs cached (advantage stage)",
    "buckets": "+ length-bucketed batches (k=8)",
    "bf16": "+ bf16 weights and autocast",
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def config(overrides: list[str], row: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["algo=alol", *overrides])
    with open_dict(cfg):
        cfg.model.lora = cfg.model.get("lora") or LORA
        if row != "bf16":
            cfg.model.dtype = "fp32"
    return cfg


def measure(row: str, overrides: list[str], steps: int, warmup: int) -> None:
    """One row, as a worker: set up (the one-off caching timed), warm up, then a segment of
    `steps` timed steps each time the parent says go; at the end, peak memory over all steps."""
    cfg = config(overrides, row)
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    torch.manual_seed(0)
    if row != "bf16":  # the loop's autocast is bf16 on a GPU: rows before this one run without it
        train_loop.autocast = lambda _device: contextlib.nullcontext()
    task = build_task(cfg.task)
    rows_data = task.splits["train"]
    policy, tokenizer = initial_policy(cfg.model, [task.format_prompt(e.prompt) + " " + e.response for e in rows_data],
                                       device)
    rows = encode_rows(tokenizer, task, rows_data, cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
    rewards = torch.tensor(train_rewards(task, rows_data)[0], dtype=torch.float32)
    advantages = rewards - rewards.mean()  # V(x) set to the mean: the weights only steer the sampling
    keep = torch.nonzero(advantages > 0).squeeze(-1)

    ragged, cache_seconds = {}, 0.0
    if row in ("cached", "buckets", "bf16"):
        started = time.perf_counter()
        with reference_policy(policy) as reference, train_loop.autocast(device):
            ragged = {"response": reference_logprobs(reference, rows, 256, device)}
        cache_seconds = time.perf_counter() - started
    copy = None
    if row == "copy":  # what the frozen base is, loaded a second time
        copy = load_base(cfg.model.path, cfg.model, device) if cfg.model.kind == "pretrained" else \
            type(policy.get_base_model())(policy.get_base_model().config).to(device)
        copy.eval().requires_grad_(False)

    source = train_loop.BatchSource(rows, {"advantages": advantages}, ragged, keep, advantages.clamp(min=0),
                                    cfg.rl.batch_size, seed=0, length_buckets=8 if row in ("buckets", "bf16") else 1)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.rl.lr)
    loss_fn, params = LOSSES["alol"], dict(cfg.algo.params)
    reset_peak_memory(device)  # the peak of the training steps, not of loading or caching

    def run_step() -> None:
        _, batch = source.sample()
        batch = to_device(batch, device)
        if row in ("copy", "disabled"):
            with torch.no_grad(), train_loop.autocast(device):
                if copy is not None:
                    batch["ref_logprobs"] = response_logprobs(copy, batch)[0].float()
                else:
                    with reference_policy(policy) as reference:
                        batch["ref_logprobs"] = response_logprobs(reference, batch)[0].float()
        policy.train()
        loss, _ = train_loop.loss_on_batch(policy, batch, ["response"], loss_fn, params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], cfg.rl.grad_clip)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchlib.serve(steps, run_step, warmup=warmup, ready={"cache_seconds": cache_seconds})
    benchlib.report({"row": row, "cache_seconds": cache_seconds, "peak_bytes": peak_memory(device),
                     "device": device.type, "parameters": sum(p.numel() for p in policy.parameters()),
                     "batch_size": cfg.rl.batch_size})


VOCABS = {"32k": 32000, "128k": 128256}  # LLaMA-2's and LLaMA-3's vocabularies
LOGPROB_PATHS = {"full": "before: logits at every position, full fp32 log_softmax",
                 "lean": "after: head on response positions, selective log-softmax"}


def measure_vocab(vocab: str, path: str, steps: int, warmup: int, batch: int = 8, prompt: int = 64,
                  response: int = 64) -> dict:
    """One A-LOL step of a small from-config LLaMA + LoRA with the given log-prob path."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lol_rl import logprobs

    torch.set_num_threads(torch.get_num_threads())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCABS[vocab], hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=prompt + response)
    policy = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                                  target_modules="all-linear"))
    train_loop.response_logprobs = logprobs.full_response_logprobs if path == "full" else logprobs.response_logprobs
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config.vocab_size, (prompt,), generator=g).tolist() for _ in range(batch)]
    responses = [torch.randint(0, config.vocab_size, (int(torch.randint(response // 2, response + 1, (1,), generator=g)),),
                               generator=g).tolist() for _ in range(batch)]
    padded = logprobs.pad_batch(prompts, responses, pad_id=0)
    padded["ref_logprobs"] = -torch.rand(batch, int(padded["response_lengths"].max()), generator=g) * 10
    padded["advantages"] = torch.rand(batch, generator=g)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    device = torch.device("cpu")
    reset_peak_memory(device)
    resident = peak_memory(device)
    losses = []

    def run_step() -> None:
        policy.train()
        loss, _ = train_loop.loss_on_batch(policy, padded, ["response"], LOSSES["alol"], {"eps": 0.9})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    benchlib.serve(steps, run_step, warmup=warmup, ready={"resident_bytes": resident})
    # the loss of the first step (before any update), the same on both paths if they agree
    benchlib.report({"vocab": vocab, "path": path, "peak_bytes": peak_memory(device), "resident_bytes": resident,
                     "loss": losses[0], "batch": batch, "prompt": prompt, "response": response,
                     "parameters": sum(p.numel() for p in policy.parameters())})


def run_workers(argv: dict[str, list[str]], repeats: int) -> tuple[dict, dict[str, list[float]], str]:
    """Interleaved rounds over one worker per row: (closing reports, mean step s per round, threads)."""
    workers = benchlib.Workers(argv)
    try:
        segments = workers.interleaved(repeats)
        closing = workers.finish()
    finally:
        workers.close()
    return closing, {name: benchlib.segment_means(per) for name, per in segments.items()}, \
        benchlib.threads_used(segments)


def vocab_table(steps: int, warmup: int, repeats: int) -> list[dict]:
    results, threads = [], set()
    for vocab in VOCABS:  # before / after alternate within a vocabulary (both alive at once: one vocabulary at a time)
        argv = {path: [sys.executable, __file__, "--only-vocab", f"{vocab}:{path}", "--steps", str(steps),
                       "--warmup", str(warmup)] for path in LOGPROB_PATHS}
        closing, rounds, used = run_workers(argv, repeats)
        threads.add(used)
        for path in LOGPROB_PATHS:
            results.append({**closing[path], "seconds_per_step": benchlib.Spread.of(rounds[path]),
                            "x_before": benchlib.ratios(rounds["full"], rounds[path]), "rounds": rounds[path]})
    first = results[0]
    print(f"\nLog-probs at large vocabularies: A-LOL steps of a from-config LLaMA (2 layers, hidden 256) + LoRA r 16, "
          f"batch {first['batch']} x ({first['prompt']} prompt + <= {first['response']} response tokens), CPU, "
          f"{'/'.join(sorted(threads))} threads (in the workers), {repeats} interleaved rounds of {steps} timed steps "
          f"(mean, min..max over rounds)")
    print("| vocabulary | log-prob path | s/step | speed-up over before | peak RSS (MiB) | "
          "peak over the loaded model (MiB) | loss |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['vocab']} | {LOGPROB_PATHS[r['path']]} | {r['seconds_per_step'].format(3)} | "
              f"{r['x_before'].format(2)} | {r['peak_bytes'] / 2**20:.0f} | "
              f"{(r['peak_bytes'] - r['resident_bytes']) / 2**20:.0f} | {r['loss']:.6f} |")
    return results


def as_json(results: list[dict]) -> str:
    return json.dumps(results, indent=2, default=vars)  # a Spread as {mean, low, high}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds over the rows")
    parser.add_argument("--only", choices=list(ROWS), help=argparse.SUPPRESS)  # one row: a worker
    parser.add_argument("--only-vocab", help=argparse.SUPPRESS)  # <vocab>:<path>: a worker
    parser.add_argument("--vocab-only", action="store_true", help="only the large-vocabulary log-prob rows")
    parser.add_argument("--vocab-steps", type=int, default=3, help="timed steps per large-vocabulary row per round "
                                                                   "(after 1 warm-up)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.n_layer=6 rl.batch_size=64")
    args = parser.parse_args()
    if args.only:
        measure(args.only, args.overrides, args.steps, args.warmup)
        return
    if args.only_vocab:
        vocab, path = args.only_vocab.split(":")
        measure_vocab(vocab, path, args.steps, args.warmup)
        return
    with benchlib.LoadWindow():
        if args.vocab_only:
            results = vocab_table(args.vocab_steps, 1, args.repeats)
        else:
            results = main_table(args) + vocab_table(args.vocab_steps, 1, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            f.write(as_json(results))


def main_table(args) -> list[dict]:
    rows = [row for row in ROWS
            if row != "bf16" or resolve_device(config(args.overrides, row).device).type == "cuda"]
    closing, rounds, threads = run_workers(
        {row: [sys.executable, __file__, "--only", row, "--steps", str(args.steps), "--warmup", str(args.warmup),
               *args.overrides] for row in rows}, args.repeats)
    first = closing[rows[0]]
    batch = first["batch_size"]
    memory = "peak allocated GPU memory" if first["device"] == "cuda" else "peak RSS"
    print(f"A-LOL steps, LoRA policy ({first['parameters'] / 1e6:.2f}M parameters), batch {batch}, "
          f"{args.repeats} interleaved rounds of {args.steps} timed steps per row (mean, min..max over rounds), "
          f"device {first['device']}, {threads} threads (in the workers)")
    print(f"| configuration | sequences/s | x row 1 | {memory} (MiB) | one-off caching (s) |")
    print("|---|---|---|---|---|")
    results = []
    for row in rows:
        result = {**closing[row], "sequences_per_s": benchlib.Spread.of([batch / s for s in rounds[row]]),
                  "x_row_1": benchlib.ratios(rounds[rows[0]], rounds[row]), "rounds": rounds[row]}
        print(f"| {ROWS[row]} | {result['sequences_per_s'].format(1)} | {result['x_row_1'].format(2)} | "
              f"{result['peak_bytes'] / 2**20:.0f} | {result['cache_seconds']:.1f} |")
        results.append(result)
    return results

if __name__ == "__main__":
    main()
