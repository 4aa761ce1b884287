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

False-negative control (optional; issue #26 item 4, the gte / Qwen3-Embedding rule). With
``p_i`` the positive, ``m`` the margin (``false_negative_margin``) and ``tau`` the temperature,
the denominator of query ``i`` becomes::

    Z_i = e^{s(q_i,p_i)/tau}
          + sum_{c in C_i, c != p_i}  m_ic  e^{s(q_i, c)/tau}           (hard and in-batch)
          + [query_negatives]   sum_{j != i}  m^q_ij e^{s(q_i, q_j)/tau}    (query-query)
          + [passage_negatives] sum_{j != i}  m^p_ij e^{s(p_i, p_j)/tau}    (passage-passage)

    L = -1/B * sum_i log( e^{s(q_i,p_i)/tau} / Z_i )

    m_ic   = 0 if s(q_i, c)   > s(q_i, p_i) + m, else 1
    m^q_ij = 0 if s(q_i, q_j) > s(q_i, p_i) + m, else 1
    m^p_ij = 0 if s(q_i, p_j) > s(q_i, p_i) + m, else 1

(``m = None``: every ``m`` is 1.) The own positive is never masked. ``j`` runs over every
query of the (gathered) batch; the passage-passage term pairs ``p_i`` with the *other
queries' positives* only (gte's "improved contrastive loss", Li et al. 2023,
arXiv:2308.03281, whose denominator also holds a reverse ``s(q_j, p_i)`` term that is
not implemented here). The passage-passage mask reads the Qwen3-Embedding report
(arXiv:2506.05176, training objective) literally: "``s_ij`` is the corresponding score of ``q_i, d_j`` or
``q_i, q_j``", so ``p_j`` leaves ``p_i``'s term when it is a false negative *for q_i*
(comparing ``s(p_i, p_j)`` with a query-passage threshold would mask most passage pairs,
which sit higher on the cosine scale); ms-swift's ``INFONCE_INCLUDE_DD`` applies no margin to
that term at all. Qwen3-Embedding uses ``m = 0.1`` (the report's ``m_ij`` definition; ms-swift's
``INFONCE_MASK_FAKE_NEGATIVE`` / ``INFONCE_FAKE_NEG_MARGIN`` default). Groups apply to the new
terms as to the candidates: ``q_j`` and ``p_j`` of the query's own group leave its
denominator. The number of terms the margin removed (beyond those groups and ``in_batch``
already leave out) is what :func:`info_nce_loss_with_count` returns beside the loss. Under
Matryoshka the rule is evaluated at each truncation on that truncation's scores.

Example::

    loss = info_nce_loss(q, p, negs, temperature=0.05)
    loss.backward()
    loss, masked = info_nce_loss_with_count(q, p, negs, false_negative_margin=0.1,
                                            query_negatives=True, passage_negatives=True)
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
    false_negative_margin: float | None = None,
    query_negatives: bool = False,
    passage_negatives: bool = False,
    all_queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean InfoNCE over the batch (see the module docstring for the formula).

    ``groups`` (``[B]``) labels each query and its positive; ``negative_groups`` (``[B, n]``)
    labels the hard negatives. A candidate whose group equals the query's is left out of the
    query's denominator unless it is the query's own positive. The false-negative options are
    those of :func:`info_nce_loss_with_count`, which also returns how many terms they masked.
    """
    loss, _ = info_nce_loss_with_count(
        query,
        positive,
        negatives,
        temperature=temperature,
        in_batch=in_batch,
        groups=groups,
        negative_groups=negative_groups,
        query_offset=query_offset,
        false_negative_margin=false_negative_margin,
        query_negatives=query_negatives,
        passage_negatives=passage_negatives,
        all_queries=all_queries,
    )
    return loss


@float32_loss
def info_nce_loss_with_count(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    temperature: float = 0.05,
    in_batch: bool = True,
    groups: torch.Tensor | None = None,
    negative_groups: torch.Tensor | None = None,
    query_offset: int = 0,
    false_negative_margin: float | None = None,
    query_negatives: bool = False,
    passage_negatives: bool = False,
    all_queries: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`info_nce_loss` and the number of denominator terms the false-negative margin
    removed (a 0-d integer tensor on the scores' device; summed over this call's queries).

    ``false_negative_margin`` (``m``, None = off) masks every term scoring above
    ``s(q_i, p_i) + m``; ``query_negatives`` adds the other queries ``q_j`` to query ``i``'s
    denominator and ``passage_negatives`` the other positives against its positive,
    ``s(p_i, p_j)`` (module docstring). Data parallel: ``all_queries`` (``[B, d]``, every
    rank's queries in batch order, this rank's at rows ``query_offset ..``) is needed for
    ``query_negatives`` when ``query`` is only part of the batch; it defaults to ``query``.
    With every option off the loss is exactly the plain InfoNCE and the count 0.
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
    same_group: torch.Tensor | None = None
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
        same_group = same[:, :batch]  # [B_r, B]: q_j / p_j of the query's own group
    masked = torch.zeros((), dtype=torch.long, device=device)
    if not (false_negative_margin is not None or query_negatives or passage_negatives):
        logits = logits.masked_fill(drop, float("-inf"))
        return F.cross_entropy(logits, labels), masked

    # false-negative control: extra blocks of terms, each with its own mask
    too_high: torch.Tensor | None = None  # [B_r, C]: s(q_i, c) > s(q_i, p_i) + m
    if false_negative_margin is not None:
        threshold = scores[rows, labels].unsqueeze(1) + false_negative_margin
        too_high = scores > threshold
        too_high[rows, labels] = False  # the own positive stays, whatever the margin
        masked = masked + (too_high & ~drop).sum()
        drop = drop | too_high
    others = torch.arange(batch, device=device).unsqueeze(0) == labels.unsqueeze(1)  # j == i
    if same_group is not None:
        others = others | same_group
    blocks, drops = [logits], [drop]
    if query_negatives:
        if all_queries is None:
            if query_offset or query.shape[0] != batch:
                raise ValueError(
                    "query_negatives with part of the batch (query_offset) needs all_queries, "
                    "every rank's queries in batch order"
                )
            all_queries = query
        if all_queries.shape[0] != batch:
            raise ValueError(f"all_queries has {all_queries.shape[0]} rows, the batch {batch}")
        qq = F.normalize(query, dim=-1) @ F.normalize(all_queries, dim=-1).T  # [B_r, B]
        qq_drop = others.clone()
        if false_negative_margin is not None:
            qq_high = qq > threshold
            masked = masked + (qq_high & ~qq_drop).sum()
            qq_drop |= qq_high
        blocks.append(qq / temperature)
        drops.append(qq_drop)
    if passage_negatives:
        passages = F.normalize(positive, dim=-1)
        pp = passages[labels] @ passages.T  # [B_r, B]: s(p_i, p_j)
        pp_drop = others.clone()
        if too_high is not None:  # p_j is a false negative for q_i (module docstring)
            pp_high = too_high[:, :batch]
            masked = masked + (pp_high & ~pp_drop).sum()
            pp_drop |= pp_high
        blocks.append(pp / temperature)
        drops.append(pp_drop)
    logits = torch.cat(blocks, dim=1).masked_fill(torch.cat(drops, dim=1), float("-inf"))
    return F.cross_entropy(logits, labels), masked


@float32_loss
def own_negative_scores(query: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """``cos(q_i, n_ik)`` for each query's own negatives, shape ``[B, n]`` (for DHNM)."""
    return torch.einsum("bd,bnd->bn", F.normalize(query, dim=-1), F.normalize(negatives, dim=-1))
