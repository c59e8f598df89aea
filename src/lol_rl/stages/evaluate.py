"""Stage 5: test metrics of one policy (pi_ref, or the rl stage's best checkpoint): greedy
generation on the test prompts, scored by the task's test reward; every generation is kept.
Under several processes each generates and scores its share of the batches."""

from __future__ import annotations

import json
from pathlib import Path

from .. import artifacts, distributed
from ..faults import kill_point
from ..data import count_cut_prompts, cut_counts
from ..generate import generate_with_config
from ..models import load_policy
from ..scoring import score_generations
from . import Stage, StageRun


def evaluate(stage: StageRun, policy_dir: Path) -> None:
    cfg, task, out = stage.cfg, stage.task, stage.out
    model, tokenizer = load_policy(policy_dir, stage.device, cfg.model)
    examples = task.splits["test"][: cfg.eval.test_prompts] if cfg.eval.test_prompts else task.splits["test"]
    formatted = [task.format_prompt(e.prompt) for e in examples]
    # every process generates and scores its share of the batches; the main process writes
    responses = [r[0] for r in generate_with_config(model, tokenizer, formatted, cfg, desc="eval", sharded=True)]
    scores, total, per_component = score_generations(task.test_reward, examples, responses, cfg.generation.batch_size,
                                                     sharded=True, desc="eval scores")
    if not distributed.is_main():
        return
    scores.update(cut_counts("eval", len(examples),
                             count_cut_prompts(tokenizer, formatted, cfg.model.max_prompt_tokens)))
    kill_point("eval:generated")
    with (out / artifacts.GENERATIONS).open("w", encoding="utf-8") as f:
        for i, (example, response) in enumerate(zip(examples, responses)):
            row = {"id": example.id, "prompt": example.prompt, "response": response,
                   "reward": None if total is None else float(total[i]),
                   "rewards": {k: float(v[i]) for k, v in per_component.items()}, "meta": example.meta}
            f.write(json.dumps(row) + "\n")
    (out / artifacts.EVAL_METRICS).write_text(json.dumps(scores, indent=2))


READS = ("task", "model", "reward", "eval", "generation")

REFERENCE = Stage(name="eval_ref", store="eval", reads=READS, inputs=lambda algorithm: ("sft",),
                  run=lambda stage: evaluate(stage, stage.inputs["sft"]), parallel=lambda algorithm: True)
POLICY = Stage(name="eval", store="eval", reads=READS, inputs=lambda algorithm: ("rl",),
               run=lambda stage: evaluate(stage, stage.inputs["rl"] / artifacts.POLICY), parallel=lambda algorithm: True)
