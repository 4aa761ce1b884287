"""The CBB loss against a literal loop over the Conan-v1 formula, and the layout-bug check."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conan_embedding.losses.cbb import (
    DEFAULT_BETA,
    cbb_info_nce_loss,
    cbb_loss,
    merge_rank_negatives,
)
from conan_embedding.losses.cosent import cosent_loss
from conan_embedding.losses.infonce import info_nce_loss

TAU = 0.05


def _batch(seed: int = 0, batch: int = 3, n: int = 2, devices: int = 2, dim: int = 8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, dim, generator=gen)
    p = q + 0.5 * torch.randn(batch, dim, generator=gen)
    per_rank = [torch.randn(batch, n, dim, generator=gen) for _ in range(devices)]
    return q, p, per_rank


def reference_cbb(q, p, per_rank, tau=TAU) -> float:
    """The formula term by term: own positive + the query's negatives of every device."""
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(F.cosine_similarity(q[i], p[i], dim=0).item() / tau)
        negs = sum(
            math.exp(F.cosine_similarity(q[i], device[i, j], dim=0).item() / tau)
            for device in per_rank
            for j in range(device.shape[1])
        )
        total += -math.log(pos / (pos + negs))
    return total / q.shape[0]


def reference_in_batch(q, p, per_rank, tau=TAU) -> float:
    """Every positive and every negative of every device in each denominator."""
    candidates = [p[j] for j in range(p.shape[0])]
    candidates += [d[i, j] for d in per_rank for i in range(d.shape[0]) for j in range(d.shape[1])]
    total = 0.0
    for i in range(q.shape[0]):
        exps = [math.exp(F.cosine_similarity(q[i], c, dim=0).item() / tau) for c in candidates]
        total += -math.log(exps[i] / sum(exps))
    return total / q.shape[0]


def test_cbb_matches_the_paper_formula_term_by_term():
    q, p, per_rank = _batch(devices=3)
    got = cbb_info_nce_loss(q, p, per_rank, temperature=TAU, in_batch=False)
    assert got.item() == pytest.approx(reference_cbb(q, p, per_rank), rel=1e-5)
    got_in_batch = cbb_info_nce_loss(q, p, per_rank, temperature=TAU, in_batch=True)
    assert got_in_batch.item() == pytest.approx(reference_in_batch(q, p, per_rank), rel=1e-5)


def test_every_devices_negatives_enter_the_denominator():
    q, p, per_rank = _batch(devices=2)
    one = cbb_info_nce_loss(q, p, per_rank[:1], in_batch=False)
    both = cbb_info_nce_loss(q, p, per_rank, in_batch=False)
    # more negatives can only grow each denominator
    assert both.item() > one.item()
    assert one.item() == pytest.approx(info_nce_loss(q, p, per_rank[0], in_batch=False).item())


# -- the layout bug: candidates gathered as per-device blocks [P, N] read P N N P N N ----------
def layout_merged(p, per_rank):
    """Ours: positives once, then negatives merged per query (P P P N N N)."""
    negatives = merge_rank_negatives(per_rank)
    return torch.cat([p, negatives.reshape(-1, negatives.shape[-1])])


def layout_interleaved_blocks(p, per_rank):
    """sentence-transformers' bug: each device's [P, N] block gathered and concatenated."""
    return torch.cat([torch.cat([p, d.reshape(-1, d.shape[-1])]) for d in per_rank])


def layout_device_major(p, per_rank):
    """Negatives concatenated device by device, then read as if query-major (wrong owner)."""
    stacked = torch.cat([d.reshape(-1, d.shape[-1]) for d in per_rank])
    return torch.cat([p, stacked])


def _loss_from_layout(q, p, per_rank, layout) -> float:
    """InfoNCE over a flat candidate matrix with labels 0..B-1 (positives assumed first) and
    each query restricted to its own positive and its own negatives (read query-major)."""
    candidates = layout(p, per_rank)
    batch, n_total = q.shape[0], sum(d.shape[1] for d in per_rank)
    logits = F.normalize(q, dim=-1) @ F.normalize(candidates, dim=-1).T / TAU
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for i in range(batch):
        keep[i, i] = True
        start = batch + i * n_total
        keep[i, start : start + n_total] = True
    return F.cross_entropy(logits.masked_fill(~keep, float("-inf")), torch.arange(batch)).item()


@pytest.mark.parametrize(
    "layout",
    [
        layout_merged,
        pytest.param(
            layout_interleaved_blocks,
            marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason="P N N P N N bug"),
        ),
        pytest.param(
            layout_device_major,
            marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason="wrong owner"),
        ),
    ],
)
def test_candidate_layout_matches_the_formula(layout):
    """Fails (strict xfail) for a wrong layout: the check really discriminates layouts."""
    q, p, per_rank = _batch(seed=4, batch=4, n=2, devices=2)
    # the interleaved layout has as many columns as the right one needs when the query's
    # negatives are looked up at B + i * N * n, so the comparison is value against value
    assert _loss_from_layout(q, p, per_rank, layout) == pytest.approx(
        reference_cbb(q, p, per_rank), rel=1e-5
    )
    # and our loss function agrees with the same reference
    assert cbb_info_nce_loss(q, p, per_rank, in_batch=False).item() == pytest.approx(
        reference_cbb(q, p, per_rank), rel=1e-5
    )


def test_cbb_loss_adds_beta_times_cosent():
    q, p, per_rank = _batch()
    gen = torch.Generator().manual_seed(9)
    a, b = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    gold = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    expected = cbb_info_nce_loss(q, p, per_rank) + DEFAULT_BETA * cosent_loss(a, b, gold)
    assert DEFAULT_BETA == 0.8
    assert cbb_loss(q, p, per_rank, sts=(a, b, gold)).item() == pytest.approx(expected.item())


def test_gradient_reaches_every_devices_negatives():
    q, p, per_rank = _batch()
    per_rank = [d.clone().requires_grad_(True) for d in per_rank]
    cbb_info_nce_loss(q, p, per_rank).backward()
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in per_rank)


def test_mismatched_devices_are_rejected():
    q, p, per_rank = _batch()
    with pytest.raises(ValueError, match="device 1"):
        merge_rank_negatives([per_rank[0], per_rank[1][:2]])
    with pytest.raises(ValueError, match="at least one device"):
        merge_rank_negatives([])
