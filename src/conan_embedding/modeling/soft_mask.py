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
bidirectional one (``config.is_causal = False``, ``alpha = 1``) for Llama, Qwen2, Mistral,
Gemma 3 and GPT-2.

Sliding-window layers (Mistral with ``sliding_window`` set, Gemma 3's local layers, Qwen2 with
``use_sliding_window``) keep their window. In general the soft mask opens exactly the keys
that the model's bidirectional reading adds to its causal one, with ``d = i - j``::

    M_ij = 1              where the causal reading allows j     (full: d >= 0; window w: 0 <= d < w)
    M_ij = min(alpha * L / i, 1)   where only the bidirectional one does (full: d < 0;
                                   window w: |d| <= w, transformers' bidirectional window)
    M_ij = 0              elsewhere (outside the window, padding keys)

so ``alpha = 0`` is the stock causal model and ``alpha = 1`` (``L_over_i``) the stock
``is_causal = False`` model, layer type by layer type. A 4-D mask reaches every layer
unchanged, so a model whose layers are all of one kind gets one tensor (Mistral: the
windowed one); a model that mixes kinds gets transformers' own per-layer-type mapping
``{"full_attention": ..., "sliding_attention": ...}`` (Gemma 3, Qwen2). Other layer kinds
(chunked, linear attention) are refused by :func:`attention_layout` with the arch's name.

Fast path: at ``alpha = 0`` and at ``alpha = 1`` (``L_over_i``) there is nothing soft left,
so :func:`soft_masked_forward` passes only the 2-D padding mask and ``is_causal`` to the
model, and transformers builds its own mask: none at all for SDPA on unpadded batches (the
flash kernel), O(S) memory instead of the dense ``[B, 1, S, S]``, and flash-attention-2
compatible. The exported model uses the same path through ``config.is_causal = False``.
Positions are counted among real tokens (``position_ids = cumsum(mask) - 1``), so left and
right padding give the same vectors, also for GPT-2's absolute position embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

import torch

# the names a config may give (one definition, in the config vocabulary)
from conan_embedding.config.llm import Schedule, Variant

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
    attention_mask: torch.Tensor,
    alpha: float,
    variant: Variant = "L_over_i",
    sliding_window: int | None = None,
) -> torch.Tensor:
    """``M`` itself, shape ``[B, S, S]``, from a 0/1 padding mask ``[B, S]``.

    Positions ``i, j`` count real tokens only (1-based), so left and right padding both work;
    ``L`` is each row's own number of real tokens. Padding keys get ``M = 0``. With a
    ``sliding_window`` ``w`` only keys within the window are open (module docstring).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown soft-mask variant {variant!r}; expected one of {VARIANTS}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    real = attention_mask.bool()
    position = real.long().cumsum(dim=-1).to(torch.float32)  # 1-based among real tokens
    length = real.sum(dim=-1, keepdim=True).to(torch.float32).clamp(min=1.0)  # [B, 1]
    query_pos = position.clamp(min=1.0)  # a leading pad row has cumsum 0
    ratio = length / query_pos if variant == "L_over_i" else query_pos / length  # [B, S]
    upper_value = (alpha * ratio).clamp(max=1.0).unsqueeze(-1)  # [B, S(query), 1]
    distance = position.unsqueeze(-1) - position.unsqueeze(-2)  # d = i - j  -> [B, S, S]
    if sliding_window is None:
        causal_open = distance >= 0
        bidirectional_open = torch.ones_like(causal_open)
    else:
        causal_open = (distance >= 0) & (distance < sliding_window)
        bidirectional_open = distance.abs() <= sliding_window
    values = torch.where(causal_open, torch.ones_like(upper_value), upper_value)
    values = values * bidirectional_open.to(values.dtype)
    return values * real.unsqueeze(-2).to(values.dtype)  # padding keys -> 0


def additive_soft_mask(
    attention_mask: torch.Tensor,
    alpha: float,
    variant: Variant = "L_over_i",
    dtype: torch.dtype = torch.float32,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """``log M`` as the 4-D additive mask ``[B, 1, S, S]`` that attention adds to its logits."""
    values = soft_mask_values(attention_mask, alpha, variant, sliding_window)
    most_negative = torch.finfo(dtype).min
    log_values = torch.log(values.to(torch.float32))
    log_values = torch.where(values > 0, log_values, torch.full_like(log_values, most_negative))
    return log_values.to(dtype).unsqueeze(1)


FULL, SLIDING = "full_attention", "sliding_attention"


class UnsupportedAttentionError(ValueError):
    """A model whose attention the soft mask cannot drive faithfully."""


def attention_layout(config: Any) -> dict[str, int | None]:
    """The model's layer kinds and their windows: ``{"full_attention": None,
    "sliding_attention": w}``, read from ``config.layer_types`` (Gemma 3, Qwen2/3) or, without
    it, from ``config.sliding_window`` (Mistral: every layer windowed when it is set)."""
    arch = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedAttentionError(
            f"{arch}: config.use_bidirectional_attention is set, the model is already "
            "bidirectional; the soft mask starts from a causal LM"
        )
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        types = [SLIDING if window else FULL] * int(config.num_hidden_layers)
    unknown = sorted(set(types) - {FULL, SLIDING})
    if unknown:
        raise UnsupportedAttentionError(
            f"{arch}: layer types {unknown} (config.layer_types) are not supported by the soft "
            f"mask; only {FULL!r} and {SLIDING!r} layers are"
        )
    if SLIDING in types and not window:
        raise UnsupportedAttentionError(
            f"{arch}: config.layer_types has sliding layers but config.sliding_window is {window!r}"
        )
    return {kind: (int(window) if kind == SLIDING else None) for kind in dict.fromkeys(types)}


def soft_mask_for_model(
    config: Any,
    attention_mask: torch.Tensor,
    alpha: float,
    variant: Variant = "L_over_i",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The additive mask(s) a model takes as ``attention_mask``: one tensor when all its layers
    are of one kind, else transformers' per-layer-type mapping."""
    masks = {
        kind: additive_soft_mask(attention_mask, alpha, variant, dtype, window)
        for kind, window in attention_layout(config).items()
    }
    return next(iter(masks.values())) if len(masks) == 1 else masks


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0-based positions among real tokens (padding rows get a valid, unused position)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def is_fast(alpha: float, variant: Variant = "L_over_i") -> bool:
    """Whether ``alpha`` needs no soft values: the causal model, or full bidirectional."""
    return alpha == 0.0 or (alpha == 1.0 and variant == "L_over_i")


def soft_masked_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    alpha: float,
    variant: Variant = "L_over_i",
    *,
    dense: bool = False,
) -> torch.Tensor:
    """Last hidden states of a transformers decoder (``AutoModel``: Llama, Qwen2/3, Mistral,
    Gemma 3, GPT-2, ...) run under the soft mask; ``dense=True`` skips the fast path."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    position_ids = position_ids_from_mask(attention_mask)
    if not dense and is_fast(alpha, variant):
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            is_causal=alpha == 0.0,
        ).last_hidden_state
    dtype = next(model.parameters()).dtype
    mask = soft_mask_for_model(model.config, attention_mask, alpha, variant, dtype)
    return model(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids
    ).last_hidden_state


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
