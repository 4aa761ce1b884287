"""CoSENT: a ranking loss on cosine similarities for graded (STS) pairs.

For pairs ``(a_i, b_i)`` with gold scores ``y_i`` and cosine ``c_i = cos(a_i, b_i)``::

    L = log( 1 + sum_{(i, j): y_i > y_j} exp( (c_j - c_i) / tau ) )

Every pair that the gold scores order must be ordered the same way by the cosines; pairs
with equal gold score contribute nothing. ``tau = 0.05`` equals sentence-transformers'
``CoSENTLoss(scale=20)``.

Example::

    loss = cosent_loss(emb_a, emb_b, torch.tensor([4.2, 1.0, 3.3]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conan_embedding.losses.precision import float32_loss


@float32_loss
def cosent_loss(
    first: torch.Tensor, second: torch.Tensor, scores: torch.Tensor, *, temperature: float = 0.05
) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    cos = F.cosine_similarity(first, second, dim=-1) / temperature
    # diff[i, j] = c_j - c_i, kept only where gold says i ranks above j
    diff = cos.unsqueeze(0) - cos.unsqueeze(1)
    scores = scores.to(cos.device)
    ordered = scores.unsqueeze(1) > scores.unsqueeze(0)
    diff = diff.masked_fill(~ordered, float("-inf"))
    # log(1 + sum exp(.)) == logsumexp over the terms plus a zero
    terms = torch.cat([torch.zeros(1, dtype=diff.dtype, device=diff.device), diff.flatten()])
    return torch.logsumexp(terms, dim=0)
