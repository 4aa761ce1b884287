"""Dynamic hard negative mining: the v1/v2 rules on hand-made score sequences, S_0 at
assignment (pool score or scored with the step's query row), quantile thresholds, the pool walk,
exhaustion, the state as safetensors arrays (resume gives the same trajectory), rank 0 deciding
for two gloo ranks, and ANCE-style re-mining."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conan_embedding.data.records import RecordError, RetrievalRecord
from conan_embedding.mining.base import (
    NegativeProvider,
    StaticNegatives,
    restore_provider_states,
    split_provider_states,
)
from conan_embedding.mining.dynamic import (
    DHNMConfig,
    DynamicNegatives,
    build_dynamic_negatives,
    quantile_grid,
    to_quantile,
    v1_should_replace,
    v2_should_replace,
)
from conan_embedding.mining.offline import (
    PoolCandidate,
    PoolEntry,
    PoolMeta,
    pool_meta_path,
    read_pool_meta,
    write_pools,
)

META = PoolMeta(
    model="m", probe=[0.6, 0.8], query_prompt="query: ", passage_prompt=None, max_seq_length=128
)


def _data(samples: int = 3, pool_size: int = 12, with_neg: bool = True, top: float = 0.9):
    """Pool ``s`` holds ``c{s}-{r}`` at ranks 10.., scored ``top - 0.01 * (r - 10)``."""
    records, pools = [], []
    for s in range(samples):
        neg = [f"orig-{s}-{k}" for k in range(2)] if with_neg else []
        records.append(RetrievalRecord(query=f"q{s}", pos=[f"p{s}"], neg=neg))
        cands = [
            PoolCandidate(text=f"c{s}-{r}", score=top - 0.01 * (r - 10), rank=r)
            for r in range(10, 10 + pool_size)
        ]
        pools.append(PoolEntry(index=s, query=f"q{s}", positive_score=0.95, candidates=cands))
    return records, pools


def _one_hot_encoder(calls: list | None = None):
    """q{s} -> e_0; every other text -> e_1 (orthogonal to every query), recording calls."""

    def encode(texts, role=None):
        if calls is not None:
            calls.append((role, list(texts)))
        return torch.tensor([[1.0, 0.0] if t.startswith("q") else [0.0, 1.0] for t in texts])

    return encode


def test_rules_on_hand_made_values():
    t = torch.tensor
    # v1: current*1.15 < initial and |current| < 0.8
    assert v1_should_replace(t([0.6]), t([0.5])).item()  # 0.575 < 0.6
    assert not v1_should_replace(t([0.6]), t([0.53])).item()  # 0.6095 >= 0.6
    assert not v1_should_replace(t([0.99]), t([0.85])).item()  # |current| >= 0.8
    assert v1_should_replace(t([0.0]), t([-0.5])).item()  # -0.575 < 0, |-0.5| < 0.8
    # v2: S0 < 0.4, or 1.2*S < S0 and S < 0.7
    assert v2_should_replace(t([0.39]), t([0.39])).item()  # never hard
    assert not v2_should_replace(t([0.6]), t([0.55])).item()  # 0.66 >= 0.6
    assert v2_should_replace(t([0.6]), t([0.49])).item()  # 0.588 < 0.6
    assert not v2_should_replace(t([0.9]), t([0.72])).item()  # S >= 0.7
    assert v2_should_replace(t([0.9]), t([0.69])).item()
    # thresholds are configurable
    assert not v2_should_replace(t([0.39]), t([0.39]), never_hard=0.3).item()


def test_pool_score_is_s0_so_a_negative_is_judged_at_its_first_draw():
    """The issue's test: with pool scores, a negative failing the v2 rule at its query's first
    draw is replaced, and the replacement is used at the query's second draw."""
    records, pools = _data(with_neg=False)
    provider = DynamicNegatives(records, 2, pools, DHNMConfig(rule="v2", initial_score="pool"))
    assert isinstance(provider, NegativeProvider)
    # the initial negatives are the pool's head, their S_0 the mined scores 0.90 and 0.89
    assert provider.negatives([0]) == [["c0-10", "c0-11"]]
    assert provider.s0[0].tolist() == pytest.approx([0.90, 0.89])
    # first draw of q0: c0-10 scores 0.60 (1.2*0.60 = 0.72 < 0.90, 0.60 < 0.7) -> replaced
    provider.observe(0, [0], torch.tensor([[0.60, 0.85]]))
    log = provider.on_step_end(1, _one_hot_encoder())
    assert log["dhnm/replaced"] == 1
    # second draw of q0 already holds the replacement (next pool candidate, its S_0 mined)
    assert provider.negatives([0]) == [["c0-12", "c0-11"]]
    assert provider.s0[0].tolist() == pytest.approx([0.88, 0.89])
    provider.observe(1, [0], torch.tensor([[0.80, 0.85]]))
    assert provider.negatives([0]) == [["c0-12", "c0-11"]]
    assert provider.replacements.tolist() == [1, 0, 0]


def test_first_observed_fallback_for_negatives_outside_the_pool():
    records, pools = _data()  # records' own "orig" negatives have no mined score
    provider = DynamicNegatives(records, 2, pools, DHNMConfig(rule="v2", initial_score="pool"))
    assert torch.isnan(provider.s0).all()
    provider.observe(0, [0], torch.tensor([[0.6, 0.3]]))  # S_0 = (0.6, 0.3): 0.3 never hard
    assert provider.negatives([0]) == [["orig-0-0", "c0-10"]]
    assert provider.s0[0].tolist() == pytest.approx([0.6, 0.9])


def test_without_pool_scores_s0_is_scored_at_assignment_with_the_steps_query_row():
    records, pools = _data(with_neg=False)
    provider = DynamicNegatives(records, 2, pools, DHNMConfig(rule="v2"))  # auto, no meta
    assert not provider.use_pool_scores and torch.isnan(provider.s0).all()
    # first draw: S_0 = first observed; 0.3 < 0.4 was never hard -> replaced by c0-12
    query = torch.tensor([[0.6, 0.8]])
    provider.observe(0, [0], torch.tensor([[0.5, 0.3]]), query_embeddings=query)
    assert provider.negatives([0]) == [["c0-10", "c0-12"]]
    calls: list = []
    provider.on_step_end(1, _one_hot_encoder(calls))
    # only the new negative was encoded (as a passage); the query row came from the step
    assert calls == [("passage", ["c0-12"])]
    assert provider.s0[0].tolist() == pytest.approx([0.5, 0.8])  # cos((.6,.8), (0,1)) = 0.8
    # the replacement is judged at the query's next draw against that S_0
    provider.observe(1, [0], torch.tensor([[0.5, 0.6]]), query_embeddings=query)
    assert provider.negatives([0]) == [["c0-10", "c0-13"]]  # 1.2*0.6 < 0.8, 0.6 < 0.7


def test_auto_takes_pool_scores_only_when_the_meta_matches(tmp_path):
    records, pools = _data(with_neg=False)
    train = tmp_path / "train.jsonl"
    write_pools(tmp_path / "train.pool.jsonl", pools, META)
    assert read_pool_meta(tmp_path / "train.pool.jsonl") == META
    section = DHNMConfig(rule="v2")
    same = build_dynamic_negatives(records, 2, section, train, trained_with=META)
    assert same.use_pool_scores and same.s0[0].tolist() == pytest.approx([0.9, 0.89])
    for other in (
        META.model_copy(update={"max_seq_length": 256}),
        META.model_copy(update={"passage_prompt": "passage: "}),
        META.model_copy(update={"probe": [0.8, 0.6]}),  # another model: cosine 0.96
    ):
        assert not build_dynamic_negatives(
            records, 2, section, train, trained_with=other
        ).use_pool_scores
    # the same model loaded another way (name, float noise) still matches
    twin = META.model_copy(update={"model": "/elsewhere/m", "probe": [0.6001, 0.7999]})
    assert build_dynamic_negatives(records, 2, section, train, trained_with=twin).use_pool_scores
    assert not build_dynamic_negatives(records, 2, section, train).use_pool_scores
    forced = DHNMConfig(rule="v2", initial_score="assignment")
    assert not build_dynamic_negatives(records, 2, forced, train, trained_with=META).use_pool_scores
    # a pool rewritten without a meta loses the stale one; a broken meta names its file
    write_pools(tmp_path / "train.pool.jsonl", pools)
    assert read_pool_meta(tmp_path / "train.pool.jsonl") is None
    pool_meta_path(tmp_path / "train.pool.jsonl").write_text("{not json")
    with pytest.raises(RecordError, match="train.pool.meta.json"):
        read_pool_meta(tmp_path / "train.pool.jsonl")
    pool_meta_path(tmp_path / "train.pool.jsonl").write_text('{"model": "m"}')
    with pytest.raises(RecordError, match="meta.json:1: field 'probe'"):
        read_pool_meta(tmp_path / "train.pool.jsonl")


def test_quantile_mapping():
    grid = quantile_grid(np.linspace(0.80, 0.90, 11))
    assert len(grid) == 1001
    got = to_quantile(torch.tensor([0.79, 0.80, 0.85, 0.88, 0.95, math.nan]), grid)
    assert got[:5].tolist() == pytest.approx([0.0, 0.0, 0.5, 0.8, 1.0], abs=1e-4)
    assert math.isnan(got[5])


def test_pool_quantile_thresholds_act_on_a_narrow_score_band():
    """me5-small-like pools (scores 0.80..0.91): the absolute rule never fires, the quantile
    rule replaces a negative that fell from the pool's top to its bottom decile."""
    records, pools = _data(samples=1, pool_size=12, with_neg=False, top=0.91)
    scores = torch.tensor([[0.905, 0.80]])  # c0-10 at ~its mined 0.91, c0-11 fell to 0.80
    absolute = DynamicNegatives(records, 2, pools, DHNMConfig(rule="v2", initial_score="pool"))
    absolute.observe(0, [0], scores)
    assert absolute.replacements.tolist() == [0]
    config = DHNMConfig(rule="v2", initial_score="pool", thresholds="pool_quantile")
    quantile = DynamicNegatives(records, 2, pools, config)
    # F(S_0): c0-10 = 1.0 and c0-11 = 0.909; F(0.905) = 0.95, F(0.80) = 0 -> only slot 1 fell
    quantile.observe(0, [0], scores)
    assert quantile.negatives([0]) == [["c0-10", "c0-12"]]
    # "never hard": the pool's easiest 40% (here ranks 17..21) are replaced at first sight
    assert to_quantile(torch.tensor([0.84]), quantile._grid).item() < 0.4
    assert quantile.on_step_end(1, _one_hot_encoder())["dhnm/calibrated"] == 1.0


def test_pool_quantile_without_pool_scores_calibrates_on_the_first_s0():
    records, pools = _data(samples=4, with_neg=False)
    config = DHNMConfig(rule="v2", thresholds="pool_quantile", calibration_size=6)
    provider = DynamicNegatives(records, 2, pools, config)
    provider.observe(0, [0, 1], torch.tensor([[0.1, 0.2], [0.3, 0.4]]))  # 4 S_0: not yet
    assert provider.replacements.sum() == 0 and len(provider._grid) == 0
    assert provider.on_step_end(1, _one_hot_encoder())["dhnm/calibrated"] == 0.0
    provider.observe(1, [2, 3], torch.tensor([[0.5, 0.6], [0.7, 0.8]]))  # 8 >= 6: fitted
    assert len(provider._grid) == 1001
    # F on S_0 = 0.1..0.6: sample 2's 0.5 (F = 0.8) stays, 3's 0.7 and 0.8 are above the grid
    provider.observe(2, [0], torch.tensor([[0.1, 0.6]]))  # F(0.1) = 0 < 0.4: never hard
    assert provider.negatives([0])[0][0] != "c0-10"


def test_v1_ith_replacement_takes_ranks_i_minus_1_n_plus_10():
    records, pools = _data(samples=1, pool_size=6, with_neg=False)
    config = DHNMConfig(rule="v1", check_every=5, v1_current="observed", initial_score="pool")
    provider = DynamicNegatives(records, 2, pools, config)
    noop = _one_hot_encoder()
    assert provider.negatives([0]) == [["c0-10", "c0-11"]]  # initial mean S_0 0.895
    provider.observe(1, [0], torch.tensor([[0.6, 0.6]]))  # 0.69 < 0.895 but not a check step
    assert provider.on_step_end(2, noop)["dhnm/replaced"] == 0
    provider.observe(4, [0], torch.tensor([[0.6, 0.6]]))
    assert provider.on_step_end(5, noop)["dhnm/replaced"] == 2
    assert provider.negatives([0]) == [["c0-12", "c0-13"]]  # 1st: ranks 12..13
    assert provider.s0[0].tolist() == pytest.approx([0.88, 0.87])
    provider.observe(9, [0], torch.tensor([[0.8, 0.8]]))  # 0.92 >= 0.875: still hard
    provider.on_step_end(10, noop)
    assert provider.negatives([0]) == [["c0-12", "c0-13"]]
    provider.observe(14, [0], torch.tensor([[0.1, 0.1]]))
    provider.on_step_end(15, noop)
    assert provider.negatives([0]) == [["c0-14", "c0-15"]]  # 2nd: ranks 14..15
    provider.observe(19, [0], torch.tensor([[0.1, 0.1]]))
    log = provider.on_step_end(20, noop)
    assert log["dhnm/blocked"] == 1 and log["dhnm/pool_exhausted"] == 1.0
    assert provider.negatives([0]) == [["c0-14", "c0-15"]]


def test_v1_encode_rescoring_uses_the_current_model_and_scores_replacements():
    records, pools = _data(samples=2)
    provider = DynamicNegatives(records, 2, pools, DHNMConfig(rule="v1", check_every=1))

    # sample 0's negatives now sit orthogonal to its query, sample 1's do not
    def encode(texts, role=None):
        return torch.tensor(
            [[1.0, 0.0] if t.startswith(("q", "orig-1", "c0-11")) else [0.0, 1.0] for t in texts]
        )

    provider.observe(0, [0, 1], torch.tensor([[0.6, 0.6], [0.6, 0.6]]))
    provider.on_step_end(1, encode)
    assert provider.negatives([0, 1]) == [["c0-10", "c0-11"], ["orig-1-0", "orig-1-1"]]
    assert provider.current[1].tolist() == [1.0, 1.0]
    # the replacements were scored at assignment with the re-scored query rows
    assert provider.s0[0].tolist() == [0.0, 1.0]


def test_pool_offset_skips_low_ranks_and_mismatched_pools_fail():
    records, pools = _data(samples=1, with_neg=False)
    low = [PoolCandidate(text=f"low{r}", score=0.99, rank=r) for r in range(3)]
    pools = [pools[0].model_copy(update={"candidates": low + pools[0].candidates})]
    provider = DynamicNegatives(records, 2, pools, DHNMConfig(rule="v2", pool_offset=10))
    assert provider.negatives([0]) == [["c0-10", "c0-11"]]
    bad = [pools[0].model_copy(update={"query": "other"})]
    with pytest.raises(ValueError, match="does not match"):
        DynamicNegatives(records, 2, bad)


def _scores(step: int, ids: list[int], rank: int = 0) -> torch.Tensor:
    """A deterministic pseudo-training: scores fall with the step, per sample and slot."""
    return torch.tensor(
        [[0.9 - 0.05 * ((step + s + k) % 9) + 1e-4 * rank for k in range(2)] for s in ids]
    )


def _run(provider, steps, start=0):
    for step in range(start, steps):
        ids = [step % 3, (step + 1) % 3]
        queries = torch.tensor([[1.0, 0.1 * s] for s in ids])
        provider.observe(step, ids, _scores(step, ids), query_embeddings=queries)
        provider.on_step_end(step + 1, _one_hot_encoder())


@pytest.mark.parametrize(
    ("rule", "initial", "thresholds"),
    [("v1", "pool", "absolute"), ("v2", "assignment", "absolute"), ("v2", "pool", "pool_quantile")],
)
def test_state_survives_a_checkpoint_as_json_or_safetensors(tmp_path, rule, initial, thresholds):
    records, pools = _data(pool_size=40)
    config = DHNMConfig(
        rule=rule,
        check_every=3,
        v1_current="observed",
        initial_score=initial,
        thresholds=thresholds,
        calibration_size=8,
    )
    straight = DynamicNegatives(records, 2, pools, config)
    _run(straight, 20)
    first = DynamicNegatives(records, 2, pools, config)
    _run(first, 10)
    # (a) everything in the JSON state (arrays as one safetensors blob)
    saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    # (b) the JSON without arrays, the arrays in a .safetensors file
    save_file(first.state_tensors(), tmp_path / "dhnm.safetensors")
    meta = json.loads(json.dumps(first.state_dict(arrays=False)))
    assert "arrays" not in meta
    from_json = DynamicNegatives(records, 2, pools, config)
    from_json.load_state_dict(saved)
    from_file = DynamicNegatives(records, 2, pools, config)
    from_file.load_state_dict(meta, load_file(tmp_path / "dhnm.safetensors"))
    assert straight.replacements.sum() > 0
    for resumed in (from_json, from_file):
        _run(resumed, 20, start=10)
        for key, value in straight.state_tensors().items():
            got = resumed.state_tensors()[key]
            torch.testing.assert_close(got, value, rtol=0, atol=0, equal_nan=True, msg=key)
    other, _ = _data(samples=2)
    with pytest.raises(ValueError, match="other records"):
        DynamicNegatives(other, 2, pools[:2], config).load_state_dict(meta)
    with pytest.raises(ValueError, match="version"):
        DynamicNegatives(records, 2, pools, config).load_state_dict({**meta, "version": 1})


def test_checkpoint_helpers_put_arrays_in_safetensors_and_the_rest_in_json(tmp_path):
    records, pools = _data(pool_size=40)
    config = DHNMConfig(rule="v2", initial_score="assignment")
    providers = {
        "bge": DynamicNegatives(records, 2, pools, config),
        "plain": StaticNegatives(records, 2),
    }
    _run(providers["bge"], 6)
    states, tensors = split_provider_states(providers)
    assert set(tensors) >= {"bge/assigned", "bge/s0", "bge/pointer"}
    text = json.dumps(states, allow_nan=False)
    assert len(text) < 400  # no lists, no base64 blob
    save_file(tensors, tmp_path / "providers.safetensors")
    fresh = {
        "bge": DynamicNegatives(records, 2, pools, config),
        "plain": StaticNegatives(records, 2),
    }
    restore_provider_states(fresh, json.loads(text), load_file(tmp_path / "providers.safetensors"))
    for key, value in providers["bge"].state_tensors().items():
        got = fresh["bge"].state_tensors()[key]
        torch.testing.assert_close(got, value, rtol=0, atol=0, equal_nan=True, msg=key)
    with pytest.raises(ValueError, match="unknown task 'bge'"):
        restore_provider_states({"plain": fresh["plain"]}, states, tensors)


def test_build_from_training_config_and_pool_file(tmp_path):
    records, pools = _data()
    train = tmp_path / "train.jsonl"
    write_pools(tmp_path / "train.pool.jsonl", pools)
    section = DHNMConfig(rule="v2", v2_never_hard=0.5)  # the trainer's dynamic_negatives
    provider = build_dynamic_negatives(records, 2, section, train)
    assert provider.config.v2_never_hard == 0.5
    with pytest.raises(FileNotFoundError, match="conan-embed mine"):
        build_dynamic_negatives(records, 2, section, tmp_path / "missing.jsonl")
    # a task's max_rows keeps a subset of the rows: each finds its own pool by query
    subset = build_dynamic_negatives([records[2], records[0]], 2, section, train)
    assert subset.pool(0) != subset.pool(1)
    assert subset.negatives([0]) == [records[2].neg] and subset.negatives([1]) == [records[0].neg]
    # with the rows' file positions, repeated queries are no obstacle
    twins, twin_pools = _data(4)
    twins[3] = twins[3].model_copy(update={"query": "q1"})
    twin_pools[3] = twin_pools[3].model_copy(update={"query": "q1"})
    write_pools(tmp_path / "twins.pool.jsonl", twin_pools)
    kept = build_dynamic_negatives(
        [twins[1], twins[3]], 2, section, tmp_path / "twins.jsonl", rows=[1, 3]
    )
    assert kept.negatives([0, 1]) == [twins[1].neg, twins[3].neg]
    assert kept.pool(0) != kept.pool(1)  # each row got its own pool, not the first "q1"
    with pytest.raises(ValueError, match="repeated queries"):
        build_dynamic_negatives([twins[1], twins[3]], 2, section, tmp_path / "twins.jsonl")
    stranger = RetrievalRecord(query="never mined", pos=["p"], neg=["n"])
    with pytest.raises(ValueError, match="no pool for query 'never mined'"):
        build_dynamic_negatives([stranger], 2, section, train)


def test_remine_rebuilds_pools_with_the_current_model():
    records, pools = _data(samples=2, pool_size=12)
    provider = DynamicNegatives(
        records,
        2,
        pools,
        DHNMConfig(rule="v2", pool_offset=0, remine_every=5, remine_relative_margin=None),
    )

    # the "current model" puts c0-21 closest to q0 and c1-15 closest to q1
    def encode(texts):
        out = []
        for t in texts:
            if t in ("q0", "c0-21"):
                out.append([1.0, 0.0, 0.0])
            elif t in ("q1", "c1-15"):
                out.append([0.0, 1.0, 0.0])
            else:
                out.append([0.3, 0.3, 0.9])
        return torch.nn.functional.normalize(torch.tensor(out), dim=-1)

    assert provider.negatives([0]) == [["orig-0-0", "orig-0-1"]]
    stats = provider.on_step_end(5, encode)
    assert provider.pools_remined and provider.use_pool_scores
    assert provider.corpus[provider.pool(0)[0]] == "c0-21"
    assert provider.corpus[provider.pool(1)[0]] == "c1-15"
    assert provider.pool_scores[0] == pytest.approx(1.0)
    # every query now holds its new pool's head (the current model's hardest), S_0 = its pool
    # scores, and the next replacement comes after it: the swap reaches the query's next draw
    for sid in (0, 1):
        head = provider.pool(sid)[:2]
        assert provider.assigned[sid].tolist() == head
        start = int(provider.pool_offsets[sid])
        assert provider.s0[sid].tolist() == pytest.approx(provider.pool_scores[start : start + 2])
        assert int(provider.pointer[sid]) == 2
    assert provider.negatives([0])[0][0] == "c0-21" and provider.s0[0, 0] == pytest.approx(1.0)
    assert stats["dhnm/remine_reassigned"] == 2.0 and stats["dhnm/remine_kept_old"] == 0.0
    tensors = provider.state_tensors()
    assert tensors["pool_ids"].tolist() == provider.pool_ids.tolist()
    fresh = DynamicNegatives(records, 2, pools, provider.config)
    fresh.load_state_dict(provider.state_dict())
    assert fresh.pool(0) == provider.pool(0) and fresh.pools_remined


def test_remine_encodes_a_positive_that_is_a_corpus_text_once():
    """A positive that is another query's candidate takes the corpus row: a re-mine encodes
    the corpus, the queries and only the positives outside the corpus."""
    records, pools = _data(samples=3, pool_size=12)
    records[0] = RetrievalRecord(query="q0", pos=["c1-12"], neg=records[0].neg)
    config = DHNMConfig(rule="v2", pool_offset=0, remine_relative_margin=None)
    provider = DynamicNegatives(records, 2, pools, config)
    calls: list = []
    provider.remine(_one_hot_encoder(calls))
    passages = [t for role, texts in calls if role == "passage" for t in texts]
    assert sorted(passages) == sorted([*provider.corpus, "p1", "p2"])
    # q0's positive is excluded from its own new pool, as a positive outside the corpus is
    assert provider.corpus.index("c1-12") not in provider.pool(0)


def test_remine_times_itself_and_skips_the_last_step():
    """A re-mine logs how long it took; none runs after the run's last step (nothing would
    train on its pools, and on a large corpus one costs as much as many steps)."""
    records, pools = _data(samples=2, pool_size=12)
    config = DHNMConfig(rule="v2", pool_offset=0, remine_every=5, remine_relative_margin=None)
    provider = DynamicNegatives(records, 2, pools, config, last_step=10)
    calls: list[int] = []

    def encode(texts):
        calls.append(len(texts))
        return torch.nn.functional.normalize(torch.rand(len(texts), 3), dim=-1)

    stats = provider.on_step_end(5, encode)
    assert provider.pools_remined and stats["dhnm/remine_seconds"] >= 0
    remined_at_5 = len(calls)
    stats = provider.on_step_end(10, encode)  # the last step: a multiple of 5, not re-mined
    assert "dhnm/remine_seconds" not in stats
    assert sum(calls[remined_at_5:]) < len(provider.corpus)  # scores only, no corpus encode


_SYNC_CASES = {
    "v1": DHNMConfig(rule="v1", check_every=2, v1_current="observed", initial_score="pool"),
    "v2-assignment": DHNMConfig(rule="v2", initial_score="assignment"),
    "v2-quantile": DHNMConfig(rule="v2", thresholds="pool_quantile", calibration_size=4),
    "v2-remine": DHNMConfig(
        rule="v2", initial_score="pool", remine_every=5, remine_relative_margin=None
    ),
}


def _hashed_encoder(calls: list | None = None):
    """Every text its own fixed random direction (seeded by its CRC), the same in any process:
    a re-mine's pools then depend on every row landing where it belongs."""
    import zlib

    def encode(texts, role=None):
        if calls is not None:
            calls.append((role, list(texts)))
        rows = [
            torch.randn(4, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
            for t in texts
        ]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    return encode


def _run_sync_case(name: str, rank: int, calls: list, sync: bool) -> DynamicNegatives:
    """Ten steps of ``name`` as rank ``rank`` sees them (``sync``: under ``sync_from(0)``)."""
    records, pools = _data(pool_size=40)
    provider = DynamicNegatives(records, 2, pools, _SYNC_CASES[name])
    if sync:
        provider.sync_from(0)
    encoder = _hashed_encoder(calls) if name == "v2-remine" else _one_hot_encoder(calls)
    for step in range(10):
        # both ranks train on the same rows (CBB) but see scores that differ slightly:
        # on their own they would disagree where a score sits at a threshold
        ids = [step % 3, (step + 1) % 3]
        scores = _scores(step, ids, rank) + (0.3 if rank and step == 3 else 0.0)
        queries = torch.tensor([[1.0, 0.1 * s + rank] for s in ids])
        provider.observe(step, ids, scores, query_embeddings=queries)
        provider.on_step_end(step + 1, encoder)
    return provider


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        records, pools = _data(pool_size=40)
        for name in _SYNC_CASES:
            calls: list = []
            provider = _run_sync_case(name, rank, calls, sync=True)
            tensors = {k: v.tolist() for k, v in provider.state_tensors().items()}
            out = {
                "state": tensors,
                "encoded": sum(len(texts) for _, texts in calls),
                "negatives": provider.negatives([0]),
                "corpus": len(provider.corpus),
            }
            with open(f"{out_dir}/{name}-{rank}.json", "w") as handle:
                json.dump(out, handle)
        # a task that runs on rank 0 only: on rank 1 its provider is inert (no re-mining)
        alone = dist.new_group([0])
        provider = DynamicNegatives(records, 2, pools, DHNMConfig(rule="v2", remine_every=1))
        provider.sync_from(0, alone)
        calls = []
        log = provider.on_step_end(1, _one_hot_encoder(calls))
        assert (log == {} and not calls) if rank == 1 else (log and calls)
    finally:
        dist.destroy_process_group()


def test_rank_zero_decides_for_every_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for name in _SYNC_CASES:
        rank0 = json.loads((tmp_path / f"{name}-0.json").read_text())
        rank1 = json.loads((tmp_path / f"{name}-1.json").read_text())
        assert rank0["state"] == rank1["state"], name
        assert rank0["negatives"] == rank1["negatives"]
        assert sum(rank0["state"]["replacements"]) > 0, name
        # the group decides as rank 0 alone would: the same state as one process
        reference = _run_sync_case(name, 0, [], sync=False)
        as_text = {k: v.tolist() for k, v in reference.state_tensors().items()}
        assert json.dumps(rank0["state"], sort_keys=True) == json.dumps(as_text, sort_keys=True)
        if name != "v2-remine":
            assert rank1["encoded"] == 0  # the follower neither decides nor encodes
        else:  # a real re-mine: q0's new pool draws from the whole corpus, not its c0-* pool
            assert not all(reference.corpus[i].startswith("c0-") for i in reference.pool(0))
    # re-mining (steps 5 and 10) is the one encode the follower shares: the second half of
    # the corpus, of the 3 queries and of their 3 positives, each time
    remine = json.loads((tmp_path / "v2-remine-1.json").read_text())
    corpus = remine["corpus"]
    assert remine["encoded"] == 2 * ((corpus - corpus // 2) + 2 + 2)
    assert "pool_ids" in remine["state"]


# ---------------------------------------------------------------- GPU index and idle syncs (§8)
def _remine_devices(monkeypatch, index_device, max_k=None):
    import conan_embedding.mining.dynamic as dynamic

    seen: list = []
    real = dynamic.build_index

    def spy(vectors, kind="auto", **kwargs):
        seen.append(kwargs.get("device", "cpu"))
        return real(vectors, kind)  # the CPU index either way: no GPU here

    monkeypatch.setattr(dynamic, "build_index", spy)
    if max_k is not None:
        monkeypatch.setattr(dynamic, "FAISS_GPU_MAX_K", max_k)
    records, pools = _data(samples=2, pool_size=12)
    provider = DynamicNegatives(records, 2, pools, DHNMConfig(rule="v2", pool_offset=0))
    if index_device is not None:
        provider.index_device = index_device
    provider.remine(_one_hot_encoder())
    return seen


def test_remine_builds_its_index_on_the_engines_device(monkeypatch):
    """Re-mining searches on the training GPU (FAISS-GPU when installed; build_index falls
    back to the CPU otherwise), not always on the CPU as before."""
    assert _remine_devices(monkeypatch, None) == ["cpu"]
    assert _remine_devices(monkeypatch, torch.device("cuda", 1)) == [torch.device("cuda", 1)]
    # FAISS-GPU returns at most 2048 neighbours: a larger k searches on the CPU
    assert _remine_devices(monkeypatch, torch.device("cuda", 1), max_k=3) == ["cpu"]


def _idle_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    calls: list[int] = []
    real = dist.broadcast

    def counting(tensor, *args, **kwargs):
        calls.append(1)
        return real(tensor, *args, **kwargs)

    dist.broadcast = counting
    try:
        records, pools = _data(pool_size=40)
        provider = DynamicNegatives(records, 2, pools, DHNMConfig(rule="v2", initial_score="pool"))
        provider.sync_from(0)
        per_step, logs = [], []
        for step in range(6):
            before = len(calls)
            if step % 2 == 0:  # the task runs every other step (task_schedule round_robin)
                ids = [step % 3, (step + 1) % 3]
                provider.observe(step, ids, _scores(step, ids), torch.ones(2, 2))
            logs.append(provider.on_step_end(step + 1, _one_hot_encoder()))
            per_step.append(len(calls) - before)
        tensors = {k: v.tolist() for k, v in provider.state_tensors().items()}
        out = {"per_step": per_step, "state": tensors, "logs": logs}
        with open(f"{out_dir}/idle-{rank}.json", "w") as handle:
            json.dump(out, handle)
    finally:
        dist.broadcast = real
        dist.destroy_process_group()


def test_an_idle_step_costs_one_small_broadcast_and_ranks_still_agree(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_idle_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"idle-{r}.json").read_text()) for r in range(2))
    assert rank0["per_step"] == rank1["per_step"] == [2, 1, 2, 1, 2, 1]
    assert rank0["state"] == rank1["state"] and rank0["logs"] == rank1["logs"]


# ---------------------------------------------------------------- re-mining that empties pools
def _same_vector(texts, role=None):
    """An untrained model's picture: every text embeds alike, so every candidate scores as
    high as the positive and the relative false-negative margin drops them all."""
    return torch.ones(len(texts), 4)


def test_remine_keeps_the_old_pool_where_the_margin_leaves_too_few_candidates():
    """Row G's finding: with the default margin 0.05 the first re-mine on a random model
    emptied every pool and the second failed ("window 10..10 cannot hold 1 negatives")."""
    records, pools = _data(pool_size=12)
    provider = DynamicNegatives(records, 2, pools, DHNMConfig(rule="v2", remine_every=1))
    before = [provider.pool(s) for s in range(3)]
    provider.pointer[1] = 3  # sample 1 already walked part of its pool
    logs = []
    for step in range(3):  # three re-mines, each margin filter leaving nothing
        ids = [step % 3, (step + 1) % 3]
        provider.observe(step, ids, _scores(step, ids), query_embeddings=torch.ones(2, 4))
        logs.append(provider.on_step_end(step + 1, _same_vector))
    assert [log["dhnm/remine_kept_old"] for log in logs] == [3.0, 3.0, 3.0]
    # each query kept its pool (it was not re-mined) and its place in it ...
    assert [provider.pool(s) for s in range(3)] == before
    assert int(provider.pointer[1]) >= 3
    # ... re-scored by the current model, like the held negatives' S_0
    assert provider.pool_scores.tolist() == pytest.approx([1.0] * 36)
    assert provider.s0.flatten().tolist() == pytest.approx([1.0] * 6)
    assert provider.pools_remined and provider.use_pool_scores


def test_remine_mixes_new_and_kept_pools_each_on_the_current_scale():
    """q0's new pool passes the margin and replaces the old one (q0 holds its head, the
    pointer past it); q1's positive scores below all its candidates, so q1 keeps its old pool,
    its place in it and its negatives, and gets the current model's scores; the quantile grid
    is fitted on the pools in use."""
    records, pools = _data(samples=2, pool_size=12)
    config = DHNMConfig(rule="v2", pool_offset=0, remine_every=5, thresholds="pool_quantile")
    provider = DynamicNegatives(records, 2, pools, config)
    old_q1 = provider.pool(1)
    provider.pointer[:] = torch.tensor([4, 3])

    def encode(texts):
        out = []
        for t in texts:
            if t in ("q0", "p0"):
                out.append([1.0, 0.0, 0.0])
            elif t.startswith("c0-"):
                out.append([0.5, 0.0, 0.75**0.5])
            elif t == "q1":
                out.append([0.0, 1.0, 0.0])
            elif t == "p1":  # the positive scores -1: every candidate is within the margin
                out.append([0.0, -1.0, 0.0])
            elif t.startswith("c1-"):
                out.append([0.0, 0.6, 0.8])
            else:
                out.append([0.0, 0.0, 1.0])
        return torch.tensor(out)

    log = provider.on_step_end(5, encode)
    assert log["dhnm/remine_kept_old"] == 1.0
    new_q0 = [provider.corpus[c] for c in provider.pool(0)]
    assert all(t.startswith("c0-") for t in new_q0[:12]) and len(new_q0) == 12
    assert provider.pool(1) == old_q1
    q1_scores = provider.pool_scores[provider.pool_offsets[1] : provider.pool_offsets[2]]
    assert q1_scores.tolist() == pytest.approx([0.6] * 12)
    assert provider.pointer.tolist() == [2, 3]
    assert log["dhnm/remine_reassigned"] == 1.0
    assert provider.assigned[0].tolist() == provider.pool(0)[:2]
    assert provider.negatives([1]) == [["orig-1-0", "orig-1-1"]]  # q1 keeps what it held
    assert provider.s0[1].tolist() == pytest.approx([0.0, 0.0])  # ... scored now: cos(q1, e_2)
    assert torch.equal(provider._grid, quantile_grid(provider.pool_scores))
    fresh = DynamicNegatives(records, 2, pools, config)
    fresh.load_state_dict(provider.state_dict())
    assert fresh.pool(1) == old_q1 and fresh.pointer.tolist() == [2, 3]
    assert fresh.negatives([0]) == provider.negatives([0])
