"""Classification cast as retrieval (Conan v1/v2 supervised stage).

A text ``x_i`` with label ``y_i`` is the query; another text of the same label is its
positive; texts of other labels are its hard negatives. The loss is InfoNCE
(:mod:`conan_embedding.losses.infonce`) with the label as the *group*, so no text of the
query's own label ever lands in its denominator, in-batch or hard::

    L = -1/B * sum_i log( exp(s(x_i, x_i+)/tau)
                          / (exp(s(x_i, x_i+)/tau) + sum_{c : label(c) != y_i} exp(s(x_i, c)/tau)) )

Labels are integers here (the sampler maps label strings to ids).
"""

from __future__ import annotations

import torch

from conan_embedding.losses.infonce import info_nce_loss
from conan_embedding.losses.precision import float32_loss


@float32_loss
def classification_as_retrieval_loss(
    text: torch.Tensor,
    same_label: torch.Tensor,
    other_labels: torch.Tensor | None,
    labels: torch.Tensor,
    other_label_ids: torch.Tensor | None,
    *,
    temperature: float = 0.05,
    query_offset: int = 0,
) -> torch.Tensor:
    """``text``/``same_label`` ``[B, d]``, ``other_labels`` ``[B, n, d]``, ``labels`` ``[B]``,
    ``other_label_ids`` ``[B, n]``; with ``query_offset`` the texts are rows
    ``query_offset ..`` of a batch gathered from every rank (see ``info_nce_loss``)."""
    if other_labels is not None and other_label_ids is not None:
        mine = slice(query_offset, query_offset + text.shape[0])
        own = labels[mine].unsqueeze(1) == other_label_ids[mine]
        if own.any():
            raise ValueError("a hard negative carries the query's own label")
    labels = labels.to(text.device)
    if other_label_ids is not None:
        other_label_ids = other_label_ids.to(text.device)
    return info_nce_loss(
        text,
        same_label,
        other_labels,
        temperature=temperature,
        groups=labels,
        negative_groups=other_label_ids,
        query_offset=query_offset,
    )
