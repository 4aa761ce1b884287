"""Cross-GPU batch balance (CBB) loss: one InfoNCE denominator over every device's negatives.

Why: multi-task training that draws one random task per iteration makes consecutive steps
pull the model in different directions (the Conan-v1 paper reports a final loss of 0.38 that
way). CBB puts every task in every step instead: retrieval runs on ``N`` devices that hold the
*same* queries and positives but *different* hard negatives, STS runs on another device with a
larger batch, and one optimiser step follows the sum. Because the negatives of all ``N``
devices enter each query's denominator, a query meets ``N`` times more hard negatives than
fit on one device (Conan-v1 reports 0.08 with CBB).

The loss (Conan-v1, eq. CBB; ``s`` the cosine, ``y_kj-`` the ``j``-th negative of device ``k``)::

    L_CBB = -1/B * sum_i log( e^{s(x_i, y_i+)/tau}
                              / (e^{s(x_i, y_i+)/tau} + sum_{k=1..N} sum_{j=1..n} e^{s(x_i, y_kj-)/tau}) )
            + beta * L_CoSENT,                                              beta = 0.8

How: the retrieval part is :func:`~conan_embedding.losses.infonce.info_nce_loss` applied to the
negatives of all devices merged *per query* (:func:`merge_rank_negatives`); the STS part is
:func:`~conan_embedding.losses.cosent.cosent_loss`. Nothing is re-derived here: CBB is a
statement about which candidates a denominator holds, so this module only builds that
candidate layout, and :mod:`conan_embedding.training.cbb` supplies the per-device
negatives (gathered with gradient across processes, or computed by virtual devices in one
process).

The layout matters. ``info_nce_loss`` expects candidates ``[p_1..p_B, n_11..n_Bn]`` with the
positive of query ``i`` in column ``i``. Gathering whole per-device blocks ``[P, N]`` and
concatenating them gives ``P N N P N N``, while labels ``0..B-1`` assume ``P P P N N N``: the
second device's positives become negatives and, when devices hold different queries, labels
point at the wrong texts (a bug sentence-transformers shipped). Here only negatives are
gathered and merged along the per-query axis, so positives stay first;
``tests/test_cbb.py`` checks the result against a literal loop over the formula and shows the
interleaved layout failing that check.

False-negative control (``false_negative_margin``, ``query_negatives``, ``passage_negatives``;
:mod:`conan_embedding.losses.infonce` has the formula) applies to the merged candidates, so a
negative of any device scoring above ``s(x_i, y_i+) + m`` leaves the one denominator it sits
in, exactly as in one device's loss over the same candidates. The query-query and
passage-passage terms need no gathering: every device of a task holds the whole batch's
queries and positives (the CBB contract), so those terms are the one-device terms.

Example::

    per_rank = [negs_rank0, negs_rank1]          # each [B, n, d], same queries
    loss = cbb_loss(q, p, per_rank, sts=(a, b, gold), beta=0.8)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from conan_embedding.losses.cosent import cosent_loss
from conan_embedding.losses.infonce import info_nce_loss_with_count
from conan_embedding.losses.precision import float32_loss

DEFAULT_BETA = 0.8
"""Weight of the CoSENT term in Conan-v1's CBB loss."""


def merge_rank_negatives(per_rank: Sequence[torch.Tensor]) -> torch.Tensor:
    """Negatives of ``N`` devices ``[B, n_k, d]`` -> ``[B, sum_k n_k, d]``, query by query.

    Query ``i`` gets device 0's negatives of ``i``, then device 1's, ...; all devices must hold
    the same ``B`` queries (the CBB contract), which is checked.
    """
    if not per_rank:
        raise ValueError("merge_rank_negatives needs the negatives of at least one device")
    batch = per_rank[0].shape[0]
    for k, negatives in enumerate(per_rank):
        if negatives.ndim != 3 or negatives.shape[0] != batch:
            raise ValueError(
                f"device {k}: negatives must be [B={batch}, n, d], got {tuple(negatives.shape)}"
            )
    return torch.cat(list(per_rank), dim=1)


@float32_loss
def cbb_info_nce_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    per_rank_negatives: Sequence[torch.Tensor],
    *,
    temperature: float = 0.05,
    in_batch: bool = True,
    groups: torch.Tensor | None = None,
    negative_groups: torch.Tensor | None = None,
    false_negative_margin: float | None = None,
    query_negatives: bool = False,
    passage_negatives: bool = False,
) -> torch.Tensor:
    """The retrieval term of ``L_CBB``: InfoNCE whose denominators hold every device's negatives.

    ``in_batch=False`` is the paper's formula exactly (a query's own positive and its negatives
    from all ``N`` devices); ``in_batch=True`` adds the other queries' positives and negatives,
    as :func:`~conan_embedding.losses.infonce.info_nce_loss` does on one device.
    ``negative_groups`` is ``[B, sum_k n_k]`` in the merged order (device-major per query).
    The false-negative options are those of :func:`cbb_info_nce_loss_with_count`.
    """
    loss, _ = cbb_info_nce_loss_with_count(
        query,
        positive,
        per_rank_negatives,
        temperature=temperature,
        in_batch=in_batch,
        groups=groups,
        negative_groups=negative_groups,
        false_negative_margin=false_negative_margin,
        query_negatives=query_negatives,
        passage_negatives=passage_negatives,
    )
    return loss


@float32_loss
def cbb_info_nce_loss_with_count(
    query: torch.Tensor,
    positive: torch.Tensor,
    per_rank_negatives: Sequence[torch.Tensor],
    *,
    temperature: float = 0.05,
    in_batch: bool = True,
    groups: torch.Tensor | None = None,
    negative_groups: torch.Tensor | None = None,
    false_negative_margin: float | None = None,
    query_negatives: bool = False,
    passage_negatives: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cbb_info_nce_loss` and the number of denominator terms the false-negative margin
    removed over the merged candidates (see
    :func:`~conan_embedding.losses.infonce.info_nce_loss_with_count`). No devices, or devices
    without negatives: the in-batch / own-positive InfoNCE of one device."""
    negatives = merge_rank_negatives(per_rank_negatives) if per_rank_negatives else None
    if negatives is not None and not negatives.shape[1]:
        negatives = None
    return info_nce_loss_with_count(
        query,
        positive,
        negatives,
        temperature=temperature,
        in_batch=in_batch,
        groups=groups,
        negative_groups=negative_groups if negatives is not None else None,
        false_negative_margin=false_negative_margin,
        query_negatives=query_negatives,
        passage_negatives=passage_negatives,
    )


@float32_loss
def cbb_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    per_rank_negatives: Sequence[torch.Tensor],
    *,
    sts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    beta: float = DEFAULT_BETA,
    temperature: float = 0.05,
    in_batch: bool = True,
) -> torch.Tensor:
    """``L_CBB`` for one step: the cross-device InfoNCE plus ``beta`` times CoSENT on ``sts``.

    ``sts`` is ``(first, second, gold_scores)`` of the STS device's batch (or ``None``).
    """
    loss = cbb_info_nce_loss(
        query, positive, per_rank_negatives, temperature=temperature, in_batch=in_batch
    )
    if sts is not None:
        first, second, gold = sts
        loss = loss + beta * cosent_loss(first, second, gold, temperature=temperature)
    return loss
