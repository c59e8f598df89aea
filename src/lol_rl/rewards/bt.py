"""A Bradley-Terry reward model that lol-rl fits itself on a task's chosen/rejected train pairs,
standing in for the paper's HHA reward models (1.4B train, 6.9B test) that cannot load offline.

R(x, y) = sigmoid(s(x, y) - c) with s a head (linear, or a one-hidden-layer MLP) on the frozen
MiniLM embeddings (`minilm.py`) of prompt and response, [e(x), e(y), e(x) * e(y)], fit by the
Bradley-Terry loss -log sigmoid(s(x, y_chosen) - s(x, y_rejected)) (Bradley & Terry 1952, as
in Ouyang et al. 2022's reward models), full-batch on CPU from a seeded init, so a fit is
deterministic. The loss sees only differences, so `c` (the mean s over the fit's responses)
puts an average train response at 0.5: R reads as P(y beats a typical train response).

A fit is cached per process under the hash of its pairs and options: the train and test
rewards of one task, and each build of the same task, fit once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import RewardError
from .minilm import encode, minilm_dir
from .preferences import Pair, pairs_digest, pairwise_agreement

log = logging.getLogger(__name__)

HEADS = ("linear", "mlp")
PROMPT_TOKENS = 128  # a prompt keeps its last 128 tokens (its latest turns): faster, and what the reply answers
_FITTED: dict[str, FittedHead] = {}  # pairs digest -> fit, for this process
_HELD_OUT: dict[tuple[str, str], dict[str, float]] = {}  # (fit digest, held-out digest) -> agreement


@dataclass(frozen=True)
class FittedHead:
    head: nn.Module  # features -> s(x, y), on CPU, float32
    center: float    # mean s over the fit's chosen and rejected responses
    train_accuracy: float
    n_pairs: int
    embed_seconds: float  # the MiniLM encoding of the pairs' texts (not already in this process's memo)
    fit_seconds: float    # the head's Adam steps


def pair_features(prompt_vectors: np.ndarray, response_vectors: np.ndarray) -> torch.Tensor:
    """[e(x), e(y), e(x) * e(y)]: who asks, what is said, and how the two fit together."""
    p, r = torch.from_numpy(prompt_vectors), torch.from_numpy(response_vectors)
    return torch.cat([p, r, p * r], dim=-1)


def make_head(n_features: int, head: str, hidden: int) -> nn.Module:
    if head == "linear":
        return nn.Linear(n_features, 1)
    return nn.Sequential(nn.Linear(n_features, hidden), nn.GELU(), nn.Linear(hidden, 1))


def fit_bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, head: str, hidden: int, l2: float,
                      steps: int, lr: float, seed: int) -> nn.Module:
    """The head minimising mean(-log sigmoid(s(chosen) - s(rejected))) + l2 * |weights|^2 by
    full-batch Adam; seeded init and fixed steps, so the same inputs give the same head."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small lose to thread sync: 10x slower on 2 busy cores
    try:
        return _adam_fit(chosen, rejected, head, hidden, l2, steps, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _adam_fit(chosen, rejected, head, hidden, l2, steps, lr, seed) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        torch.manual_seed(seed)
        model = make_head(chosen.shape[1], head, hidden)
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        margin = model(chosen).squeeze(-1) - model(rejected).squeeze(-1)
        loss = nn.functional.softplus(-margin).mean() + l2 * sum((w ** 2).sum() for w in weights)
        loss.backward()
        optimizer.step()
    return model.eval()


class BradleyTerryMiniLM:
    """sigmoid(s(x, y) - c) in [0, 1], s fit on the task's train pairs (build_reward's `fit_pairs`).

    head: linear | mlp (one hidden layer of `hidden` GELU units). l2: weight penalty. steps, lr:
    full-batch Adam. max_pairs: fit on a seeded sample of that many train pairs (null: all).
    seed: the init and the sample. batch_size, device: the encoder's.
    """

    min_value, max_value = 0.0, 1.0

    def __init__(self, *, head: str = "linear", hidden: int = 32, l2: float = 1e-2, steps: int = 300,
                 lr: float = 1e-2, max_pairs: int | None = None, seed: int = 0, batch_size: int = 64,
                 device: str = "auto", name: str = "bt_minilm"):
        if head not in HEADS:
            raise ValueError(f"head {head!r}; expected one of {list(HEADS)}")
        if hidden < 1 or steps < 1 or batch_size < 1 or (max_pairs is not None and max_pairs < 1):
            raise ValueError(f"hidden {hidden}, steps {steps}, batch_size {batch_size} and max_pairs {max_pairs} "
                             "must be positive")
        if not (l2 >= 0 and lr > 0):
            raise ValueError(f"l2 {l2} must be >= 0 and lr {lr} > 0")
        self.fit_options = dict(head=head, hidden=hidden if head == "mlp" else 0, l2=l2, steps=steps, lr=lr, seed=seed,
                                prompt_tokens=PROMPT_TOKENS)
        self.max_pairs, self.seed, self.batch_size, self.device, self.name = max_pairs, seed, batch_size, device, name
        self.fitted: FittedHead | None = None
        self.digest: str | None = None
        self.held_out: dict[str, float] | None = None  # pairwise agreement on the held-out pairs, if given

    def check_available(self) -> None:
        minilm_dir()

    def features(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        prompt_vectors = encode(prompts, self.device, self.batch_size, PROMPT_TOKENS, truncation_side="left")
        return pair_features(prompt_vectors, encode(responses, self.device, self.batch_size))

    def fit_pairs(self, pairs: Sequence[Pair], held_out: Sequence[Pair] | None = None) -> BradleyTerryMiniLM:
        """Fit on `pairs` (a seeded sample of max_pairs), or take this process's earlier fit of the
        same pairs and options; with `held_out` pairs, measure and log the accuracy on them."""
        pairs = self._sample(list(pairs))
        self.digest = pairs_digest(pairs, **self.fit_options)
        if self.digest not in _FITTED:
            _FITTED[self.digest] = self._fit(pairs)
        self.fitted = _FITTED[self.digest]
        fitted = self.fitted
        log.info("%s: %s head fit on %d pairs (encoding %.1f s, fitting %.1f s), train pairwise accuracy %.3f",
                 self.name, self.fit_options["head"], fitted.n_pairs, fitted.embed_seconds, fitted.fit_seconds,
                 fitted.train_accuracy)
        if held_out:
            self.held_out = self.held_out_agreement(held_out)
            log.info("%s: held-out pairwise accuracy %.3f on %d pairs not used for fitting", self.name,
                     self.held_out["accuracy"], len(held_out))
        return self

    def held_out_agreement(self, pairs: Sequence[Pair]) -> dict[str, float]:
        """`pairwise_agreement` on pairs, cached per (fit, pairs) in this process."""
        key = (self.digest, pairs_digest(pairs))
        if key not in _HELD_OUT:
            _HELD_OUT[key] = pairwise_agreement(self, pairs)
        return _HELD_OUT[key]

    def _sample(self, pairs: list[Pair]) -> list[Pair]:
        bad = next((p for p in pairs if len(p) != 3 or not all(isinstance(t, str) for t in p)), None)
        if bad is not None:
            raise RewardError(f"reward component '{self.name}': a preference pair is (prompt, chosen, rejected) "
                              f"strings, got {bad!r:.120}")
        if len(pairs) < 2:
            raise RewardError(f"reward component '{self.name}': a Bradley-Terry fit needs 2 or more train pairs, "
                              f"got {len(pairs)}")
        if self.max_pairs is None or self.max_pairs >= len(pairs):
            return pairs
        return [pairs[i] for i in sorted(random.Random(self.seed).sample(range(len(pairs)), self.max_pairs))]

    def _fit(self, pairs: list[Pair]) -> FittedHead:
        start = time.perf_counter()
        prompts = [p for p, _, _ in pairs]
        both = self.features(prompts * 2, [c for _, c, _ in pairs] + [r for _, _, r in pairs])
        chosen, rejected = both[:len(pairs)], both[len(pairs):]
        encoded = time.perf_counter()
        o = self.fit_options
        head = fit_bradley_terry(chosen, rejected, o["head"], o["hidden"], o["l2"], o["steps"], o["lr"], o["seed"])
        with torch.no_grad():
            scores = head(both).squeeze(-1)
        accuracy = float((scores[:len(pairs)] > scores[len(pairs):]).float().mean())
        return FittedHead(head, float(scores.mean()), accuracy, len(pairs), encoded - start,
                          time.perf_counter() - encoded)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if self.fitted is None:
            raise RewardError(f"reward component '{self.name}' is not fitted: call fit_pairs(train pairs) first "
                              "(build_reward does when given fit_pairs)")
        if not len(prompts):
            return np.zeros(0)
        with torch.no_grad():
            logits = self.fitted.head(self.features(prompts, responses)).squeeze(-1).double().numpy()
        return 1 / (1 + np.exp(-(logits - self.fitted.center)))
