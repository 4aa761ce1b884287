"""The two ways a training step program encodes texts with the model being trained.

:func:`encode_with_grad` is the step's forward (through the engine's DDP/FSDP wrapper, with
autograd, counting texts and tokens); :func:`encode_no_grad` is what DHNM's re-scores and
re-mining call between steps (eval mode, no gradient). Both put the prompt before each text
and cut it at the side's token limit, so the two compare like for like.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from sentence_transformers import SentenceTransformer


def encode_with_grad(
    model: SentenceTransformer,
    texts: Sequence[str],
    prompt: str | None = None,
    forward: torch.nn.Module | None = None,
    counts: dict[str, int] | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Sentence embeddings with autograd (``model.encode`` runs without gradient).

    ``forward`` is the module to call (the engine's DDP/FSDP wrapper of ``model``); the
    result is float32 whatever the autocast precision, so losses are computed in float32.
    ``counts`` (if given) gains ``samples`` (texts encoded) and ``tokens`` (their non-padding
    tokens, the attention mask's sum): the engine's throughput numbers. This is the one place
    a training step tokenizes, so every stage built on it counts the same way.
    ``max_length`` cuts each text (prompt included) at that many tokens instead of the model's
    ``max_seq_length`` (the per-side lengths, ``model.query_max_length`` /
    ``passage_max_length``).
    """
    if prompt:
        texts = [prompt + t for t in texts]
    kwargs: dict[str, Any] = {"max_length": max_length} if max_length else {}
    features = model.preprocess(list(texts), **kwargs)
    if counts is not None:
        mask = features.get("attention_mask", features.get("input_ids"))
        counts["samples"] = counts.get("samples", 0) + len(texts)
        if isinstance(mask, torch.Tensor):  # still on the CPU: no device sync
            real = int(mask.sum()) if "attention_mask" in features else mask.numel()
            counts["tokens"] = counts.get("tokens", 0) + real
    features = {
        k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()
    }
    return (forward or model)(features)["sentence_embedding"].float()


def encode_no_grad(
    model: SentenceTransformer,
    texts: Sequence[str],
    prompt: str | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """The model's normalised rows (eval mode, no gradient; float32 on the CPU), each text
    after ``prompt`` and cut at ``max_length`` tokens (None: ``max_seq_length``). The model's
    mode and ``max_seq_length`` come out as they went in."""
    was_training, max_seq_length = model.training, model.max_seq_length
    model.eval()
    if max_length:  # encode() takes no max_length: cut at the side's length for this call
        model.max_seq_length = max_length
    try:
        with torch.no_grad():
            out = model.encode(
                [prompt + t for t in texts] if prompt else list(texts),
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
                batch_size=64,
            )
    finally:
        model.max_seq_length = max_seq_length
        model.train(was_training)
    return out.float().cpu()
