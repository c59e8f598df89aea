"""Preference pairs as reward components see them: (prompt, chosen, rejected) triples, their
digest (the key of a fitted component's cache) and how often a scorer agrees with them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

import numpy as np

Pair = tuple[str, str, str]  # (prompt, chosen response, rejected response)


def preference_pairs(examples: Iterable) -> list[Pair]:
    """The (prompt, chosen, rejected) of every row that has a rejected response (an `Example`)."""
    return [(e.prompt, e.response, e.rejected) for e in examples if e.rejected is not None]


def pairs_digest(pairs: Sequence[Pair], **options) -> str:
    """A hash of the pairs' texts in order and of the options a fit depends on."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for pair in pairs:
        digest.update(json.dumps(list(pair)).encode())
    return digest.hexdigest()[:16]


def pairwise_agreement(scorer, pairs: Sequence[Pair]) -> dict[str, float]:
    """How a scorer orders each pair's two responses: the fraction scoring chosen above rejected
    (`chosen_higher`), level with it (`tied`), and `accuracy` = chosen_higher + tied / 2
    (chance is 0.5). Chosen and rejected are scored in one call, so a batched scorer batches."""
    if not pairs:
        raise ValueError("pairwise agreement needs at least one pair")
    prompts = [p for p, _, _ in pairs] * 2
    responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    scores = np.asarray(scorer(prompts, responses), dtype=np.float64)
    chosen, rejected = scores[:len(pairs)], scores[len(pairs):]
    higher, tied = float(np.mean(chosen > rejected)), float(np.mean(chosen == rejected))
    return {"chosen_higher": higher, "tied": tied, "accuracy": higher + tied / 2}
