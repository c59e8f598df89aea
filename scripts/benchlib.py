"""The one harness every scripts/bench_*.py measures with, so that a ratio holds on a machine
whose cores other jobs share:

- contenders run interleaved, A B, B A, A B ..., for `repeats` rounds in one run of the script (in
  one process, or in one long-lived worker process per contender that runs a segment of steps
  each time it is told to, so that its peak memory is still its own; `Workers`);
- a rate comes from the mean step time (total time over steps), never the median (step times
  are skewed; the median flatters whatever has a long tail);
- every figure is the mean over rounds with its min..max spread; a ratio of two contenders is
  taken per round (the two ran next to each other) and reported the same way;
- a target is "met" only when the whole spread meets it, "missed" when none of it does, and
  "inconclusive" when the spread crosses it;
- the load average is printed before and after, and the thread count is the one the worker
  used (torch.get_num_threads() inside it), not the parent's;
- a script imports benchlib before torch, so that its steps run under lol_rl's OpenMP wait
  policy (see the import below).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Before anything loads torch: lol_rl sets OMP_WAIT_POLICY=PASSIVE (unless the environment sets it),
# which OpenMP reads only when torch loads it, so a script that imports benchlib first times its
# steps under the wait policy `lol-rl train` runs with.
import lol_rl  # noqa: F401

PROTOCOL = "BENCH "  # a worker's lines to the parent start with this; anything else it prints is passed over


@dataclass(frozen=True)
class Spread:
    """A figure measured once per round: mean over rounds, min..max."""

    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.mean(values), min(values), max(values))

    def format(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} ({self.low:.{digits}f}..{self.high:.{digits}f})"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(spread: Spread, target: float, at_most: bool) -> str:
    """'met' if every round meets the target, 'missed' if none does, else 'inconclusive'."""
    good = (lambda v: v <= target) if at_most else (lambda v: v >= target)
    if good(spread.low) and good(spread.high):
        return "met"
    if not good(spread.low) and not good(spread.high):
        return "missed"
    return "inconclusive"


def target_line(name: str, spread: Spread, target: float, at_most: bool, digits: int = 3) -> str:
    sign = "<=" if at_most else ">="
    return f"{name}: {spread.format(digits)}x, target {sign} {target}x: {verdict(spread, target, at_most)}"


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> Spread:
    """Per-round ratio of two contenders measured in the same rounds."""
    if len(numerator) != len(denominator):
        raise ValueError(f"{len(numerator)} rounds against {len(denominator)}: ratios need the same rounds")
    return Spread.of([a / b for a, b in zip(numerator, denominator)])


def mean_step_seconds(step_seconds: Sequence[float]) -> float:
    return sum(step_seconds) / len(step_seconds)


def load_average() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


class LoadWindow:
    """Prints the 1/5/15-minute load average when entered and when left; `summary` has both."""

    def __enter__(self) -> LoadWindow:
        self.before = load_average()
        print(f"load average (1/5/15 min) before: {self.before}", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.after = load_average()
        print(f"load average (1/5/15 min) after: {self.after}", flush=True)

    def summary(self) -> dict:
        return {"load_before": self.before, "load_after": getattr(self, "after", load_average())}


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """Every contender once per round, the order reversed every other round (A B C, C B A, ...):
    drift in the machine's load hits all of them alike, and no contender always runs first
    (after the others' segments) or last."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def interleaved(contenders: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each round calls every contender once (`round_order`). Returns each contender's value per round."""
    rounds: dict[str, list[float]] = {name: [] for name in contenders}
    for index in range(repeats):
        for name in round_order(list(contenders), index):
            rounds[name].append(contenders[name]())
    return rounds


# ---- long-lived workers: one process per contender, segments on demand ----

class Workers:
    """One worker process per contender (`argv[name]`), started one after another: each sets
    itself up (its one-off costs timed with no sibling busy), runs its warm-up, reports, then
    waits. `interleaved` then tells them in turn to run one segment of timed steps, so the
    contenders alternate A B, B A, ... while each keeps its own process (and its own peak
    memory); a waiting worker blocks on its stdin and takes no CPU (unless OMP_WAIT_POLICY=ACTIVE:
    then its idle OpenMP threads spin; `run_once` starts a fresh process per run instead). `finish` collects each
    worker's closing report. A worker's stderr goes to a temp file, shown if it fails."""

    def __init__(self, argv: dict[str, list[str]], env: dict | None = None):
        self.processes: dict[str, subprocess.Popen] = {}
        self.stderr: dict[str, tempfile._TemporaryFileWrapper] = {}
        self.ready: dict[str, dict] = {}
        try:
            for name, args in argv.items():
                self.stderr[name] = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{name}-", suffix=".log")
                self.processes[name] = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                        stderr=self.stderr[name], text=True, env=env, bufsize=1)
                self.ready[name] = self._read(name)  # its set-up report
        except BaseException:
            self.close()
            raise

    def _read(self, name: str) -> dict:
        process = self.processes[name]
        for line in process.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        process.wait()
        self.stderr[name].seek(0)
        raise RuntimeError(f"bench worker {name} exited (status {process.returncode}) before reporting:\n"
                           f"{self.stderr[name].read()[-4000:]}")

    def segment(self, name: str) -> dict:
        process = self.processes[name]
        process.stdin.write("go\n")
        process.stdin.flush()
        return self._read(name)

    def interleaved(self, repeats: int, order: Sequence[str] | None = None) -> dict[str, list[dict]]:
        segments: dict[str, list[dict]] = {name: [] for name in order or self.processes}
        for index in range(repeats):
            for name in round_order(list(segments), index):
                segments[name].append(self.segment(name))
        return segments

    def finish(self) -> dict[str, dict]:
        reports = {}
        for name, process in self.processes.items():
            process.stdin.write("end\n")
            process.stdin.flush()
            reports[name] = self._read(name)
            process.wait()
        return reports

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in self.stderr.values():
            log.close()


def run_once(args: list[str], env: dict | None = None) -> dict:
    """A worker that reports once and exits (a fresh process per run): its last report. For
    what a long-lived worker would distort, e.g. OMP_WAIT_POLICY=ACTIVE, whose idle threads keep
    spinning a core while the worker waits its turn."""
    done = subprocess.run(args, env=env, text=True, capture_output=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(PROTOCOL)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench worker {' '.join(args[1:3])} exited (status {done.returncode}) without a "
                           f"report:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len(PROTOCOL):])


def report(payload: dict) -> None:
    """A worker's message to its parent (one line on stdout)."""
    sys.stdout.write(PROTOCOL + json.dumps(payload) + "\n")
    sys.stdout.flush()


def wait_for_go() -> bool:
    """In a worker: block until the parent says run a segment (True) or end (False)."""
    line = sys.stdin.readline().strip()
    if line not in ("go", "end", ""):
        raise RuntimeError(f"bench worker: unexpected line from the parent: {line!r}")
    return line == "go"


class SegmentClock:
    """In a worker: the end time of each step, cut into segments. A segment starts when the
    parent says go, so the first step's time is from then; `step_seconds` are its steps'."""

    def __init__(self):
        self.ends: list[float] = []

    def start(self) -> None:
        self.ends = [time.perf_counter()]

    def step_done(self) -> None:
        self.ends.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def serve(steps_per_segment: int, run_step: Callable[[], None], extra: Callable[[], dict] | None = None, *,
          warmup: int = 0, ready: dict | None = None) -> None:
    """In a worker whose steps it drives itself: `warmup` untimed steps, then its set-up report
    `ready` (if given: what Workers waits for), then one segment of `steps_per_segment` steps each
    time the parent says go, reporting their step times and the thread count in use."""
    import torch

    for _ in range(warmup):
        run_step()
    if ready is not None:
        report(ready)
    clock = SegmentClock()
    while wait_for_go():
        clock.start()
        for _ in range(steps_per_segment):
            run_step()
            clock.step_done()
        report({"step_seconds": clock.step_seconds(), "threads": torch.get_num_threads(),
                **(extra() if extra else {})})


def segment_means(segments: Sequence[dict]) -> list[float]:
    """Each segment's mean step seconds."""
    return [mean_step_seconds(s["step_seconds"]) for s in segments]


def threads_used(segments: dict[str, Sequence[dict]]) -> str:
    """The worker thread counts, as reported from inside the workers ('2', or '1/2' if they differ)."""
    counts = sorted({s["threads"] for per in segments.values() for s in per})
    return "/".join(str(c) for c in counts)


# ---- whole `lol-rl train` chains, one sweep per seed ----

def sweep_jobs(seed: int, algos: Sequence[str], workdir: Path, overrides: Sequence[str]) -> dict[str, Path]:
    """Runs `lol-rl train -m algo=a,b,...` with seed, sft.seed and value.seed set to `seed` (so the
    whole chain, pi_ref included, varies with it) and its cache in `workdir` (empty on the first
    seed); returns each algorithm's job dir. The jobs run one after another and share the cached
    stages: a stage's time is in the job that built it."""
    from omegaconf import OmegaConf

    sweep = workdir / f"seed{seed}"
    cmd = ["lol-rl", "train", "-m", f"algo={','.join(algos)}", f"seed={seed}", f"sft.seed={seed}",
           f"value.seed={seed}", f"hydra.sweep.dir={sweep}", *overrides]
    env = {**os.environ, "LOL_RL_CACHE": str(workdir / "cache"), "CI": "true"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    jobs = {OmegaConf.load(job / "config.yaml").algo.name: job
            for job in sorted(sweep.iterdir()) if (job / "eval.json").exists()}
    missing = [algo for algo in algos if algo not in jobs]
    if missing:
        raise RuntimeError(f"sweep {sweep}: no finished job (eval.json) for {', '.join(missing)}")
    return jobs


def add_seed_arguments(parser: argparse.ArgumentParser, overrides_example: str) -> None:
    """--seeds, --json and the Hydra overrides of a script that runs one sweep per seed."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="one sweep each (end the list with -- when Hydra overrides follow)")
    parser.add_argument("--json", type=Path, help="also write the figures as one JSON object here")
    parser.add_argument("overrides", nargs="*", help=f"extra Hydra overrides, e.g. {overrides_example}")


def over_seeds(run_seed: Callable[[int, Path, list[str]], dict], seeds: Sequence[int], overrides: list[str],
               prefix: str) -> dict[int, dict]:
    """run_seed(seed, workdir, overrides) for each seed in turn (each seed one repeat), all in one
    temporary workdir whose cache starts empty, with the load average printed before and after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, LoadWindow():
        return {seed: run_seed(seed, Path(tmp), overrides) for seed in seeds}
