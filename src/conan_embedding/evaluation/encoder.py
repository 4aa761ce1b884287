"""The model as mteb sees it: a sentence-transformers encoder with an on-disk embedding cache.

Why: on two CPU cores an evaluation suite spends nearly all of its time encoding, and the same
texts come back again and again (the same STS test set before and after every training run,
the SciFact corpus for every retrieval experiment, a rerun after a crash). Caching each
embedding by ``(model fingerprint, prompt, text)`` makes the second run of anything nearly free
and lets a run that died half way resume where it stopped.

How:

- :func:`model_fingerprint` hashes the module layout and every weight tensor, so changing one
  weight (a training step) gives a new cache namespace; nothing stale is ever served.
- :class:`EmbeddingCache` keeps one folder per fingerprint holding safetensors shards, each a
  ``keys`` tensor (16-byte BLAKE2b digests of ``prompt + "\\0" + text``) and an ``embeddings``
  tensor. New embeddings go to a new shard written atomically (temp file, then rename); no
  pickle is involved anywhere.
- :class:`CachedEncoder` implements mteb's encoder protocol (``encode(dataloader, task_metadata,
  hf_split, hf_subset, prompt_type)``) so ``mteb.evaluate`` drives it, looks each text up in the
  cache and only encodes the misses.

Prompts: mteb picks the prompt by task name, task type and prompt type (query/document). e5
models expect ``query: `` on *both* sides of symmetric tasks (STS, classification, clustering,
bitext mining), where mteb asks for no prompt type at all; :class:`CachedEncoder` then uses the
model's ``query`` prompt (``symmetric_prompt="query"``, configurable). A ``passage`` prompt is
treated as mteb's ``document`` prompt, the name e5 models ship with.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
from safetensors.numpy import load_file, save_file

from conan_embedding.progress import progress

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.types import PromptType
    from sentence_transformers import SentenceTransformer
    from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

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
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
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
        handle, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".safetensors")
        os.close(handle)
        try:
            save_file({"keys": key_array, "embeddings": embeddings}, tmp)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        rows = self._load()
        for key, row in zip(keys, embeddings, strict=True):
            rows[key] = row
        return final


def normalized_prompts(model: SentenceTransformer) -> dict[str, str]:
    """The model's prompts with e5's ``passage`` also offered under mteb's name ``document``."""
    prompts = {k: v for k, v in (getattr(model, "prompts", None) or {}).items() if v}
    if "passage" in prompts and "document" not in prompts:
        prompts["document"] = prompts["passage"]
    return prompts


class CachedEncoder(AbsEncoder):
    """mteb's encoder protocol over a SentenceTransformer, with :class:`EmbeddingCache`.

    ``cache_dir=None`` disables the disk cache (embeddings are still computed the same way).
    """

    def __init__(
        self,
        model: SentenceTransformer,
        *,
        name: str,
        cache_dir: str | os.PathLike[str] | None = None,
        symmetric_prompt: str | None = "query",
        show_progress: bool = True,
        flush_every: int = 2048,
    ) -> None:
        self.model = model
        self.flush_every = flush_every
        self.fingerprint = model_fingerprint(model)
        meta = ModelMeta.from_sentence_transformer_model(model)
        self.mteb_model_meta = meta.model_copy(
            update={"name": name, "revision": self.fingerprint[:12]}
        )
        self.model_prompts = normalized_prompts(model)
        self.symmetric_prompt = symmetric_prompt
        self.show_progress = show_progress
        self.cache = EmbeddingCache(cache_dir, self.fingerprint) if cache_dir else None
        self.encoded_texts = 0  # texts actually run through the network (cache misses)

    def resolve_prompt(
        self, task_metadata: TaskMetadata, prompt_type: PromptType | None
    ) -> str | None:
        name = get_prompt_name(self.model_prompts or None, task_metadata, prompt_type)
        if name is None and prompt_type is None and self.symmetric_prompt:
            name = self.symmetric_prompt if self.symmetric_prompt in self.model_prompts else None
        return self.model_prompts.get(name) if name else None

    def encode(
        self,
        inputs: DataLoader[Any],
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        prompt = self.resolve_prompt(task_metadata, prompt_type)
        return self.encode_texts(
            texts,
            prompt=prompt,
            batch_size=int(kwargs.get("batch_size", 32)),
            desc=task_metadata.name,
        )

    def encode_texts(
        self,
        texts: Sequence[str],
        *,
        prompt: str | None = None,
        batch_size: int = 32,
        desc: str = "encode",
    ) -> np.ndarray:
        """Embeddings of ``texts`` (float32, one row each), from the cache where possible."""
        keys = [text_key(prompt, text) for text in texts]
        if self.cache is not None:
            found, missing = self.cache.lookup(keys)
        else:
            found, missing = [None] * len(texts), list(range(len(texts)))
        # Duplicates inside one call are encoded once.
        unique_missing: dict[bytes, int] = {}
        for index in missing:
            unique_missing.setdefault(keys[index], index)
        todo = list(unique_missing.values())
        by_key: dict[bytes, np.ndarray] = {}
        # Encode and store in chunks so an interrupted run keeps what it already paid for.
        for start in range(0, len(todo), self.flush_every):
            chunk = todo[start : start + self.flush_every]
            fresh = self._encode_uncached([texts[i] for i in chunk], prompt, batch_size, desc)
            self.encoded_texts += len(chunk)
            if self.cache is not None:
                self.cache.add([keys[i] for i in chunk], fresh)
            by_key.update({keys[i]: fresh[j] for j, i in enumerate(chunk)})
        for index in missing:
            found[index] = by_key[keys[index]]
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack(found).astype(np.float32, copy=False)

    def _encode_uncached(
        self, texts: list[str], prompt: str | None, batch_size: int, desc: str
    ) -> np.ndarray:
        # Longest first so each batch pads little; one progress bar over all batches.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        chunks: list[np.ndarray] = []
        starts: Iterable[int] = range(0, len(order), batch_size)
        bar = progress(
            starts,
            total=(len(order) + batch_size - 1) // batch_size,
            desc=f"{desc}: encoding {len(texts)} texts",
            disable=not self.show_progress,
        )
        for start in bar:
            batch = [texts[i] for i in order[start : start + batch_size]]
            chunks.append(
                self.model.encode(
                    batch,
                    prompt=prompt,
                    batch_size=batch_size,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                ).astype(np.float32)
            )
        stacked = np.concatenate(chunks, axis=0)
        out = np.empty_like(stacked)
        out[np.asarray(order)] = stacked
        return out
