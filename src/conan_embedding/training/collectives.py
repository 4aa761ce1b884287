"""Collectives with gradient: how negatives cross devices (data parallel and CBB).

``all_gather`` has no gradient in PyTorch; :func:`all_gather_with_grad` adds the backward a
contrastive loss over gathered embeddings needs: each rank receives the *sum* of the
gradients every rank's loss sends to its slice. With DDP averaging parameter gradients over
``W`` ranks afterwards, a rank whose loss is the mean over its own queries yields the gradient
of the mean over all queries (what sentence-transformers calls ``gather_across_devices`` and
FlagEmbedding ``negatives_cross_device``). Tensors stay on their device, so the same code runs
over gloo (CPU) and NCCL (GPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, tensor, group=group)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        # gloo has no reduce_scatter: all-reduce the stacked gradients, keep our own slice
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=ctx.group)
        return stacked[dist.get_rank(ctx.group)], None


def all_gather_with_grad(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """The tensors of every rank of ``group``, in group-rank order, differentiable w.r.t. our own.

    Every rank must pass a tensor of the same shape.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [tensor]
    return list(_AllGatherWithGrad.apply(tensor, group))


def all_gather_no_grad(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


def all_gather_arrays(array: np.ndarray) -> np.ndarray:
    """Every process's numpy array (any length) concatenated in rank order."""
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)
