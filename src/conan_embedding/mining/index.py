"""Embed texts in bounded-memory chunks, cache the vectors, and search them with FAISS.

Why: offline mining is dominated by encoding (the corpus is embedded once; the search is a
few matrix products), so this module makes encoding cheap and never repeated:

- **dedup**: each distinct text is encoded once, whatever its number of occurrences;
- **length-sorted chunks**: texts are sorted by length over the *whole* corpus and encoded in
  chunks of ``chunk_size``, so every batch holds texts of about the same length (little
  padding), and only one chunk's activations live in memory at a time;
- **cache**: vectors are written to ``cache_dir`` as ``.npy`` (loaded with
  ``allow_pickle=False``), keyed by the model, the prompt and the texts, so re-mining with
  other margins or windows costs no encoding at all;
- **backend**: ``"torch"`` is sentence-transformers' own ``encode``; ``"onnx"`` exports the
  transformer once (``torch.onnx.export``) and runs it with ONNX Runtime, which fuses the
  attention/GELU/LayerNorm kernels on CPU (onnxruntime's transformer optimizer for BERT-likes)
  and gives the same vectors (cosine > 0.9999); it also batches by *token* count (each chunk
  is tokenized once and padded per batch), which removes the quarter of padding that sorting
  by characters leaves on short texts; ``"onnx-int8"`` also quantises the matrix
  weights to int8 (:func:`conan_embedding.serving.onnx.quantize_int8`): about 1.7x faster
  again, at a small cost in the vectors (``bench/bench_mining.py`` reports the overlap of the
  mined negatives with sentence-transformers' fp32 ones).

How the search runs: :func:`build_index` picks an exact ``IndexFlatIP`` below
``exact_max`` vectors and an approximate index (IVF-Flat or HNSW-Flat) above it; vectors are
L2-normalised, so inner product is cosine. :func:`search` queries in chunks with a progress bar.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from conan_embedding.atomic import save_npy_atomic
from conan_embedding.progress import progress

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


Backend = Literal["torch", "onnx", "onnx-int8"]
IndexKind = Literal["auto", "exact", "ivf", "hnsw"]


def _model_identity(model: SentenceTransformer) -> str:
    """A string that changes when the weights or the tokenisation settings change."""
    first = next(iter(model.state_dict().values()))
    probe = first.flatten()[:64].double().sum().item()
    names = ",".join(type(m).__name__ for m in model)
    return (
        f"{names}|{model.max_seq_length}|{probe:.10e}|{sum(p.numel() for p in model.parameters())}"
    )


def texts_fingerprint(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def _quantize_atomically(source: Path, target: Path) -> None:
    from conan_embedding.serving.onnx import quantize_int8

    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        quantize_int8(source, Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _OnnxTransformer:
    """The model's first module exported to ONNX; pooling/Dense/Normalize replayed in numpy."""

    def __init__(
        self,
        model: SentenceTransformer,
        export_dir: Path,
        int8: bool = False,
        concurrent_batches: bool = True,
    ):
        import onnxruntime as ort
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )

        from conan_embedding.serving.onnx import export_transformer_graph

        modules = list(model)
        if not isinstance(modules[0], Transformer) or not isinstance(modules[1], Pooling):
            raise ValueError("the onnx backend needs a Transformer -> Pooling model; use torch")
        pooling = modules[1]
        modes = pooling.get_config_dict().get("pooling_mode")
        modes = [modes] if isinstance(modes, str) else list(modes or [])
        if modes not in (["mean"], ["cls"]) or any(
            not isinstance(m, Normalize) for m in modules[2:]
        ):
            raise ValueError(
                f"the onnx backend handles mean/cls pooling + Normalize only (got {modes} and "
                f"{[type(m).__name__ for m in modules[2:]]}); use backend='torch'"
            )
        self.mode = modes[0]
        self.normalize = len(modules) > 2
        self.tokenizer = model.tokenizer
        self.max_length = model.max_seq_length
        path = (
            export_dir / f"{hashlib.sha256(_model_identity(model).encode()).hexdigest()[:16]}.onnx"
        )
        if not path.is_file():
            export_transformer_graph(model, path)
        if int8:
            quantized = path.with_name(path.stem + "-int8.onnx")
            if not quantized.is_file():
                _quantize_atomically(path, quantized)
            path = quantized
        threads = max(1, torch.get_num_threads())
        self.workers = threads if concurrent_batches else 1
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1 if concurrent_batches else threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """Tokenize once, batch by token count, run the batches on every worker thread.

        Sorting by characters (what ``SentenceTransformer.encode`` does) leaves about a quarter
        of a batch's tokens as padding on short texts; sorting the token ids themselves leaves
        almost none. With several threads, each batch runs on one thread and ``workers``
        batches run at once (ONNX Runtime releases the GIL); on 2 cores this measured the same
        as one batch on 2 intra-op threads, and it needs no thread barrier per small matrix.
        """
        if not texts:
            return np.zeros((0, 0), np.float32)
        encoded = self.tokenizer(
            list(texts), padding=False, truncation=True, max_length=self.max_length
        )
        ids = encoded["input_ids"]
        lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

        def run(rows: np.ndarray) -> np.ndarray:
            batch = self.tokenizer.pad(
                {name: [encoded[name][i] for i in rows] for name in encoded},
                padding=True,
                return_tensors="np",
            )
            feeds = {name: batch[name].astype(np.int64) for name in self.input_names}
            mask = batch["attention_mask"].astype(bool)
            hidden = self.session.run(None, feeds)[0]
            if self.mode == "cls":
                vectors = hidden[:, 0]
            else:
                weights = mask[..., None].astype(np.float32)
                vectors = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
            if self.normalize:
                vectors = vectors / np.maximum(
                    np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12
                )
            return vectors.astype(np.float32)

        if self.workers > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                parts = list(pool.map(run, batches))
        else:
            parts = [run(rows) for rows in batches]
        out = np.empty((len(texts), parts[0].shape[1]), np.float32)
        out[order] = np.concatenate(parts)
        return out


class TextEncoder:
    """Encodes texts into L2-normalised float32 rows: deduplicated, length-sorted, cached.

    >>> encoder = TextEncoder(model, cache_dir="runs/cache")   # doctest: +SKIP
    >>> vectors = encoder.encode(corpus, prompt="passage: ")  # [len(corpus), dim]
    """

    def __init__(
        self,
        model: SentenceTransformer,
        *,
        backend: Backend = "torch",
        batch_size: int = 32,
        chunk_size: int = 4096,
        cache_dir: str | os.PathLike[str] | None = None,
        show_progress: bool = True,
    ):
        if batch_size <= 0 or chunk_size <= 0:
            raise ValueError("batch_size and chunk_size must be positive")
        self.model, self.backend = model, backend
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.show_progress = show_progress
        self._onnx: _OnnxTransformer | None = None
        if backend in ("onnx", "onnx-int8"):
            export_dir = self.cache_dir or Path(tempfile.gettempdir()) / "conan-embedding-onnx"
            self._onnx = _OnnxTransformer(model, export_dir / "onnx", int8=backend == "onnx-int8")
        elif backend != "torch":
            raise ValueError(
                f"unknown backend {backend!r}; expected 'torch', 'onnx' or 'onnx-int8'"
            )
        # int8 vectors differ from fp32 ones: they must not share cache entries
        self._identity = _model_identity(model) + ("|int8" if backend == "onnx-int8" else "")
        self.cache_hits = 0

    def _cache_path(self, texts: Sequence[str], prompt: str | None) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(
            f"{self._identity}|{prompt or ''}|{texts_fingerprint(texts)}".encode()
        ).hexdigest()[:32]
        return self.cache_dir / f"emb-{key}.npy"

    def encode(
        self, texts: Sequence[str], prompt: str | None = None, desc: str = "encoding"
    ) -> np.ndarray:
        """One normalised row per input text (duplicates share one encoding)."""
        unique = list(dict.fromkeys(texts))
        position = {text: i for i, text in enumerate(unique)}
        cache_path = self._cache_path(unique, prompt)
        if cache_path is not None and cache_path.is_file():
            vectors = np.load(cache_path, allow_pickle=False)
            self.cache_hits += 1
        else:
            vectors = self._encode_unique(unique, prompt, desc)
            if cache_path is not None:
                save_npy_atomic(cache_path, vectors)
        if len(unique) == len(texts):
            return vectors
        return vectors[np.fromiter((position[t] for t in texts), dtype=np.int64, count=len(texts))]

    def _encode_unique(self, texts: list[str], prompt: str | None, desc: str) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension()), np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out: np.ndarray | None = None
        bar = progress(total=len(texts), desc=desc, disable=not self.show_progress, unit="text")
        for start in range(0, len(texts), self.chunk_size):
            rows = order[start : start + self.chunk_size]
            chunk = [(prompt or "") + texts[i] for i in rows]
            vectors = self._encode_chunk(chunk)
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), np.float32)
            out[rows] = vectors
            bar.update(len(rows))
        bar.close()
        assert out is not None
        return out

    def _encode_chunk(self, texts: list[str]) -> np.ndarray:
        if self._onnx is not None:
            return self._onnx.encode(texts, self.batch_size)
        with torch.inference_mode():
            vectors = self.model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

    def dimension(self) -> int:
        return int(self.model.get_embedding_dimension())


def build_index(
    vectors: np.ndarray,
    kind: IndexKind = "auto",
    *,
    exact_max: int = 200_000,
    ivf_lists: int | None = None,
    ivf_probe: int = 16,
    hnsw_m: int = 32,
    hnsw_ef_search: int = 256,
    seed: int = 0,
):
    """A FAISS inner-product index over normalised ``vectors`` (``auto``: exact up to ``exact_max``)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    if kind == "auto":
        kind = "exact" if count <= exact_max else "ivf"
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        lists = ivf_lists or max(1, min(int(4 * np.sqrt(count)), count // 39))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(vectors)
        index.nprobe = min(ivf_probe, lists)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = hnsw_ef_search
    else:
        raise ValueError(f"unknown index kind {kind!r}; expected auto, exact, ivf or hnsw")
    index.add(vectors)
    return index


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
