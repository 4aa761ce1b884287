"""Splits we cut ourselves from training files, shared by data preparation and evaluation.

``bge_finetune_data.jsonl`` is training data, but 300 of its rows (seeded) are held out as a
reranking test (MAP over ``pos`` + 10 ``neg``). Defining the held-out rows here, in the data
stage, lets ``data prepare`` drop them and the evaluator score exactly them.
"""

from __future__ import annotations

import random

SPLIT_SEED = 42  # seed of every split and subsample we make ourselves
RERANKING_HOLDOUT = 300  # rows of bge_finetune_data.jsonl held out for reranking


def reranking_holdout_indices(
    n_rows: int, n_holdout: int = RERANKING_HOLDOUT, seed: int = SPLIT_SEED
) -> list[int]:
    """The 0-based rows of ``bge_finetune_data.jsonl`` the reranking task scores.

    A trainer that reports this task must drop these rows from its training data
    (``conan-embed data prepare`` does).
    """
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    return sorted(order[:n_holdout])
