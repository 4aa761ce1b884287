"""InfoNCE with in-batch and hard negatives (Conan v1/v2 retrieval, weak stage, CLR).

For a batch of ``B`` queries ``q_i``, their positives ``p_i`` and ``n`` hard negatives each
``n_ik``, with ``s`` the cosine similarity and ``tau`` the temperature::

    L = -1/B * sum_i log( exp(s(q_i, p_i)/tau) / sum_{c in C_i} exp(s(q_i, c)/tau) )

where the candidate set ``C_i`` holds ``p_i``, every hard negative in the batch (``n_jk`` for
all ``j``, so a query also meets the other queries' negatives) and, with ``in_batch=True``,
every other query's positive ``p_j``. Without in-batch negatives, ``C_i = {p_i} ∪ {n_ik}``.

Candidates that share a *group* with the query (for example the same class label in
classification-as-retrieval) are removed from its denominator, apart from its own positive,
so a same-label text is never pushed away.

Inputs are raw embeddings; they are L2-normalised here. Shapes: ``query`` ``[B, d]``,
``positive`` ``[B, d]``, ``negatives`` ``[B, n, d]`` (or ``None``).

Data parallel (candidates gathered from every rank): a rank passes only its own ``B_r``
queries with ``query_offset`` = the index of its first query in the gathered batch, so query
``j`` is row ``query_offset + j`` of the candidates; the mean over a rank's queries, averaged
over ranks, is the loss of the whole batch. Helper tensors (labels, groups) are put on the
scores' device here, so callers may build them anywhere.

Example::

    loss = info_nce_loss(q, p, negs, temperature=0.05)
    loss.backward()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conan_embedding.losses.precision import float32_loss


@float32_loss
def candidate_scores(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor | None = None,
    query_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores of each query against the candidates, and the index of its positive.

    Candidates are laid out as ``[p_1 .. p_B, n_11 .. n_1n, n_21 .. n_Bn]`` (positives first,
    then negatives query by query), so the positive of query ``i`` is column
    ``query_offset + i``.
    """
    query = F.normalize(query, dim=-1)
    candidates = [F.normalize(positive, dim=-1)]
    if negatives is not None and negatives.numel():
        candidates.append(F.normalize(negatives.reshape(-1, negatives.shape[-1]), dim=-1))
    scores = query @ torch.cat(candidates).T
    labels = torch.arange(query.shape[0], device=scores.device) + query_offset
    return scores, labels


@float32_loss
def info_nce_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    temperature: float = 0.05,
    in_batch: bool = True,
    groups: torch.Tensor | None = None,
    negative_groups: torch.Tensor | None = None,
    query_offset: int = 0,
) -> torch.Tensor:
    """Mean InfoNCE over the batch (see the module docstring for the formula).

    ``groups`` (``[B]``) labels each query and its positive; ``negative_groups`` (``[B, n]``)
    labels the hard negatives. A candidate whose group equals the query's is left out of the
    query's denominator unless it is the query's own positive.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    batch = positive.shape[0]
    scores, labels = candidate_scores(query, positive, negatives, query_offset)
    logits = scores / temperature
    n_neg = 0 if negatives is None else negatives.shape[0] * negatives.shape[1]
    device = logits.device
    rows = torch.arange(query.shape[0], device=device)

    drop = torch.zeros_like(logits, dtype=torch.bool)
    if not in_batch:
        drop[:, :batch] = torch.arange(batch, device=device).unsqueeze(0) != labels.unsqueeze(1)
        if n_neg:
            # only a query's own negatives remain
            owner = torch.arange(batch, device=device).repeat_interleave(negatives.shape[1])
            drop[:, batch:] = owner.unsqueeze(0) != labels.unsqueeze(1)
    if groups is not None:
        groups = groups.to(device)
        candidate_groups = [groups]
        if n_neg:
            if negative_groups is None:
                raise ValueError("negative_groups is required with groups and hard negatives")
            candidate_groups.append(negative_groups.to(device).reshape(-1))
        same = groups[labels].unsqueeze(1) == torch.cat(candidate_groups).unsqueeze(0)
        same[rows, labels] = False
        drop |= same
    logits = logits.masked_fill(drop, float("-inf"))
    return F.cross_entropy(logits, labels)


@float32_loss
def own_negative_scores(query: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """``cos(q_i, n_ik)`` for each query's own negatives, shape ``[B, n]`` (for DHNM)."""
    return torch.einsum("bd,bnd->bn", F.normalize(query, dim=-1), F.normalize(negatives, dim=-1))
