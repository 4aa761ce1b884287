"""Offline hard-negative mining: a ranked candidate pool per query, with false-negative filters.

Why a pool and not just ``neg``: Conan's dynamic hard negative mining (``mining.dynamic``)
replaces a sample's negatives during training with the *next* candidates of its mined list
(v1: the i-th replacement takes ranks ``(i-1)*n+10 .. i*n+10``), so mining keeps a whole
window of ranked candidates (e.g. ranks 10-200), not only the ``n`` negatives used first.

How: the corpus is read as a stream (:func:`iter_corpus`; a ``.txt`` or ``.jsonl[.gz]`` file
is never held whole), deduplicated by a 64-bit hash of each text and written once to the pool's
corpus file, and encoded chunk by chunk into a resumable vector file
(:meth:`~conan_embedding.encoding.texts.TextEncoder.encode_stream`: a killed run resumes at the
chunk it was on). FAISS (:mod:`conan_embedding.mining.index`; exact, IVF, HNSW or IVF-PQ, GPU when
there is one) is filled block by block from that file and returns the top
``range_max + extra`` corpus rows per query, searched in chunks of ``query_chunk`` queries;
then candidates are dropped when they are

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

Several processes (one per GPU, or CPU processes): the same command under a launcher,

    torchrun --standalone --nproc_per_node 8 -m conan_embedding.cli mine IN.jsonl OUT.jsonl ...

(with the options of one process; or ``accelerate launch -m conan_embedding.cli mine ...``).
Every rank reads the same inputs and encodes every ``W``-th chunk of the corpus and of the
queries on its own device (``--device auto`` = ``cuda:LOCAL_RANK``) into its own resumable
shard file (:meth:`~conan_embedding.encoding.texts.TextEncoder.encode_shards`); after a
barrier (NCCL on GPUs, gloo on CPUs) rank 0 merges the shards into the vector file one process
writes, builds the index, searches and writes the pool, while the other ranks leave. The
pools are those of one process (ids equal, scores to 1e-5). Killed, the command started again
with the same process count re-encodes at most the chunk each rank was on. The cache/work
folder must be one every rank sees (any folder on one machine; a shared file system across
machines). Only the encoding is shared: the search runs on rank 0's device.

Memory: the FAISS index (the corpus vectors, once), the query vectors, one query chunk's
search results, the records, and a hash -> row dictionary of the corpus (about 100 bytes a
distinct text); the vector files are read in blocks and the pools are written row block by row
block, so neither stays in memory.

Outputs, written atomically:

- the retrieval JSONL: each input record with ``neg`` = the first ``num_negatives`` pool
  candidates (ids and meta kept);
- the pool (default ``<output stem>.pool.json``): int32 candidate ids and float32 scores
  beside one corpus file, see :mod:`conan_embedding.mining.pools`; :func:`read_pools` gives
  the pools back (with texts) and names file, line and field on bad input.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from conan_embedding.data.records import (
    RetrievalRecord,
    iter_json_objects,
    open_records,
    text_field,
    write_records,
)
from conan_embedding.encoding.backends import get_backend
from conan_embedding.encoding.cache import VectorFile, texts_fingerprint
from conan_embedding.encoding.engine import Backend
from conan_embedding.encoding.texts import TextEncoder, chunked
from conan_embedding.mining.index import IndexKind, build_index, search
from conan_embedding.mining.pools import (
    PoolCandidate,
    PoolEntry,
    PoolFile,
    PoolMeta,
    PoolWriter,
    array_pool_path,
    default_pool_path,
    pool_meta_path,
    read_pool_meta,
    read_pools,
    write_pool_meta,
    write_pools,
)
from conan_embedding.runtime import Processes, join_processes

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

# the pool format's names, imported from here by mining.dynamic and older callers
__all__ = [
    "MiningConfig",
    "MiningStats",
    "PoolCandidate",
    "PoolEntry",
    "PoolMeta",
    "default_pool_path",
    "pool_meta_path",
    "read_pool_meta",
    "iter_corpus",
    "mine",
    "mine_file",
    "mine_stream",
    "read_corpus",
    "read_pools",
    "select_candidates",
    "write_pools",
]


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
    max_batch_tokens: int | None = Field(None, gt=0)
    chunk_size: int = Field(4096, gt=0)
    query_chunk: int = Field(4096, gt=0)
    backend: Backend = "torch"
    device: str = "auto"
    ivf_probe: int = Field(16, gt=0)
    hnsw_m: int = Field(32, gt=0)
    hnsw_ef_search: int = Field(256, gt=0)
    pq_m: int | None = Field(None, gt=0)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        get_backend(name)  # a ValueError naming the registered backends
        return name

    @model_validator(mode="after")
    def _check_window(self) -> MiningConfig:
        if self.range_max - self.range_min < self.num_negatives:
            raise ValueError(
                f"the window {self.range_min}..{self.range_max} cannot hold "
                f"{self.num_negatives} negatives"
            )
        return self


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
    rows_resumed: int = 0
    """Vectors found on disk from an earlier (killed or finished) run, not encoded again."""
    seconds: dict[str, float] = field(default_factory=dict)
    pool_meta: dict[str, Any] = field(default_factory=dict)
    """:class:`PoolMeta` of the run, also written beside the pool (DHNM's S_0 check)."""

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


def _hash64(text: str) -> int:
    """A 64-bit digest of a text (BLAKE2b): the corpus dedup key, 8 bytes instead of the text."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class _CorpusBuilder:
    """Deduplicates a text stream into corpus rows; each new text is written to the pool's
    corpus file once, and rows whose normalised text is one of ``wanted`` are remembered."""

    def __init__(self, write: Any, wanted: set[int], chunk_size: int):
        self.write, self.wanted, self.chunk_size = write, wanted, chunk_size
        self.rows: dict[int, int] = {}
        self.norm_rows: dict[int, list[int]] = {}

    def chunks(self, texts: Iterable[str]) -> Iterator[list[str]]:
        buffer: list[str] = []
        for text in texts:
            key = _hash64(text)
            if key in self.rows:
                continue
            row = self.rows[key] = len(self.rows)
            self.write(text)
            norm = _hash64(_norm(text))
            if norm in self.wanted:
                self.norm_rows.setdefault(norm, []).append(row)
            buffer.append(text)
            if len(buffer) == self.chunk_size:
                yield buffer
                buffer = []
        if buffer:
            yield buffer


def make_encoder(
    model: SentenceTransformer,
    config: MiningConfig,
    cache_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
) -> TextEncoder:
    """The mining encoder for ``config`` (backend, batch, chunk, device)."""
    return TextEncoder(
        model,
        backend=config.backend,
        batch_size=config.batch_size,
        max_batch_tokens=config.max_batch_tokens,
        chunk_size=config.chunk_size,
        cache_dir=cache_dir,
        show_progress=show_progress,
        device=config.device,
    )


def mine_stream(
    records: Sequence[RetrievalRecord],
    corpus: Iterable[str] | None,
    encoder: TextEncoder,
    pool_path: str | os.PathLike[str],
    config: MiningConfig,
    *,
    corpus_key: str,
    work_dir: str | os.PathLike[str],
    show_progress: bool = True,
    processes: Processes | None = None,
) -> tuple[PoolFile | None, MiningStats]:
    """Mine a pool per record into the array-format pool at ``pool_path``; returns it and stats.

    The corpus is ``corpus`` (streamed once) plus every positive, deduplicated; without
    ``corpus`` it is the records' existing negatives plus positives. ``corpus_key`` names that
    stream (a fingerprint of the texts or of the files it comes from): vectors already in
    ``work_dir`` under the same key (a killed run, or an earlier run) are not re-encoded.

    With ``processes`` (:func:`~conan_embedding.runtime.join_processes` under
    ``torchrun``) every rank streams the same inputs and encodes its share of the chunks
    (:meth:`~conan_embedding.encoding.texts.TextEncoder.encode_shards`); rank 0 alone writes
    the pool and returns it, the other ranks return ``(None, stats)`` once the queries are
    encoded. ``work_dir`` must be a folder every rank sees.
    """
    if not records:
        raise ValueError("no retrieval records to mine for")
    processes = processes or Processes()
    work = Path(work_dir)
    stats = MiningStats(queries=len(records))
    started = time.perf_counter()
    width = config.range_max - config.range_min
    if not processes.is_main:  # its share of the vectors goes to disk; rank 0 does the rest
        _encode_inputs(records, corpus, encoder, config, corpus_key, work, processes, _discard)
        stats.seconds["encode"] = time.perf_counter() - started
        stats.rows_resumed = encoder.rows_resumed
        return None, stats
    writer = PoolWriter(pool_path, len(records), width, config.range_min)
    try:
        builder, corpus_store, query_store, unique = _encode_inputs(
            records, corpus, encoder, config, corpus_key, work, processes, writer.corpus.write
        )
        assert corpus_store is not None and query_store is not None  # rank 0 gets both
        stats.corpus_size = corpus_store.rows
        queries = [r.query for r in records]
        position = {text: i for i, text in enumerate(unique)}
        query_vectors = np.array(query_store.array())[[position[t] for t in queries]]
        del position, unique
        for text in queries:
            writer.query_texts.write(text)
        stats.seconds["encode"] = time.perf_counter() - started
        stats.rows_resumed = encoder.rows_resumed

        started = time.perf_counter()
        excluded, pos_rows, pos_query = [], [], []
        for q, record in enumerate(records):
            banned = {
                row
                for t in (*record.pos, record.query)
                for row in builder.norm_rows.get(_hash64(_norm(t)), ())
            }
            excluded.append(banned)
            for text in record.pos:
                pos_rows.append(builder.rows[_hash64(text)])
                pos_query.append(q)
        del builder
        positive_scores = np.full(len(records), np.inf, np.float32)
        blocks = _score_positives(
            corpus_store.blocks(),
            np.asarray(pos_rows, np.int64),
            np.asarray(pos_query, np.int64),
            query_vectors,
            positive_scores,
        )
        index = build_index(
            blocks,
            config.index,
            count=corpus_store.rows,
            exact_max=config.exact_max,
            ivf_probe=config.ivf_probe,
            hnsw_m=config.hnsw_m,
            hnsw_ef_search=config.hnsw_ef_search,
            pq_m=config.pq_m,
            device=config.device,
        )
        writer.positive_scores[:] = positive_scores
        k = config.range_max + max(len(b) for b in excluded)
        for start in range(0, len(records), config.query_chunk):
            stop = min(start + config.query_chunk, len(records))
            scores, ids = search(index, query_vectors[start:stop], k, show_progress=False)
            windows = select_candidates(
                scores, ids, excluded[start:stop], positive_scores[start:stop], config, stats
            )
            writer.rows(windows)
        del index
        stats.seconds["search"] = time.perf_counter() - started
        path = writer.close()
    except BaseException:
        writer.abort()
        raise
    pools = PoolFile(path)
    filled = np.asarray(pools.ids >= 0)
    sizes = filled.sum(axis=1)
    chosen = filled[:, : config.num_negatives]
    stats.short_pools = int((sizes < config.num_negatives).sum())
    stats.mean_pool_size = float(sizes.mean())
    stats.mean_negative_score = (
        float(np.asarray(pools.scores[:, : config.num_negatives])[chosen].mean())
        if chosen.any()
        else 0.0
    )
    stats.mean_positive_score = float(positive_scores.mean())
    return pools, stats


def _encode_inputs(
    records: Sequence[RetrievalRecord],
    corpus: Iterable[str] | None,
    encoder: TextEncoder,
    config: MiningConfig,
    corpus_key: str,
    work: Path,
    processes: Processes,
    write_corpus: Any,
) -> tuple[_CorpusBuilder, VectorFile | None, VectorFile | None, list[str]]:
    """Encode the deduplicated corpus (each new text also goes to ``write_corpus``) and the
    distinct queries; every rank runs this on the same inputs, rank 0 gets the vector files."""
    wanted: set[int] = set()
    for record in records:  # (also validates a lazy records file before any encoding)
        wanted.update(_hash64(_norm(t)) for t in (*record.pos, record.query))
    builder = _CorpusBuilder(write_corpus, wanted, config.chunk_size)
    base = corpus if corpus is not None else (n for r in records for n in r.neg)
    positives = (p for r in records for p in r.pos)
    corpus_store = encoder.encode_shards(
        builder.chunks(_chain(base, positives)),
        work / f"emb-{encoder.key(corpus_key, config.passage_prompt, 'passage')}",
        processes,
        prompt=config.passage_prompt,
        side="passage",
        key=corpus_key,
        desc="encoding corpus",
    )
    unique = list(dict.fromkeys(r.query for r in records))
    query_key = texts_fingerprint(unique)
    query_store = encoder.encode_shards(
        chunked(unique, config.chunk_size),
        work / f"emb-{encoder.key(query_key, config.query_prompt, 'query')}",
        processes,
        prompt=config.query_prompt,
        side="query",
        key=query_key,
        desc="encoding queries",
    )
    return builder, corpus_store, query_store, unique


def _discard(text: str) -> None:
    """The corpus writer of ranks other than 0 (rank 0 alone writes the pool's corpus)."""


def _chain(*streams: Iterable[str]) -> Iterator[str]:
    for stream in streams:
        yield from stream


def _score_positives(
    blocks: Iterable[tuple[int, np.ndarray]],
    rows: np.ndarray,
    owners: np.ndarray,
    query_vectors: np.ndarray,
    out: np.ndarray,
) -> Iterator[tuple[int, np.ndarray]]:
    """Pass the corpus blocks through, setting ``out[q]`` to the lowest score of query ``q``'s
    positives (``rows`` are their corpus rows, ``owners`` their queries) on the way, so the
    corpus is read once for the index and the positive scores together."""
    order = np.argsort(rows, kind="stable")
    rows, owners = rows[order], owners[order]
    for start, block in blocks:
        lo, hi = np.searchsorted(rows, [start, start + len(block)])
        if hi > lo:
            vectors = block[rows[lo:hi] - start]
            scores = np.einsum("ij,ij->i", vectors, query_vectors[owners[lo:hi]])
            np.minimum.at(out, owners[lo:hi], scores.astype(np.float32))
        yield start, block


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
    """Mine a pool per record in memory; returns the records with new ``neg``, the pools and
    statistics (:func:`mine_stream` into a temporary pool, read back with texts).

    The corpus is ``corpus`` plus every positive (deduplicated); without ``corpus`` it is the
    records' positives and existing negatives. With ``cache_dir`` the vectors stay there as a
    warm (and resumable) cache.
    """
    config = config or MiningConfig()
    if not records:
        raise ValueError("no retrieval records to mine for")
    records = list(records)
    encoder = encoder or make_encoder(model, config, cache_dir, show_progress)
    base = list(corpus) if corpus is not None else [n for r in records for n in r.neg]
    key = texts_fingerprint(_chain(base, (p for r in records for p in r.pos)))  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="conan-mine-") as tmp:
        work = Path(cache_dir) if cache_dir is not None else Path(tmp)
        pools, stats = mine_stream(
            records,
            base,
            encoder,
            Path(tmp) / "pool.json",
            config,
            corpus_key=key,
            work_dir=work,
            show_progress=show_progress,
        )
        assert pools is not None  # one process: rank 0
        entries = list(pools)
        del pools
    stats.pool_meta = PoolMeta.of(model, config.query_prompt, config.passage_prompt).model_dump()
    n = config.num_negatives
    mined = [
        record.model_copy(update={"neg": [c.text for c in entry.candidates[:n]]})
        for record, entry in zip(records, entries, strict=True)
    ]
    return mined, entries, stats


def iter_corpus(path: str | os.PathLike[str]) -> Iterator[str]:
    """Corpus texts, streamed, from ``.txt`` (one per line) or ``.jsonl[.gz]`` (``text``,
    optional ``title``); a bad row raises RecordError naming file, line and field."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz", ".json.gz"))
    with opener(path, "rt", encoding="utf-8-sig") as handle:
        if not is_jsonl:
            yield from (line.rstrip("\r\n") for line in handle if line.strip())
            return
        for line_no, row in iter_json_objects(path, handle):
            text = text_field(row, "text", path, line_no)
            title = row.get("title")
            yield f"{title} {text}" if isinstance(title, str) and title.strip() else text


def read_corpus(path: str | os.PathLike[str]) -> list[str]:
    """All corpus texts of ``path`` (see :func:`iter_corpus`) in a list."""
    return list(iter_corpus(path))


def _file_key(path: str | os.PathLike[str]) -> str:
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


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
    """The ``conan-embed mine`` command: stream, mine, write records + pool.

    Vectors go to ``cache_dir`` (kept: a warm cache) or to ``.<output>.mining/`` beside the
    output (removed on success); either way a killed run started again with the same inputs
    resumes at the chunk it was encoding. Under ``torchrun`` / ``accelerate launch`` the
    encoding is shared by the processes (see the module docstring); rank 0 writes the outputs
    and returns the full statistics, the other ranks return once their share is encoded.
    """
    from conan_embedding.data.hf_sources import export_hint, is_hub_name
    from conan_embedding.modeling.embedder import load_embedder

    if is_hub_name(records_path):  # its key below is a file's size and time
        raise ValueError(
            f"{records_path}: mining reads local records (JSONL or a dataset file/folder): "
            f"{export_hint(str(records_path))} first, then mine OUT.jsonl"
        )
    config = config or MiningConfig()
    processes = join_processes(config.device)
    output = Path(output_path)
    records = open_records(records_path, "retrieval")
    key = _file_key(records_path) + ("|" + _file_key(corpus_path) if corpus_path else "")
    work = Path(cache_dir) if cache_dir is not None else output.with_name(f".{output.name}.mining")
    model = load_embedder(model_name_or_path)
    encoder = make_encoder(model, config, work, show_progress and processes.is_main)
    pool_target = Path(pool_path) if pool_path is not None else array_pool_path(output)
    if pool_target.name.endswith(".jsonl"):
        raise ValueError(f"{pool_target}: mining writes the array pool format (.pool.json)")
    pools, stats = mine_stream(
        records,
        iter_corpus(corpus_path) if corpus_path is not None else None,
        encoder,
        pool_target,
        config,
        corpus_key=key,
        work_dir=work,
        show_progress=show_progress,
        processes=processes,
    )
    processes.close()
    if pools is None:  # not rank 0
        return stats
    stats.pool_meta = PoolMeta.of(model, config.query_prompt, config.passage_prompt).model_dump()
    write_pool_meta(pool_target, stats.pool_meta)
    n = config.num_negatives
    write_records(
        output,
        (
            record.model_copy(update={"neg": [pools.text(i) for i in pools.ids[q, :n] if i >= 0]})
            for q, record in enumerate(records)
        ),
    )
    if cache_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return stats
