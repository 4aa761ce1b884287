"""Matryoshka representation learning (MRL) over any embedding loss.

The same loss is applied to the first ``d`` dimensions of every embedding for each
``d`` in ``dims`` (the losses normalise, so truncation needs nothing else) and the results
are averaged with weights ``w_d`` (uniform by default)::

    L_MRL = sum_d w_d * L(e[..., :d]) / sum_d w_d

Conan-v1 uses dims 256 .. 1792 on a 1792-d projection; the full width should be among the
dims so the model is still trained at full size.

Example::

    loss = matryoshka_loss(lambda q, p: info_nce_loss(q, p), [q, p], dims=[64, 128, 384])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from conan_embedding.losses.precision import float32_loss


@float32_loss
def matryoshka_loss(
    loss_fn: Callable[..., torch.Tensor],
    embeddings: Sequence[torch.Tensor | None],
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Weighted mean of ``loss_fn(*truncated_embeddings)`` over ``dims``; ``None`` passes through."""
    if not dims:
        return loss_fn(*embeddings)
    weights = list(weights) if weights is not None else [1.0] * len(dims)
    if len(weights) != len(dims):
        raise ValueError("matryoshka weights and dims differ in length")
    width = next(e for e in embeddings if e is not None).shape[-1]
    if max(dims) > width:
        raise ValueError(f"matryoshka dim {max(dims)} exceeds the embedding width {width}")
    total = sum(
        w * loss_fn(*[None if e is None else e[..., :d] for e in embeddings])
        for d, w in zip(dims, weights, strict=True)
    )
    return total / sum(weights)
