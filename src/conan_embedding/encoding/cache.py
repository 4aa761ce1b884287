"""Embedding caches: per-text keyed shards (evaluation) and resumable append-only vector files (mining).

Why two shapes: evaluation asks for the same texts in changing company (one STS set before and
after every run), so its cache answers per text (:class:`EmbeddingCache`); mining encodes one
large, fixed, ordered stream (a corpus of millions), so its cache is one file of rows in stream
order (:class:`VectorFile`) that a killed run resumes instead of restarting.

How:

- :func:`model_fingerprint` hashes the module layout, truncation, tokenizer size and every weight,
  so changing one weight gives a new cache namespace; nothing stale is ever served.
- :class:`EmbeddingCache`: one folder per fingerprint holding safetensors shards, each a ``keys``
  tensor (16-byte BLAKE2b digests of ``prompt + "\\0" + text``) and an ``embeddings`` tensor;
  a new shard is written atomically (temp file, then rename). No pickle anywhere.
- :class:`VectorFile`: raw little-endian float32 rows appended to ``<name>.f32`` and flushed
  (``fsync``) after every chunk, with a JSON manifest ``<name>.json`` (key, width, rows expected,
  complete). Rows on disk = ``file size // (4 * width)``; a partly written last row (the process
  was killed inside ``write``) is cut off on reopen, so a killed run loses at most the chunk it
  was encoding. Read back as a read-only ``np.memmap`` (no copy, pages loaded on demand) or in
  blocks (:meth:`VectorFile.blocks`, plain reads, so a pass over the file does not pin it in RSS).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from conan_embedding._io import atomic_path, write_text_atomic

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

KEY_BYTES = 16


def model_fingerprint(model: SentenceTransformer) -> str:
    """A hex digest of the model's layout, tokenizer size, truncation and every weight."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(model).encode("utf-8"))
    digest.update(f"truncate_dim={model.truncate_dim}".encode())
    # sentence-transformers 6's repr leaves the token limit out: without it, one model's
    # embeddings cut at 64 tokens were served to the same weights evaluated at 256
    digest.update(f"max_seq_length={model.max_seq_length}".encode())
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        digest.update(f"vocab={len(tokenizer)}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode("utf-8"))
        # hashed through the buffer protocol: no copy of a float32 CPU weight is made
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().data)
    return digest.hexdigest()


def text_key(prompt: str | None, text: str) -> bytes:
    """The cache key of one input: the digest of the prompt and the text it is prepended to."""
    payload = (prompt or "").encode("utf-8") + b"\0" + text.encode("utf-8")
    return hashlib.blake2b(payload, digest_size=KEY_BYTES).digest()


class EmbeddingCache:
    """Embeddings of one model on disk, keyed by :func:`text_key`.

    ``lookup`` returns the cached rows and the positions that are missing; ``add`` appends a
    shard. Shards are loaded lazily once per process; ``hits``/``misses`` count lookups.
    """

    def __init__(self, root: str | os.PathLike[str], fingerprint: str) -> None:
        self.folder = Path(root) / fingerprint
        self._rows: dict[bytes, np.ndarray] | None = None
        self.hits = 0
        self.misses = 0

    def _load(self) -> dict[bytes, np.ndarray]:
        if self._rows is None:
            rows: dict[bytes, np.ndarray] = {}
            for shard in sorted(self.folder.glob("shard-*.safetensors")):
                tensors = load_file(str(shard))
                keys, embeddings = tensors["keys"], tensors["embeddings"]
                if keys.shape != (len(embeddings), KEY_BYTES):
                    raise ValueError(
                        f"{shard}: keys tensor has shape {keys.shape}, expected ({len(embeddings)}, {KEY_BYTES})"
                    )
                for key, row in zip(keys, embeddings, strict=True):
                    rows[key.tobytes()] = row
            self._rows = rows
        return self._rows

    def __len__(self) -> int:
        return len(self._load())

    def lookup(self, keys: Sequence[bytes]) -> tuple[list[np.ndarray | None], list[int]]:
        rows = self._load()
        found = [rows.get(key) for key in keys]
        missing = [i for i, row in enumerate(found) if row is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return found, missing

    def add(self, keys: Sequence[bytes], embeddings: np.ndarray) -> Path | None:
        if len(keys) == 0:
            return None
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"shard-{uuid.uuid4().hex}.safetensors"
        with atomic_path(final) as tmp:
            save_file({"keys": key_array, "embeddings": embeddings}, str(tmp))
        rows = self._load()
        for key, row in zip(keys, embeddings, strict=True):
            rows[key] = row
        return final


def texts_fingerprint(texts: Sequence[str]) -> str:
    """SHA-256 of the texts in order (NUL-separated): the key of one ordered text stream."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


class VectorFile:
    """An append-only, resumable file of float32 rows of one width (see the module docstring).

    >>> store = VectorFile(folder / "corpus", key="model|prompt|texts", width=384)  # doctest: +SKIP
    >>> store.rows  # rows already on disk (a resumed run skips them)
    >>> store.append(vectors); store.finish(); store.array()  # np.memmap [rows, 384]
    """

    MANIFEST_VERSION = 1

    def __init__(
        self, path: str | os.PathLike[str], *, key: str, width: int, expected: int | None = None
    ):
        base = Path(path)
        self.path = base.with_name(base.name + ".f32")
        self.manifest = base.with_name(base.name + ".json")
        self.key, self.width, self.expected = key, int(width), expected
        self.path.parent.mkdir(parents=True, exist_ok=True)
        previous = self._read_manifest()
        if previous is None or previous.get("key") != key or previous.get("width") != self.width:
            self.path.unlink(missing_ok=True)
            self._write_manifest(complete=False)
        self.path.touch()
        row_bytes = 4 * self.width
        size = self.path.stat().st_size
        if size % row_bytes:  # killed inside a write: drop the partial row
            os.truncate(self.path, size - size % row_bytes)
        self.rows = size // row_bytes
        self.complete = bool(previous and previous.get("key") == key and previous.get("complete"))

    @staticmethod
    def finished(path: str | os.PathLike[str], *, key: str, width: int) -> bool:
        """Whether the file at ``path`` is complete under ``key``, read without opening it for
        writing (the constructor may reset or truncate: one process of several must not)."""
        base = Path(path)
        manifest = VectorFile._manifest_at(base.with_name(base.name + ".json"))
        return bool(
            manifest
            and manifest.get("key") == key
            and manifest.get("width") == int(width)
            and manifest.get("complete")
        )

    @staticmethod
    def _manifest_at(path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None

    def _read_manifest(self) -> dict[str, Any] | None:
        return self._manifest_at(self.manifest)

    def _write_manifest(self, complete: bool) -> None:
        manifest = {
            "version": self.MANIFEST_VERSION,
            "key": self.key,
            "width": self.width,
            "dtype": "float32",
            "expected": self.expected,
            "complete": complete,
        }
        write_text_atomic(self.manifest, json.dumps(manifest, indent=2))

    def append(self, vectors: np.ndarray) -> None:
        """Append rows and make them durable (flush + fsync) before returning."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if vectors.ndim != 2 or vectors.shape[1] != self.width:
            raise ValueError(
                f"{self.path}: rows of width {self.width} expected, got {vectors.shape}"
            )
        with open(self.path, "ab") as handle:
            handle.write(vectors.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        self.rows += len(vectors)

    def finish(self) -> None:
        if self.expected is not None and self.rows != self.expected:
            raise ValueError(f"{self.path}: {self.rows} rows written, {self.expected} expected")
        self.complete = True
        self._write_manifest(complete=True)

    def array(self) -> np.ndarray:
        """All rows as a read-only memory map ``[rows, width]`` (an empty array when none)."""
        if self.rows == 0:
            return np.zeros((0, self.width), np.float32)
        return np.memmap(self.path, dtype="<f4", mode="r", shape=(self.rows, self.width))

    def read(self, start: int, count: int) -> np.ndarray:
        """Rows ``start .. start + count - 1`` (a plain read, like :meth:`blocks`)."""
        if start < 0 or start + count > self.rows:
            raise ValueError(f"{self.path}: rows {start}..{start + count} of {self.rows} asked")
        with open(self.path, "rb") as handle:
            handle.seek(start * 4 * self.width)
            block = np.fromfile(handle, dtype="<f4", count=count * self.width)
        return block.reshape(count, self.width)

    def blocks(self, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, block)`` in order, read with plain reads (no mapping stays resident)."""
        with open(self.path, "rb") as handle:
            for start in range(0, self.rows, rows):
                count = min(rows, self.rows - start)
                block = np.fromfile(handle, dtype="<f4", count=count * self.width)
                yield start, block.reshape(count, self.width)
