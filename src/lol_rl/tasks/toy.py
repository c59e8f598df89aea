"""The embedded task: a tiny synthetic assistant, generated from a seed, that runs on a CPU.

Prompts ask for one of four skills of clearly different difficulty for a ~1M-parameter LM:
`repeat: fox owl` (easy), `reverse: ...`, `sort: ...` (word lists) and `add: 7 + 8`
(hard when it carries). A good response is an opener, the answer and a
full stop: `Sure, happy to help! owl fox.`.

Why it is hard enough to tell methods apart (EMBEDDED.md's lessons):
- rewards are graded: correctness gives partial credit position by position, politeness is
  a real sentiment scorer (VADER) that grades the five good openers differently, and
  conciseness decays with extra words;
- prompts differ in difficulty (short lists and sums without a carry are easy; lists of
  five or more words and sums that carry are hard, and there the data's majority is a
  systematic wrong answer), so V(x) matters and the advantage ranks rows differently from
  the reward;
- bad rows are not all separable by reward: a lazy or slightly wrong answer keeps most of
  its correctness, a rambling tail raises politeness while it costs conciseness;
- the most frequent good opener is the least polite one, so dropping bad rows alone
  (NLL on A > 0 rows) does not reach the best responses, which leaves headroom.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .base import DataError, Example

WORDS = "ant bat bee cat cow dog eel elk emu fox gnu hen owl pig ram yak".split()

# Openers with the probability a good (or wrong/rambling) response starts with each. The
# least polite good opener is the most common one, so its mode is not the best response.
GOOD_OPENERS = {
    "Okay, sure:": 0.30,
    "Sure, no problem:": 0.25,
    "Of course, glad to help!": 0.20,
    "Sure, happy to help!": 0.15,
    "Great question, happy to help!": 0.10,
}
RUDE_OPENERS = {"Ugh, whatever.": 0.7, "Stupid question.": 0.2, "Ugh, fine.": 0.1}
RAMBLE = "I hope this helps, let me know if you need anything else."

SKILLS = ("repeat", "reverse", "sort", "add")
# Fraction of train rows that are deliberately bad, by prompt difficulty (hard: a list of 5+
# words, or a sum with a carry), and the mix of defects among them. On hard prompts the
# systematic wrong answer (lazy copy, dropped carry) is the data's majority, so greedy
# pi_ref learns it; on easy prompts the noise stays low enough that every good response
# scores above V(x).
NOISE_RATE = {"noisy": {"easy": 0.40, "hard": 0.60}, "clean": {"easy": 0.10, "hard": 0.15}}
DEFECTS = {
    "easy": {"rude": 0.50, "wrong": 0.10, "ramble": 0.40},
    "hard": {"rude": 0.15, "wrong": 0.70, "ramble": 0.15},
}
LIST_LENGTHS = {"repeat": (2, 4), "reverse": (2, 6), "sort": (2, 6)}
HARD_LIST_LENGTH = 5


def solve(prompt: str) -> str:
    """The correct answer to a toy prompt (raises ValueError on a prompt of another shape)."""
    skill, _, arg = prompt.partition(": ")
    if skill == "add":
        left, _, right = arg.partition(" + ")
        return str(int(left) + int(right))
    words = arg.split()
    if skill == "repeat":
        return " ".join(words)
    if skill == "reverse":
        return " ".join(reversed(words))
    if skill == "sort":
        return " ".join(sorted(words))
    raise ValueError(f"not a toy prompt: {prompt!r}")


@dataclass(frozen=True)
class Draft:
    opener: str
    answer: str
    ramble: bool = False

    def text(self) -> str:
        return f"{self.opener} {self.answer}." + (f" {RAMBLE}" if self.ramble else "")


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _make_prompt(rng: random.Random, skill: str) -> str:
    if skill == "add":
        return f"add: {rng.randint(0, 9)} + {rng.randint(0, 9)}"
    words = rng.sample(WORDS, rng.randint(*LIST_LENGTHS[skill]))
    return f"{skill}: {' '.join(words)}"


def _no_carry_sum(left: int, right: int) -> str:
    """The sum a child gets by dropping every carry: 7 + 8 -> 5."""
    width = max(len(str(left)), len(str(right)))
    digits = (str((int(a) + int(b)) % 10) for a, b in zip(str(left).zfill(width), str(right).zfill(width)))
    return "".join(digits).lstrip("0") or "0"


def is_hard(prompt: str) -> bool:
    """A sum with a carry, or a list of HARD_LIST_LENGTH or more words."""
    skill, _, arg = prompt.partition(": ")
    if skill == "add":
        left, right = (int(s) for s in arg.split(" + "))
        return _no_carry_sum(left, right) != solve(prompt)
    return skill != "repeat" and len(arg.split()) >= HARD_LIST_LENGTH


def wrong_answer(rng: random.Random, prompt: str) -> str:
    """A plausible, partly right answer: lazy copies for lists, dropped carries for sums."""
    skill, _, arg = prompt.partition(": ")
    answer = solve(prompt)
    if skill == "add":
        no_carry = _no_carry_sum(*(int(s) for s in arg.split(" + ")))
        if no_carry != answer:
            return no_carry
        digits = list(answer)
        i = rng.randrange(len(digits))
        digits[i] = str((int(digits[i]) + rng.randint(1, 9)) % 10)
        return "".join(digits)
    words = answer.split()
    if skill in ("reverse", "sort") and arg != answer:
        return arg  # the lazy answer: the input list unchanged
    i = rng.randrange(len(words))
    words[i] = rng.choice([w for w in WORDS if w != words[i]])
    return " ".join(words)


def _with_defect(rng: random.Random, prompt: str, draft: Draft, defect: str) -> Draft:
    if defect == "rude":
        return Draft(_pick(rng, RUDE_OPENERS), draft.answer, draft.ramble)
    if defect == "wrong":
        return Draft(draft.opener, wrong_answer(rng, prompt), draft.ramble)
    return Draft(draft.opener, draft.answer, True)


def _degradations(rng: random.Random, prompt: str, draft: Draft, defect: str | None) -> list[Draft]:
    """Two successively worse versions of `draft`, each adding one defect it lacks."""
    order = [d for d in ("wrong", "rude", "ramble") if d != defect]
    worse = _with_defect(rng, prompt, draft, order[0])
    return [worse, _with_defect(rng, prompt, worse, order[1])]


def generate_split(seed: int, n: int, split: str, noise_rate: dict[str, float]) -> list[Example]:
    """`n` rows of one split. Only the train split is noisy; validation/test keep good
    responses (they are references for prompts; the policy is scored on its own output)."""
    rng = random.Random(f"{seed}-{split}")
    examples = []
    for i in range(n):
        skill = rng.choice(SKILLS)
        prompt = _make_prompt(rng, skill)
        difficulty = "hard" if is_hard(prompt) else "easy"
        good = Draft(_pick(rng, GOOD_OPENERS), solve(prompt))
        noisy = split == "train" and rng.random() < noise_rate[difficulty]
        defect = _pick(rng, DEFECTS[difficulty]) if noisy else None
        draft = _with_defect(rng, prompt, good, defect) if defect else good
        ranking = [draft, *_degradations(rng, prompt, draft, defect)]
        examples.append(
            Example(
                id=f"{split}-{i}",
                prompt=prompt,
                response=draft.text(),
                rejected=ranking[-1].text(),
                ranking=[d.text() for d in ranking],
                meta={"skill": skill, "difficulty": difficulty, "bad": noisy, "defect": defect or "none"},
            )
        )
    return examples


def load_toy(seed: int, variant: str, sizes: dict[str, int]) -> dict[str, list[Example]]:
    """The three splits of the toy task; `variant` is `noisy` or `clean` (cf. Reddit down/up)."""
    if variant not in NOISE_RATE:
        raise DataError(f"task.variant must be one of {sorted(NOISE_RATE)}, got {variant!r}")
    return {split: generate_split(seed, n, split, NOISE_RATE[variant]) for split, n in sizes.items()}
