"""Pairwise win rates judged by an LLM or by people (PAPER.md, Table 3).

    lol-rl judge a=outputs/<run> b=test_good n=400 judge=gpt4     # an LLM judge, both orders
    lol-rl judge a=<run or generations.jsonl> b=<run or file> judge=local out=judged/x
    lol-rl judge export a=<run> b=test_good n=400 out=human/x   # form.html + form.csv for annotators
    lol-rl judge import out=human/x answers=[ann1.csv,ann2.csv,ann3.csv] verdicts=judged/x/verdicts.jsonl

Each pair (a's and b's responses to one test prompt) is shown to the judge twice, the order
swapped; only consistent verdicts count. `pairs.py` holds the pure functions (sampling, the
prompt, parsing, combining, the table), `client.py` the endpoint and the resumable verdict
log, `human.py` the annotators' round trip, `run.py` the three modes.
"""

from .client import JudgeError
from .run import MODES, run

__all__ = ["MODES", "JudgeError", "run"]
