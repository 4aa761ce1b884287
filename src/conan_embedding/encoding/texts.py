"""Encode a stream of texts into a resumable vector file: dedup, chunks, cache (mining's encoder).

Why: offline mining is dominated by encoding (the corpus is embedded once; the search is a few
matrix products over the result), and a corpus of millions takes hours, so encoding must be
never repeated and never restarted from zero:

- **dedup**: each distinct text is encoded once, whatever its number of occurrences
  (:meth:`TextEncoder.encode`; a streamed corpus is deduplicated by its reader);
- **chunks**: texts are encoded ``chunk_size`` at a time by the shared
  :class:`~conan_embedding.encoding.engine.EmbeddingEngine` (token batches inside each chunk),
  so memory holds one chunk's activations whatever the corpus size;
- **resume**: with a ``cache_dir`` every chunk is appended to a
  :class:`~conan_embedding.encoding.cache.VectorFile` keyed by the model's weights, the prompt
  and the texts (or the caller's key for a stream); a rerun skips the rows already on disk
  (a SIGKILL loses at most the chunk being encoded) and a finished file is a warm cache
  (re-mining with other margins or windows costs no encoding at all);
- **shards**: under ``torchrun`` / ``accelerate launch`` (:meth:`TextEncoder.encode_shards`)
  chunk ``c`` of the stream is encoded by rank ``c mod W`` into that rank's own resumable
  file ``<name>.shard-RRRRR-of-WWWWW``; after a barrier rank 0 merges the shards, in stream
  order, into the file one process would have written (then removes them), so a warm cache
  or a killed run serves 1 or ``W`` processes alike. Chunks are dealt round-robin rather
  than in contiguous slices because the stream's length is unknown until it is read through
  (a ``.jsonl.gz`` corpus, deduplicated on the fly): the deal needs one pass and keeps the
  ranks within one chunk of each other. A killed rank loses at most the chunk it was
  encoding; the rerun must use the same process count to reuse the shards;
- **backend**: ``"torch"``, ``"torch-bf16"`` (bf16 autocast: on a GPU, or a CPU with
  AVX512-BF16, faster; cosine ~0.9999), ``"onnx"`` (fused fp32 graph; same vectors, cosine >
  0.9999), ``"onnx-int8"`` (weights quantised: faster, slightly different vectors) or any
  other registered backend (:mod:`conan_embedding.encoding.backends`); one that runs an export
  gets one made once under the cache folder; vectors of another precision never share a
  cache entry with fp32 ones; ``device`` as everywhere (``"auto"`` = this rank's GPU, else
  CPU).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from conan_embedding.encoding.backends import get_backend
from conan_embedding.encoding.cache import VectorFile, model_fingerprint, texts_fingerprint
from conan_embedding.encoding.engine import Backend, EmbeddingEngine
from conan_embedding.progress import progress
from conan_embedding.runtime import Processes

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


def chunked(texts: Iterable[str], size: int) -> Iterable[list[str]]:
    """Consecutive lists of ``size`` texts (the last may be shorter)."""
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class TextEncoder:
    """L2-normalised float32 rows for texts: deduplicated, chunked, cached and resumable.

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
        device: str | torch.device | None = "auto",
        max_batch_tokens: int | None = None,
    ):
        if batch_size <= 0 or chunk_size <= 0:
            raise ValueError("batch_size and chunk_size must be positive")
        self.chunk_size = chunk_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.show_progress = show_progress
        onnx_dir = (self.cache_dir or Path(tempfile.gettempdir()) / "conan-embedding") / "onnx"
        self.engine = EmbeddingEngine(
            model,
            backend=backend,
            onnx_dir=onnx_dir if get_backend(backend).needs_export else None,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            device=device,
            threads=torch.get_num_threads(),
        )
        self.fingerprint = model_fingerprint(model)
        self.cache_hits = 0
        self.rows_resumed = 0

    @property
    def width(self) -> int:
        return self.engine.width

    def encode(
        self,
        texts: Sequence[str],
        prompt: str | None = None,
        desc: str = "encoding",
        *,
        side: str | None = None,
    ) -> np.ndarray:
        """One normalised row per input text (duplicates share one encoding); ``side``
        (``query`` / ``passage``) cuts them at the model's length for that side."""
        unique = list(dict.fromkeys(texts))
        if self.cache_dir is None:
            vectors = np.empty((len(unique), self.width), np.float32)
            done = 0
            bar = progress(
                total=len(unique), desc=desc, disable=not self.show_progress, unit="text"
            )
            for chunk in chunked(unique, self.chunk_size):
                vectors[done : done + len(chunk)] = self._encode_chunk(chunk, prompt, side)
                done += len(chunk)
                bar.update(len(chunk))
            bar.close()
        else:
            store = self.encode_stream(
                chunked(unique, self.chunk_size),
                self.cache_dir / f"emb-{self.key(texts_fingerprint(unique), prompt, side)}",
                prompt=prompt,
                side=side,
                key=texts_fingerprint(unique),
                expected=len(unique),
                desc=desc,
            )
            vectors = np.array(store.array())
        if len(unique) == len(texts):
            return vectors
        position = {text: i for i, text in enumerate(unique)}
        return vectors[np.fromiter((position[t] for t in texts), dtype=np.int64, count=len(texts))]

    def key(self, stream_key: str, prompt: str | None, side: str | None = None) -> str:
        """The cache key of a stream under this model, backend, prompt and, where the model
        has one for ``side``, that side's length (32 hex digits)."""
        import hashlib

        # int8 / bf16 vectors (the backend's, or a caller's autocast) differ from fp32 ones:
        # they must not share cache entries
        precision = self.engine.precision
        identity = self.fingerprint + (f"|{precision}" if precision else "")
        length = self.engine.side_tokens.get("passage" if side == "document" else side or "")
        identity += f"|max_length={length}" if length is not None else ""
        payload = f"{identity}|{prompt or ''}|{stream_key}"
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def encode_stream(
        self,
        chunks: Iterable[Sequence[str]],
        path: str | os.PathLike[str],
        *,
        prompt: str | None = None,
        key: str,
        expected: int | None = None,
        desc: str = "encoding",
        side: str | None = None,
    ) -> VectorFile:
        """Encode every chunk into the vector file at ``path``, resuming what is on disk.

        ``chunks`` must be the same sequence on a rerun (``key`` names it, e.g. a fingerprint of
        the texts or of the source file): rows already on disk are skipped, not re-encoded.
        The whole stream is still iterated, so a reader's side effects happen on every run.
        """
        store = VectorFile(
            path, key=self.key(key, prompt, side), width=self.width, expected=expected
        )
        if store.complete:
            self.cache_hits += 1
            for _ in chunks:  # the caller's side effects (dedup, corpus file) still happen
                pass
            return store
        on_disk, position = store.rows, 0
        self.rows_resumed += on_disk
        bar = progress(
            total=expected, initial=on_disk, desc=desc, disable=not self.show_progress, unit="text"
        )
        for chunk in chunks:
            end = position + len(chunk)
            if end > on_disk:
                fresh = list(chunk[max(0, on_disk - position) :])
                store.append(self._encode_chunk(fresh, prompt, side))
                bar.update(len(fresh))
            position = end
        bar.close()
        if position < store.rows:
            raise ValueError(f"{store.path}: holds {store.rows} rows, the stream only {position}")
        store.finish()
        return store

    def encode_shards(
        self,
        chunks: Iterable[Sequence[str]],
        path: str | os.PathLike[str],
        processes: Processes,
        *,
        prompt: str | None = None,
        key: str,
        desc: str = "encoding",
        side: str | None = None,
    ) -> VectorFile | None:
        """:meth:`encode_stream` spread over ``processes``; every rank must call it with the
        same ``chunks`` (each iterates the whole stream, encoding only its own chunks).

        Returns the merged vector file on rank 0 and ``None`` on the others. One process:
        exactly :meth:`encode_stream`.
        """
        if processes.world == 1:
            return self.encode_stream(chunks, path, prompt=prompt, key=key, desc=desc, side=side)
        base, rank, world = Path(path), processes.rank, processes.world
        full_key = self.key(key, prompt, side)
        # read-only: only rank 0 ever opens the merged file, after the barrier
        done = VectorFile.finished(base, key=full_key, width=self.width)
        sizes: list[int] = []

        def own() -> Iterator[Sequence[str]]:
            for c, chunk in enumerate(chunks):
                sizes.append(len(chunk))
                if c % world == rank:
                    yield chunk

        if done:
            self.cache_hits += 1
            for _ in chunks:  # the caller's side effects still happen
                pass
        else:
            self.encode_stream(
                own(),
                _shard_path(base, rank, world),
                prompt=prompt,
                key=f"{key}|shard {rank} of {world}",
                desc=f"{desc} (rank {rank})",
                side=side,
            )
        processes.wait()  # one barrier on every path, so ranks cannot disagree on the count
        if not processes.is_main:
            return None
        if done:
            merged = VectorFile(base, key=full_key, width=self.width)
        else:
            merged = self._merge(base, full_key, sizes, prompt, key, world, side)
        for leftover in base.parent.glob(f"{base.name}.shard-*-of-*.*"):
            leftover.unlink(missing_ok=True)
        return merged

    def _merge(
        self,
        base: Path,
        full_key: str,
        sizes: Sequence[int],
        prompt: str | None,
        key: str,
        world: int,
        side: str | None = None,
    ) -> VectorFile:
        """Rank 0: the shards' rows in stream order into ``base`` (resumes a killed merge)."""
        shards = [
            VectorFile(
                _shard_path(base, r, world),
                key=self.key(f"{key}|shard {r} of {world}", prompt, side),
                width=self.width,
            )
            for r in range(world)
        ]
        merged = VectorFile(base, key=full_key, width=self.width, expected=sum(sizes))
        if not merged.complete:
            position, local = 0, [0] * world
            for c, size in enumerate(sizes):
                owner = c % world
                skip = max(0, merged.rows - position)
                if skip < size:
                    merged.append(shards[owner].read(local[owner] + skip, size - skip))
                local[owner] += size
                position += size
            merged.finish()
        return merged

    def _encode_chunk(
        self, texts: Sequence[str], prompt: str | None, side: str | None = None
    ) -> np.ndarray:
        return self.engine.embed(texts, prompt=prompt, normalize=True, side=side)

    def dimension(self) -> int:
        return int(self.width)


def _shard_path(base: Path, rank: int, world: int) -> Path:
    """Rank ``rank``'s own vector file beside the merged file ``base``."""
    return base.with_name(f"{base.name}.shard-{rank:05d}-of-{world:05d}")
