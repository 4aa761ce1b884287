"""False-negative control in InfoNCE (issue #26 item 4): the margin mask (gte / Qwen3-Embedding),
query-query and passage-passage negatives, checked against a loop written from the formula in
``losses/infonce.py``'s docstring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from conan_embedding.config import TaskConfig, TrainConfig
from conan_embedding.losses import info_nce_loss, info_nce_loss_with_count, matryoshka_loss


def _loop_info_nce(
    q: torch.Tensor,
    p: torch.Tensor,
    negs: torch.Tensor | None,
    tau: float,
    *,
    margin: float | None = None,
    in_batch: bool = True,
    query_negatives: bool = False,
    passage_negatives: bool = False,
    groups: list[int] | None = None,
    neg_groups: list[list[int]] | None = None,
) -> tuple[torch.Tensor, int]:
    """The reference: one query at a time, one denominator term at a time."""
    q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    negs = F.normalize(negs, dim=-1) if negs is not None else None
    batch = q.shape[0]
    n = 0 if negs is None else negs.shape[1]
    total, count = q.new_zeros(()), 0

    def group_of(j: int, k: int | None = None) -> int | None:
        if groups is None:
            return None
        return groups[j] if k is None else neg_groups[j][k]

    for i in range(batch):
        s_pos = q[i] @ p[i]
        limit = None if margin is None else s_pos.item() + margin
        own = None if groups is None else groups[i]
        terms, masked = [s_pos], [0]

        def add(
            score: torch.Tensor,
            group: int | None,
            by: torch.Tensor | None,
            *,
            own=own,
            limit=limit,
            terms=terms,
            masked=masked,
        ) -> None:
            """Append ``score`` unless its group is the query's or ``by`` (default: ``score``,
            the query's score of the candidate) is above the positive by the margin."""
            if own is not None and group == own:
                return
            if limit is not None and (score if by is None else by).item() > limit:
                masked[0] += 1
                return
            terms.append(score)

        for j in range(batch):  # in-batch positives
            if j != i and in_batch:
                add(q[i] @ p[j], group_of(j), None)
        for j in range(batch):  # hard negatives: every query's (own only without in_batch)
            for k in range(n):
                if in_batch or j == i:
                    add(q[i] @ negs[j, k], group_of(j, k), None)
        if query_negatives:
            for j in range(batch):
                if j != i:
                    add(q[i] @ q[j], group_of(j), None)
        if passage_negatives:  # masked when p_j is a false negative for q_i
            for j in range(batch):
                if j != i:
                    add(p[i] @ p[j], group_of(j), q[i] @ p[j])
        count += masked[0]
        logits = torch.stack(terms) / tau
        total = total - (logits[0] - torch.logsumexp(logits, dim=0))
    return total / batch, count


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# --------------------------------------------------------------------------- hand-built batch
def _hand_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query at 0 degrees; its positive at cos 0.5; a hard negative at cos 0.9 (above the
    positive by 0.4: a false negative for m = 0.1) and one at cos 0.55 (within the margin)."""
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([_unit(60.0)])
    negs = torch.tensor(
        [[_unit(math.degrees(math.acos(0.9))), _unit(-math.degrees(math.acos(0.55)))]]
    )
    return q, p, negs


def test_a_negative_above_the_positive_by_more_than_the_margin_is_masked():
    q, p, negs = _hand_batch()
    tau = 0.5
    loss, masked = info_nce_loss_with_count(q, p, negs, temperature=tau, false_negative_margin=0.1)
    # by hand: the 0.9 negative leaves the denominator, the 0.55 one (0.05 above) stays
    expected = -math.log(math.exp(0.5 / tau) / (math.exp(0.5 / tau) + math.exp(0.55 / tau)))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert int(masked) == 1
    without = -math.log(
        math.exp(0.5 / tau) / (math.exp(0.5 / tau) + math.exp(0.55 / tau) + math.exp(0.9 / tau))
    )
    assert info_nce_loss(q, p, negs, temperature=tau).item() == pytest.approx(without, abs=1e-6)
    # a margin wider than 0.4 keeps both
    loss, masked = info_nce_loss_with_count(q, p, negs, temperature=tau, false_negative_margin=0.5)
    assert loss.item() == pytest.approx(without, abs=1e-6) and int(masked) == 0


def test_the_own_positive_is_never_masked():
    q, p, negs = _hand_batch()
    # a negative identical to the positive is not *above* it: kept at m = 0
    twin = torch.cat([p.unsqueeze(1), negs], dim=1)
    _, masked = info_nce_loss_with_count(q, p, twin, false_negative_margin=0.0)
    assert int(masked) == 2  # the 0.9 and 0.55 ones, not the twin (0.5)
    # a margin below zero (the loss allows it; the config does not) masks every other term,
    # and the positive alone is left: loss 0
    q2, p2 = torch.randn(3, 8), torch.randn(3, 8)
    negs2 = torch.randn(3, 2, 8)
    loss, masked = info_nce_loss_with_count(
        q2, p2, negs2, false_negative_margin=-10.0, query_negatives=True, passage_negatives=True
    )
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # per query: 2 other positives + 6 negatives + 2 queries + 2 passages
    assert int(masked) == 3 * (2 + 6 + 2 + 2)


def test_option_off_is_exactly_todays_loss():
    torch.manual_seed(0)
    q, p, n = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 3, 8)
    groups = torch.tensor([0, 1, 0, 2, 3])
    neg_groups = torch.tensor([[1, 4, 5], [6, 0, 7], [8, 9, 1], [10, 11, 12], [13, 14, 3]])
    for kwargs in ({}, {"in_batch": False}, {"groups": groups, "negative_groups": neg_groups}):
        today = info_nce_loss(q, p, n, **kwargs)
        off, masked = info_nce_loss_with_count(q, p, n, **kwargs)
        assert torch.equal(off, today) and int(masked) == 0
        # a margin nothing reaches changes no bit either
        wide, masked = info_nce_loss_with_count(q, p, n, false_negative_margin=10.0, **kwargs)
        assert torch.equal(wide, today) and int(masked) == 0
    ref, _ = _loop_info_nce(q, p, n, 0.05)
    assert info_nce_loss(q, p, n).item() == pytest.approx(ref.item(), rel=1e-5)


# --------------------------------------------------------------------------- against the loop
CASES = [
    {"margin": 0.1},
    {"margin": 0.0, "in_batch": False},
    {"query_negatives": True},
    {"passage_negatives": True},
    {"margin": 0.1, "query_negatives": True, "passage_negatives": True},
    {"margin": 0.05, "query_negatives": True, "passage_negatives": True, "in_batch": False},
]


def _random_batch(seed: int = 0, batch: int = 6, n: int = 3, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, d, generator=g).requires_grad_()
    p = torch.randn(batch, d, generator=g).requires_grad_()
    negs = torch.randn(batch, n, d, generator=g).requires_grad_()
    return q, p, negs


def _options(case: dict) -> dict:
    return {
        "false_negative_margin": case.get("margin"),
        "in_batch": case.get("in_batch", True),
        "query_negatives": case.get("query_negatives", False),
        "passage_negatives": case.get("passage_negatives", False),
    }


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("with_groups", [False, True])
def test_matches_the_loop_value_gradients_and_count(case, with_groups):
    q, p, negs = _random_batch()
    groups = [0, 1, 0, 2, 3, 1] if with_groups else None
    neg_groups = [[5, 0, 6], [7, 8, 9], [10, 2, 11], [12, 13, 14], [15, 16, 3], [1, 17, 18]]
    kwargs = _options(case)
    if with_groups:
        kwargs |= {"groups": torch.tensor(groups), "negative_groups": torch.tensor(neg_groups)}
    ours, masked = info_nce_loss_with_count(q, p, negs, temperature=0.05, **kwargs)
    ref, count = _loop_info_nce(
        q,
        p,
        negs,
        0.05,
        margin=case.get("margin"),
        in_batch=case.get("in_batch", True),
        query_negatives=case.get("query_negatives", False),
        passage_negatives=case.get("passage_negatives", False),
        groups=groups,
        neg_groups=neg_groups if with_groups else None,
    )
    if case.get("margin") is not None:
        assert count > 0  # the case really masks something
    assert int(masked) == count
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    for a, b in zip(
        torch.autograd.grad(ours, [q, p, negs]),
        torch.autograd.grad(ref, [q, p, negs]),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_query_and_passage_terms_by_hand():
    """Two queries on the unit circle: the extra terms of query 0 written out."""
    q = torch.tensor([_unit(0.0), _unit(90.0)])
    p = torch.tensor([_unit(30.0), _unit(120.0)])
    tau = 1.0
    c = math.cos
    r = math.radians
    s_pos = c(r(30))
    in_batch = c(r(120))  # q0 . p1
    qq = c(r(90))  # q0 . q1
    pp = c(r(90))  # p0 . p1
    expected0 = -math.log(
        math.exp(s_pos) / (math.exp(s_pos) + math.exp(in_batch) + math.exp(qq) + math.exp(pp))
    )
    # query 1 is symmetric (rotated by 90 degrees), except its in-batch term q1 . p0 = cos 60
    expected1 = -math.log(
        math.exp(s_pos) / (math.exp(s_pos) + math.exp(c(r(60))) + math.exp(qq) + math.exp(pp))
    )
    loss = info_nce_loss(q, p, temperature=tau, query_negatives=True, passage_negatives=True)
    assert loss.item() == pytest.approx((expected0 + expected1) / 2, abs=1e-6)
    # query 1's in-batch candidate p0 scores cos 60 = 0.5 < cos 30 + m: a margin of 0 keeps
    # it; move p0 to 85 degrees (q1 . p0 = cos 5 > cos 30): then p0 leaves q1's in-batch term
    # *and* its passage term s(p1, p0)
    p_close = torch.tensor([_unit(85.0), _unit(120.0)])
    _, masked = info_nce_loss_with_count(
        q, p_close, false_negative_margin=0.0, passage_negatives=True
    )
    assert int(masked) == 2


# --------------------------------------------------------------------------- composition
@pytest.mark.parametrize("case", CASES[-2:], ids=str)
def test_ranks_with_query_offset_add_up_to_the_whole_batch(case):
    """Data parallel: each rank passes its own queries, every rank's candidates (and queries,
    for the query-query term); the mean over ranks is the whole batch's loss, counts add up."""
    q, p, negs = _random_batch(seed=3)
    kwargs = _options(case)
    whole, masked = info_nce_loss_with_count(q, p, negs, **kwargs)
    halves = [
        info_nce_loss_with_count(
            q[r * 3 : (r + 1) * 3], p, negs, query_offset=r * 3, all_queries=q, **kwargs
        )
        for r in range(2)
    ]
    torch.testing.assert_close((halves[0][0] + halves[1][0]) / 2, whole)
    assert int(halves[0][1] + halves[1][1]) == int(masked) > 0
    g_whole = torch.autograd.grad(whole, [q, p, negs])
    g_ranks = torch.autograd.grad((halves[0][0] + halves[1][0]) / 2, [q, p, negs])
    for a, b in zip(g_whole, g_ranks, strict=True):
        torch.testing.assert_close(a, b)


def test_query_negatives_on_part_of_a_batch_need_all_queries():
    q, p, negs = _random_batch()
    with pytest.raises(ValueError, match="all_queries"):
        info_nce_loss(q[3:], p, negs, query_offset=3, query_negatives=True)


def test_matryoshka_applies_the_rule_at_each_width():
    q, p, negs = _random_batch(seed=5, d=16)
    dims = [4, 16]
    counts: dict[int, int] = {}

    def loss_fn(qe, pe, ne):
        value, counts[qe.shape[-1]] = info_nce_loss_with_count(
            qe, pe, ne, false_negative_margin=0.1, query_negatives=True, passage_negatives=True
        )
        return value

    got = matryoshka_loss(loss_fn, [q, p, negs], dims)
    parts = [
        _loop_info_nce(
            q[:, :d],
            p[:, :d],
            negs[..., :d],
            0.05,
            margin=0.1,
            query_negatives=True,
            passage_negatives=True,
        )
        for d in dims
    ]
    assert got.item() == pytest.approx(sum(v.item() for v, _ in parts) / 2, rel=1e-5)
    assert {d: int(c) for d, c in counts.items()} == {
        d: c for d, (_, c) in zip(dims, parts, strict=True)
    }


def test_runs_in_float32_under_bf16_autocast():
    q, p, negs = (t.detach() for t in _random_batch(seed=7))
    kwargs = {"false_negative_margin": 0.1, "query_negatives": True, "passage_negatives": True}
    reference, count = info_nce_loss_with_count(q, p, negs, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under, under_count = info_nce_loss_with_count(q.bfloat16(), p, negs.bfloat16(), **kwargs)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, reference, rtol=0, atol=2e-2)  # bf16 inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact, exact_count = info_nce_loss_with_count(q, p, negs, **kwargs)
    torch.testing.assert_close(exact, reference, rtol=0, atol=1e-6)
    assert int(exact_count) == int(count)


# --------------------------------------------------------------------------- config
def _task(**extra) -> dict:
    return {"name": "t", "kind": "retrieval", "path": "x.jsonl", "batch_size": 4, **extra}


def test_config_fields_default_off_and_validate():
    task = TaskConfig(**_task())
    assert task.false_negative_margin is None and not task.query_negatives
    assert not task.passage_negatives and task.false_negative_control() == []
    on = TaskConfig(**_task(false_negative_margin=0.1, passage_negatives=True))
    assert on.false_negative_control() == ["false_negative_margin", "passage_negatives"]
    with pytest.raises(ValidationError):
        TaskConfig(**_task(false_negative_margin=-0.1))
    with pytest.raises(ValidationError, match="retrieval and pairs tasks only, not sts"):
        TaskConfig(**_task(kind="sts", query_negatives=True))
    with pytest.raises(ValidationError, match="false_negative_margin"):
        TaskConfig(**_task(kind="classification", false_negative_margin=0.1))


def test_cbb_accepts_false_negative_control():
    """The CBB step passes the options to its loss (tests/test_cbb_options.py checks it)."""
    on = {"false_negative_margin": 0.1, "query_negatives": True, "passage_negatives": True}
    config = TrainConfig(tasks=[_task(**on)], cbb={"world_size": 1})
    assert config.tasks[0].false_negative_control() == list(on)
    TrainConfig(tasks=[_task(**on, kind="pairs")], cbb={"world_size": 2})


# --------------------------------------------------------------------------- trainer
def test_a_two_step_run_logs_the_masked_count(tmp_path, tiny_bert):
    from conan_embedding.config import load_config
    from conan_embedding.toy import toy_train_config
    from conan_embedding.training.trainer import Trainer, read_log

    raw = toy_train_config(tmp_path, tiny_bert, steps=2, tasks=("ret",))
    # margin 0: whatever scores above its positive leaves the denominator (an untrained model
    # ranks some negatives above the positive, so the count is not 0)
    raw["tasks"][0] |= {
        "false_negative_margin": 0.0,
        "query_negatives": True,
        "passage_negatives": True,
    }
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    config = load_config(path)
    result = Trainer(config).train(show_progress=False)
    rows = read_log(result.output_dir / "train_log.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    task = config.tasks[0]
    batch, n = task.batch_size, task.negatives
    # per query at most: the other positives, every negative, other queries, other positives
    most = batch * ((batch - 1) + batch * n + 2 * (batch - 1))
    for row in rows:
        count = row["masked_negatives/ret"]
        assert isinstance(count, int) and 0 <= count <= most
        assert math.isfinite(row["loss"])
    assert sum(row["masked_negatives/ret"] for row in rows) > 0
