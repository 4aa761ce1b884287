"""Validation during training (issue #26 item 5): ``validation:`` in the train config.

Tiny random BERT and the toy task files; the metric is real (the held-out loss, or mteb's
STSBenchmark on a dozen pairs written here), never a fake.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from conan_embedding.config import ConfigError, ValidationConfig, load_config
from conan_embedding.modeling.embedder import load_embedder
from conan_embedding.toy import toy_sentence, toy_sts_rows, toy_train_config
from conan_embedding.training.trainer import Trainer, read_log

NEVER = 1e6
"""A ``min_delta`` no later validation beats: the first one stays best."""


def _config(folder: Path, model: Path, steps: int, validation: dict, **extra):
    config = {
        **toy_train_config(folder, model, steps, tasks=("ret", "sts", "cls")),
        "validation": validation,
        **extra,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return load_config(path)


def _val_rows(output_dir: Path, key: str = "val/loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_log(output_dir / "train_log.jsonl") if key in r]


def test_heldout_validation_logs_curve_and_keeps_the_best_step(tmp_path, tiny_bert):
    config = _config(tmp_path, tiny_bert, 7, {"every": 2, "heldout": {"rows": 8}})
    trainer = Trainer(config)
    result = trainer.train(show_progress=False)

    curve = _val_rows(result.output_dir)
    assert [s for s, _ in curve] == [2, 4, 6, 7]  # every 2 steps and the last
    rows = read_log(result.output_dir / "train_log.jsonl")
    assert all("val/loss/ret" in r and "val/loss/sts" in r for r in rows if "val/loss" in r)
    assert not any(k.startswith("val/") for r in rows if r["step"] in (1, 3, 5) for k in r)
    best_step, best_value = min(curve, key=lambda sv: sv[1])
    assert result.best_step == best_step and trainer.validation.state.best_step == best_step

    # best/ is that step's model: its held-out loss is the logged one
    best = result.output_dir / "best"
    assert (best / "model.safetensors").is_file()
    meta = json.loads((best / "conan_embedding.json").read_text())
    assert meta["step"] == best_step and meta["validation"]["metric"] == "loss"
    again = trainer.validation.heldout(load_embedder(best))["loss"]
    assert again == pytest.approx(best_value, abs=1e-5)
    # the final model stays where it is, and is the last step's
    assert json.loads((result.model_dir / "conan_embedding.json").read_text())["steps"] == 7
    last = trainer.validation.heldout(load_embedder(result.model_dir))["loss"]
    assert last == pytest.approx(curve[-1][1], abs=1e-5)
    assert not list(result.output_dir.glob(".best*"))  # atomic: no temp folder left


def test_heldout_rows_are_never_trained_on(tmp_path, tiny_bert):
    config = _config(tmp_path, tiny_bert, 6, {"every": 3, "heldout": {"fraction": 0.25}})
    trainer = Trainer(config)
    # classification has no held-out loss: its rows all train; ret and sts lose 10 of 40
    assert {k: len(v) for k, v in trainer.heldout_records.items()} == {"ret": 10, "sts": 10}
    assert len(trainer.records["ret"]) == 30 and len(trainer.records["cls"]) == 40
    held_queries = {r.query for r in trainer.heldout_records["ret"]}
    held_pairs = {(r.sentence1, r.sentence2) for r in trainer.heldout_records["sts"]}
    assert not held_queries & {r.query for r in trainer.records["ret"]}
    # the negative pool of the task is the training rows only
    assert len(trainer.providers["ret"].records) == 30  # type: ignore[attr-defined]

    seen: dict[str, list[int]] = {"ret": [], "sts": []}
    for name, stream in trainer.streams.items():
        if name in seen:
            draw = stream.next_indices

            def spy(size, _draw=draw, _name=name):
                rows = _draw(size)
                seen[_name].extend(int(i) for i in rows)
                return rows

            stream.next_indices = spy  # type: ignore[method-assign]
    trainer.train(show_progress=False)
    assert seen["ret"] and seen["sts"]
    assert not {trainer.records["ret"][i].query for i in seen["ret"]} & held_queries
    trained_pairs = {
        (trainer.records["sts"][i].sentence1, trainer.records["sts"][i].sentence2)
        for i in seen["sts"]
    }
    assert not trained_pairs & held_pairs


def test_early_stopping_stops_after_patience(tmp_path, tiny_bert):
    validation = {
        "every": 2,
        "heldout": {"rows": 8},
        "early_stopping": {"patience": 2, "min_delta": NEVER},
    }
    config = _config(tmp_path, tiny_bert, 20, validation)
    result = Trainer(config).train(show_progress=False)
    # step 2 is best; 4 and 6 do not improve by min_delta: patience 2 is used up at step 6
    assert result.steps == 6 and result.best_step == 2
    assert result.stopped and "early stopping at step 6" in result.stopped
    rows = read_log(result.output_dir / "train_log.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert "early stopping at step 6" in (result.output_dir / "train.log").read_text()
    assert (result.model_dir / "model.safetensors").is_file()  # saved as usual
    assert json.loads((result.model_dir / "conan_embedding.json").read_text())["steps"] == 6
    card = (result.model_dir / "README.md").read_text()
    assert "## Validation during training" not in card  # no readme given: ST's generic card


def test_resume_keeps_the_best_step_and_patience(tmp_path, tiny_bert):
    validation = {
        "every": 2,
        "heldout": {"rows": 8},
        "early_stopping": {"patience": 5, "min_delta": NEVER},
    }
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full_dir.mkdir()
    killed_dir.mkdir()
    full = Trainer(_config(full_dir, tiny_bert, 16, validation)).train(show_progress=False)
    assert (full.steps, full.best_step) == (12, 2)  # 2 best; 4..12 are five without

    def die_at_10(step: int, record: dict) -> None:
        if step == 10:
            raise KeyboardInterrupt

    config = _config(killed_dir, tiny_bert, 16, validation)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, on_step=die_at_10).train(show_progress=False)
    # checkpoint at step 8 holds best step 2 and three validations without improvement
    trainer = Trainer(config)
    resumed = trainer.train(resume=True, show_progress=False)
    assert (resumed.steps, resumed.best_step) == (12, 2)
    assert trainer.validation.state.since_best == 5
    assert [s for s, _ in trainer.validation.state.curve] == [2, 4, 6, 8, 10, 12]
    np.testing.assert_allclose(
        [v for _, v in _val_rows(killed_dir / "run")],
        [v for _, v in _val_rows(full_dir / "run")],
        rtol=1e-5,
        atol=1e-6,
    )
    best_meta = json.loads((killed_dir / "run" / "best" / "conan_embedding.json").read_text())
    assert best_meta["step"] == 2


def _write_sts_benchmark(data_dir: Path, rows: int = 16) -> None:
    """A dozen pairs as ``sts/stsbenchmark.tsv.gz`` (the local STSBenchmark task's file)."""
    rng = np.random.default_rng(5)
    lines = ["split\tgenre\tdataset\tyear\tsid\tscore\tsentence1\tsentence2"]
    for i, row in enumerate(toy_sts_rows(rng, rows)):
        lines.append(
            f"test\tmain\ttoy\t2024\t{i}\t{row['score']}\t{row['sentence1']}\t{row['sentence2']}"
        )
    lines.append(f"train\tmain\ttoy\t2024\t99\t1.0\t{toy_sentence(rng, 3)}\t{toy_sentence(rng, 3)}")
    (data_dir / "sts").mkdir(parents=True)
    with gzip.open(data_dir / "sts" / "stsbenchmark.tsv.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def test_task_validation_scores_a_local_sts_task(tmp_path, tiny_bert):
    from conan_embedding.evaluation.validation import task_validator
    from conan_embedding.reporting.card import readme_for

    data_dir = tmp_path / "data"
    _write_sts_benchmark(data_dir)
    validation = {
        "every": 2,
        "tasks": ["STSBenchmark"],
        "max_pairs": None,
        "data_dir": str(data_dir),
    }
    config = _config(tmp_path, tiny_bert, 4, validation, checkpoint_every=100)
    assert config.validation.metric == "STSBenchmark" and config.validation.mode == "max"
    with pytest.raises(ValueError, match="evaluation layer"):
        Trainer(config)  # tasks need the function from the layer above
    result = Trainer(
        config, readme=readme_for(config), validate=task_validator(config.validation)
    ).train(show_progress=False)
    curve = _val_rows(result.output_dir, "val/STSBenchmark")
    assert [s for s, _ in curve] == [2, 4] and all(math.isfinite(v) for _, v in curve)
    assert result.best_step == max(curve, key=lambda sv: sv[1])[0]
    card = (result.model_dir / "README.md").read_text()
    assert "## Validation during training" in card and "| step | STSBenchmark |" in card
    assert f"at step {result.best_step}" in card

    # scoring does not change the training trajectory (RNGs untouched, eval mode restored)
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    plain = {**toy_train_config(plain_dir, tiny_bert, 4), "checkpoint_every": 100}
    (plain_dir / "c.yaml").write_text(yaml.safe_dump(plain), encoding="utf-8")
    without = Trainer(load_config(plain_dir / "c.yaml")).train(show_progress=False)
    np.testing.assert_allclose(
        [r["loss"] for r in read_log(result.output_dir / "train_log.jsonl")],
        [r["loss"] for r in read_log(without.output_dir / "train_log.jsonl")],
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    ("validation", "message"),
    [
        ({"every": 2}, "give tasks, heldout"),
        ({"every": 2, "heldout": {"rows": 4, "fraction": 0.1}}, "exactly one of"),
        ({"every": 2, "tasks": ["STSBenchmark"], "metric": "loss"}, "needs validation.heldout"),
        ({"every": 2, "tasks": ["STSBenchmark"], "metric": "SciFact"}, "neither"),
    ],
)
def test_validation_config_errors(validation, message):
    with pytest.raises(ValidationError, match=message):
        ValidationConfig(**validation)


def test_validation_config_defaults_and_heldout_task_checks(tmp_path, tiny_bert):
    config = ValidationConfig(every=5, heldout={"fraction": 0.1})
    assert (config.metric, config.mode, config.key) == ("loss", "min", "val/loss")
    with pytest.raises(ConfigError, match="classification"):
        _config(tmp_path, tiny_bert, 4, {"every": 2, "heldout": {"rows": 4, "tasks": ["cls"]}})
    with pytest.raises(ConfigError, match="no held-out task"):
        _config(tmp_path, tiny_bert, 4, {"every": 2, "heldout": {"rows": 4}, "metric": "loss/cls"})


def _validated_rank(rank: int, world: int, port: int, config_path: str) -> None:
    """One torchrun-like process of a run with validation (rank 0 scores, all ranks obey)."""
    import torch.distributed as dist
    from tests.test_distributed import join_as_rank

    join_as_rank(rank, world, port)
    try:
        trainer = Trainer(load_config(config_path))
        assert trainer.engine.world_size == world
        result = trainer.train(show_progress=False)
        Path(config_path).with_name(f"rank{rank}.json").write_text(
            json.dumps({"steps": result.steps, "best_step": result.best_step}), encoding="utf-8"
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_validate_like_one_and_stop_together(tmp_path, tiny_bert):
    """Under data parallel the main rank scores the held-out rows and every rank follows its
    best-step and early-stopping decisions: the curve, the best step and the stop equal one
    process's with the same shards (the same trajectory), and no rank waits at a collective."""
    import torch.multiprocessing as mp
    from tests.test_distributed import free_port

    validation = {
        "every": 2,
        "heldout": {"rows": 8},
        "early_stopping": {"patience": 2, "min_delta": NEVER},
    }
    runs = {}
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        config = _config(folder, tiny_bert, 20, validation, engine={"shards": 2})
        path = folder / "config.yaml"
        if name == "one":
            runs[name] = Trainer(config).train(show_progress=False).output_dir
            continue
        mp.spawn(_validated_rank, args=(2, free_port(), str(path)), nprocs=2, join=True)
        ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
        assert ranks == [{"steps": 6, "best_step": 2}] * 2  # both ranks stopped at step 6
        runs[name] = Path(config.output_dir)
    one, two = (_val_rows(runs[n]) for n in ("one", "two"))
    assert [s for s, _ in two] == [s for s, _ in one] == [2, 4, 6]
    for (_, a), (_, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, abs=1e-4)
    best = json.loads((runs["two"] / "best" / "conan_embedding.json").read_text())
    assert best["step"] == 2
