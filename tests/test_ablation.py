"""The recipe ablation (issue #9): configs, the CLR builder, one arm end to end, the results page.

Everything runs on a tiny random BERT and a few dozen rows written into ``tmp_path``; only the
evaluation reads ``../shared/data`` (one STS task), and that test skips when it is absent.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tests.conftest import WORDS

from conan_embedding.config import TrainConfig, load_config
from conan_embedding.data.records import PairRecord, RetrievalRecord, STSRecord, write_records
from conan_embedding.experiments.recipe_v1.arms import (
    ANALYSIS_END,
    ANALYSIS_START,
    RECIPE_TASKS,
    recipe_config_dir,
    resolve_arm,
)
from conan_embedding.experiments.recipe_v1.inputs import (
    build_clr_records,
    mine_with_own_corpus,
    recipe_mining_config,
)
from conan_embedding.experiments.recipe_v1.report import (
    backfill_negative_stats,
    load_results,
    write_results,
)
from conan_embedding.experiments.recipe_v1.run import EvalSettings, evaluate_dims, run_arm
from conan_embedding.mining.offline import default_pool_path, read_pools, write_pools
from conan_embedding.training.logs import negative_stats

ARMS = sorted(p.stem for p in recipe_config_dir().glob("*.yaml"))


def _load(arm: str) -> TrainConfig:
    return load_config(recipe_config_dir() / f"{arm}.yaml", {"data_dir": "/data"})


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths of a config dump; tasks keyed by name so a reorder is no difference."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict) and "name" in value[0]:
        return _flatten({item["name"]: item for item in value}, prefix)
    return {prefix.rstrip("."): value}


def _differences(arm: str, parent: str = "full") -> set[str]:
    full = _flatten(_load(parent).model_dump())
    other = _flatten(_load(arm).model_dump())
    keys = (set(full) | set(other)) - {"output_dir"}
    return {k for k in keys if full.get(k, "<absent>") != other.get(k, "<absent>")}


def test_every_recipe_config_validates():
    assert {"baseline", "full", "full-dhnm-v1", "minus-cbb", "minus-clr", "minus-dhnm",
            "minus-mrl"} <= set(ARMS)  # fmt: skip
    for arm in ARMS:
        config = _load(arm)
        assert config.optim.max_steps == 620 and config.model.max_seq_length == 64
        assert config.model.freeze_word_embeddings and config.checkpoint_every >= 620
        assert all(Path(t.path).is_relative_to("/data") for t in config.tasks)


def test_arms_are_overrides_of_full_and_package_data():
    """Every arm but the baseline (a different recipe) is ``base: full`` (or an arm based on
    it) plus overrides, and the baseline's variants are ``base: baseline``; the arms ship in the
    package (recipe_config_dir is not the checkout)."""
    assert recipe_config_dir().parts[-3:] == ("conan_embedding", "recipes", "v1")
    bases = {arm: yaml.safe_load((recipe_config_dir() / f"{arm}.yaml").read_text()).get("base")
             for arm in ARMS}  # fmt: skip
    assert bases.pop("full") is None and bases.pop("baseline") is None
    for arm, base in bases.items():
        while base not in ("full", "baseline"):
            assert base in bases, (arm, base)
            base = bases[base]
    assert resolve_arm("configs/recipe/full.yaml") == ("full", recipe_config_dir() / "full.yaml")


def test_minus_dhnm_differs_only_in_the_rule():
    assert _differences("minus-dhnm") == {
        "tasks.bge.dynamic_negatives.rule",
        "tasks.clr.dynamic_negatives.rule",
    }
    assert {t.dynamic_negatives.rule for t in _load("minus-dhnm").tasks} == {"none"}


def test_vanilla_is_minus_cbb_with_static_negatives():
    minus_cbb, vanilla = _load("minus-cbb"), _load("vanilla")
    assert {t.dynamic_negatives.rule for t in vanilla.tasks} == {"none"}
    assert vanilla.cbb is None and vanilla.task_schedule == minus_cbb.task_schedule
    for before, after in zip(minus_cbb.tasks, vanilla.tasks, strict=True):
        assert after.model_copy(update={"dynamic_negatives": before.dynamic_negatives}) == before


def test_dhnm_revisit_quantile_differs_from_revisit_v2_only_in_the_thresholds():
    absolute, quantile = _load("dhnm-revisit-v2"), _load("dhnm-revisit-v2-quantile")
    retrieval = [t for t in quantile.tasks if t.kind == "retrieval"]
    assert retrieval and {t.dynamic_negatives.thresholds for t in retrieval} == {"pool_quantile"}
    for before, after in zip(absolute.tasks, quantile.tasks, strict=True):
        thresholds = {"thresholds": before.dynamic_negatives.thresholds}
        restored = after.dynamic_negatives.model_copy(update=thresholds)
        assert after.model_copy(update={"dynamic_negatives": restored}) == before
    assert quantile.model_copy(update={"tasks": absolute.tasks, "output_dir": ""}) == (
        absolute.model_copy(update={"output_dir": ""})
    )


def test_full_dhnm_v1_differs_only_in_the_rule_and_its_check():
    diff = _differences("full-dhnm-v1")
    assert {k.split(".", 2)[2] for k in diff} == {
        "dynamic_negatives.rule",
        "dynamic_negatives.check_every",
    }


def test_minus_mrl_differs_only_in_matryoshka_dims():
    assert _differences("minus-mrl") == {"model.matryoshka_dims"}
    assert _load("minus-mrl").model.matryoshka_dims == []


def test_minus_clr_replaces_only_the_clr_task():
    diff = _differences("minus-clr")
    assert diff and all(
        k.startswith(("tasks.clr.", "tasks.parallel-pairs.", "cbb.task_ranks.")) for k in diff
    )
    full, minus = _load("full"), _load("minus-clr")
    assert minus.cbb.task_ranks["parallel-pairs"] == full.cbb.task_ranks["clr"]
    pairs = next(t for t in minus.tasks if t.name == "parallel-pairs")
    assert pairs.kind == "pairs" and pairs.path.endswith("parallel-en-zh.jsonl")


def _anchors_per_step(config: TrainConfig) -> int:
    """Queries / first sentences a step trains on (retrieval devices share their queries)."""
    return sum(t.batch_size for t in config.tasks)


def test_full_shares_moves_only_batch_shares_toward_bq_and_parallel_pairs():
    diff = _differences("full-shares")
    added = ("tasks.bq.", "tasks.parallel-pairs.", "cbb.task_ranks.")
    assert diff and all(k.startswith(added) or k.endswith(".batch_size") for k in diff)
    full, shares = _load("full"), _load("full-shares")
    assert _anchors_per_step(shares) == _anchors_per_step(full) == 36
    by_name = {t.name: t for t in shares.tasks}
    assert by_name["bq"].kind == "sts" and by_name["bq"].path.endswith("bq-dev.jsonl")
    pairs = by_name["parallel-pairs"]
    assert pairs.kind == "pairs" and pairs.path.endswith("parallel-en-zh.jsonl")
    # the parallel pairs train beside CLR, BQ beside the other STS sets; CLR and DHNM stay
    assert shares.cbb.task_ranks["parallel-pairs"] == full.cbb.task_ranks["clr"]
    assert shares.cbb.task_ranks["bq"] == full.cbb.task_ranks["zh-pairs"]
    assert [t.dynamic_negatives.rule for t in shares.tasks if t.kind == "retrieval"] == [
        "v2",
        "v2",
    ]


def test_issue_27_arms_each_change_one_mechanism_of_full():
    """Re-mining DHNM, false-negative masking and instructions each differ from full in their
    own keys only, so a score difference is that mechanism's."""
    assert _differences("full-remine") == {
        "tasks.bge.dynamic_negatives.remine_every",
        "tasks.clr.dynamic_negatives.remine_every",
    }
    remine = _load("full-remine")
    assert {t.dynamic_negatives.remine_every for t in remine.tasks if t.kind == "retrieval"} == {
        100
    }
    assert _differences("full-fnmask") == {
        "tasks.bge.false_negative_margin",
        "tasks.clr.false_negative_margin",
    }
    instruct = _differences("full-instruct")
    assert {k for k in instruct if not k.startswith("eval_prompts.")} == {
        "tasks.bge.instruction",
        "tasks.cnsd-sts.instruction",
        "tasks.zh-pairs.instruction",
    }
    assert _load("full-instruct").eval_prompts == {
        "STS": "cnsd-sts",
        "Retrieval": "bge",
        "Reranking": "bge",
    }
    assert _differences("full-beta02") == {"cbb.beta"}
    assert _differences("full-gradbal") == {"cbb.grad_balance"}
    assert _load("full-gradbal").cbb.grad_balance == "norm"
    assert _differences("full-gradbal-half") == {"cbb.grad_balance", "cbb.grad_balance_alpha"}
    assert _differences("full-gradbal-rate") == {"cbb.grad_balance"}
    assert _load("full-gradbal-rate").cbb.grad_balance == "loss_rate"
    assert _differences("full-remine-gradbal-rate", "full-remine") == {"cbb.grad_balance"}
    assert _differences("full-tatoeba-gradbal", "full-tatoeba") == {"cbb.grad_balance"}
    assert _differences("full-tatoeba-gradbal-half", "full-tatoeba-gradbal") == {
        "cbb.grad_balance_alpha"
    }
    assert _differences("full-tatoeba-gradbal-rate", "full-tatoeba-gradbal") == {"cbb.grad_balance"}
    for floored, parent in (
        ("full-tatoeba-gradbal-floor", "full-tatoeba-gradbal-rate"),
        ("full-gradbal-floor", "full-gradbal-rate"),
    ):
        assert _differences(floored, parent) == {"cbb.grad_balance_rate_floor"}
        assert _load(floored).cbb.grad_balance_rate_floor == 0.3
    for fast, parent in (
        ("full-tatoeba-gradbal-floor-lr4", "full-tatoeba-gradbal-floor"),
        ("baseline-lr4", "baseline"),
        ("full-gradbal-rate-lr4", "full-gradbal-rate"),
    ):
        assert _differences(fast, parent) == {"optim.lr"}
        assert _load(fast).optim.lr == 2 * _load(parent).optim.lr
    higher_floor = "full-tatoeba-gradbal-floor07-lr4"
    assert _differences(higher_floor, "full-tatoeba-gradbal-floor-lr4") == {
        "cbb.grad_balance_rate_floor"
    }
    assert _load(higher_floor).cbb.grad_balance_rate_floor == 0.7
    cosent12 = "full-tatoeba-gradbal-floor07-lr4-cosent12"
    assert _differences(cosent12, higher_floor) == {
        "tasks.cnsd-sts.batch_size",
        "tasks.zh-pairs.batch_size",
    }
    assert {t.name: t.batch_size for t in _load(cosent12).tasks if "-" in t.name} == {
        "cnsd-sts": 12,
        "zh-pairs": 12,
        "parallel-pairs": 32,
    }
    clr8 = "full-tatoeba-gradbal-floor-lr4-clr8"
    assert _differences(clr8, "full-tatoeba-gradbal-floor-lr4") == {"tasks.clr.batch_size"}
    assert next(t for t in _load(clr8).tasks if t.name == "clr").batch_size == 8


def test_minus_cbb_remine_is_minus_cbb_with_re_mining_only():
    minus_cbb, remine = _load("minus-cbb"), _load("minus-cbb-remine")
    assert remine.cbb is None and remine.task_schedule == minus_cbb.task_schedule
    for before, after in zip(minus_cbb.tasks, remine.tasks, strict=True):
        every = 100 if before.kind == "retrieval" else 0
        assert after.dynamic_negatives.remine_every == every
        unchanged = after.dynamic_negatives.model_copy(update={"remine_every": 0})
        assert after.model_copy(update={"dynamic_negatives": unchanged}) == before


def test_full_remine_tatoeba_is_full_tatoeba_with_full_remines_re_mining():
    tatoeba, combined = _load("full-tatoeba"), _load("full-remine-tatoeba")
    remine = {t.name: t.dynamic_negatives for t in _load("full-remine").tasks}
    assert combined.cbb == tatoeba.cbb
    for before, after in zip(tatoeba.tasks, combined.tasks, strict=True):
        if before.name in ("bge", "clr"):
            assert after.dynamic_negatives == remine[before.name]
            before = before.model_copy(update={"dynamic_negatives": remine[before.name]})
        assert after == before


def test_full_tatoeba_gives_the_parallel_pairs_the_baseline_batch_on_their_own_device():
    shares, remedy = _load("full-shares"), _load("full-tatoeba")
    pairs = {t.name: t for t in remedy.tasks}["parallel-pairs"]
    assert (
        pairs.batch_size
        == 32
        == {t.name: t for t in _load("baseline").tasks}["parallel-pairs"].batch_size
    )
    assert remedy.cbb.world_size == shares.cbb.world_size + 1
    owners = [name for name, ranks in remedy.cbb.task_ranks.items() if 4 in ranks]
    assert owners == ["parallel-pairs"]
    same = {k: v for k, v in _flatten(shares.model_dump()).items() if "parallel-pairs" not in k}
    other = _flatten(remedy.model_dump())
    changed = {k for k, v in same.items() if other.get(k) != v} - {"output_dir"}
    assert changed == {"cbb.world_size"}


def test_minus_cbb_keeps_examples_and_negatives_of_full():
    diff = _differences("minus-cbb")
    assert all(
        k.startswith("cbb") or k == "task_schedule" or k.endswith((".batch_size", ".negatives"))
        for k in diff
    )
    full, minus = _load("full"), _load("minus-cbb")
    assert minus.cbb is None and minus.task_schedule == "round_robin"
    n_tasks = len(full.tasks)
    for task in full.tasks:
        other = next(t for t in minus.tasks if t.name == task.name)
        devices = len(full.cbb.task_ranks[task.name])
        if task.kind == "retrieval":  # devices share the queries, split the negatives
            assert other.batch_size == n_tasks * task.batch_size
            assert other.negatives == devices * task.negatives
        else:  # every device draws its own batch
            assert other.batch_size == n_tasks * task.batch_size * devices
        assert other.dynamic_negatives == task.dynamic_negatives


# --------------------------------------------------------------------------- tiny data
def _sentence(i: int, offset: int = 0) -> str:
    return " ".join(WORDS[(i * 7 + k * 3 + offset) % len(WORDS)] for k in range(5))


def _parallel(n: int) -> list[PairRecord]:
    return [
        PairRecord(query=f"{_sentence(i)} {i}", pos=f"{_sentence(i, 11)} {i}") for i in range(n)
    ]


def _tiny_mining():
    """The recipe's window (ranks 10..110, 7 negatives) without the margin: a random BERT
    scores every text about as high as the positive, so the margin would drop them all."""
    return recipe_mining_config(None).model_copy(update={"relative_margin": None})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.conftest import build_tiny_bert

    from conan_embedding.modeling.embedder import build_embedder, save_embedder

    folder = tmp_path_factory.mktemp("tiny")
    model = build_embedder(build_tiny_bert(folder / "hf"), max_seq_length=32)
    return model, save_embedder(model, folder / "st")


def test_clr_builder_mines_both_directions_with_renumbered_pools(tiny_model, tmp_path):
    model, _ = tiny_model
    parallel = _parallel(40)
    records, pools, report = build_clr_records(
        parallel, model, _tiny_mining(), max_pairs=30, seed=1, show_progress=False
    )
    english = {p.query for p in parallel}
    chinese = {p.pos for p in parallel}
    en_to_zh = [r for r in records if r.query in english]
    zh_to_en = [r for r in records if r.query in chinese]
    assert len(en_to_zh) == report["en->zh"]["kept"] > 0
    assert len(zh_to_en) == report["zh->en"]["kept"] > 0
    assert records == en_to_zh + zh_to_en  # en->zh first, then zh->en
    assert all(set(r.pos) <= chinese and set(r.neg) <= chinese for r in en_to_zh)
    assert all(set(r.pos) <= english and set(r.neg) <= english for r in zh_to_en)
    assert all(len(r.neg) == 7 and not set(r.neg) & set(r.pos) for r in records)
    chosen_en = {r.query for r in en_to_zh}
    assert len(chosen_en | {p for r in zh_to_en for p in r.pos}) <= 30  # the cap
    path = tmp_path / "clr.jsonl"
    write_records(path, records)
    write_pools(default_pool_path(path), pools)
    reread = read_pools(default_pool_path(path))  # validates index == line
    assert [p.index for p in reread] == list(range(len(records)))
    assert [p.query for p in reread] == [r.query for r in records]
    assert all(
        r.neg == [c.text for c in p.candidates[:7]] for r, p in zip(records, reread, strict=True)
    )


def test_prepared_recipe_pools_record_how_they_were_mined(tiny_model, tmp_path, monkeypatch):
    """Issue #16: both mined files get a pool meta beside their pool, so DHNM's
    ``initial_score: auto`` can take the pool's scores as S_0 for the model that mined them."""
    from conan_embedding.experiments.recipe_v1 import inputs as recipe_inputs
    from conan_embedding.mining.offline import PoolMeta, read_pool_meta

    model, model_dir = tiny_model
    data = tmp_path / "work" / "data"
    sts = [
        STSRecord(sentence1=_sentence(i), sentence2=_sentence(i, 1), score=1.0) for i in range(8)
    ]
    for source in recipe_inputs.prepare_sources():  # present, so nothing is downloaded or prepared
        write_records(data / f"{source}.jsonl", sts)
    write_records(data / "parallel-en-zh.jsonl", _parallel(40))
    bge = [
        RetrievalRecord(query=_sentence(i), pos=[_sentence(i, 2)], neg=[_sentence(i + 1, 5)])
        for i in range(30)
    ]
    write_records(data / "bge-finetune.jsonl", bge)
    monkeypatch.setattr(recipe_inputs, "recipe_mining_config", lambda prompt: _tiny_mining())
    inputs = recipe_inputs.prepare_recipe_inputs(
        tmp_path / "work", model_dir=model_dir, clr_pairs=30, show_progress=False
    )
    mined_with = recipe_inputs._load_mining_model(model_dir, 64)
    for pool in (inputs.clr_pool, inputs.bge_pool):
        meta = read_pool_meta(pool)
        assert meta is not None and meta.max_seq_length == 64
        assert meta.matches(PoolMeta.of(mined_with, None, None))
    report = json.loads((data / "recipe_mining_report.json").read_text(encoding="utf-8"))
    assert report["clr"]["en->zh"]["kept"] > 0 and report["bge"]["kept"] > 0
    assert "pool_meta" not in report["clr"] and "pool_meta" not in report["bge"]  # beside the pool


def _write_tiny_work_dir(work: Path, model) -> None:
    data = work / "data"
    sts = [
        STSRecord(sentence1=_sentence(i), sentence2=_sentence(i, 1 + i % 3), score=float(i % 6))
        for i in range(24)
    ]
    write_records(data / "cnsd-stsb-train.jsonl", sts)
    write_records(
        data / "zh-pairs-sts.jsonl", [s.model_copy(update={"score": s.score % 2}) for s in sts]
    )
    config = _tiny_mining()
    records, pools, _ = build_clr_records(_parallel(40), model, config, show_progress=False)
    write_records(data / "clr-en-zh.jsonl", records)
    write_pools(default_pool_path(data / "clr-en-zh.jsonl"), pools)
    bge = [
        RetrievalRecord(
            query=_sentence(i),
            pos=[_sentence(i, 2)],
            neg=[_sentence(i + j, 5) for j in range(1, 4)],
        )
        for i in range(30)
    ]
    mined, bge_pools, _ = mine_with_own_corpus(bge, model, config, show_progress=False)
    write_records(data / "bge-finetune-mined.jsonl", mined)
    write_pools(default_pool_path(data / "bge-finetune-mined.jsonl"), bge_pools)


def test_run_arm_end_to_end_writes_the_result_json(tiny_model, tmp_path, data_dir, monkeypatch):
    model, model_dir = tiny_model
    monkeypatch.setenv("CONAN_EMBED_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    _write_tiny_work_dir(tmp_path / "work", model)
    results = tmp_path / "results"
    settings = EvalSettings(results_dir=results, data_dir=data_dir, show_progress=False)
    record = run_arm(
        "full",
        seed=3,
        work_dir=tmp_path / "work",
        steps=2,
        threads=1,
        eval_tasks=["STSBenchmark"],
        model_dir=model_dir,
        overrides={"model.matryoshka_dims": [8, 16, 32], "model.max_seq_length": 32},
        settings=settings,
    )
    torch.set_num_threads(threads)
    saved = json.loads((results / "full-s3.json").read_text(encoding="utf-8"))
    assert saved == record
    assert record["arm"] == "full" and record["seed"] == 3 and record["steps"] == 2
    assert record["trainer"] == "CBBTrainer" and record["torch_threads"] == 1
    assert (
        set(record["scores"]) == {"STSBenchmark"}
        and -100 <= record["scores"]["STSBenchmark"] <= 100
    )
    assert record["eval_max_seq_length"] == 64  # 256 capped by the tiny BERT's positions
    seen = record["examples_seen"]
    assert seen["bge"] == {"steps": 2, "batch_size": 4, "devices": 1, "examples": 8,
                           "negatives_per_query": 4}  # fmt: skip
    assert seen["cnsd-sts"]["examples"] == 2 * 12 and seen["clr"]["examples"] == 2 * 8
    assert not (tmp_path / "work" / "arms" / "full-s3" / "checkpoints").exists()
    assert (tmp_path / "work" / "arms" / "full-s3" / "model" / "modules.json").is_file()
    card = (tmp_path / "work" / "arms" / "full-s3" / "model" / "README.md").read_text("utf-8")
    assert card.startswith("---\n") and "# full-s3" in card  # Conan's card, with the scores
    assert f"| STSBenchmark | {record['scores']['STSBenchmark']:.4g} |" in card
    assert "**Dynamic hard negative mining (DHNM)** on `bge`: rule v2" in card
    for key in ("train_seconds", "eval_seconds", "loadavg_before", "loadavg_after", "machine"):
        assert key in record
    # a second call finds the JSON and trains nothing
    again = run_arm("full", seed=3, work_dir=tmp_path / "nowhere", settings=settings)
    assert again == record
    # a tag names its own file, so the tagged run is not the untagged one
    (results / "full-620-s3.json").write_text('{"arm": "full-620"}', encoding="utf-8")
    tagged = run_arm("full", seed=3, work_dir=tmp_path / "nowhere", settings=settings, tag="620")
    assert tagged == {"arm": "full-620"}
    (results / "full-620-s3.json").unlink()

    # Matryoshka: the same model cut to 8 of its 32 dims is scored again, beside the rest
    dims = {"work_dir": tmp_path / "work", "eval_tasks": ["STSBenchmark"], "settings": settings}
    cut = evaluate_dims("full-s3", [8], **dims)
    torch.set_num_threads(threads)
    assert {k: v for k, v in cut.items() if k != "scores_by_dim"} == record
    assert set(cut["scores_by_dim"]) == {"8"}
    assert cut["scores_by_dim"]["8"]["STSBenchmark"] != record["scores"]["STSBenchmark"]
    assert json.loads((results / "full-s3.json").read_text(encoding="utf-8")) == cut
    assert evaluate_dims("full-s3", [8], **dims) == cut  # kept, not evaluated again
    with pytest.raises(ValueError, match="outside 1..32"):
        evaluate_dims("full-s3", [64], **dims)
    page = write_results(results, tmp_path / "results.md").read_text(encoding="utf-8")
    row = f"| full | 3 | 8 |  | {cut['scores_by_dim']['8']['STSBenchmark']:.2f} |"
    assert row in page

    # --mixed-precision bf16: the arm trains and is evaluated under bf16 autocast, and says so
    bf16 = run_arm(
        "full",
        seed=3,
        work_dir=tmp_path / "work",
        steps=1,
        threads=1,
        eval_tasks=["STSBenchmark"],
        model_dir=model_dir,
        overrides={"model.matryoshka_dims": [8, 16, 32], "model.max_seq_length": 32},
        settings=dataclasses.replace(settings, mixed_precision="bf16"),
        tag="bf16",
    )
    torch.set_num_threads(threads)
    assert record["mixed_precision"] == "no" and record["eval_mixed_precision"] == "no"
    assert bf16["mixed_precision"] == "bf16" and bf16["eval_mixed_precision"] == "bf16"
    trained = json.loads(
        (tmp_path / "work" / "arms" / "full-bf16-s3" / "config.json").read_text(encoding="utf-8")
    )
    assert trained["engine"]["mixed_precision"] == "bf16"

    # an arm trained with instructions is scored with them: its eval_prompts reach evaluate
    instructed = run_arm(
        "full-instruct",
        seed=3,
        work_dir=tmp_path / "work",
        steps=1,
        threads=1,
        eval_tasks=["STSBenchmark"],
        model_dir=model_dir,
        overrides={"model.matryoshka_dims": [8, 16, 32], "model.max_seq_length": 32},
        settings=settings,
    )
    torch.set_num_threads(threads)
    assert instructed["eval_prompts"] == {"STS": "cnsd-sts", "Retrieval": "bge", "Reranking": "bge"}
    run_info = next(
        (tmp_path / "work" / "arms" / "full-instruct-s3" / "eval").rglob("run_info.json")
    )
    assert (
        json.loads(run_info.read_text(encoding="utf-8"))["prompt_map"] == instructed["eval_prompts"]
    )


def _fake_result(arm: str, seed: int | None, base: float) -> dict[str, Any]:
    scores = {t: round(base + i, 2) for i, t in enumerate(RECIPE_TASKS)}
    scores["BGEHeldoutRerankingLocal"] = base + 10
    return {
        "arm": arm, "seed": seed, "steps": 620, "scores": scores, "train_seconds": 100.0,
        "eval_seconds": 50.0, "torch_threads": 2, "loadavg_before": [1.0, 1.0, 1.0],
        "loadavg_after": [2.0, 2.0, 2.0], "git_commit": "abc", "machine": {"cpus": 2,
        "platform": "test"}, "examples_seen": {},
    }  # fmt: skip


def test_write_results_table_equals_the_jsons_and_keeps_the_analysis(tmp_path):
    results = tmp_path / "results"
    for name, record in {
        "base.json": _fake_result("base", None, 50.0),
        "baseline-s42.json": _fake_result("baseline", 42, 60.0),
        "full-s42.json": _fake_result("full", 42, 62.0),
        "full-s43.json": _fake_result("full", 43, 63.0),
        "baseline-620-s42.json": _fake_result("baseline-620", 42, 64.0),
        "full-620-s42.json": _fake_result("full-620", 42, 65.5),
        "full-shares-620-s42.json": _fake_result("full-shares-620", 42, 67.0),
        "minus-dhnm-620-s42.json": _fake_result("minus-dhnm-620", 42, 65.5)
        | {"mixed_precision": "bf16", "eval_mixed_precision": "bf16"},
        "dhnm-revisit-v2-s42.json": _fake_result("dhnm-revisit-v2", 42, 61.0),
    }.items():
        results.mkdir(exist_ok=True)
        (results / name).write_text(json.dumps(record), encoding="utf-8")
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text(f"old\n{ANALYSIS_START}\nwhy CBB helps\n{ANALYSIS_END}\nold tail\n", "utf-8")
    write_results(results, page)
    text = page.read_text(encoding="utf-8")
    assert f"{ANALYSIS_START}\nwhy CBB helps\n{ANALYSIS_END}" in text and "old tail" not in text
    assert (tmp_path / "docs" / "results.png").is_file()
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in text.split("| arm | seeds |", 1)[1].split("\n\n", 1)[0].splitlines()
        if line.startswith("| ")
    }
    assert [a.arm for a in load_results(results)] == [
        "base",
        "baseline",
        "full",
        "baseline-620",
        "full-620",
        "full-shares-620",
        "minus-dhnm-620",
        "dhnm-revisit-v2",
    ]  # fmt: skip  (the plain arms, then each tag's arms in the same order, then the rest)
    baseline_cells = rows["baseline"].strip("| ").split(" | ")
    assert baseline_cells[2:9] == [f"{60.0 + i:.2f}" for i in range(7)]
    assert baseline_cells[9] == f"{60.0 + 3:.2f}"  # the average of the seven
    assert baseline_cells[10] == "70.00"  # BGE reranking, outside the average
    full_cells = rows["full"].strip("| ").split(" | ")
    assert full_cells[1] == "42, 43" and full_cells[2] == "62.50 ± 0.50"
    delta = rows["**full − baseline**"].strip("| ").split(" | ")
    assert delta[2:] == ["+2.50"] * 9
    tagged = rows["**full-620 − baseline-620**"].strip("| ").split(" | ")  # a tagged pair
    assert tagged[2:] == ["+1.50"] * 9
    # every whole-recipe arm gets its line against the baseline run the same way
    shares = rows["**full-shares-620 − baseline-620**"].strip("| ").split(" | ")
    assert shares[2:] == ["+3.00"] * 9
    assert "**full-620 − plain ST (quoted)**" in rows
    assert "*plain ST fine-tune (issue #9, quoted)*" in rows
    assert "76.42" in rows["*plain ST fine-tune (issue #9, quoted)*"]
    assert "conan-embed recipe report" in text
    # the Runs table says each run's train / eval precision (older JSONs: float32)
    assert "| minus-dhnm-620 | 42 | 620 | 100 | 50 | 2 | bf16 / bf16 |" in text
    assert "| full-620 | 42 | 620 | 100 | 50 | 2 | fp32 / fp32 |" in text
    # regenerating keeps the (now only) analysis section verbatim
    write_results(results, page)
    assert page.read_text(encoding="utf-8") == text


def test_the_bar_table_ranks_every_arm_against_its_own_baseline(tmp_path):
    """Issue #27's bar: +2.0 on the average, two seeds, no row below the baseline."""
    results = tmp_path / "results"
    results.mkdir()
    one_row_low = _fake_result("full-tatoeba", 42, 63.0)
    one_row_low["scores"]["BQ"] = 58.0  # mean of the seeds 61.50, the baseline's 62.00
    for name, record in {
        "baseline-s42.json": _fake_result("baseline", 42, 60.0),
        "baseline-s43.json": _fake_result("baseline", 43, 60.0),
        "full-s42.json": _fake_result("full", 42, 62.0),
        "full-s43.json": _fake_result("full", 43, 62.5),  # +2.25, two seeds, nothing below
        "full-remine-s42.json": _fake_result("full-remine", 42, 63.0),  # one seed only
        "full-tatoeba-s42.json": one_row_low,
        "full-tatoeba-s43.json": _fake_result("full-tatoeba", 43, 63.0),
        "baseline-620-s42.json": _fake_result("baseline-620", 42, 70.0),
        "full-620-s42.json": _fake_result("full-620", 42, 69.0),  # against baseline-620
    }.items():
        (results / name).write_text(json.dumps(record), encoding="utf-8")
    text = write_results(results, tmp_path / "results.md", chart=False).read_text("utf-8")
    section = text.split("## Every arm against the bar of issue #27", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0].strip("| ") for r in rows[1:]] == [
        "full-remine",
        "full-tatoeba",
        "full",
        "full-620",
    ]  # best gain first; the baselines are not rows
    assert rows[1] == "| full-remine | 1 | baseline | 66.00 | +3.00 |  | none | no |"
    assert rows[2] == "| full-tatoeba | 2 | baseline | 65.50 | +2.50 | 0.50 | BQ -0.50 | no |"
    assert rows[3] == "| full | 2 | baseline | 65.25 | +2.25 | 0.25 | none | yes |"
    assert rows[4].startswith("| full-620 | 1 | baseline-620 | 72.00 | -1.00 |  | ")
    assert rows[4].endswith(" | no |") and "STSB -1.00" in rows[4]


def _negatives(rule: str, replacements: float | None, first: float) -> dict[str, Any]:
    return {
        "rule": rule, "replacements": replacements, "pool_exhausted": None,
        "neg_score_first_10": first, "neg_score_second_half": first - 0.2,
    }  # fmt: skip


def test_the_paper_shape_table_puts_each_tag_s_four_arms_beside_the_paper(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    static = {"negatives": {"bge": _negatives("none", None, 0.85)}}
    dynamic = {"negatives": {"bge": _negatives("v2", 4832.0, 0.9)}}
    dynamic["negatives"]["clr"] = _negatives("v2", 1942.0, 0.8)
    for name, record in {
        "vanilla-620-s42.json": _fake_result("vanilla-620", 42, 60.0) | static,
        "vanilla-620-s43.json": _fake_result("vanilla-620", 43, 61.0) | static,
        "full-620-s42.json": _fake_result("full-620", 42, 62.0) | dynamic,
        "minus-cbb-620-s42.json": _fake_result("minus-cbb-620", 42, 59.0),
        "full-s42.json": _fake_result("full", 42, 70.0),  # untagged: a table of its own
        "minus-dhnm-s42.json": _fake_result("minus-dhnm", 42, 69.0),
        "full-bq-s42.json": _fake_result("full-bq", 42, 70.0),  # one arm: no table
    }.items():
        (results / name).write_text(json.dumps(record), encoding="utf-8")
    text = write_results(results, tmp_path / "results.md").read_text(encoding="utf-8")
    section = text.split("## The v1 paper's ablation shape", 1)[1].split("\n## ", 1)[0]
    assert "Runs `bq`" not in section
    untagged, tagged = section.split("Runs `untagged`:", 1)[1].split("Runs `620`:")
    assert "| full (CBB + DHNM) | full | 42 | 73.00 |  | 72.62 | +3.82 |" in untagged
    assert "| +CBB | minus-dhnm | 42 | 72.00 |  | 70.40 | +1.60 |" in untagged
    assert "| vanilla | vanilla-620 | 42, 43 | 63.50 ± 0.50 | +0.00 | 68.80 | +0.00 |" in tagged
    assert "| +CBB | minus-dhnm-620 | not run |  |  | 70.40 | +1.60 |" in tagged
    assert "| +DHNM | minus-cbb-620 | 42 | 62.00 | -1.50 | 71.20 | +2.40 |" in tagged
    assert "| full (CBB + DHNM) | full-620 | 42 | 65.00 | +1.50 | 72.62 | +3.82 |" in tagged
    # each arm's hard negatives: score trend averaged over seeds, DHNM replacements per seed
    assert "| +3.82 | bge 0.900 → 0.700; clr 0.800 → 0.600 | bge 4,832, clr 1,942 (s42) |" in (
        tagged
    )
    assert "| +0.00 | bge 0.850 → 0.650 | static (s42); static (s43) |" in tagged


def test_negative_stats_read_each_dhnm_task_and_the_page_shows_them(tmp_path):
    config = _load("full")
    rows = []
    for step in range(1, 21):
        row: dict[str, Any] = {"step": step, "loss/bge": 1.0, "loss/clr": 1.0}
        row["bge/neg_score"] = 0.9 if step <= 10 else 0.7
        row["clr/neg_score"] = 0.8
        row["bge/dhnm/replacements_total"] = float(step)
        row["bge/dhnm/pool_exhausted"] = 0.25
        row["clr/dhnm/replacements_total"] = 0.0
        row["clr/dhnm/pool_exhausted"] = 0.0
        rows.append(row)
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    stats = negative_stats(config, log)
    assert set(stats) == {"bge", "clr"}  # the STS tasks have no negatives
    assert stats["bge"] == {
        "rule": "v2", "replacements": 20.0, "pool_exhausted": 0.25,
        "neg_score_first_10": 0.9, "neg_score_second_half": 0.7,
    }  # fmt: skip
    assert stats["clr"]["replacements"] == 0.0 and stats["clr"]["neg_score_second_half"] == 0.8

    results = tmp_path / "results"
    results.mkdir()
    record = _fake_result("full", 42, 62.0)
    record.update({"config": "configs/recipe/full.yaml", "output_dir": str(tmp_path)})
    (results / "full-s42.json").write_text(json.dumps(record), encoding="utf-8")
    assert backfill_negative_stats(results) == [results / "full-s42.json"]
    assert backfill_negative_stats(results) == []  # already there
    page = write_results(results, tmp_path / "results.md")
    assert "| full | 42 | bge | v2 | 20 | 25.0% | 0.9000 → 0.7000 |" in page.read_text("utf-8")
