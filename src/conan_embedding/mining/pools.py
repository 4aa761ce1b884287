"""Candidate pools on disk: int32 corpus ids and float32 scores beside one corpus file.

Why: Conan's dynamic hard negative mining draws replacements from a ranked pool per query
(ranks 10-200), so the pools of a 10M-query file hold ~2G candidates. As texts in JSON that is
hundreds of GB and must be parsed whole before training starts; as ids into one deduplicated
corpus file it is 8 bytes a candidate, memory-mapped, and a pool is read only when asked for.

Format (``<records stem>.pool.json``, the manifest, written last; the rest beside it)::

    X.pool.json            {"format": "conan-pool/1", "queries": Q, "width": W,
                            "first_rank": r0, "corpus_size": N, "files": {...}}
    X.pool.ids.npy         int32   [Q, W]  corpus row of candidate j of query q; -1 = none
    X.pool.scores.npy      float32 [Q, W]  its cosine with the query; NaN where id is -1
    X.pool.positive.npy    float32 [Q]     the query's (lowest) positive score
    X.pool.corpus.jsonl    one JSON string per line: corpus row i is line i + 1
    X.pool.queries.jsonl   one JSON string per line: the query of pool q

Candidate ``j`` of a pool has rank ``first_rank + j`` (mined pools are a contiguous window of
the filtered ranking, so ranks need no storage). Candidates fill each row from the left.
:func:`read_pools` gives a :class:`PoolFile`, a lazy sequence of :class:`PoolEntry` (the texts
looked up on access, for the consumers that want texts) with the arrays on ``.ids``,
``.scores`` and the texts on ``.corpus`` for the ones that want ids.

The earlier format, one JSON object per line (``X.pool.jsonl``, ``{"index", "query",
"positive_score", "candidates": [{"text", "score", "rank"}]}``), is still read and written
when a path ends in ``.jsonl``; :func:`default_pool_path` returns it only where it is the one
on disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from conan_embedding._io import write_text_atomic
from conan_embedding.data.records import (
    JsonLines,
    RecordError,
    iter_json_objects,
    validated,
    write_records,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

POOL_FORMAT = "conan-pool/1"
_FILES = {
    "ids": ".ids.npy",
    "scores": ".scores.npy",
    "positive_scores": ".positive.npy",
    "corpus": ".corpus.jsonl",
    "queries": ".queries.jsonl",
}


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


def _stem(path: str | os.PathLike[str]) -> Path:
    """``X.pool.json`` -> ``X.pool`` (the prefix of every file of the pool)."""
    path = Path(path)
    return path.with_name(path.name[: -len(".json")] if path.name.endswith(".json") else path.name)


def pool_files(path: str | os.PathLike[str]) -> dict[str, Path]:
    """The files of the pool whose manifest is ``path``, manifest included."""
    stem = _stem(path)
    return {"manifest": Path(path)} | {
        name: stem.with_name(stem.name + suffix) for name, suffix in _FILES.items()
    }


def array_pool_path(records_path: str | os.PathLike[str]) -> Path:
    """``train.jsonl`` -> ``train.pool.json``: where mining writes the pool of a records file."""
    path = Path(records_path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    return path.with_name(f"{stem}.pool.json")


def default_pool_path(records_path: str | os.PathLike[str]) -> Path:
    """``train.jsonl`` -> ``train.pool.json`` (or ``train.pool.jsonl`` if only that exists)."""
    arrays = array_pool_path(records_path)
    legacy = arrays.with_name(arrays.name + "l")
    return legacy if legacy.is_file() and not arrays.is_file() else arrays


class JsonStringWriter:
    """Appends one JSON string per line (the corpus / queries files of a pool)."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.count = 0

    def write(self, text: str) -> int:
        self.handle.write(json.dumps(text, ensure_ascii=False) + "\n")
        self.count += 1
        return self.count - 1

    def close(self) -> None:
        self.handle.close()


class PoolWriter:
    """Writes a pool in the array format, rows in order, files renamed on close.

    Rows go to the ``.npy`` files with ``os.pwrite`` (through the page cache, not a writable
    memory map, so a 10M-query pool never sits in this process's RSS). Every file is written
    under a temporary name and renamed by :meth:`close`, the manifest last, so a reader never
    trusts a half-written pool.
    """

    def __init__(self, path: str | os.PathLike[str], queries: int, width: int, first_rank: int):
        self.files = pool_files(path)
        self.tmp = {k: p.with_name(f".{p.name}.{os.getpid()}.tmp") for k, p in self.files.items()}
        self.files["manifest"].parent.mkdir(parents=True, exist_ok=True)
        self.queries, self.width, self.first_rank = queries, width, first_rank
        self.positive_scores = np.full(queries, np.nan, np.float32)
        self._arrays = {}
        for name, dtype in (("ids", np.int32), ("scores", np.float32)):
            header = np.lib.format.open_memmap(self.tmp[name], "w+", dtype, (queries, width))
            offset = header.offset
            del header  # the file now has its header and full (sparse) size
            self._arrays[name] = (os.open(self.tmp[name], os.O_WRONLY), offset, np.dtype(dtype))
        self.rows_written = 0
        self.corpus = JsonStringWriter(self.tmp["corpus"])
        self.query_texts = JsonStringWriter(self.tmp["queries"])

    def write_rows(self, ids: np.ndarray, scores: np.ndarray) -> None:
        """The next ``len(ids)`` pools: ``ids`` int32 ``[n, width]`` (-1 = none), ``scores``."""
        if ids.shape != scores.shape or ids.shape[1:] != (self.width,):
            raise ValueError(f"pool rows of shape (n, {self.width}) expected, got {ids.shape}")
        for name, block in (("ids", ids), ("scores", scores)):
            fd, offset, dtype = self._arrays[name]
            data = np.ascontiguousarray(block, dtype=dtype).tobytes()
            os.pwrite(fd, data, offset + self.rows_written * self.width * dtype.itemsize)
        self.rows_written += len(ids)

    def rows(self, windows: Sequence[Sequence[tuple[int, float, int]]]) -> None:
        """Write pools given as ``(corpus id, score, rank)`` lists (ranks implied by position)."""
        ids = np.full((len(windows), self.width), -1, np.int32)
        scores = np.full((len(windows), self.width), np.nan, np.float32)
        for q, window in enumerate(windows):
            if len(window) > self.width:
                raise ValueError(
                    f"a pool has {len(window)} candidates, the file holds {self.width}"
                )
            ids[q, : len(window)] = [c for c, _, _ in window]
            scores[q, : len(window)] = [s for _, s, _ in window]
        self.write_rows(ids, scores)

    def close(self) -> Path:
        self.corpus.close()
        self.query_texts.close()
        for fd, _, _ in self._arrays.values():
            os.close(fd)
        self._arrays = {}
        if self.query_texts.count != self.queries or self.rows_written != self.queries:
            raise ValueError(
                f"{self.rows_written} pools and {self.query_texts.count} query texts written "
                f"for {self.queries} queries"
            )
        with open(self.tmp["positive_scores"], "wb") as handle:  # np.save(path) would add .npy
            np.save(handle, self.positive_scores, allow_pickle=False)
        for name in _FILES:
            os.replace(self.tmp[name], self.files[name])
        manifest = {
            "format": POOL_FORMAT,
            "queries": self.queries,
            "width": self.width,
            "first_rank": self.first_rank,
            "corpus_size": self.corpus.count,
            "files": {name: self.files[name].name for name in _FILES},
        }
        write_text_atomic(self.files["manifest"], json.dumps(manifest, indent=2))
        return self.files["manifest"]

    def abort(self) -> None:
        for handle in (self.corpus, self.query_texts):
            handle.close()
        for fd, _, _ in self._arrays.values():
            os.close(fd)
        self._arrays = {}
        for path in self.tmp.values():
            path.unlink(missing_ok=True)


class PoolFile(Sequence[PoolEntry]):
    """A pool in the array format, memory-mapped; ``pools[q]`` is a :class:`PoolEntry`."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            manifest = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RecordError(
                self.path, err.lineno, "<json>", f"invalid JSON ({err.msg})"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != POOL_FORMAT:
            raise RecordError(self.path, 1, "format", f"expected {POOL_FORMAT!r}")
        self.manifest = manifest
        folder = self.path.parent
        files = {name: folder / manifest["files"][name] for name in _FILES}
        self.ids = np.load(files["ids"], mmap_mode="r", allow_pickle=False)
        self.scores = np.load(files["scores"], mmap_mode="r", allow_pickle=False)
        self.positive_scores = np.load(files["positive_scores"], mmap_mode="r", allow_pickle=False)
        self.first_rank = int(manifest["first_rank"])
        queries, width = int(manifest["queries"]), int(manifest["width"])
        for name, array, shape in (
            ("ids", self.ids, (queries, width)),
            ("scores", self.scores, (queries, width)),
            ("positive_scores", self.positive_scores, (queries,)),
        ):
            if array.shape != shape:
                raise RecordError(self.path, 1, name, f"shape {array.shape}, expected {shape}")
        if self.ids.dtype != np.int32:
            raise RecordError(self.path, 1, "ids", f"dtype {self.ids.dtype}, expected int32")
        self.corpus = JsonLines(files["corpus"])
        self.queries = JsonLines(files["queries"])
        if len(self.corpus) != int(manifest["corpus_size"]) or len(self.queries) != queries:
            raise RecordError(self.path, 1, "corpus_size", "corpus/queries files do not match")

    def __len__(self) -> int:
        return len(self.ids)

    def text(self, corpus_id: int) -> str:
        value = self.corpus.value(int(corpus_id))
        if not isinstance(value, str):
            line = self.corpus.index.line_of(int(corpus_id))
            raise RecordError(self.corpus.path, line, "<row>", "expected a JSON string")
        return value

    def query(self, q: int) -> str:
        return str(self.queries.value(q))

    def entry(self, q: int) -> PoolEntry:
        ids, scores = self.ids[q], self.scores[q]
        count = int(np.count_nonzero(ids >= 0))
        candidates = [
            PoolCandidate.model_construct(
                text=self.text(ids[j]), score=float(scores[j]), rank=self.first_rank + j
            )
            for j in range(count)
        ]
        return PoolEntry.model_construct(
            index=q,
            query=self.query(q),
            positive_score=float(self.positive_scores[q]),
            candidates=candidates,
        )

    @overload
    def __getitem__(self, q: int) -> PoolEntry: ...
    @overload
    def __getitem__(self, q: slice) -> list[PoolEntry]: ...
    def __getitem__(self, q: int | slice) -> PoolEntry | list[PoolEntry]:
        if isinstance(q, slice):
            return [self.entry(i) for i in range(len(self))[q]]
        if not -len(self) <= q < len(self):
            raise IndexError(f"pool {q} out of range for {len(self)} pools")
        return self.entry(q % len(self))

    def __iter__(self) -> Iterator[PoolEntry]:
        return (self.entry(q) for q in range(len(self)))


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
    query_max_length: int | None = None
    passage_max_length: int | None = None
    """The model's per-side token limits (``model.query_max_length`` / ``passage_max_length``)."""

    @classmethod
    def of(
        cls, model: SentenceTransformer, query_prompt: str | None, passage_prompt: str | None
    ) -> PoolMeta:
        """The meta of ``model`` encoding with these prompt *texts* (not prompt names)."""
        import torch

        from conan_embedding.modeling.embedder import side_max_length

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
            query_max_length=side_max_length(model, "query"),
            passage_max_length=side_max_length(model, "passage"),
        )

    def matches(self, other: PoolMeta, min_cosine: float = 0.999) -> bool:
        """Same prompts and max length, and probe embeddings at cosine >= ``min_cosine``."""
        mine = (self.query_prompt, self.passage_prompt, self.max_seq_length)
        theirs = (other.query_prompt, other.passage_prompt, other.max_seq_length)
        sides = (self.query_max_length, self.passage_max_length)
        if mine != theirs or sides != (other.query_max_length, other.passage_max_length):
            return False
        if len(self.probe) != len(other.probe):
            return False
        return float(np.dot(self.probe, other.probe)) >= min_cosine


def pool_meta_path(pool_path: str | os.PathLike[str]) -> Path:
    """``train.pool.jsonl`` -> ``train.pool.meta.json``."""
    path = Path(pool_path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    return path.with_name(f"{stem}.meta.json")


def write_pool_meta(
    pool_path: str | os.PathLike[str], meta: PoolMeta | dict[str, Any] | None
) -> None:
    """The pool's meta beside it (a stale meta of an earlier pool is removed when None)."""
    meta_path = pool_meta_path(pool_path)
    if meta is None:
        meta_path.unlink(missing_ok=True)
        return
    meta = meta if isinstance(meta, PoolMeta) else PoolMeta.model_validate(meta)
    write_text_atomic(meta_path, meta.model_dump_json(indent=1) + "\n")


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


def write_pools(
    path: str | os.PathLike[str],
    pools: Sequence[PoolEntry],
    meta: PoolMeta | dict[str, Any] | None = None,
) -> int:
    """Write pools: the array format, or one JSON object per line when ``path`` ends in ``.jsonl``;
    ``meta`` (:class:`PoolMeta`) goes beside them.

    The array format needs each pool's ranks to be ``first_rank, first_rank + 1, ...`` with the
    same ``first_rank`` for every non-empty pool (what mining produces).
    """
    write_pool_meta(path, meta)
    if str(path).endswith(".jsonl"):
        return write_records(path, pools)
    starts = {p.candidates[0].rank for p in pools if p.candidates}
    if len(starts) > 1:
        raise ValueError(f"pools start at ranks {sorted(starts)}: write them as .jsonl")
    first_rank = starts.pop() if starts else 0
    width = max((len(p.candidates) for p in pools), default=0)
    writer = PoolWriter(path, len(pools), width, first_rank)
    try:
        corpus: dict[str, int] = {}
        for q, pool in enumerate(pools):
            if [c.rank for c in pool.candidates] != list(
                range(first_rank, first_rank + len(pool.candidates))
            ):
                raise ValueError(f"pool {q}: ranks are not consecutive; write it as .jsonl")
            window = []
            for cand in pool.candidates:
                if cand.text not in corpus:
                    corpus[cand.text] = writer.corpus.write(cand.text)
                window.append((corpus[cand.text], cand.score, cand.rank))
            writer.rows([window])
            writer.positive_scores[q] = pool.positive_score
            writer.query_texts.write(pool.query)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return len(pools)


def _read_pool_lines(path: str | os.PathLike[str]) -> list[PoolEntry]:
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


def read_pools(path: str | os.PathLike[str]) -> Sequence[PoolEntry]:
    """The pools at ``path``: a lazy :class:`PoolFile`, or a list for a ``.jsonl`` pool file.

    Bad input raises :class:`RecordError` naming file, line and field.
    """
    if str(path).endswith(".jsonl"):
        return _read_pool_lines(path)
    return PoolFile(path)
