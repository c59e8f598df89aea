"""Length-penalised TF-IDF diversity, the Reddit and WoW tasks' fifth reward (PAPER.md).

As the authors' code computes it (utils/rl_utils.py `get_batch_tfidf_reward`; fit in
preprocess_reddit_comment_scores_and_add_rewards.py): sklearn's CountVectorizer +
TfidfTransformer(smooth_idf=True, use_idf=True) fit on the train responses, which is
`TfidfVectorizer()` with its defaults (lowercase, words of 2+ word characters, smooth idf,
l2-normalised rows). A response scores the mean of its non-zero tf-idf values, times nnz / 10
when it has fewer than 5 distinct known terms (their fix for one-word responses scoring 1.0);
no known term scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.sparse import csr_matrix
from sklearn.feature_extraction.text import TfidfVectorizer

from . import RewardError

SHORT_RESPONSE_TERMS = 5  # fewer distinct terms than this: score x nnz / 10


def length_penalised_mean(rows: csr_matrix) -> np.ndarray:
    """Per row: mean of the stored (non-zero) values x (nnz / 10 if nnz < 5 else 1); 0 if empty."""
    nnz = np.diff(rows.indptr)
    sums = np.asarray(rows.sum(axis=1)).ravel()
    means = np.divide(sums, nnz, out=np.zeros(len(nnz)), where=nnz > 0)
    return means * np.where(nnz < SHORT_RESPONSE_TERMS, nnz / 10, 1.0)


class TfidfDiversity:
    """Scores a response by how rare its words are in the train responses; `fit` first."""

    max_value = 1.0  # a mean of l2-normalised non-negative values

    def __init__(self):
        self.vectorizer: TfidfVectorizer | None = None

    def fit(self, texts: Sequence[str]) -> TfidfDiversity:
        vectorizer = TfidfVectorizer()
        try:
            vectorizer.fit(list(texts))
        except ValueError as err:  # e.g. no texts, or no word of two or more characters
            raise RewardError(f"tfidf_diversity: cannot fit on the {len(texts)} train responses ({err})") from None
        self.vectorizer = vectorizer
        return self

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if self.vectorizer is None:
            raise RewardError("tfidf_diversity is not fitted: call fit(train responses) before scoring "
                              "(build_reward does when given fit_texts)")
        return length_penalised_mean(self.vectorizer.transform(list(responses)).tocsr())
