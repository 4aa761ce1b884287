"""Conan-v2's soft mask: moving a causal LLM to bidirectional attention gradually.

Why: a decoder was pretrained with a causal mask, so its attention to later tokens (the upper
triangle) was never trained. Switching at once to the all-ones bidirectional mask (a hard
switch) jumps from a full-rank mask to a rank-1 one and can land the embedding training in a
poor optimum. Conan-v2 instead opens the upper triangle step by step during the weak
(stage-3) embedding training.

The mask, for a sequence of ``L`` real tokens and the 1-based query position ``i``::

    M_ij(t) = 1                              if j <= i
    M_ij(t) = min(alpha(t) * L / i, 1)       if j > i          (variant "L_over_i", default)
    M_ij(t) = min(alpha(t) * i / L, 1)       if j > i          (variant "i_over_L")

with ``alpha(t)`` one of the schedules (``T`` = total steps of the stage)::

    linear        t / T
    accelerating  (t / T) ** 2
    decelerating  1 - (1 - t / T) ** 2
    hard          1                (baseline: bidirectional from the first step)
    causal        0                (baseline: the plain causal model)

With ``L / i`` early rows open first and every row is fully open by ``alpha = 1``; one paper
translation writes ``i / L`` instead, under which later rows open first and, at ``alpha = 1``,
only the last row is fully open (so ``i_over_L`` never becomes exactly bidirectional).

How: the paper does not say how ``M`` enters attention; we use the natural reading, attention
weights proportional to ``M_ij * exp(score_ij)``, i.e. an additive ``log M`` on the logits.
``M = 0`` (the whole upper triangle at ``alpha = 0``, and every padding key) becomes the
dtype's most negative finite value, as transformers does for its own masks, so a fully
masked padding row stays finite instead of turning into NaN. transformers 5.x Llama passes a
4-D float ``attention_mask`` straight through ``create_causal_mask`` to the eager and SDPA
kernels, which add it to the logits: :func:`soft_masked_forward` relies on exactly that, and
the tests prove it by equality with the stock causal model (``alpha = 0``) and the stock
bidirectional one (``config.is_causal = False``, ``alpha = 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

Schedule = Literal["linear", "accelerating", "decelerating", "hard", "causal"]
Variant = Literal["L_over_i", "i_over_L"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
VARIANTS: tuple[str, ...] = get_args(Variant)


def alpha_at(step: int, total_steps: int, schedule: Schedule = "linear") -> float:
    """``alpha(t)`` in ``[0, 1]`` for step ``t`` of a stage of ``T`` steps (clamped past ``T``)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown soft-mask schedule {schedule!r}; expected one of {SCHEDULES}")
    if schedule == "hard":
        return 1.0
    if schedule == "causal":
        return 0.0
    if total_steps <= 0:
        raise ValueError("total_steps must be > 0")
    progress = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "linear":
        return progress
    if schedule == "accelerating":
        return progress**2
    return 1.0 - (1.0 - progress) ** 2  # decelerating


def soft_mask_values(
    attention_mask: torch.Tensor, alpha: float, variant: Variant = "L_over_i"
) -> torch.Tensor:
    """``M`` itself, shape ``[B, S, S]``, from a 0/1 padding mask ``[B, S]``.

    Positions ``i, j`` count real tokens only (1-based), so left and right padding both work;
    ``L`` is each row's own number of real tokens. Padding keys get ``M = 0``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown soft-mask variant {variant!r}; expected one of {VARIANTS}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    real = attention_mask.bool()
    position = real.long().cumsum(dim=-1).to(torch.float32)  # 1-based among real tokens
    length = real.sum(dim=-1, keepdim=True).to(torch.float32).clamp(min=1.0)  # [B, 1]
    query_pos = position.clamp(min=1.0)  # a leading pad row has cumsum 0
    ratio = length / query_pos if variant == "L_over_i" else query_pos / length  # [B, S]
    upper_value = (alpha * ratio).clamp(max=1.0).unsqueeze(-1)  # [B, S(query), 1]
    is_upper = position.unsqueeze(-1) < position.unsqueeze(-2)  # j > i  -> [B, S, S]
    values = torch.where(is_upper, upper_value, torch.ones_like(upper_value))
    return values * real.unsqueeze(-2).to(values.dtype)  # padding keys -> 0


def additive_soft_mask(
    attention_mask: torch.Tensor,
    alpha: float,
    variant: Variant = "L_over_i",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``log M`` as the 4-D additive mask ``[B, 1, S, S]`` that Llama attention adds to logits."""
    values = soft_mask_values(attention_mask, alpha, variant)
    most_negative = torch.finfo(dtype).min
    log_values = torch.log(values.to(torch.float32))
    log_values = torch.where(values > 0, log_values, torch.full_like(log_values, most_negative))
    return log_values.to(dtype).unsqueeze(1)


def soft_masked_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    alpha: float,
    variant: Variant = "L_over_i",
) -> torch.Tensor:
    """Last hidden states of a transformers decoder (``LlamaModel``) run under the soft mask."""
    dtype = next(model.parameters()).dtype
    mask = additive_soft_mask(attention_mask, alpha, variant, dtype=dtype)
    return model(input_ids=input_ids, attention_mask=mask).last_hidden_state


@dataclass(frozen=True)
class SoftMaskSchedule:
    """A stage's schedule: ``alpha(step)`` and the mask it produces at that step."""

    schedule: Schedule = "linear"
    total_steps: int = 1
    variant: Variant = "L_over_i"

    def __post_init__(self) -> None:
        alpha_at(0, max(self.total_steps, 1), self.schedule)  # validates the name
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown soft-mask variant {self.variant!r}; expected {VARIANTS}")

    def alpha(self, step: int) -> float:
        return alpha_at(step, max(self.total_steps, 1), self.schedule)

    def mask(
        self, attention_mask: torch.Tensor, step: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        return additive_soft_mask(attention_mask, self.alpha(step), self.variant, dtype)

    @property
    def ends_bidirectional(self) -> bool:
        """Whether the trained model is served with full bidirectional attention."""
        return self.schedule != "causal" and self.variant == "L_over_i"
