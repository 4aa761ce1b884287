"""Dynamic hard negative mining: the v1/v2 rules on hand-made score sequences, the pool
walk, exhaustion, checkpoint round-trip (resume gives the same trajectory), agreement across
two gloo ranks, and ANCE-style re-mining."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conan_embedding.data.records import RetrievalRecord
from conan_embedding.mining.base import NegativeProvider
from conan_embedding.mining.dynamic import (
    DHNMConfig,
    DynamicNegatives,
    build_dynamic_negatives,
    v1_should_replace,
    v2_should_replace,
)
from conan_embedding.mining.offline import PoolCandidate, PoolEntry, write_pools


def _data(samples: int = 3, pool_size: int = 12, with_neg: bool = True):
    records, pools = [], []
    for s in range(samples):
        neg = [f"orig-{s}-{k}" for k in range(2)] if with_neg else []
        records.append(RetrievalRecord(query=f"q{s}", pos=[f"p{s}"], neg=neg))
        cands = [
            PoolCandidate(text=f"c{s}-{r}", score=0.9 - 0.01 * r, rank=r)
            for r in range(10, 10 + pool_size)
        ]
        pools.append(PoolEntry(index=s, query=f"q{s}", positive_score=0.95, candidates=cands))
    return records, pools


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


def test_v2_replaces_single_negatives_from_the_pool_in_rank_order():
    records, pools = _data()
    provider = DynamicNegatives(records, 2, pools, DHNMConfig(rule="v2"))
    assert isinstance(provider, NegativeProvider)
    assert provider.negatives([0]) == [["orig-0-0", "orig-0-1"]]
    # step 0: S0 = (0.6, 0.8); nothing to replace
    provider.observe(0, [0, 1], torch.tensor([[0.6, 0.8], [0.5, 0.5]]))
    assert provider.negatives([0]) == [["orig-0-0", "orig-0-1"]]
    # step 1: slot 0 drops to 0.45 (1.2*0.45 = 0.54 < 0.6, < 0.7) -> replaced by rank 10
    provider.observe(1, [0], torch.tensor([[0.45, 0.79]]))
    assert provider.negatives([0]) == [["c0-10", "orig-0-1"]]
    log = provider.on_step_end(2, encode=lambda texts: torch.zeros(len(texts), 4))
    assert log["dhnm/replaced"] == 1 and log["dhnm/replacements_total"] == 1
    assert math.isclose(
        log["dhnm/neg_score"], (0.6 + 0.8 + 0.5 + 0.5 + 0.45 + 0.79) / 6, rel_tol=1e-6
    )
    # the new negative's S0 is its first score: 0.3 < 0.4 means never hard -> next candidate
    provider.observe(2, [0], torch.tensor([[0.3, 0.79]]))
    assert provider.negatives([0]) == [["c0-11", "orig-0-1"]]
    provider.observe(3, [0], torch.tensor([[0.5, 0.79]]))
    assert provider.negatives([0]) == [["c0-11", "orig-0-1"]]
    assert provider.replacements.tolist() == [2, 0, 0]


def test_v1_ith_replacement_takes_ranks_i_minus_1_n_plus_10(tmp_path):
    records, pools = _data(samples=1, pool_size=6)
    config = DHNMConfig(rule="v1", check_every=5, v1_current="observed")
    provider = DynamicNegatives(records, 2, pools, config)
    noop = lambda texts: torch.zeros(len(texts), 4)  # noqa: E731
    provider.observe(0, [0], torch.tensor([[0.7, 0.7]]))  # initial mean 0.7
    provider.observe(1, [0], torch.tensor([[0.6, 0.6]]))  # 0.69 < 0.7 but not a check step
    assert provider.on_step_end(2, noop)["dhnm/replaced"] == 0
    provider.observe(4, [0], torch.tensor([[0.6, 0.6]]))
    assert provider.on_step_end(5, noop)["dhnm/replaced"] == 2
    assert provider.negatives([0]) == [["c0-10", "c0-11"]]  # 1st: ranks 10..11
    provider.observe(5, [0], torch.tensor([[0.5, 0.5]]))
    provider.observe(9, [0], torch.tensor([[0.2, 0.3]]))  # 0.25*1.15 < 0.5
    provider.on_step_end(10, noop)
    assert provider.negatives([0]) == [["c0-12", "c0-13"]]  # 2nd: ranks 12..13
    provider.observe(10, [0], torch.tensor([[0.5, 0.5]]))
    provider.observe(14, [0], torch.tensor([[0.52, 0.5]]))  # 0.51*1.15 >= 0.5: still hard
    provider.on_step_end(15, noop)
    assert provider.negatives([0]) == [["c0-12", "c0-13"]]
    # pool has two more; a third and fourth replacement exhaust it
    provider.observe(15, [0], torch.tensor([[0.1, 0.1]]))
    provider.on_step_end(20, noop)
    assert provider.negatives([0]) == [["c0-14", "c0-15"]]
    provider.observe(20, [0], torch.tensor([[0.5, 0.5]]))
    provider.observe(21, [0], torch.tensor([[0.1, 0.1]]))
    log = provider.on_step_end(25, noop)
    assert log["dhnm/blocked"] == 1 and log["dhnm/pool_exhausted"] == 1.0
    assert provider.negatives([0]) == [["c0-14", "c0-15"]]


def test_v1_encode_rescoring_uses_the_current_model():
    records, pools = _data(samples=2)
    provider = DynamicNegatives(records, 2, pools, DHNMConfig(rule="v1", check_every=1))

    # an "encoder" where sample 0's negatives now sit orthogonal to its query, sample 1's do not
    def encode(texts):
        rows = []
        for t in texts:
            if t.startswith("q") or t.startswith("orig-1"):
                rows.append([1.0, 0.0])
            else:
                rows.append([0.0, 1.0])
        return torch.tensor(rows)

    provider.observe(0, [0, 1], torch.tensor([[0.6, 0.6], [0.6, 0.6]]))
    provider.on_step_end(1, encode)
    assert provider.negatives([0, 1]) == [["c0-10", "c0-11"], ["orig-1-0", "orig-1-1"]]
    assert provider.current[1].tolist() == [1.0, 1.0]


def test_records_without_negatives_start_from_the_pool_head():
    records, pools = _data(samples=1, with_neg=False)
    provider = DynamicNegatives(
        records, 3, pools, DHNMConfig(rule="v1", v1_current="observed", check_every=1)
    )
    assert provider.negatives([0]) == [["c0-10", "c0-11", "c0-12"]]
    provider.observe(0, [0], torch.tensor([[0.5, 0.5, 0.5]]))
    provider.observe(1, [0], torch.tensor([[0.1, 0.1, 0.1]]))
    provider.on_step_end(1, lambda texts: torch.zeros(len(texts), 2))
    assert provider.negatives([0]) == [["c0-13", "c0-14", "c0-15"]]


def test_pool_offset_skips_low_ranks_and_mismatched_pools_fail():
    records, pools = _data(samples=1, with_neg=False)
    low = [PoolCandidate(text=f"low{r}", score=0.99, rank=r) for r in range(3)]
    pools = [pools[0].model_copy(update={"candidates": low + pools[0].candidates})]
    provider = DynamicNegatives(records, 2, pools, DHNMConfig(rule="v2", pool_offset=10))
    assert provider.negatives([0]) == [["c0-10", "c0-11"]]
    bad = [pools[0].model_copy(update={"query": "other"})]
    with pytest.raises(ValueError, match="does not match"):
        DynamicNegatives(records, 2, bad)


def _run(provider, steps, start=0):
    """A deterministic pseudo-training: scores decay with the step, per sample and slot."""
    for step in range(start, steps):
        ids = [step % 3, (step + 1) % 3]
        base = torch.tensor([[0.8 - 0.05 * ((step + s + k) % 9) for k in range(2)] for s in ids])
        provider.observe(step, ids, base)
        provider.on_step_end(step + 1, lambda texts: torch.ones(len(texts), 2) / math.sqrt(2))


@pytest.mark.parametrize("rule", ["v1", "v2"])
def test_state_survives_a_json_checkpoint(rule):
    records, pools = _data(pool_size=40)
    config = DHNMConfig(rule=rule, check_every=3, v1_current="observed")
    straight = DynamicNegatives(records, 2, pools, config)
    _run(straight, 20)
    first = DynamicNegatives(records, 2, pools, config)
    _run(first, 10)
    saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    resumed = DynamicNegatives(records, 2, pools, config)
    resumed.load_state_dict(saved)
    _run(resumed, 20, start=10)
    assert straight.replacements.sum() > 0
    assert resumed.state_dict() == straight.state_dict()
    other, _ = _data(samples=2)
    with pytest.raises(ValueError, match="other records"):
        DynamicNegatives(other, 2, pools[:2], config).load_state_dict(saved)


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
    assert subset.pools[0] != subset.pools[1]
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
    assert kept.pools[0] != kept.pools[1]  # each row got its own pool, not the first "q1"
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

    provider.on_step_end(5, encode)
    assert provider.pools_remined
    assert provider.corpus[provider.pools[0][0]] == "c0-21"
    assert provider.corpus[provider.pools[1][0]] == "c1-15"
    assert provider.state_dict()["pools"] == provider.pools


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        records, pools = _data(pool_size=40)
        for rule in ("v1", "v2", "cbb"):
            # data parallel: each rank trains on different samples and syncs over the group;
            # "cbb": both ranks see the same rows and scores and need no collective at all
            shared = rule == "cbb"
            provider = DynamicNegatives(
                records,
                2,
                pools,
                DHNMConfig(rule="v2" if shared else rule, check_every=2),
                group=None if shared else dist.group.WORLD,
            )
            for step in range(8):
                ids = [(step + (0 if shared else rank)) % 3]
                scores = torch.tensor([[0.8 - 0.07 * ((step + ids[0] + k) % 7) for k in range(2)]])
                provider.observe(step, ids, scores)
                provider.on_step_end(
                    step + 1,
                    # the "current model" puts every negative orthogonal to its query
                    lambda t: torch.tensor([[1.0, 0.0] if x[0] == "q" else [0.0, 1.0] for x in t]),
                )
            with open(f"{out_dir}/{rule}-{rank}.json", "w") as handle:
                json.dump(provider.state_dict(), handle)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_keep_identical_state(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rule in ("v1", "v2", "cbb"):
        rank0 = json.loads((tmp_path / f"{rule}-0.json").read_text())
        rank1 = json.loads((tmp_path / f"{rule}-1.json").read_text())
        assert rank0 == rank1
        assert sum(rank0["replacements"]) > 0
