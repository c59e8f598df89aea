"""Knowledge-grounded dialogue: Wizard of Wikipedia (Dinan et al. 2019) for train and validation,
FaithDial (Dziri et al. 2022) for test, as the paper's appendix C.2 and the authors'
preprocess_wow_and_add_rewards.py.

- Wizard of Wikipedia (parl.ai/downloads/wizard_of_wikipedia/wizard_of_wikipedia.tgz): train.json and
  valid_topic_split.json (unseen topics, the authors' validation), each a JSON list of dialogues
  `{chosen_topic, persona, wizard_eval, chosen_topic_passage, dialog: [turn, ...]}`, a turn being
  `{speaker: "0_Wizard" | "1_Apprentice", text, retrieved_topics, retrieved_passages}` plus, for the
  wizard, `checked_sentence: {key: sentence}` (empty, or "no_passages_used" when no knowledge was used)
  and `checked_passage`. One row per wizard turn that used a checked sentence and has a history.
- FaithDial (McGill-NLP/FaithDial on the hub, its data/test.json): a JSON list of `{utterances: [...]}`,
  an utterance being `{history: [str], speaker, knowledge, response, original_response, BEGIN, VRM}`.

The prompt is `Knowledge: {sentence}<eos>{history joined by <eos>}<eos>` with DialoGPT's EOS. The
authors cut the history to 400 DialoGPT tokens by dropping its oldest turns; with no tokenizer here,
`max_history_tokens` counts GPT-2 pre-tokenizer pieces (words, numbers, punctuation runs), one token
each for common words and a lower bound for rare ones. It must be cut here, not by the left
truncation of data.py, which would cut the knowledge first.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .base import DataError, Example, read_json, require, subsample

EOS = "<|endoftext|>"  # DialoGPT's EOS: separates knowledge and turns, as DialogRPT reads turns
KNOWLEDGE = "Knowledge: "
NO_PASSAGE = "no_passages_used"  # the wizard's checked sentence when no knowledge was used
_PIECE = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+")


def format_prompt(knowledge: str, history: list[str]) -> str:
    return f"{KNOWLEDGE}{knowledge.strip()}{EOS}{EOS.join(turn.strip() for turn in history)}{EOS}"


def faithcritic_input(prompt: str, response: str) -> tuple[str, str]:
    """The FaithCritic's sentence pair: (knowledge, response)."""
    knowledge = prompt.split(EOS, 1)[0]
    return knowledge.removeprefix(KNOWLEDGE), response


def dialogrpt_input(prompt: str, response: str) -> str:
    """DialogRPT's input: the history turns and the response, EOS-separated (no knowledge)."""
    return prompt.split(EOS, 1)[1] + response


def approx_tokens(text: str) -> int:
    """GPT-2 pre-tokenizer pieces of `text`: its BPE token count for common words, else less."""
    return len(_PIECE.findall(text))


def truncate_history(history: list[str], max_tokens: int) -> list[str]:
    """Drop the oldest turns until turns plus their EOS separators fit in `max_tokens`; the last
    turn always stays."""
    while len(history) > 1 and sum(approx_tokens(t) for t in history) + len(history) - 1 > max_tokens:
        history = history[1:]
    return history


def load_wow(cfg) -> dict[str, list[Example]]:
    splits = {
        "train": _examples(_wizard_turns(cfg.train), "wow-train", cfg.max_history_tokens),
        "validation": _examples(_wizard_turns(cfg.validation), "wow-valid", cfg.max_history_tokens),
        "test": _examples(_faithdial_turns(cfg.test), "faithdial-test", cfg.max_history_tokens),
    }
    return {split: subsample(rows, cfg.sizes[split], cfg.seed) for split, rows in splits.items()}


def _examples(turns, source: str, max_history_tokens: int) -> list[Example]:
    return [
        Example(id=f"{source}-{turn_id}", response=response.strip(), meta={"source": source},
                prompt=format_prompt(knowledge, truncate_history(history, max_history_tokens)))
        for turn_id, knowledge, history, response in turns
    ]


def _wizard_turns(path):
    """(id, knowledge, history, response) of each wizard turn with a checked sentence and a history.
    Unlike the authors' script, a wizard turn without a checked sentence stays in the history of the
    turns after it (theirs skipped it, so those histories missed a turn)."""
    path = Path(path)
    for d, dialogue in enumerate(_load_list(path)):
        history = []
        for t, turn in enumerate(require(dialogue, "dialog", list, f"{path} dialogue {d}")):
            where = f"{path} dialogue {d} turn {t}"
            speaker, text = require(turn, "speaker", str, where), require(turn, "text", str, where)
            if "Wizard" in speaker:
                checked = require(turn, "checked_sentence", dict, where)
                knowledge = next(iter(checked.values()), NO_PASSAGE)
                if not isinstance(knowledge, str):
                    raise DataError(f"{where}: key 'checked_sentence' must map to a sentence (string)")
                if history and knowledge != NO_PASSAGE:
                    yield f"{d}-{t}", knowledge, list(history), text
            history.append(text)


def _faithdial_turns(path):
    """(id, knowledge, history, response) of each FaithDial utterance that has a history."""
    path = Path(path)
    for d, dialogue in enumerate(_load_list(path)):
        for u, utterance in enumerate(require(dialogue, "utterances", list, f"{path} dialogue {d}")):
            where = f"{path} dialogue {d} utterance {u}"
            history = require(utterance, "history", list, where)
            if not all(isinstance(h, str) for h in history):
                raise DataError(f"{where}: key 'history' must be a list of strings")
            knowledge = require(utterance, "knowledge", str, where)
            response = require(utterance, "response", str, where)
            if history:
                yield f"{d}-{u}", knowledge, history, response


def _load_list(path: Path) -> list[Any]:
    return read_json(path, list, "a JSON list of dialogues")
