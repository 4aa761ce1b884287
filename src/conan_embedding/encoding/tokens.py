"""Token-level helpers of the batch encoder: the tokenizer's special-token frame and token batches.

Why token batches: texts sorted by *characters* (``SentenceTransformer.encode``) still leave
about a quarter of a short-text batch as padding, because characters per token vary; sorting
the token id lists themselves and cutting batches by their token count leaves almost none.

How: :func:`token_batches` orders rows longest first and closes a batch when it holds
``batch_size`` rows or when one more row would make ``rows x longest`` (the padded size, which
is what the transformer actually computes) exceed ``max_tokens``. Longest first also means a
batch too large for the device fails on the first batch, not after an hour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def special_token_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a text (e.g. ``[CLS]`` / ``[SEP]``).

    Read from the tokenizer's own output on a probe word, so it holds for any template.
    """
    for probe in ("hello", "a", "the", "x"):
        content = tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = tokenizer(probe, add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(content) + 1):
            if content and full[start : start + len(content)] == content:
                return list(full[:start]), list(full[start + len(content) :])
    return [], []


def token_batches(
    lengths: Sequence[int] | np.ndarray, batch_size: int, max_tokens: int | None = None
) -> list[np.ndarray]:
    """Row indices per batch: longest first, at most ``batch_size`` rows and ``max_tokens``
    padded tokens (``rows * longest``) each; a single row longer than ``max_tokens`` is alone."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    if max_tokens is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches, start = [], 0
    while start < len(order):
        longest = max(1, int(lengths[order[start]]))  # sorted: the first row is the longest
        rows = max(1, min(batch_size, max_tokens // longest))
        batches.append(order[start : start + rows])
        start += rows
    return batches
