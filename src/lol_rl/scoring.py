"""Scoring generations (PAPER.md "Metrics"): mean reward per component and in total, mean length in
whitespace words, distinct-1/2/3 over the whole output (lowercased whitespace tokens)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from . import distributed
from .data import count_cut_prompts, cut_counts
from .generate import generate_with_config
from .rewards import CompositeReward
from .tables import markdown_table
from .tasks import Example, Task


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over every text together (0 when there are none)."""
    ngrams = []
    for text in texts:
        tokens = text.lower().split()
        ngrams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def score_in_batches(reward: CompositeReward, prompts: Sequence[str], responses: Sequence[str], ids: Sequence[str],
                     batch_size: int, desc: str = "score", sharded: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`reward.score` of the rows, `batch_size` at a time (`sharded`: each process scores its
    share of the batches, distributed.map_batches), concatenated in row order."""
    if not prompts:
        return reward.score(prompts, responses, ids=ids)

    def score_batch(start: int):
        end = start + batch_size
        return reward.score(prompts[start:end], responses[start:end], ids=ids[start:end])

    parts = distributed.map_batches(score_batch, range(0, len(prompts), batch_size), desc, sharded=sharded)
    return (np.concatenate([total for total, _ in parts]),
            {name: np.concatenate([components[name] for _, components in parts]) for name in parts[0][1]})


def score_generations(reward: CompositeReward | None, examples: Sequence[Example], responses: Sequence[str],
                      batch_size: int | None = None, sharded: bool = False, desc: str = "score"):
    """(summary, per-row totals, per-row components) of responses to `examples`' prompts, scored
    `batch_size` rows at a time (all at once by default); without a scorer (a task with only the
    data's rewards) the reward entries are None."""
    summary = {
        "reward": None,
        "rewards": {},
        "length": sum(len(r.split()) for r in responses) / len(responses),
        "distinct": [distinct_n(responses, n) for n in (1, 2, 3)],
        "n": len(responses),
    }
    if reward is None:
        return summary, None, {}
    total, per_component = score_in_batches(reward, [e.prompt for e in examples], list(responses), [e.id for e in examples],
                                             batch_size or max(1, len(examples)), desc, sharded)
    summary["reward"] = float(total.mean())
    summary["rewards"] = {name: float(values.mean()) for name, values in per_component.items()}
    segments = sorted({e.meta["segment"] for e in examples if "segment" in e.meta})
    if segments:  # HHA's test segments are reported separately (Table 2)
        by_segment = np.array([e.meta.get("segment") for e in examples])
        summary["segments"] = {seg: {"reward": float(total[by_segment == seg].mean()), "n": int((by_segment == seg).sum())}
                               for seg in segments}
    return summary, total, per_component


def validation_scorer(task: Task, tokenizer, cfg) -> Callable | None:
    """`score(model) -> (reward, details)`: greedy generation on the first `rl.val_prompts`
    validation prompts, scored by the task reward (None for a task without a scorer: nothing
    can score new responses)."""
    if task.reward is None:
        return None
    examples = task.splits["validation"][: cfg.rl.val_prompts]
    formatted = [task.format_prompt(e.prompt) for e in examples]
    cut_counts("validation", len(examples), count_cut_prompts(tokenizer, formatted, cfg.model.max_prompt_tokens))

    def score(model) -> tuple[float, dict]:
        responses = [r[0] for r in generate_with_config(model, tokenizer, formatted, cfg)]
        scores, _, _ = score_generations(task.reward, examples, responses)
        return scores["reward"], {f"reward/{k}": v for k, v in scores["rewards"].items()} | {"length": scores["length"]}

    return score


def format_results(rows: dict[str, dict]) -> str:
    """A markdown table of test metrics: total, per-segment (HHA) and per-component reward,
    length, distinct-1/2/3."""
    first = next(iter(rows.values()))
    components = list(first["rewards"])
    segments = list(first.get("segments", {}))
    header = ["policy", *segments, "reward", *components, "length", "distinct-1/2/3", "n"]
    lines = []
    for name, m in rows.items():
        reward = "n/a" if m["reward"] is None else f"{m['reward']:.3f}"  # a task without a scorer
        lines.append([name, *(f"{m['segments'][s]['reward']:.3f}" for s in segments), reward,
                      *(f"{m['rewards'][c]:.3f}" for c in components), f"{m['length']:.1f}",
                      "/".join(f"{d:.3f}" for d in m["distinct"]), str(m["n"])])
    return markdown_table(header, lines)
