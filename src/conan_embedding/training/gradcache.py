"""GradCache: a contrastive loss over more texts than one forward's activations hold.

Why: an InfoNCE denominator wants many candidates, and encoding them all with their graphs
at once costs the activations of all of them. GradCache (Gao et al., 2021) computes the same
loss and the same gradients in two passes, keeping only one chunk's activations at a time:

1. encode every chunk without a graph (embeddings only);
2. make the embeddings leaves, compute the loss on them and back-propagate it to the
   leaves only (``d loss / d embedding``, small);
3. re-encode each chunk with its graph under the *same* dropout seed and back-propagate its
   cached embedding gradient into the weights.

The replay must see exactly pass 1's randomness, so a chunk carries its seed key and
``encode`` runs it under :meth:`~conan_embedding.training.engine.Engine.seeded`. Used by
cross-GPU batch balance on virtual devices (:mod:`conan_embedding.training.cbb`); nothing in
it is CBB's, so any contrastive task can run on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Chunk:
    """Texts encoded together, with their prompt and the seed key of their dropout."""

    texts: list[str]
    prompt: str | None
    seed: tuple[int, ...]


EncodeChunk = Callable[[Chunk, bool], torch.Tensor]
"""``encode(chunk, count)``: the chunk's embeddings, with a graph when grad is enabled, drawn
under the chunk's seed; ``count`` False for a replay (its texts were counted in pass 1)."""


def encode_with_graphs(encode: EncodeChunk, chunks: Sequence[Chunk]) -> list[torch.Tensor]:
    """One pass: every chunk's embeddings with its graph (the activations of all at once)."""
    return [encode(chunk, True) for chunk in chunks]


def grad_cache_backward(
    encode: EncodeChunk,
    chunks: Sequence[Chunk],
    backward_loss: Callable[[list[torch.Tensor]], float],
) -> tuple[float, list[torch.Tensor]]:
    """Two passes (see the module docstring); returns what ``backward_loss`` returned (the
    loss) and the embeddings it saw (leaves, detached from the model).

    ``backward_loss(embeddings)`` computes the loss on the leaves and back-propagates it;
    the leaves' gradients are then replayed into the weights chunk by chunk.
    """
    with torch.no_grad():
        cached = [encode(chunk, True) for chunk in chunks]
    leaves = [e.detach().requires_grad_(True) for e in cached]
    value = backward_loss(leaves)
    for chunk, leaf in zip(chunks, leaves, strict=True):
        encode(chunk, False).backward(leaf.grad)
    return value, leaves
