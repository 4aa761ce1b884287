"""Teacher-score filtering of weakly supervised pairs (Conan-v1 stage 1, v2 stage 3).

Why: mined and generated pairs are noisy: a news title with an unrelated body, a query the
LLM invented that its passage does not answer. The papers score every pair with an existing
embedder (the teacher) and drop pairs whose cosine similarity is below 0.4; of ~750M
collected pairs about 400M survive in v1.

How: every distinct text is embedded once by the teacher (a sentence-transformers model run by
the shared :class:`~conan_embedding.encoding.engine.EmbeddingEngine` on ``device``,
L2-normalised, optional ``query:``/``passage:`` prompts for e5-style teachers), each pair
is scored ``s = cos(teacher(query), teacher(pos))``, and pairs with ``s < threshold`` are
dropped. For retrieval records each positive is scored on its own; a record keeps the
positives that pass and is dropped when none do. The kept rows are written atomically, the
dropped ones optionally, plus a JSON report (counts, score quantiles, histogram) and a PNG
histogram with the threshold marked. Given an ``eval_index``
(:mod:`conan_embedding.data.leakage`), rows touching an evaluation sentence are removed before
scoring, so a filtered file is clean even when its input was built without the index.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from conan_embedding._io import atomic_path, write_json_atomic
from conan_embedding.data.leakage import DedupReport, EvalIndex, dedup_retrieval
from conan_embedding.data.records import PairRecord, RetrievalRecord, read_records, write_records
from conan_embedding.encoding.engine import EmbeddingEngine

PAPER_THRESHOLD = 0.4
FilterKind = Literal["pairs", "retrieval"]


def pair_scores(
    model,
    queries: Sequence[str],
    passages: Sequence[str],
    *,
    batch_size: int = 64,
    query_prompt: str = "",
    passage_prompt: str = "",
    show_progress: bool = True,
    device: str | None = "auto",
) -> np.ndarray:
    """Cosine similarity of each (query, passage) under ``model``; each distinct text encoded once."""
    if len(queries) != len(passages):
        raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
    if not queries:
        return np.zeros(0, dtype=np.float32)
    q_texts = sorted(set(queries))
    p_texts = sorted(set(passages))
    engine = EmbeddingEngine(model, batch_size=batch_size, device=device)
    q_emb = engine.embed(q_texts, prompt=query_prompt, normalize=True)
    p_emb = engine.embed(p_texts, prompt=passage_prompt, normalize=True)
    q_row = {t: i for i, t in enumerate(q_texts)}
    p_row = {t: i for i, t in enumerate(p_texts)}
    qi = np.fromiter((q_row[t] for t in queries), dtype=np.int64, count=len(queries))
    pi = np.fromiter((p_row[t] for t in passages), dtype=np.int64, count=len(passages))
    return np.einsum("ij,ij->i", q_emb[qi], p_emb[pi]).astype(np.float32)


def teacher_pair_scores(
    teacher,
    records: Sequence[PairRecord | RetrievalRecord],
    positions: Sequence[int],
    *,
    batch_size: int = 64,
) -> np.ndarray:
    """Cosine of each record's query and its (first) positive under ``teacher``, for the
    records at ``positions``: the weak stage's filter inside training (each rank scores its
    share of a lazy dataset, so only the texts are held, never the records)."""
    queries, positives = [], []
    for i in positions:
        r = records[int(i)]
        queries.append(r.query)
        positives.append(r.pos if isinstance(r, PairRecord) else r.pos[0])
    q = teacher.encode(queries, batch_size=batch_size, normalize_embeddings=True)
    p = teacher.encode(positives, batch_size=batch_size, normalize_embeddings=True)
    return np.asarray((q * p).sum(axis=1), np.float32)


def keep_by_teacher(
    records: Sequence[PairRecord | RetrievalRecord],
    teacher: Callable[[], Any],
    threshold: float,
    *,
    batch_size: int = 64,
    rank: int = 0,
    world: int = 1,
    gather: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Positions of the records whose :func:`teacher_pair_scores` reach ``threshold``.

    Several processes: process ``rank`` of ``world`` scores its own contiguous share (loading
    the model with ``teacher()`` only if it has one) and ``gather`` joins every share's scores
    in rank order, so every process keeps the same rows. Why not every process scoring
    everything (the work ``world`` times over), nor rank 0 alone (the others would wait in a
    collective, and a large weak-stage file outlasts NCCL's 10-minute default timeout).
    """
    share = np.array_split(np.arange(len(records)), world)[rank]
    scores = np.zeros(0, np.float32)
    if len(share):
        scores = teacher_pair_scores(teacher(), records, share, batch_size=batch_size)
    if gather is not None:
        scores = gather(scores)
    return np.flatnonzero(scores >= threshold)


@dataclass
class FilterResult:
    kept: list
    dropped: list
    scores: np.ndarray  # one per scored (query, positive) pair
    pairs_scored: int
    pairs_kept: int


def filter_records(
    records: Sequence[PairRecord | RetrievalRecord],
    model,
    threshold: float = PAPER_THRESHOLD,
    **score_kwargs,
) -> FilterResult:
    """Keep the pairs whose teacher cosine is >= ``threshold``."""
    queries, passages, owner = [], [], []
    for i, record in enumerate(records):
        positives = [record.pos] if isinstance(record, PairRecord) else list(record.pos)
        for pos in positives:
            queries.append(record.query)
            passages.append(pos)
            owner.append(i)
    scores = pair_scores(model, queries, passages, **score_kwargs)
    passing: dict[int, list[tuple[str, float]]] = {}
    for i, pos, score in zip(owner, passages, scores, strict=True):
        if score >= threshold:
            passing.setdefault(i, []).append((pos, float(score)))
    kept, dropped = [], []
    for i, record in enumerate(records):
        if i not in passing:
            dropped.append(record)
        elif isinstance(record, RetrievalRecord) and len(passing[i]) < len(record.pos):
            kept.append(record.model_copy(update={"pos": [p for p, _ in passing[i]]}))
        else:
            kept.append(record)
    pairs_kept = sum(len(v) for v in passing.values())
    return FilterResult(kept, dropped, scores, len(scores), pairs_kept)


def drop_eval_overlap(
    records: Sequence[PairRecord | RetrievalRecord], index: EvalIndex, report: DedupReport
) -> list[PairRecord | RetrievalRecord]:
    """``records`` without evaluation sentences: pairs touching one go, retrieval records as
    :func:`~conan_embedding.data.leakage.dedup_retrieval` (touching negatives pruned)."""
    kept: list[PairRecord | RetrievalRecord] = []
    for record in records:
        if isinstance(record, RetrievalRecord):
            kept.extend(dedup_retrieval([record], index, report))
            continue
        report.records_in += 1
        hits = [name for text in (record.query, record.pos) for name in index.hits(text)]
        if hits:
            report.records_dropped += 1
            report.hits_by_eval_set.update(hits)
        else:
            kept.append(record)
    return kept


def score_histogram(scores: np.ndarray, bin_width: float = 0.05) -> dict:
    """Counts over fixed bins of width ``bin_width`` covering [-1, 1]."""
    edges = np.round(np.arange(-1.0, 1.0 + bin_width / 2, bin_width), 6)
    counts, _ = np.histogram(np.clip(scores, -1.0, 1.0), bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def plot_histogram(
    scores: np.ndarray, threshold: float, path: str | os.PathLike[str], title: str
) -> Path:
    """A PNG histogram of the teacher scores with the threshold drawn, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    low, high = (
        float(min(scores.min(initial=0.0), threshold)),
        float(max(scores.max(initial=1.0), threshold)),
    )
    bins = np.linspace(low, high, 41)
    ax.hist(
        scores[scores < threshold],
        bins=bins,
        color="#c0504d",
        label=f"dropped ({int((scores < threshold).sum())})",
    )
    ax.hist(
        scores[scores >= threshold],
        bins=bins,
        color="#4f81bd",
        label=f"kept ({int((scores >= threshold).sum())})",
    )
    ax.axvline(
        threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}"
    )
    ax.set_xlabel("teacher cosine similarity (query, positive)")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


def run_filter(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    teacher: str,
    *,
    kind: FilterKind = "pairs",
    threshold: float = PAPER_THRESHOLD,
    dropped_path: str | os.PathLike[str] | None = None,
    histogram_path: str | os.PathLike[str] | None = None,
    report_path: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    query_prompt: str = "",
    passage_prompt: str = "",
    max_seq_length: int | None = None,
    show_progress: bool = True,
    model=None,
    device: str | None = "auto",
    eval_index: EvalIndex | None = None,
) -> dict:
    """Score ``input_path`` with ``teacher``, write the kept rows, report and histogram."""
    records = read_records(input_path, kind)  # bad rows fail before the teacher is loaded
    records_in, leakage = len(records), DedupReport()
    if eval_index is not None:
        records = drop_eval_overlap(records, eval_index, leakage)  # type: ignore[arg-type]
    if model is None:
        from conan_embedding.modeling.embedder import load_embedder

        try:
            model = load_embedder(teacher)
        except OSError as err:
            raise FileNotFoundError(
                f"teacher model {teacher!r} could not be loaded: {err}"
            ) from None
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    result = filter_records(
        records, model, threshold, batch_size=batch_size, query_prompt=query_prompt,
        passage_prompt=passage_prompt, show_progress=show_progress, device=device,
    )  # fmt: skip
    output_path = Path(output_path)
    write_records(output_path, result.kept)
    if dropped_path is not None:
        write_records(dropped_path, result.dropped)
    histogram_path = (
        Path(histogram_path) if histogram_path else output_path.with_suffix(".scores.png")
    )
    report_path = Path(report_path) if report_path else output_path.with_suffix(".filter.json")
    plot_histogram(
        result.scores,
        threshold,
        histogram_path,
        f"{Path(input_path).name}: teacher {Path(teacher).name}",
    )
    scores = result.scores
    report = {
        "input": str(input_path),
        "output": str(output_path),
        "teacher": str(teacher),
        "kind": kind,
        "threshold": threshold,
        "records_in": records_in,
        "records_kept": len(result.kept),
        "records_dropped": len(result.dropped),
        "pairs_scored": result.pairs_scored,
        "pairs_kept": result.pairs_kept,
        "pairs_dropped": result.pairs_scored - result.pairs_kept,
        "score_quantiles": (
            {q: float(np.quantile(scores, float(q))) for q in ("0.05", "0.25", "0.5", "0.75", "0.95")}
            if len(scores) else {}
        ),
        "histogram": score_histogram(scores),
        "histogram_png": str(histogram_path),
    }  # fmt: skip
    if eval_index is not None:
        report["eval_overlap"] = leakage.as_dict()
        report["eval_files_missing"] = eval_index.missing
    write_json_atomic(report_path, report)
    report["report"] = str(report_path)
    return report
