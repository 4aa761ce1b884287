"""FAISS search over normalised vectors: exact, IVF, HNSW or IVF-PQ, on the GPU when one is there.

Why: mining asks, for every query, for the top ``range_max + extra`` corpus rows by cosine.
Vectors are L2-normalised, so inner product is cosine. Up to a few hundred thousand rows an exact
``IndexFlatIP`` is both exact and fast; above that an approximate index trades a little recall
for time and memory.

How: :func:`build_index` takes the vectors as an array or as ``(first row, block)`` pieces
(a :meth:`~conan_embedding.encoding.cache.VectorFile.blocks` stream), so a corpus larger than
one allocation is added block by block; the index then holds the one copy of the vectors.

- ``exact``: ``IndexFlatIP``; ``auto`` picks it up to ``exact_max`` rows, IVF above;
- ``ivf``: ``IndexIVFFlat`` with ``4 sqrt(n)`` lists (at least 39 training rows each), trained
  on the first ``train_max`` rows, searched with ``nprobe`` lists;
- ``hnsw``: ``IndexHNSWFlat`` (``M``, ``efSearch``); CPU only in FAISS;
- ``ivfpq``: ``IndexIVFPQ``, vectors stored as ``pq_m`` bytes each (memory / ``4 dim / pq_m``);
  its scores are PQ approximations, so margins act on approximate cosines.

GPU: when the installed FAISS is a GPU build (``faiss.StandardGpuResources``) and
``device`` is a CUDA device, exact and IVF indexes are moved to that GPU with
``index_cpu_to_gpu``; otherwise everything runs on the CPU. The GPU resources are made once
per GPU and process (:func:`gpu_resources`). :func:`search` queries in chunks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch

# the fingerprint of an ordered text list now lives with the caches; mining.dynamic imports it here
from conan_embedding.encoding.cache import texts_fingerprint  # noqa: F401
from conan_embedding.progress import progress

IndexKind = Literal["auto", "exact", "ivf", "hnsw", "ivfpq"]

_GPU_RESOURCES: dict[int, Any] = {}
"""One ``faiss.StandardGpuResources`` per GPU for the whole process (see :func:`gpu_resources`)."""


def gpu_resources(device: int) -> Any:
    """This process's FAISS-GPU resources on GPU ``device``, made on first use.

    Why cached: each ``StandardGpuResources`` reserves its own scratch memory and CUDA
    streams on the GPU, which may also hold the model being trained; DHNM re-mines every
    ``remine_every`` steps, and a new one per index would stack those reservations.
    """
    import faiss

    if device not in _GPU_RESOURCES:
        _GPU_RESOURCES[device] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[device]


def gpu_available() -> bool:
    """True when FAISS is a GPU build and sees at least one GPU."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _pq_bytes(dim: int, wanted: int | None) -> int:
    """Sub-quantisers for IVF-PQ: ``wanted`` if it divides ``dim``, else the largest divisor of
    ``dim`` at most ``dim / 4`` (4 dims per byte: 16x smaller than float32)."""
    if wanted is not None:
        if dim % wanted:
            raise ValueError(f"pq_m={wanted} must divide the vector width {dim}")
        return wanted
    return max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)


def build_index(
    vectors: np.ndarray | Iterable[tuple[int, np.ndarray]],
    kind: IndexKind = "auto",
    *,
    count: int | None = None,
    exact_max: int = 200_000,
    ivf_lists: int | None = None,
    ivf_probe: int = 16,
    hnsw_m: int = 32,
    hnsw_ef_search: int = 256,
    pq_m: int | None = None,
    train_max: int = 262_144,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
):
    """A FAISS inner-product index over normalised vectors (``auto``: exact up to ``exact_max``).

    ``vectors`` is an array, or ``(first row, block)`` pieces with ``count`` the total rows.
    """
    import faiss

    from conan_embedding.runtime import resolve_device

    if isinstance(vectors, np.ndarray):
        array = np.ascontiguousarray(vectors, dtype=np.float32)
        blocks: Iterable[tuple[int, np.ndarray]] = [(0, array)]
        count = len(array)
        first = array
    else:
        if count is None:
            raise ValueError("build_index over blocks needs `count`")
        iterator = iter(vectors)
        _, first = next(iterator, (0, np.zeros((0, 1), np.float32)))
        blocks = _chain_first(first, iterator)
    dim = first.shape[1]
    if kind == "auto":
        kind = "exact" if count <= exact_max else "ivf"
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind in ("ivf", "ivfpq"):
        lists = ivf_lists or max(1, min(int(4 * np.sqrt(count)), count // 39))
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        else:
            m = _pq_bytes(dim, pq_m)
            index = faiss.IndexIVFPQ(quantizer, dim, lists, m, 8, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        # the training sample: the first block(s), up to train_max rows
        sample = first[:train_max]
        if len(sample) < min(count, train_max):
            sample, blocks = _training_sample(blocks, min(count, train_max))
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index.nprobe = min(ivf_probe, lists)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = hnsw_ef_search
    else:
        raise ValueError(f"unknown index kind {kind!r}; expected auto, exact, ivf, hnsw or ivfpq")
    target = resolve_device(device)
    if target.type == "cuda" and kind != "hnsw" and gpu_available():
        index = faiss.index_cpu_to_gpu(gpu_resources(target.index or 0), target.index or 0, index)
    for _, block in blocks:
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    return index


def _chain_first(first: np.ndarray, rest: Iterable[tuple[int, np.ndarray]]):
    yield 0, first
    yield from rest


def _chain(taken: list[tuple[int, np.ndarray]], rest: Iterable[tuple[int, np.ndarray]]):
    yield from taken
    yield from rest


def _training_sample(blocks: Iterable[tuple[int, np.ndarray]], rows: int):
    """Read blocks until ``rows`` are gathered; return the sample and the full block stream."""
    taken, iterator = [], iter(blocks)
    gathered = 0
    for start, block in iterator:
        taken.append((start, block))
        gathered += len(block)
        if gathered >= rows:
            break
    sample = np.concatenate([b for _, b in taken])[:rows]
    return sample, _chain(taken, iterator)


def search(
    index, queries: np.ndarray, k: int, *, query_chunk: int = 4096, show_progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) per query; ids are -1 (score -inf) past the corpus size."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k_eff = min(k, index.ntotal)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    starts = range(0, len(queries), query_chunk)
    for start in progress(starts, desc="searching", disable=not show_progress or len(starts) < 2):
        s, i = index.search(queries[start : start + query_chunk], k_eff)
        scores[start : start + len(s), :k_eff] = s
        ids[start : start + len(s), :k_eff] = i
    scores[ids < 0] = -np.inf
    return scores, ids
