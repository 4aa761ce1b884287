"""Offline hard-negative mining: a ranked candidate pool per query, with false-negative filters.

Why a pool and not just ``neg``: Conan's dynamic hard negative mining (``mining.dynamic``)
replaces a sample's negatives during training with the *next* candidates of its mined list
(v1: the i-th replacement takes ranks ``(i-1)*n+10 .. i*n+10``), so mining keeps a whole
window of ranked candidates (e.g. ranks 10-200), not only the ``n`` negatives used first.

How: queries and corpus are embedded once (:class:`~conan_embedding.mining.index.TextEncoder`:
dedup, length-sorted chunks, cache), FAISS returns the top ``range_max + extra`` corpus texts
per query, then candidates are dropped when they are

- the positive itself or an exact duplicate of a positive (whitespace-normalised text),
- the query itself,
- scored above ``positive_score - |positive_score| * relative_margin`` (the issue's
  ``positive_score * (1 - relative_margin)``, written so the threshold does not rise when
  the positive score is negative; ``positive_score`` is the *lowest* score of the query's
  positives, as in sentence-transformers),
- scored above ``positive_score - absolute_margin``, or above the absolute cap ``max_score``.

The survivors are ranked by score; ranks ``range_min .. range_max - 1`` of the survivors form
the pool (the same window semantics as sentence-transformers' ``mine_hard_negatives``, so
``sampling_strategy="top"`` there picks the same negatives as ``neg`` here).

Outputs, written atomically:

- the retrieval JSONL: each input record with ``neg`` = the first ``num_negatives`` pool
  candidates (ids and meta kept);
- the pool sidecar JSONL (default ``<output stem>.pool.jsonl``), line ``i`` for record ``i``::

      {"index": 0, "query": "...", "positive_score": 0.71,
       "candidates": [{"text": "...", "score": 0.62, "rank": 10}, ...]}

  ``rank`` is the 0-based position among the filtered candidates; candidates are sorted by
  rank. :func:`read_pools` validates it and names file, line and field on bad input.
- the pool's metadata (``<pool stem>.meta.json``, :class:`PoolMeta`): the mining model's
  identity, prompts and max length. DHNM takes the mined ``score`` as a negative's initial
  score ``S_0`` only when they match the training model's (``mining.dynamic``).
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from conan_embedding.atomic import write_text_atomic
from conan_embedding.data.records import (
    RecordError,
    RetrievalRecord,
    iter_json_objects,
    read_records,
    text_field,
    validated,
    write_records,
)
from conan_embedding.mining.index import (
    Backend,
    IndexKind,
    TextEncoder,
    build_index,
    search,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


class MiningConfig(BaseModel):
    """Window, filters and encoding settings of one mining run (defaults: ranks 10-200)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    range_min: int = Field(10, ge=0)
    range_max: int = Field(200, gt=0)
    num_negatives: int = Field(7, ge=1)
    relative_margin: float | None = Field(0.05, ge=0)
    absolute_margin: float | None = None
    max_score: float | None = None
    query_prompt: str | None = None
    passage_prompt: str | None = None
    index: IndexKind = "auto"
    exact_max: int = Field(200_000, gt=0)
    batch_size: int = Field(32, gt=0)
    chunk_size: int = Field(4096, gt=0)
    backend: Backend = "torch"

    @model_validator(mode="after")
    def _check_window(self) -> MiningConfig:
        if self.range_max - self.range_min < self.num_negatives:
            raise ValueError(
                f"the window {self.range_min}..{self.range_max} cannot hold "
                f"{self.num_negatives} negatives"
            )
        return self


class PoolCandidate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    text: str
    score: float
    rank: int = Field(ge=0)


class PoolEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    index: int = Field(ge=0)
    query: str
    positive_score: float
    candidates: list[PoolCandidate]


PROBE_TEXT = "Conan pool probe: 检索 hard negatives, 2026."
"""Encoded by :meth:`PoolMeta.of`: equal probe vectors mean the same model, whatever its
module list (a trailing ``Normalize``) or the path it was loaded from."""


class PoolMeta(BaseModel):
    """What the pool's scores were computed with: scores are on the training model's scale
    when :meth:`matches` holds (same prompts and max length, the same probe embedding)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    """The model's name or path (informative)."""
    probe: list[float]
    """The model's normalised embedding of :data:`PROBE_TEXT`."""
    query_prompt: str | None
    passage_prompt: str | None
    max_seq_length: int | None

    @classmethod
    def of(
        cls, model: SentenceTransformer, query_prompt: str | None, passage_prompt: str | None
    ) -> PoolMeta:
        """The meta of ``model`` encoding with these prompt *texts* (not prompt names)."""
        import torch

        first = model[0]
        config = getattr(getattr(first, "auto_model", None), "config", None)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            probe = model.encode([PROBE_TEXT], normalize_embeddings=True, convert_to_numpy=True)
        model.train(was_training)
        return cls(
            model=str(getattr(config, "name_or_path", "") or type(first).__name__),
            probe=[round(float(x), 6) for x in np.asarray(probe, np.float64).ravel()],
            query_prompt=query_prompt or None,
            passage_prompt=passage_prompt or None,
            max_seq_length=model.max_seq_length,
        )

    def matches(self, other: PoolMeta, min_cosine: float = 0.999) -> bool:
        """Same prompts and max length, and probe embeddings at cosine >= ``min_cosine``."""
        if (self.query_prompt, self.passage_prompt, self.max_seq_length) != (
            other.query_prompt,
            other.passage_prompt,
            other.max_seq_length,
        ):
            return False
        if len(self.probe) != len(other.probe):
            return False
        return float(np.dot(self.probe, other.probe)) >= min_cosine


@dataclass
class MiningStats:
    queries: int = 0
    corpus_size: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    short_pools: int = 0
    """Queries whose pool holds fewer than ``num_negatives`` candidates."""
    mean_pool_size: float = 0.0
    mean_negative_score: float = 0.0
    mean_positive_score: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    pool_meta: dict[str, Any] = field(default_factory=dict)
    """:class:`PoolMeta` of the run (pass it to :func:`write_pools`)."""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _norm(text: str) -> str:
    return " ".join(text.split())


def select_candidates(
    scores: np.ndarray,
    ids: np.ndarray,
    excluded: Sequence[set[int]],
    positive_scores: np.ndarray,
    config: MiningConfig,
    stats: MiningStats | None = None,
) -> list[list[tuple[int, float, int]]]:
    """Apply the false-negative filters and the rank window to raw search results.

    ``scores``/``ids`` are ``[queries, k]`` sorted by score (id -1 = no result);
    ``excluded[q]`` holds the corpus ids that are query ``q``'s positives or the query itself.
    Returns, per query, ``(corpus_id, score, rank)`` of the window's candidates.
    """
    scores = np.array(scores, dtype=np.float32, copy=True)
    valid = ids >= 0
    counters = {"positive_or_query": 0, "absolute_margin": 0, "relative_margin": 0, "max_score": 0}
    for q, banned in enumerate(excluded):
        if banned:
            hit = np.isin(ids[q], np.fromiter(banned, np.int64)) & valid[q]
            counters["positive_or_query"] += int(hit.sum())
            valid[q] &= ~hit
    pos = positive_scores[:, None]
    rules = []
    if config.absolute_margin is not None:
        rules.append(("absolute_margin", scores > pos - config.absolute_margin))
    if config.relative_margin is not None:
        rules.append(("relative_margin", scores > pos - np.abs(pos) * config.relative_margin))
    if config.max_score is not None:
        rules.append(("max_score", scores > config.max_score))
    for name, drop in rules:
        hit = drop & valid
        counters[name] += int(hit.sum())
        valid &= ~hit
    pools = []
    for q in range(len(ids)):
        keep = np.flatnonzero(valid[q])[: config.range_max]
        window = keep[config.range_min :]
        pools.append(
            [
                (int(ids[q, j]), float(scores[q, j]), config.range_min + r)
                for r, j in enumerate(window)
            ]
        )
    if stats is not None:
        for name, count in counters.items():
            stats.skipped[name] = stats.skipped.get(name, 0) + count
    return pools


def mine(
    records: Sequence[RetrievalRecord],
    model: SentenceTransformer,
    corpus: Sequence[str] | None = None,
    config: MiningConfig | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
    encoder: TextEncoder | None = None,
) -> tuple[list[RetrievalRecord], list[PoolEntry], MiningStats]:
    """Mine a pool per record; returns the records with new ``neg``, the pools and statistics.

    The corpus is ``corpus`` plus every positive (deduplicated); without ``corpus`` it is the
    records' positives and existing negatives.
    """
    config = config or MiningConfig()
    if not records:
        raise ValueError("no retrieval records to mine for")
    stats = MiningStats(queries=len(records))
    stats.pool_meta = PoolMeta.of(model, config.query_prompt, config.passage_prompt).model_dump()
    started = time.perf_counter()
    positives = [p for r in records for p in r.pos]
    base = list(corpus) if corpus is not None else [n for r in records for n in r.neg]
    texts = list(dict.fromkeys([*base, *positives]))
    stats.corpus_size = len(texts)
    encoder = encoder or TextEncoder(
        model,
        backend=config.backend,
        batch_size=config.batch_size,
        chunk_size=config.chunk_size,
        cache_dir=cache_dir,
        show_progress=show_progress,
    )
    corpus_vectors = encoder.encode(texts, config.passage_prompt, desc="encoding corpus")
    query_vectors = encoder.encode(
        [r.query for r in records], config.query_prompt, desc="encoding queries"
    )
    stats.seconds["encode"] = time.perf_counter() - started

    by_norm: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        by_norm.setdefault(_norm(text), []).append(i)
    excluded: list[set[int]] = []
    positive_scores = np.empty(len(records), np.float32)
    for q, record in enumerate(records):
        banned = {i for p in record.pos for i in by_norm.get(_norm(p), [])}
        positive_ids = [i for i in banned if texts[i] in record.pos]
        positive_scores[q] = float(np.min(corpus_vectors[positive_ids] @ query_vectors[q]))
        banned.update(by_norm.get(_norm(record.query), []))
        excluded.append(banned)

    started = time.perf_counter()
    index = build_index(corpus_vectors, config.index, exact_max=config.exact_max)
    k = config.range_max + max(len(b) for b in excluded)
    scores, ids = search(index, query_vectors, k, show_progress=show_progress)
    del index
    windows = select_candidates(scores, ids, excluded, positive_scores, config, stats)
    stats.seconds["search"] = time.perf_counter() - started

    mined, pools = [], []
    negative_scores = []
    for q, (record, window) in enumerate(zip(records, windows, strict=True)):
        candidates = [PoolCandidate(text=texts[i], score=s, rank=r) for i, s, r in window]
        pools.append(
            PoolEntry(
                index=q,
                query=record.query,
                positive_score=float(positive_scores[q]),
                candidates=candidates,
            )
        )
        chosen = candidates[: config.num_negatives]
        negative_scores.extend(c.score for c in chosen)
        stats.short_pools += len(candidates) < config.num_negatives
        mined.append(record.model_copy(update={"neg": [c.text for c in chosen]}))
    stats.mean_pool_size = float(np.mean([len(p.candidates) for p in pools]))
    stats.mean_negative_score = float(np.mean(negative_scores)) if negative_scores else 0.0
    stats.mean_positive_score = float(positive_scores.mean())
    return mined, pools, stats


def default_pool_path(records_path: str | os.PathLike[str]) -> Path:
    """``train.jsonl`` -> ``train.pool.jsonl`` (beside the retrieval file)."""
    path = Path(records_path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    return path.with_name(f"{stem}.pool.jsonl")


def pool_meta_path(pool_path: str | os.PathLike[str]) -> Path:
    """``train.pool.jsonl`` -> ``train.pool.meta.json``."""
    path = Path(pool_path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    return path.with_name(f"{stem}.meta.json")


def write_pools(
    path: str | os.PathLike[str],
    pools: Sequence[PoolEntry],
    meta: PoolMeta | dict[str, Any] | None = None,
) -> int:
    """Write the pool sidecar and its meta (a stale meta of an earlier pool is removed)."""
    count = write_records(path, pools)
    meta_path = pool_meta_path(path)
    if meta is None:
        meta_path.unlink(missing_ok=True)
    else:
        meta = meta if isinstance(meta, PoolMeta) else PoolMeta.model_validate(meta)
        write_text_atomic(meta_path, meta.model_dump_json(indent=1) + "\n")
    return count


def read_pool_meta(pool_path: str | os.PathLike[str]) -> PoolMeta | None:
    """The pool's :class:`PoolMeta`, or None for a pool written without one."""
    meta_path = pool_meta_path(pool_path)
    if not meta_path.is_file():
        return None
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RecordError(meta_path, err.lineno, "<file>", f"not JSON: {err.msg}") from None
    if not isinstance(raw, dict):
        raise RecordError(meta_path, 1, "<file>", "expected a JSON object")
    return validated(PoolMeta, raw, meta_path, 1)


def read_pools(path: str | os.PathLike[str]) -> list[PoolEntry]:
    """Read a pool sidecar; raises :class:`RecordError` naming file, line and field."""
    pools: list[PoolEntry] = []
    for line_no, raw in iter_json_objects(path):
        entry = validated(PoolEntry, raw, path, line_no)
        if entry.index != len(pools):
            raise RecordError(
                path, line_no, "index", f"expected {len(pools)} (one line per record, in order)"
            )
        ranks = [c.rank for c in entry.candidates]
        if ranks != sorted(ranks):
            raise RecordError(path, line_no, "candidates", "ranks must be ascending")
        pools.append(entry)
    return pools


def read_corpus(path: str | os.PathLike[str]) -> list[str]:
    """Corpus texts from ``.txt`` (one per line) or ``.jsonl[.gz]`` (``text``, optional ``title``)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz", ".json.gz"))
    with opener(path, "rt", encoding="utf-8-sig") as handle:
        if not is_jsonl:
            return [line.rstrip("\r\n") for line in handle if line.strip()]
        texts = []
        for line_no, row in iter_json_objects(path, handle):
            text = text_field(row, "text", path, line_no)
            title = row.get("title")
            texts.append(f"{title} {text}" if isinstance(title, str) and title.strip() else text)
    return texts


def mine_file(
    records_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    model_name_or_path: str,
    *,
    corpus_path: str | os.PathLike[str] | None = None,
    pool_path: str | os.PathLike[str] | None = None,
    config: MiningConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
) -> MiningStats:
    """The ``conan-embed mine`` command: read, mine, write records + pool sidecar."""
    from conan_embedding.modeling.embedder import load_embedder

    records = read_records(records_path, "retrieval")
    corpus = read_corpus(corpus_path) if corpus_path is not None else None
    model = load_embedder(model_name_or_path)
    mined, pools, stats = mine(
        records, model, corpus, config, cache_dir=cache_dir, show_progress=show_progress
    )
    write_records(output_path, mined)
    write_pools(pool_path or default_pool_path(output_path), pools, stats.pool_meta)
    return stats
