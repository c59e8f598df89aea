"""Test metrics (PAPER.md "Metrics"): mean reward per component and in total, mean length in
whitespace words, distinct-1/2/3 over the whole output (lowercased whitespace tokens)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .faults import kill_point
from .generate import generate_with_config
from .models import load_policy
from .rewards import CompositeReward
from .tasks import Example, Task


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over every text together (0 when there are none)."""
    ngrams = []
    for text in texts:
        tokens = text.lower().split()
        ngrams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def score_generations(reward: CompositeReward | None, examples: Sequence[Example], responses: Sequence[str]):
    """(summary, per-row totals, per-row components) of responses to `examples`' prompts;
    without a scorer (a task with only the data's rewards) the reward entries are None."""
    summary = {
        "reward": None,
        "rewards": {},
        "length": sum(len(r.split()) for r in responses) / len(responses),
        "distinct": [distinct_n(responses, n) for n in (1, 2, 3)],
        "n": len(responses),
    }
    if reward is None:
        return summary, None, {}
    total, per_component = reward.score([e.prompt for e in examples], responses, ids=[e.id for e in examples])
    summary["reward"] = float(total.mean())
    summary["rewards"] = {name: float(values.mean()) for name, values in per_component.items()}
    segments = sorted({e.meta["segment"] for e in examples if "segment" in e.meta})
    if segments:  # HHA's test segments are reported separately (Table 2)
        by_segment = np.array([e.meta.get("segment") for e in examples])
        summary["segments"] = {seg: {"reward": float(total[by_segment == seg].mean()), "n": int((by_segment == seg).sum())}
                               for seg in segments}
    return summary, total, per_component


def run_eval(cfg, task: Task, policy_dir: Path, out_dir: Path, device) -> None:
    """Stage 5: greedy generation on the test prompts; metrics.json and every generation."""
    model, tokenizer = load_policy(policy_dir, device, cfg.model)
    examples = task.splits["test"][: cfg.eval.test_prompts] if cfg.eval.test_prompts else task.splits["test"]
    formatted = [task.format_prompt(e.prompt) for e in examples]
    responses = [r[0] for r in generate_with_config(model, tokenizer, formatted, cfg, desc="eval")]
    scores, total, per_component = score_generations(task.test_reward, examples, responses)
    kill_point("eval:generated")
    with (out_dir / "generations.jsonl").open("w", encoding="utf-8") as f:
        for i, (example, response) in enumerate(zip(examples, responses)):
            row = {"id": example.id, "prompt": example.prompt, "response": response,
                   "reward": None if total is None else float(total[i]),
                   "rewards": {k: float(v[i]) for k, v in per_component.items()}, "meta": example.meta}
            f.write(json.dumps(row) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(scores, indent=2))
