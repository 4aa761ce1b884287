from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from tests.conftest import WORDS

from conan_embedding.config import ConfigError, load_config
from conan_embedding.data.records import RecordDataset, read_records, write_records
from conan_embedding.training.trainer import Trainer, TrainingDivergedError, read_log


def _sentence(rng: np.random.Generator, n: int = 5) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def write_toy_tasks(folder: Path, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    retrieval, sts, classification = [], [], []
    for _ in range(40):
        q = _sentence(rng)
        retrieval.append(
            {
                "query": q,
                "pos": [q + " " + _sentence(rng, 2)],
                "neg": [_sentence(rng) for _ in range(3)],
            }
        )
    for _ in range(40):
        a = _sentence(rng)
        score = float(rng.integers(0, 6))
        b = a if score >= 4 else _sentence(rng)
        sts.append({"sentence1": a, "sentence2": b, "score": score})
    for i in range(40):
        label = ["bank", "food", "sky"][i % 3]
        classification.append({"text": f"{label} " + _sentence(rng, 3), "label": label})
    paths = {}
    for name, rows in (("retrieval", retrieval), ("sts", sts), ("classification", classification)):
        paths[name] = folder / f"{name}.jsonl"
        write_records(paths[name], rows)
    return paths


def write_config(folder: Path, model: Path, steps: int = 12, **extra) -> Path:
    paths = write_toy_tasks(folder)
    config = {
        "output_dir": str(folder / "run"),
        "seed": 3,
        "model": {
            "name": str(model),
            "dense_dim": 24,
            "matryoshka_dims": [8, 24],
            "max_seq_length": 32,
        },
        "optim": {"lr": 5e-4, "max_steps": steps, "warmup_ratio": 0.1},
        "checkpoint_every": 4,
        "task_schedule": "round_robin",
        "tasks": [
            {
                "name": "ret",
                "kind": "retrieval",
                "path": str(paths["retrieval"]),
                "batch_size": 4,
                "negatives": 2,
            },
            {"name": "sts", "kind": "sts", "path": str(paths["sts"]), "batch_size": 8},
            {
                "name": "cls",
                "kind": "classification",
                "path": str(paths["classification"]),
                "batch_size": 6,
                "negatives": 2,
            },
        ],
        **extra,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_training_writes_model_log_plot_and_checkpoints(tmp_path, tiny_bert):
    config = load_config(write_config(tmp_path, tiny_bert, steps=12))
    result = Trainer(config).train(show_progress=False)
    rows = read_log(result.output_dir / "train_log.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"loss/ret", "loss/sts", "loss/cls"} <= {k for r in rows for k in r}
    assert (result.output_dir / "loss.png").stat().st_size > 1000
    assert (result.output_dir / "train.log").read_text().strip()
    assert (result.model_dir / "2_Dense").is_dir()
    ckpts = sorted(p.name for p in (result.output_dir / "checkpoints").iterdir())
    # every 4 steps, the newest 2 kept; a finished run saves its model, not a checkpoint
    assert ckpts == ["step-000004", "step-000008"]
    assert all(np.isfinite(r["loss"]) for r in rows)
    card = (result.model_dir / "README.md").read_text()  # Conan's card, not the generic one
    assert "| ret | retrieval | `retrieval.jsonl` | 40 |" in card and "Conan mechanisms" in card


def test_loss_goes_down_on_a_learnable_task(tmp_path, tiny_bert):
    config = load_config(
        write_config(tmp_path, tiny_bert, steps=40),
        overrides={
            "task_schedule": "round_robin",
            "tasks": [
                {
                    "name": "ret",
                    "kind": "retrieval",
                    "path": str(tmp_path / "retrieval.jsonl"),
                    "batch_size": 8,
                    "negatives": 1,
                }
            ],
        },
    )
    result = Trainer(config).train(show_progress=False)
    losses = [r["loss"] for r in read_log(result.output_dir / "train_log.jsonl")]
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])


# Runs the CLI in a child that SIGKILLs itself when the trainer asks for its third checkpoint
# (step 12; one every 4 steps): steps 9-12 are trained and logged but never saved. Dying at a fixed step, instead
# of polling from outside, keeps the test deterministic however fast the machine is.
_DIE_AT_THIRD_CHECKPOINT = """
import os, signal, sys
from conan_embedding.training.engine import Engine
from conan_embedding.cli import app

real_save = Engine.save_checkpoint
calls = []

def save_or_die(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(*args, **kwargs)

Engine.save_checkpoint = save_or_die
sys.argv = ["conan-embed", *sys.argv[1:]]
app()
"""


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_bert):
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full_dir.mkdir()
    killed_dir.mkdir()
    steps = 120
    full_cfg = write_config(full_dir, tiny_bert, steps=steps)
    killed_cfg = write_config(killed_dir, tiny_bert, steps=steps)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "conan_embedding.cli", "train"]

    killed = subprocess.run(
        [sys.executable, "-c", _DIE_AT_THIRD_CHECKPOINT, "train", str(killed_cfg), "--no-progress"],
        env=env,
        cwd=tmp_path,
    )
    assert killed.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (killed_dir / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-000004", "step-000008"]
    assert read_log(killed_dir / "run" / "train_log.jsonl")[-1]["step"] == 12

    subprocess.run(
        [*cmd, str(killed_cfg), "--resume", "--no-progress"], env=env, cwd=tmp_path, check=True
    )
    subprocess.run([*cmd, str(full_cfg), "--no-progress"], env=env, cwd=tmp_path, check=True)
    resumed = read_log(killed_dir / "run" / "train_log.jsonl")
    full = read_log(full_dir / "run" / "train_log.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    np.testing.assert_allclose(
        [r["loss"] for r in resumed], [r["loss"] for r in full], rtol=1e-5, atol=1e-6
    )


def test_nan_loss_stops_with_a_clear_message(tmp_path, tiny_bert):
    config = load_config(write_config(tmp_path, tiny_bert, steps=5))
    trainer = Trainer(config)
    with torch_no_finite(trainer), pytest.raises(TrainingDivergedError, match="step 1"):
        trainer.train(show_progress=False)


class torch_no_finite:
    """Poisons the first Dense bias with NaN so the very first loss is NaN."""

    def __init__(self, trainer):
        self.trainer = trainer

    def __enter__(self):
        import torch

        for module in self.trainer.model:
            if hasattr(module, "linear"):
                with torch.no_grad():
                    module.linear.bias.fill_(float("nan"))
        return self

    def __exit__(self, *exc):
        return False


def test_config_typo_names_the_file_and_key(tmp_path, tiny_bert):
    path = write_config(tmp_path, tiny_bert)
    raw = yaml.safe_load(path.read_text())
    raw["optim"]["lrr"] = 1.0
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"config\.yaml: optim\.lrr: Extra inputs"):
        load_config(path)


def test_sts_task_with_negatives_is_rejected(tmp_path, tiny_bert):
    path = write_config(tmp_path, tiny_bert)
    raw = yaml.safe_load(path.read_text())
    raw["tasks"][1]["negatives"] = 3
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="sts tasks take no negatives"):
        load_config(path)


def test_weak_stage_teacher_filter_drops_low_scoring_pairs(tmp_path, tiny_bert):
    pairs = [{"query": "cat sat on mat", "pos": "cat sat on mat"}] * 5 + [
        {"query": "cat sat on mat", "pos": "bank loan fee money"}
    ] * 5
    write_records(tmp_path / "pairs.jsonl", pairs)
    from conan_embedding.config import TrainConfig

    config = TrainConfig.model_validate(
        {
            "stage": "weak",
            "output_dir": str(tmp_path / "run"),
            "model": {"name": str(tiny_bert)},
            "optim": {"max_steps": 2},
            "teacher_filter": {"model": str(tiny_bert), "threshold": 0.999},
            "tasks": [
                {
                    "name": "pairs",
                    "kind": "pairs",
                    "path": str(tmp_path / "pairs.jsonl"),
                    "batch_size": 4,
                }
            ],
        }
    )
    trainer = Trainer(config)
    assert trainer.filter_report == {"task": "pairs", "kept": 5, "total": 10}
    assert all(r.pos == r.query for r in trainer.records["pairs"])
    json.dumps(trainer.filter_report)


class _EagerTrainer(Trainer):
    """The trainer as it was before the lazy reader: every row validated into a list up front."""

    def _open_records(self, task):
        return read_records(task.path, task.kind)


def test_lazy_records_train_exactly_like_the_eager_list(tmp_path, tiny_bert):
    """Same rows, caps, label index and negatives: the loss trajectory is bit-identical."""
    losses = {}
    for name, cls in (("lazy", Trainer), ("eager", _EagerTrainer)):
        (tmp_path / name).mkdir()
        config = load_config(write_config(tmp_path / name, tiny_bert, steps=9))
        config.tasks[0].max_rows = 30  # a capped task is a view of the file's rows
        trainer = cls(config)
        lazy = isinstance(trainer.records["ret"], RecordDataset)
        assert lazy == (name == "lazy") and len(trainer.records["ret"]) == 30
        result = trainer.train(show_progress=False)
        losses[name] = [r["loss"] for r in read_log(result.output_dir / "train_log.jsonl")]
    assert len(losses["lazy"]) == 9 and losses["lazy"] == losses["eager"]


def test_a_malformed_row_deep_in_the_file_names_file_line_and_field(tmp_path, tiny_bert):
    """Rows are validated when read: the trainer starts, and the first batch holding the bad
    row raises RecordError ``file:line: field`` (the CLI prints it and exits 2)."""
    from conan_embedding.config import TrainConfig
    from conan_embedding.data.records import RecordError

    rng = np.random.default_rng(0)
    rows = [{"query": _sentence(rng), "pos": _sentence(rng)} for _ in range(40)]
    rows[32] = {"query": "fine", "pos": 7}  # file line 33
    write_records(tmp_path / "pairs.jsonl", rows)
    config = TrainConfig.model_validate(
        {
            "stage": "weak",
            "output_dir": str(tmp_path / "run"),
            "model": {"name": str(tiny_bert)},
            "optim": {"max_steps": 6},  # 5 batches of 8 cover the 40 rows
            "tasks": [
                {
                    "name": "pairs",
                    "kind": "pairs",
                    "path": str(tmp_path / "pairs.jsonl"),
                    "batch_size": 8,
                }
            ],
        }
    )
    trainer = Trainer(config)
    assert len(trainer.records["pairs"]) == 40
    with pytest.raises(
        RecordError, match=r"pairs\.jsonl:33: field 'pos': Input should be a valid string"
    ):
        trainer.train(show_progress=False)
