"""Moved to :mod:`conan_embedding.data.leakage` (the one evaluation-sentence index).

Kept as a re-export so existing imports (``cli.py``, ``bench/clr_ablation.py``,
``builders/translators.py``) keep working; new code imports ``conan_embedding.data.leakage``.
"""

from __future__ import annotations

from conan_embedding.data.leakage import (
    ALL_GROUPS,
    EVAL_SETS,
    DedupReport,
    EvalGroup,
    EvalIndex,
    EvalSet,
    build_eval_index,
    dedup_retrieval,
    normalize_text,
    touches,
)

__all__ = [
    "ALL_GROUPS",
    "EVAL_SETS",
    "DedupReport",
    "EvalGroup",
    "EvalIndex",
    "EvalSet",
    "build_eval_index",
    "dedup_retrieval",
    "normalize_text",
    "touches",
]
