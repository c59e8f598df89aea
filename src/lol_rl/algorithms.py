"""An algorithm, declared once: its yaml names a loss (or the online trainer), which rows it
keeps and how it samples them; everything else follows from the loss's signature in losses.py.
A parameter `rejected_logprobs` means it reads the rejected response group, `ref_logprobs`
the reference log-probs, `advantages` the advantage stage, `mismatched_ref_logprobs` the
reference log-probs of the mismatched pairs (their own stage), and so on. The preflight, the stages
a run builds and the tensors the loop hands the loss all come from here."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .data import MISMATCHED, RANKING, REJECTED, RESPONSE
from .errors import ConfigError
from .losses import LOSSES, check_params
from .tasks import data_reward

TRAINERS = ("offline", "ppo")
KEEP = ("all", "positive_advantage")  # every train row | the rows with A > 0
SAMPLING = ("uniform", "shuffle", "advantage", "reward")  # the last two: with replacement, prob. proportional

# a loss parameter's group, by its prefix
GROUP_PREFIXES = {REJECTED: f"{REJECTED}_", RANKING: f"{RANKING}_", MISMATCHED: f"{MISMATCHED}_"}
ROW_TENSORS = {"advantages": "advantage", "rewards": "reference", "ranking_rewards": "reference"}  # name -> stage

# what a task must provide (Task.provides) for a response group or a trainer
TASK_NEEDS = {
    REJECTED: ("preferences", "preference pairs"),
    RANKING: ("ranking", "rankings of the same length"),  # scored by the task's reward (Task.provides)
    "ppo": ("scorer", "a reward scorer for new responses (reward components, not only the data's rewards)"),
}


@dataclass(frozen=True)
class Algorithm:
    name: str
    trainer: str
    loss: str | None
    keep: str
    sampling: str
    params: dict

    @property
    def loss_inputs(self) -> tuple[str, ...]:
        """The names the loss function reads (its positional parameters)."""
        if self.loss is None:
            return ()
        signature = inspect.signature(LOSSES[self.loss])
        return tuple(p.name for p in signature.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD)

    @property
    def groups(self) -> list[str]:
        """The response groups one forward covers: the logged response, the rejected one, a ranking."""
        found = [group for group, prefix in GROUP_PREFIXES.items() if any(n.startswith(prefix) for n in self.loss_inputs)]
        reads_response = any(not any(n.startswith(p) for p in GROUP_PREFIXES.values()) for n in self.loss_inputs
                             if n.endswith(("logprobs", "mask")))
        return ([RESPONSE] if reads_response else []) + found

    @property
    def reads_reference(self) -> bool:
        return any(name.endswith("ref_logprobs") for name in self.loss_inputs)

    def input_stages(self) -> tuple[str, ...]:
        """The stages the rl stage reads for this algorithm, beyond sft."""
        if self.trainer == "ppo":
            return ("sft",)
        wanted = {ROW_TENSORS[name] for name in self.loss_inputs if name in ROW_TENSORS}
        if self.reads_reference or self.sampling == "reward":
            wanted.add("reference")
        if self.reads_reference:  # every group but the logged response is cached apart: no other algorithm pays for it
            wanted.update(group for group in self.groups if group != RESPONSE)
        if self.keep == "positive_advantage" or self.sampling == "advantage":
            wanted.add("advantage")
        return ("sft", *(stage for stage in ("reference", REJECTED, RANKING, MISMATCHED, "advantage") if stage in wanted))

    def task_needs(self) -> list[tuple[str, str]]:
        """(provision, description) the task must have: Task.provides() names the provisions."""
        keys = ["ppo"] if self.trainer == "ppo" else [g for g in self.groups if g in TASK_NEEDS]
        return [TASK_NEEDS[key] for key in keys]


def algorithm(algo_cfg) -> Algorithm:
    """The run's algorithm from its config group; a loss, parameter, keep or sampling the loop
    cannot run stops here, before any stage, naming the key."""
    name, trainer = algo_cfg.name, algo_cfg.trainer
    if trainer not in TRAINERS:
        raise ConfigError(f"algo {name}: trainer={trainer!r} is not one of {list(TRAINERS)}")
    loss = algo_cfg.loss if trainer == "offline" else None
    if trainer == "offline" and loss is None:
        raise ConfigError(f"algo {name}: an offline algorithm names its loss (algo.loss, one of {sorted(LOSSES)})")
    for key, allowed in (("keep", KEEP), ("sampling", SAMPLING)):
        if algo_cfg[key] not in allowed:
            raise ConfigError(f"algo {name}: {key}={algo_cfg[key]!r} is not one of {list(allowed)}")
    params = dict(algo_cfg.params or {})
    try:  # a typo or a zero clip range would otherwise stop the run at the first rl step, after sft
        check_params(loss, params)
    except ValueError as err:
        raise ConfigError(f"algo {name}: {err}") from None
    return Algorithm(name, trainer, loss, algo_cfg.keep, algo_cfg.sampling, params)


def preflight(algorithm: Algorithm, task) -> None:
    """Refuse, before any compute, an algorithm whose needs the task's data does not meet."""
    provided = task.provides()
    missing = [description for provision, description in algorithm.task_needs() if provision not in provided]
    if missing:
        raise ConfigError(f"{algorithm.name} needs {' and '.join(missing)}; task {task.name} has none")
    if "advantages" in algorithm.loss_inputs and algorithm.keep == "all":
        # the authors' code clamps A at 0 in the loss; we drop those rows, so a loss never sees A <= 0
        raise ConfigError(f"algo {algorithm.name}: keep=all would hand the loss rows with A <= 0, whose gradient "
                          f"pushes their responses' probability down without bound; A-LOL trains on the rows with "
                          f"A > 0 (keep=positive_advantage)")
    if algorithm.keep == "positive_advantage" and task.reward is None:
        # V(x) is fit on the data's rewards, inside (lowest, highest]: rows at the lowest reward get A < 0
        train = {data_reward(example) for example in task.splits["train"]}
        lowest = min(data_reward(e) for split in ("train", "validation") for e in task.splits[split])
        if train == {lowest}:
            raise ConfigError(f"algo {algorithm.name} keeps the train rows with A = R - V(x) > 0, but every train "
                              f"row of task {task.name} has the data's lowest reward {lowest}, below every V(x): no "
                              f"row would be kept; give rewards that vary, or an algorithm that keeps every row "
                              f"(algo=nll)")


def split_threshold(name: str, rewards: torch.Tensor, given: float | None) -> float:
    """The reward above which a train row is desirable (KTO's `params.threshold`): `given`, or the
    mean train reward where it is null, which on TRL's unpaired rows (task=hf reads label true/false
    as reward 1/0) is exactly the label. Refused when every row falls on one side. `rewards` are
    float32, as the loss compares them."""
    threshold = float(rewards.double().mean()) if given is None else float(given)
    desirable = int((rewards > threshold).sum())
    if desirable in (0, len(rewards)):
        what = (f"the mean train reward {threshold:g} (algo.params.threshold=null)" if given is None
                else f"algo.params.threshold={threshold:g}")
        side = "desirable (R > threshold)" if desirable else "undesirable (R <= threshold)"
        raise ConfigError(f"algo {name}: {what} makes all {len(rewards)} train rows {side}; train rewards span "
                          f"{float(rewards.min()):g}..{float(rewards.max()):g}, and it needs rows on both sides")
    return threshold
