"""An example user scorer for `reward=examples.support.score:score` (run from the repository
root): friendly, substantive answers score high. Any function with this signature works."""

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

_ANALYZER = SentimentIntensityAnalyzer()


def score(prompts: list[str], responses: list[str]) -> list[float]:
    """Half VADER sentiment mapped to [0, 1], half length up to 12 words (one-liners help little)."""
    return [0.5 * (_ANALYZER.polarity_scores(r)["compound"] + 1) / 2 + 0.5 * min(1.0, len(r.split()) / 12)
            for r in responses]
