from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conan_embedding.losses import (
    classification_as_retrieval_loss,
    cosent_loss,
    info_nce_loss,
    matryoshka_loss,
)
from conan_embedding.losses.infonce import own_negative_scores


def _naive_info_nce(q, p, negs, tau, in_batch=True):
    """A per-query loop written straight from the formula: the reference implementation."""
    q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    negs = F.normalize(negs, dim=-1)
    total = 0.0
    for i in range(q.shape[0]):
        pos = torch.exp(q[i] @ p[i] / tau)
        cands = [negs.reshape(-1, negs.shape[-1])] if in_batch else [negs[i]]
        if in_batch:
            cands.append(torch.cat([p[:i], p[i + 1 :]]))
        denom = pos + torch.exp(torch.cat(cands) @ q[i] / tau).sum()
        total = total - torch.log(pos / denom)
    return total / q.shape[0]


def test_info_nce_hand_computed_value():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 1.0
    # query 0: pos cos 1, other positive cos 0 -> -log(e / (e + 1))
    expected = -math.log(math.e / (math.e + 1.0))
    assert info_nce_loss(q, p, temperature=tau).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("in_batch", [True, False])
def test_info_nce_matches_naive_loop_value_and_gradients(in_batch):
    torch.manual_seed(0)
    q = torch.randn(5, 8, requires_grad=True)
    p = torch.randn(5, 8, requires_grad=True)
    n = torch.randn(5, 3, 8, requires_grad=True)
    ours = info_nce_loss(q, p, n, temperature=0.05, in_batch=in_batch)
    grads = torch.autograd.grad(ours, [q, p, n])
    ref = _naive_info_nce(q, p, n, 0.05, in_batch=in_batch)
    ref_grads = torch.autograd.grad(ref, [q, p, n])
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_hard_negatives_raise_the_loss():
    torch.manual_seed(1)
    q, p = torch.randn(4, 16), torch.randn(4, 16)
    hard = q.unsqueeze(1) + 0.01 * torch.randn(4, 2, 16)
    assert info_nce_loss(q, p, hard).item() > info_nce_loss(q, p).item()


def test_own_negative_scores_are_cosines():
    q = torch.tensor([[3.0, 0.0]])
    n = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    torch.testing.assert_close(own_negative_scores(q, n), torch.tensor([[1.0, 0.0]]))


def test_cosent_hand_computed_value():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cosines 1 and 0
    scores = torch.tensor([1.0, 5.0])  # gold says pair 1 ranks above pair 0
    tau = 0.5
    expected = math.log(1.0 + math.exp((1.0 - 0.0) / tau))
    assert cosent_loss(a, b, scores, temperature=tau).item() == pytest.approx(expected, rel=1e-6)


def test_cosent_ignores_ties_and_is_zero_free_when_ordered():
    a = torch.eye(3)
    b = torch.eye(3)
    # all cosines equal and gold all equal: no ordered pair -> log(1) = 0
    assert cosent_loss(a, b, torch.tensor([2.0, 2.0, 2.0])).item() == pytest.approx(0.0)


def test_cosent_gradient_matches_explicit_sum():
    torch.manual_seed(2)
    a = torch.randn(6, 8, requires_grad=True)
    b = torch.randn(6, 8, requires_grad=True)
    y = torch.tensor([0.0, 1.0, 2.5, 2.5, 4.0, 5.0])
    ours = cosent_loss(a, b, y)
    ga = torch.autograd.grad(ours, [a, b])
    c = F.cosine_similarity(a, b) / 0.05
    terms = [torch.exp(c[j] - c[i]) for i in range(6) for j in range(6) if y[i] > y[j]]
    ref = torch.log(1 + torch.stack(terms).sum())
    gb = torch.autograd.grad(ref, [a, b])
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for x, z in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, z, rtol=1e-4, atol=1e-6)


def test_classification_never_uses_a_same_label_negative():
    torch.manual_seed(3)
    text, pos = torch.randn(4, 8), torch.randn(4, 8)
    labels = torch.tensor([0, 0, 1, 2])
    negs = torch.randn(4, 2, 8)
    neg_labels = torch.tensor([[1, 2], [1, 2], [0, 2], [0, 1]])
    # Put label-0 candidates right on query 0: query 1's positive, and query 2's label-0 negative.
    moved_pos, moved_negs = pos.clone(), negs.clone()
    moved_pos[1] = text[0] * 10
    moved_negs[2, 0] = text[0] * 10
    base = classification_as_retrieval_loss(text, pos, negs, labels, neg_labels)
    changed = classification_as_retrieval_loss(text, moved_pos, moved_negs, labels, neg_labels)
    assert base.item() != pytest.approx(changed.item())  # other queries do see them
    # query 0's own term is untouched: same-label texts never enter its denominator
    before = _query0_loss(text, pos, negs, labels, neg_labels)
    after = _query0_loss(text, moved_pos, moved_negs, labels, neg_labels)
    assert after.item() == pytest.approx(before.item(), rel=1e-6)
    # and the library's per-batch loss agrees with this reference on the untouched batch
    reference = torch.stack(
        [_query_loss(i, text, pos, negs, labels, neg_labels) for i in range(4)]
    ).mean()
    assert base.item() == pytest.approx(reference.item(), rel=1e-5)


def _query_loss(i, text, pos, negs, labels, neg_labels):
    """Query i's InfoNCE term, built from the formula with an explicit keep-list."""
    t, p = F.normalize(text, dim=-1), F.normalize(pos, dim=-1)
    n = F.normalize(negs.reshape(-1, negs.shape[-1]), dim=-1)
    cands = torch.cat([p[i : i + 1], p, n])
    groups = torch.cat([labels[i : i + 1], labels, neg_labels.reshape(-1)])
    keep = groups != labels[i]
    keep[0] = True
    row = (cands[keep] @ t[i]) / 0.05
    return -(row[0] - torch.logsumexp(row, dim=0))


def _query0_loss(text, pos, negs, labels, neg_labels):
    return _query_loss(0, text, pos, negs, labels, neg_labels)


def test_classification_rejects_a_negative_with_the_query_label():
    with pytest.raises(ValueError, match="own label"):
        classification_as_retrieval_loss(
            torch.randn(2, 4),
            torch.randn(2, 4),
            torch.randn(2, 1, 4),
            torch.tensor([0, 1]),
            torch.tensor([[0], [0]]),
        )


def test_matryoshka_is_weighted_mean_over_truncations():
    torch.manual_seed(4)
    q, p = torch.randn(4, 16), torch.randn(4, 16)
    dims, weights = [4, 8, 16], [1.0, 2.0, 1.0]
    got = matryoshka_loss(info_nce_loss, [q, p], dims, weights)
    parts = [info_nce_loss(q[:, :d], p[:, :d]) for d in dims]
    expected = (parts[0] + 2 * parts[1] + parts[2]) / 4
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_matryoshka_small_dim_trains_only_the_prefix():
    q = torch.randn(4, 16, requires_grad=True)
    p = torch.randn(4, 16)
    (grad,) = torch.autograd.grad(matryoshka_loss(info_nce_loss, [q, p], [4]), [q])
    assert grad[:, 4:].abs().max().item() == 0.0
    assert grad[:, :4].abs().max().item() > 0.0


def test_matryoshka_rejects_dims_wider_than_the_embedding():
    with pytest.raises(ValueError, match="exceeds"):
        matryoshka_loss(info_nce_loss, [torch.randn(2, 8), torch.randn(2, 8)], [16])


# --------------------------------------------------------------------- precision (audit §14)
def _bf16_case():
    """Random fp32 embeddings, as ``encode_with_grad`` returns them under autocast."""
    g = torch.Generator().manual_seed(7)
    q, p = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    negs = torch.randn(6, 3, 32, generator=g)
    gold = torch.rand(6, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    neg_labels = (labels.unsqueeze(1) + torch.tensor([1, 2, 1])) % 3
    return q, p, negs, gold, labels, neg_labels


def _every_loss():
    from conan_embedding.losses.cbb import cbb_info_nce_loss, cbb_loss

    q, p, negs, gold, labels, neg_labels = _bf16_case()
    halves = [negs[:, :1], negs[:, 1:]]
    return {
        "infonce": lambda: info_nce_loss(q, p, negs),
        "cosent": lambda: cosent_loss(q, p, gold),
        "classification": lambda: classification_as_retrieval_loss(q, p, negs, labels, neg_labels),
        "cbb_info_nce": lambda: cbb_info_nce_loss(q, p, halves),
        "cbb": lambda: cbb_loss(q, p, halves, sts=(q, p, gold)),
        "matryoshka": lambda: matryoshka_loss(
            lambda a, b: (a @ b.T).diagonal().mean(), [q, p], [8, 32]
        ),
        "own_negative_scores": lambda: own_negative_scores(q, negs),
        "candidate_scores": lambda: __import__(
            "conan_embedding.losses.infonce", fromlist=["candidate_scores"]
        ).candidate_scores(q, p, negs)[0],
    }


@pytest.mark.parametrize("name", list(_every_loss()))
def test_losses_run_in_float32_under_bf16_autocast(name):
    """Engine.run wraps the step in autocast: the loss math must still be fp32 (cosines
    quantised to bf16 are ~0.05 nats of logit noise at tau = 0.05)."""
    compute = _every_loss()[name]
    reference = compute()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = compute()
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, reference, rtol=0, atol=1e-6)
