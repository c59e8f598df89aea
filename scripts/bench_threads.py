"""Benchmark (not a test): sft steps of the default tiny model under each OpenMP wait policy and
thread count, on idle cores and beside busy ones (what CI and a laptop running other jobs see).

    python scripts/bench_threads.py                  # 3 rounds x 20 steps, 0 and 1 busy competitors
    python scripts/bench_threads.py --busy 0 2 --rounds 5

OpenMP reads OMP_WAIT_POLICY when torch loads it, so every arm is its own worker process; the
arms run interleaved round by round (drift hits all alike). A competitor is a pure-Python busy
loop, one core's worth of someone else's job. Reported: mean step time over rounds (each round's
figure the mean of its steps) with the min..max over rounds, the worker's own torch thread count,
and the load average before and after. The claim checked: PASSIVE (lol_rl's default) is no
slower than ACTIVE on idle cores and faster beside a busy one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORKER = r"""
import json, sys, time, torch
from hydra import compose, initialize_config_dir
from lol_rl.cli import CONF_DIR
from lol_rl.config import validate
from lol_rl.data import encode_rows
from lol_rl.losses import nll
from lol_rl.models import initial_policy
from lol_rl.offline import BatchSource, loss_on_batch
from lol_rl.tasks import build_task

threads, steps = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = validate(compose("config", overrides=["task.sizes.train=1024"]))
task = build_task(cfg.task)
train = task.splits["train"]
model, tokenizer = initial_policy(cfg.model, [task.format_prompt(e.prompt) + task.response_prefix + e.response
                                              for e in train], torch.device("cpu"))
rows = encode_rows(tokenizer, task, train, cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
source = BatchSource(rows, {}, {}, torch.arange(len(rows)), None, cfg.sft.batch_size, 0)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

def step():
    loss, _ = loss_on_batch(model, source.batch(source.draw()), ["response"], nll, {})
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

for _ in range(3):  # warm-up
    step()
times = []
for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(json.dumps({"mean_s": sum(times) / len(times), "threads": torch.get_num_threads()}))
"""

BUSY = "while True: pass"


def run_arm(policy: str, threads: int, steps: int) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", WORKER, str(threads), str(steps)], env=env, text=True,
                         capture_output=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed sft steps per arm per round")
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="busy competitor processes, per setting")
    args = parser.parse_args()
    arms = [(policy, threads) for threads in (1, 2) for policy in ("PASSIVE", "ACTIVE")]
    print(f"load average before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs; sft batch of the default config")
    for busy in args.busy:
        competitors = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
        try:
            results: dict = {arm: [] for arm in arms}
            for _ in range(args.rounds):
                for arm in arms:
                    results[arm].append(run_arm(*arm, args.steps))
        finally:
            for process in competitors:
                process.kill()
        print(f"\n{busy} busy competitor(s), {args.rounds} rounds x {args.steps} steps")
        print("| wait policy | threads (worker) | ms per sft step, mean | min..max over rounds |")
        print("|---|---|---|---|")
        means = {}
        for (policy, threads), runs in results.items():
            ms = [r["mean_s"] * 1000 for r in runs]
            means[(policy, threads)] = (statistics.mean(ms), min(ms), max(ms))
            print(f"| {policy} | {runs[0]['threads']} | {statistics.mean(ms):.1f} | {min(ms):.1f}..{max(ms):.1f} |")
        for threads in (1, 2):
            passive, active = means[("PASSIVE", threads)], means[("ACTIVE", threads)]
            verdict = ("inconclusive" if passive[1] <= active[2] and active[1] <= passive[2]
                       else "PASSIVE faster" if passive[0] < active[0] else "ACTIVE faster")
            print(f"threads {threads}: ACTIVE / PASSIVE step time {active[0] / passive[0]:.2f}x "
                  f"(spreads {'overlap' if verdict == 'inconclusive' else 'apart'}: {verdict})")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
