"""The one batch encoder: mining, teacher filtering, evaluation and serving all embed through it.

Why: a served model must give the vectors the trained model gives. Conan-v1's known deployment
bug is a server that ran only the transformer and pooling and silently dropped the Dense
projection (1024-d served instead of 1792-d). So the engine never rebuilds the pipeline: it
tokenises with the model's own tokenizer, runs the model's first module (the transformer) on a
backend, and then runs every remaining module of the saved sentence-transformers model
(Pooling, Dense, Normalize, ...) exactly as ``SentenceTransformer.forward`` would. Swapping the
backend (torch, torch under bf16 autocast, ONNX fp32, ONNX int8, or any other registered in
:mod:`conan_embedding.encoding.backends`) only swaps how the transformer runs, which is where
the time goes; the engine asks the backend, never compares its name.

How: texts are tokenised once into id lists (that is also how the server counts tokens and
enforces its length limit), then :meth:`EmbeddingEngine.embed_ids` cuts the rows into token
batches (:func:`~conan_embedding.encoding.tokens.token_batches`: sorted by token count, at most
``batch_size`` rows and ``max_batch_tokens`` padded tokens each), runs them on ``device``
(``"auto"``: this process's GPU, else the CPU; :mod:`conan_embedding.runtime`), and
restores the caller's order. Matryoshka truncation is ``e[:d] / ||e[:d]||`` (truncate, then
re-normalise). A backend that runs an export (ONNX) needs one: the model folder's, or (for a
model that only lives in memory, e.g. during mining) one made once into ``onnx_dir`` keyed by
its weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from conan_embedding.encoding.backends import InferenceBackend, Runner, get_backend
from conan_embedding.encoding.tokens import special_token_frame, token_batches
from conan_embedding.modeling.embedder import (
    embedding_width,
    load_embedder,
    matryoshka_dims,
    resolve_model_path,
    side_max_length,
)
from conan_embedding.runtime import resolve_device

Backend = str
"""A registered backend's name (:func:`~conan_embedding.encoding.backends.backend_names`:
``torch``, ``torch-bf16``, ``onnx``, ``onnx-int8``, ...)."""


class InputTooLongError(ValueError):
    """An input has more tokens than the model reads and truncation was not asked for."""

    def __init__(self, index: int, tokens: int, limit: int):
        self.index, self.tokens, self.limit = index, tokens, limit
        super().__init__(
            f"input[{index}] has {tokens} tokens, more than this model's limit of {limit}; "
            "shorten it or start the server/encoder with truncation enabled"
        )


@dataclass(frozen=True)
class Tokenized:
    """Token ids of one request's inputs, with the prompt already inside each row."""

    ids: list[list[int]]
    prompt_length: int | None  # tokens of the prompt, for pooling that excludes the prompt

    @property
    def token_count(self) -> int:
        return sum(len(row) for row in self.ids)


def truncate_and_normalize(embeddings: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka truncation: keep the first ``dimensions`` values, then re-normalise to unit length."""
    if dimensions is None or dimensions >= embeddings.shape[1]:
        return embeddings
    head = embeddings[:, :dimensions]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return (head / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


class EmbeddingEngine:
    """Tokenise, run the transformer on a backend, then the model's own remaining modules."""

    def __init__(
        self,
        model: SentenceTransformer,
        *,
        backend: Backend = "torch",
        onnx_dir: str | os.PathLike[str] | None = None,
        model_path: str | os.PathLike[str] | None = None,
        batch_size: int = 32,
        max_batch_tokens: int | None = None,
        threads: int | None = None,
        name: str | None = None,
        device: str | torch.device | None = "auto",
        concurrent_batches: bool | None = None,
    ):
        inference = get_backend(backend)
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.device = resolve_device(device)
        self.model = model.eval()
        if inference.runs_torch_modules and model.device != self.device:
            self.model.to(self.device)
        self.backend: Backend = backend
        self.inference_backend: InferenceBackend = inference
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.threads = threads or default_threads()
        self.model_path = Path(model_path) if model_path is not None else None
        self.name = name or (self.model_path.name if self.model_path else "conan-embedding")
        self.tokenizer = model.tokenizer
        self.width = embedding_width(model)
        self.matryoshka_dims = matryoshka_dims(model)
        self.prompts: dict[str, str] = dict(getattr(model, "prompts", {}) or {})
        limit = model.max_seq_length or getattr(self.tokenizer, "model_max_length", 512)
        self.max_tokens = int(min(limit, 1_000_000))
        self.side_tokens: dict[str, int] = {
            side: n
            for side in ("query", "passage")
            if (n := side_max_length(model, side)) is not None
        }
        """The model's per-side token limits (``query`` / ``passage``), where it has them."""
        self.vocab_size = len(self.tokenizer)
        self._needs_token_types = "token_type_ids" in self.tokenizer.model_input_names
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._left_pad = getattr(self.tokenizer, "padding_side", "right") == "left"
        # e.g. ONNX on the CPU: ``threads`` batches at once on single-threaded kernels (ORT
        # releases the GIL) instead of one batch on ``threads`` intra-op threads, which wait for
        # each other after every small matrix product and stall whenever another process takes
        # a core (InferenceBackend.concurrent_cpu_batches)
        self.concurrent = (
            concurrent_batches
            if concurrent_batches is not None
            else inference.concurrent_cpu_batches and self.device.type == "cpu" and self.threads > 1
        )
        self._workers: ThreadPoolExecutor | None = None
        self.runner: Runner = inference.load(
            self.model,
            model_path=model_path,
            export_dir=onnx_dir,
            device=self.device,
            threads=1 if self.concurrent else self.threads,
        )
        """Padded features -> sentence embeddings, the backend's way (the model's own head)."""
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)

    @property
    def precision(self) -> str | None:
        """What the vectors are made in when not float32: ``int8`` (quantised ONNX), ``bf16``
        (this backend's autocast, or a caller's autocast around the torch backend), ``fp16``;
        None for float32. Embedding caches key by it, so such vectors never stand in for
        float32 ones (nor the reverse)."""
        return self.inference_backend.precision(self.device)

    @classmethod
    def from_path(cls, model: str | os.PathLike[str], **kwargs: Any) -> EmbeddingEngine:
        path = resolve_model_path(model)
        kwargs.setdefault("name", Path(str(model)).name)
        return cls(load_embedder(path), model_path=path, **kwargs)

    # --- tokenisation -----------------------------------------------------------------------

    def resolve_prompt(self, prompt_name: str | None) -> str | None:
        if prompt_name is None:
            return None
        if prompt_name not in self.prompts:
            known = sorted(self.prompts) or "none"
            raise ValueError(f"unknown prompt {prompt_name!r}; this model's prompts: {known}")
        return self.prompts[prompt_name] or None

    def limit(self, side: str | None = None) -> int:
        """Tokens an input of ``side`` (``query``, ``passage`` or ``document``; None: no side)
        may hold: the model's length for that side, else its ``max_seq_length``."""
        side = "passage" if side == "document" else side
        return self.side_tokens.get(side or "", self.max_tokens)

    def _prompt_length(self, prompt: str | None) -> int | None:
        """Prompt tokens without a trailing special token, counted as sentence-transformers does."""
        if not prompt:
            return None
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return len(ids) - (bool(ids) and ids[-1] in set(self.tokenizer.all_special_ids))

    def tokenize(
        self,
        texts: Sequence[str],
        prompt: str | None = None,
        *,
        truncate: bool = False,
        side: str | None = None,
    ) -> Tokenized:
        """Token ids of ``prompt + text`` with the model's special tokens.

        Without ``truncate`` a row longer than the model's limit raises :class:`InputTooLongError`
        (silently embedding half a document is worse than an error); with it, rows are cut to the
        limit exactly as sentence-transformers cuts them. The limit is ``side``'s (:meth:`limit`).
        """
        limit = self.limit(side)
        full = [prompt + text for text in texts] if prompt else list(texts)
        encoded = self.tokenizer(
            full,
            add_special_tokens=True,
            truncation=truncate,
            max_length=limit if truncate else None,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        if not truncate:
            for index, row in enumerate(encoded):
                if len(row) > limit:
                    raise InputTooLongError(index, len(row), limit)
        return Tokenized(
            ids=[list(row) for row in encoded], prompt_length=self._prompt_length(prompt)
        )

    def tokenize_ids(
        self,
        rows: Sequence[Sequence[int]],
        prompt: str | None = None,
        *,
        truncate: bool = False,
        side: str | None = None,
    ) -> Tokenized:
        """Pre-tokenised input (ids of this model's vocabulary, without special tokens)."""
        limit = self.limit(side)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        before, after = special_token_frame(self.tokenizer)
        specials = len(before) + len(after)
        out: list[list[int]] = []
        for index, row in enumerate(rows):
            bad = next((t for t in row if not 0 <= int(t) < self.vocab_size), None)
            if bad is not None:
                raise ValueError(
                    f"input[{index}] has token id {bad}, outside this model's vocabulary "
                    f"0..{self.vocab_size - 1}"
                )
            content = list(prompt_ids) + [int(t) for t in row]
            room = limit - specials
            if len(content) > room:
                if not truncate:
                    raise InputTooLongError(index, len(content) + specials, limit)
                content = content[:room]
            out.append(before + content + after)
        return Tokenized(ids=out, prompt_length=self._prompt_length(prompt))

    # --- inference --------------------------------------------------------------------------

    def _pad(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        longest = max(len(row) for row in rows)
        ids = np.full((len(rows), longest), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for i, row in enumerate(rows):
            if self._left_pad:
                ids[i, longest - len(row) :], mask[i, longest - len(row) :] = row, 1
            else:
                ids[i, : len(row)], mask[i, : len(row)] = row, 1
        features = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self._needs_token_types:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        if self.inference_backend.runs_torch_modules and self.device.type != "cpu":
            features = {k: v.to(self.device, non_blocking=True) for k, v in features.items()}
        return features

    @torch.inference_mode()
    def _forward(self, features: dict[str, Any]) -> torch.Tensor:
        return self.runner(features)

    def embed_ids(
        self,
        rows: Sequence[Sequence[int]],
        prompt_length: int | None = None,
        *,
        dimensions: int | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Embeddings of tokenised rows, float32 ``[len(rows), width or dimensions]``."""
        self.check_dimensions(dimensions)
        if not rows:
            return np.zeros((0, dimensions or self.width), dtype=np.float32)
        lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
        batches = token_batches(lengths, batch_size or self.batch_size, self.max_batch_tokens)
        out = np.empty((len(rows), self.width), dtype=np.float32)

        def run(chunk: np.ndarray) -> None:
            features = self._pad([rows[i] for i in chunk])
            if prompt_length is not None:
                features["prompt_length"] = prompt_length
            out[chunk] = self._forward(features).float().cpu().numpy()

        if self.concurrent and len(batches) > 1:
            if self._workers is None:
                self._workers = ThreadPoolExecutor(self.threads, thread_name_prefix="embed")
            list(self._workers.map(run, batches))
        else:
            for chunk in batches:
                run(chunk)
        return truncate_and_normalize(out, dimensions)

    def embed(
        self,
        texts: Sequence[str],
        *,
        prompt_name: str | None = None,
        dimensions: int | None = None,
        truncate: bool = True,
        batch_size: int | None = None,
        prompt: str | None = None,
        normalize: bool = False,
        side: str | None = None,
    ) -> np.ndarray:
        """Embeddings of texts; ``prompt`` (a string) overrides ``prompt_name`` (a model prompt).

        ``normalize`` L2-normalises every row (for models without a Normalize module). ``side``
        (``query`` / ``passage``) cuts at that side's length (:meth:`limit`).
        """
        if prompt is None:
            prompt = self.resolve_prompt(prompt_name)
        tokens = self.tokenize(texts, prompt or None, truncate=truncate, side=side)
        vectors = self.embed_ids(
            tokens.ids, tokens.prompt_length, dimensions=dimensions, batch_size=batch_size
        )
        if normalize and len(vectors):
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def check_dimensions(self, dimensions: int | None) -> None:
        """``dimensions`` must be a trained Matryoshka size (or, without MRL dims, 1..width)."""
        if dimensions is None or dimensions == self.width:
            return
        if self.matryoshka_dims:
            if dimensions not in self.matryoshka_dims:
                raise ValueError(
                    f"dimensions={dimensions} is not one this model was trained for; "
                    f"choose one of {sorted(set(self.matryoshka_dims) | {self.width})}"
                )
        elif not 1 <= dimensions <= self.width:
            raise ValueError(f"dimensions must be between 1 and {self.width}, got {dimensions}")
