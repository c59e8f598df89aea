"""Reddit response generation: a reply to a comment, from Kaggle's "Reddit comment scores" data
(kaggle.com/code/danofer/reddit-comments-scores-nlp/input): comments_positive.csv (upvoted replies,
score 66..9582) and comments_negative.csv (downvoted, -2946..-6), columns id, parent_id,
subreddit_id, link_id, text, score, ups, author, controversiality, parent_link_id, parent_text,
parent_score, parent_ups, parent_author, parent_controversiality.

Prepared as the authors' preprocess_reddit_comment_scores_and_add_rewards.py does: rows without a
text or parent text dropped; up to `sample_size` (102K) rows sampled per polarity by pandas with
their seed (901: the rows they drew, given the same files); whitespace runs collapsed and URLs
replaced by "<URL>"; pairs whose parent or reply is over 100 words dropped; then, per polarity, the
first `test_per_polarity` rows are test, the next `validation_per_polarity` validation and the rest
train. Validation and test hold both polarities (balanced); train holds the configured one
(reddit_pos: positive, reddit_neg: negative). One response per prompt: no preference pairs. Their
last filter, parent + reply over 300 DialoGPT tokens, needs a tokenizer and is left to the token
truncation of data.py (rare once both sides are at most 100 words).

The prompt is the parent comment; the task's prompt_template closes it with DialoGPT's EOS.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .base import FIT_TEXTS, DataError, Example, require_file

log = logging.getLogger(__name__)

POLARITIES = ("positive", "negative")
COLUMNS = ("id", "text", "score", "parent_text")
MAX_WORDS = 100
EOS = "<|endoftext|>"  # DialoGPT's EOS, the turn separator DialogRPT and the ToxiChat classifier read
URL_TOKEN = "<URL>"
_URL = re.compile(r"https?://(?:www\.)?[-\w@:%.+~#=]{1,256}\.[a-zA-Z0-9()]{1,6}\b[-\w@:;%\\+.~#?&/=]*", re.ASCII)


def dialogrpt_input(prompt: str, response: str) -> str:
    """DialogRPT's input: the context, EOS, the response."""
    return f"{prompt}{EOS}{response}"


def toxichat_input(prompt: str, response: str) -> str:
    """The ToxiChat offensive classifier's input: every utterance closed by EOS (it reads the
    response's safety at the last EOS, as the authors' get_batch_toxichat_safe_reward)."""
    return f"{prompt}{EOS}{response}{EOS}"


def clean(text: str) -> str:
    """Whitespace runs collapsed to one space, URLs replaced by <URL>."""
    return _URL.sub(URL_TOKEN, " ".join(text.split()))


def load_reddit(cfg) -> dict[str, list[Example]]:
    if cfg.polarity not in POLARITIES:
        raise DataError(f"task.polarity must be one of {POLARITIES}, got {cfg.polarity!r}")
    test_n, val_n = cfg.test_per_polarity, cfg.validation_per_polarity
    rows = {p: _read_polarity(cfg[f"{p}_csv"], p, cfg.sample_size, cfg.seed) for p in POLARITIES}
    for polarity, examples in rows.items():
        if len(examples) <= test_n + val_n:
            raise DataError(f"{cfg[f'{polarity}_csv']}: {len(examples)} usable rows, fewer than "
                            f"test + validation ({test_n} + {val_n}) + 1 train row")
    return {
        "train": rows[cfg.polarity][test_n + val_n:],
        "validation": [e for p in POLARITIES for e in rows[p][test_n:test_n + val_n]],
        "test": [e for p in POLARITIES for e in rows[p][:test_n]],
        # the authors fit TF-IDF once on both polarities' train replies: one vocabulary, so
        # reddit_pos and reddit_neg rows of Table 4 score diversity alike
        FIT_TEXTS: [e.response for p in POLARITIES for e in rows[p][test_n + val_n:]],
    }


def _read_polarity(path, polarity: str, sample_size: int, seed: int) -> list[Example]:
    """The sampled, cleaned and length-filtered pairs of one CSV, in sample order."""
    table = _read_csv(Path(path))
    table = table.dropna(subset=["parent_text", "text"])
    table = table.sample(min(sample_size, len(table)), random_state=seed)
    examples = []
    for row in table.itertuples():
        parent, reply = clean(row.parent_text), clean(row.text)
        if 0 < len(parent.split()) <= MAX_WORDS and 0 < len(reply.split()) <= MAX_WORDS:
            examples.append(Example(id=row.id, prompt=parent, response=reply,
                                    meta={"polarity": polarity, "score": float(row.score)}))
    log.info("reddit: %s: %d of %d sampled pairs kept (parent and reply of 1 to %d words)",
             polarity, len(examples), len(table), MAX_WORDS)
    return examples


def _read_csv(path: Path):
    import pandas as pd  # heavy import, only for this task

    require_file(path)
    try:
        table = pd.read_csv(path, dtype={"id": str, "text": str, "parent_text": str})
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV ({err})") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected the Kaggle columns incl. {list(COLUMNS)}")
    scores = pd.to_numeric(table["score"], errors="coerce")
    bad = scores.isna() | table["id"].isna()
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        key = "id" if pd.isna(table["id"].iloc[i]) else "score"
        raise DataError(f"{path}: data row {i} (0-based, after the header): key '{key}' is "
                        f"{table[key].iloc[i]!r}, expected {'an id' if key == 'id' else 'a number'}")
    return table.assign(score=scores)
