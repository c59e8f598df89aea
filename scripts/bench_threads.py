"""Benchmark (not a test): sft steps of the default tiny model under each OpenMP wait policy and
thread count, on idle cores and beside busy ones (what CI and a laptop running other jobs see).

    python scripts/bench_threads.py                  # 3 rounds x 20 steps, 0 and 1 busy competitors
    python scripts/bench_threads.py --busy 0 2 --rounds 5

OpenMP reads OMP_WAIT_POLICY when torch loads it, so every arm runs in a worker process started
with it in its environment, and a fresh one each round: an ACTIVE worker's idle threads keep
spinning a core while it waits, so a long-lived one would be a busy competitor of the arm being
timed. The arms run interleaved round by round (scripts/benchlib.py: drift hits all alike). A
competitor is a pure-Python busy loop, one core's worth of someone else's job. Reported per
setting: mean step time over rounds (each round's figure the mean of its steps) with the min..max
over rounds, the worker's own torch thread count, the load average before and after, and per
thread count the ACTIVE / PASSIVE step-time ratio taken per round. Its verdict against 1.0x:
"met" if PASSIVE was faster in every round, "missed" if slower in every round, "inconclusive" if
the rounds disagree. The claim checked: PASSIVE (lol_rl's default) is no slower than ACTIVE on
idle cores (inconclusive: alike) and faster beside a busy one (met).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import benchlib  # scripts/benchlib.py

POLICIES = ("PASSIVE", "ACTIVE")
THREADS = (1, 2)
BUSY = "while True: pass"


def measure(threads: int, steps: int, warmup: int = 3) -> None:
    """One arm, as a worker: set up, warm up, time `steps` sft steps, report them and exit."""
    import torch
    from hydra import compose, initialize_config_dir

    from lol_rl.cli import CONF_DIR
    from lol_rl.config import validate
    from lol_rl.data import encode_rows
    from lol_rl.losses import nll
    from lol_rl.models import initial_policy
    from lol_rl.offline import BatchSource, loss_on_batch
    from lol_rl.tasks import build_task

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

    def step() -> None:
        loss, _ = loss_on_batch(model, source.batch(source.draw()), ["response"], nll, {})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    benchlib.report({"step_seconds": seconds, "threads": torch.get_num_threads(),
                     "wait_policy": os.environ["OMP_WAIT_POLICY"]})


def arm_name(policy: str, threads: int) -> str:
    return f"{policy}:{threads}"


def run_arm(policy: str, threads: int, steps: int) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    result = benchlib.run_once([sys.executable, __file__, "--arm", arm_name(policy, threads), "--steps", str(steps)],
                               env)
    if result["wait_policy"] != policy:
        raise RuntimeError(f"bench worker {arm_name(policy, threads)} ran with OMP_WAIT_POLICY={result['wait_policy']}")
    return result


def setting(busy: int, rounds: int, steps: int) -> None:
    """The arms' interleaved rounds beside `busy` competitors, and their table."""
    arms = [(policy, threads) for threads in THREADS for policy in POLICIES]
    print(f"\n{busy} busy competitor(s), {rounds} rounds x {steps} steps")
    competitors = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        with benchlib.LoadWindow():
            reports = benchlib.interleaved({arm_name(*arm): (lambda arm=arm: run_arm(*arm, steps)) for arm in arms},
                                           rounds)
    finally:
        for process in competitors:
            process.kill()
            process.wait()
    means = {name: benchlib.segment_means(per) for name, per in reports.items()}
    print("| wait policy | threads (worker) | ms per sft step, mean (min..max over rounds) |")
    print("|---|---|---|")
    for policy, threads in arms:
        name = arm_name(policy, threads)
        ms = benchlib.Spread.of([1000 * s for s in means[name]])
        print(f"| {policy} | {benchlib.threads_used({name: reports[name]})} | {ms.format(1)} |")
    for threads in THREADS:
        ratio = benchlib.ratios(means[arm_name("ACTIVE", threads)], means[arm_name("PASSIVE", threads)])
        print(benchlib.target_line(f"threads {threads}: ACTIVE / PASSIVE step time", ratio, 1.0, at_most=False,
                                   digits=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed sft steps per arm per round")
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="busy competitor processes, per setting")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # <policy>:<threads>: a worker
    args = parser.parse_args()
    if args.arm:
        measure(int(args.arm.split(":")[1]), args.steps)
        return
    print(f"{os.cpu_count()} CPUs; sft batch of the default config")
    for busy in args.busy:
        setting(busy, args.rounds, args.steps)


if __name__ == "__main__":
    main()
