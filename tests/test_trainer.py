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

from conan_embedding.config import ConfigError, load_config
from conan_embedding.data.records import RecordDataset, read_records, write_records
from conan_embedding.toy import toy_sentence, toy_train_config, write_toy_tasks
from conan_embedding.training.trainer import Trainer, TrainingDivergedError, read_log

__all__ = ["write_config", "write_toy_tasks"]


def write_config(folder: Path, model: Path, steps: int = 12, **extra) -> Path:
    """:func:`toy_train_config` as ``folder/config.yaml``, ``extra`` added at the top level."""
    config = {**toy_train_config(folder, model, steps), **extra}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


TEACHER_PAIRS = [{"query": "cat sat on mat", "pos": "cat sat on mat"}] * 5 + [
    {"query": "cat sat on mat", "pos": "bank loan fee money"}
] * 5
"""5 pairs whose positive is the query (a 0.999 teacher filter keeps them), 5 whose is not."""


def weak_pairs_config(
    folder: Path, model_path: Path, rows: list[dict], batch_size: int = 4, **top
) -> dict:
    """A weak-stage config (a dict for ``TrainConfig``) with one pairs task on ``rows``,
    written to ``folder/pairs.jsonl``; ``top`` adds or replaces top-level sections."""
    write_records(folder / "pairs.jsonl", rows)
    return {
        "stage": "weak",
        "output_dir": str(folder / "run"),
        "model": {"name": str(model_path)},
        "optim": {"max_steps": 2},
        "tasks": [
            {
                "name": "pairs",
                "kind": "pairs",
                "path": str(folder / "pairs.jsonl"),
                "batch_size": batch_size,
            }
        ],
        **top,
    }


def test_training_writes_model_log_plot_and_checkpoints(tmp_path, tiny_bert):
    from conan_embedding.reporting.card import readme_for

    config = load_config(write_config(tmp_path, tiny_bert, steps=12))
    # the card is rendered above training (the `train` command) and handed in
    result = Trainer(config, readme=readme_for(config)).train(show_progress=False)
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
            "loss_plot": False,
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
    # loss_plot off: the log only (the bench's setting, as the peer draws no plot)
    assert not (result.output_dir / "loss.png").exists()
    assert (result.model_dir / "model.safetensors").is_file()


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
    from conan_embedding.config import TrainConfig

    config = TrainConfig.model_validate(
        weak_pairs_config(
            tmp_path,
            tiny_bert,
            TEACHER_PAIRS,
            teacher_filter={"model": str(tiny_bert), "threshold": 0.999},
        )
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
    rows = [{"query": toy_sentence(rng), "pos": toy_sentence(rng)} for _ in range(40)]
    rows[32] = {"query": "fine", "pos": 7}  # file line 33
    config = TrainConfig.model_validate(
        weak_pairs_config(  # 5 batches of 8 cover the 40 rows
            tmp_path, tiny_bert, rows, batch_size=8, optim={"max_steps": 6}
        )
    )
    trainer = Trainer(config)
    assert len(trainer.records["pairs"]) == 40
    with pytest.raises(
        RecordError, match=r"pairs\.jsonl:33: field 'pos': Input should be a valid string"
    ):
        trainer.train(show_progress=False)


# ------------------------------------------------------- refusals before the first step (§7)
@pytest.mark.parametrize(
    ("kind", "stage", "refused"),
    [
        ("FSDP", None, True),
        ("DEEPSPEED", 3, True),
        ("DEEPSPEED", 2, False),
        ("MULTI_GPU", None, False),
        ("NO", None, False),
    ],
)
def test_dhnm_is_refused_only_with_sharded_parameters(kind, stage, refused):
    from conan_embedding.training.trainer import check_dhnm_supported

    if not refused:
        check_dhnm_supported(kind, stage, ["ret"])
        check_dhnm_supported("FSDP", None, [])  # no DHNM task: anything goes
        return
    with pytest.raises(ValueError) as info:
        check_dhnm_supported(kind, stage, ["ret"])
    message = str(info.value)
    setting = "FSDP" if kind == "FSDP" else "ZeRO-3"
    assert setting in message and "'ret'" in message
    assert "DDP" in message and "ZeRO-2" in message and "rule: none" in message


def test_the_trainer_refuses_dhnm_on_a_sharded_engine_before_preparing(
    tmp_path, tiny_bert, monkeypatch
):
    from conan_embedding.training.engine import Engine

    def never(*args, **kwargs):
        raise AssertionError("the refusal must come before engine.prepare")

    monkeypatch.setattr(Engine, "prepare", never)
    monkeypatch.setattr(Trainer, "_engine_sharding", lambda self: ("DEEPSPEED", 3))
    config = load_config(write_config(tmp_path, tiny_bert, steps=2))
    config.tasks[0].dynamic_negatives.rule = "v2"
    with pytest.raises(ValueError, match="ZeRO-3"):
        Trainer(config)


def test_the_embedder_is_built_before_the_engine(tmp_path, tiny_bert, monkeypatch):
    """Under ZeRO-3's zero3_init_flag the engine's DeepSpeed plugin makes every later
    from_pretrained build a partitioned model (the pool probe would encode with empty
    weights): the student must exist before the engine does (audit §10)."""
    import conan_embedding.training.trainer as trainer_module
    from conan_embedding.training.engine import Engine

    order: list[str] = []
    real_build, real_init = trainer_module.build_embedder, Engine.__init__

    def build(*args, **kwargs):
        order.append("model")
        return real_build(*args, **kwargs)

    def init(self, *args, **kwargs):
        order.append("engine")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "build_embedder", build)
    monkeypatch.setattr(Engine, "__init__", init)
    trainer = Trainer(load_config(write_config(tmp_path, tiny_bert, steps=2)))
    assert order == ["model", "engine"]
    assert next(trainer.model.parameters()).device == trainer.engine.device


def test_finish_saves_the_engines_consolidated_model(tmp_path, tiny_bert, monkeypatch):
    """finish() saves what Engine.consolidated_model returns (under FSDP/ZeRO-3 a gathered
    CPU copy; loading a full state dict into the sharded module itself fails, audit §3), and
    a rank that gets None saves nothing."""
    import copy

    import torch
    from safetensors.torch import load_file

    from conan_embedding.training.engine import Engine

    calls: list[bool] = []

    def consolidated(self, model):
        calls.append(model is self.model)
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin[0].auto_model.embeddings.word_embeddings.weight.fill_(0.25)
        return twin

    monkeypatch.setattr(Engine, "consolidated_model", consolidated)
    result = Trainer(load_config(write_config(tmp_path, tiny_bert, steps=1))).train(
        show_progress=False
    )
    assert calls == [True]
    saved = load_file(result.model_dir / "model.safetensors")
    word = next(v for k, v in saved.items() if k.endswith("word_embeddings.weight"))
    assert torch.all(word == 0.25)

    monkeypatch.setattr(Engine, "consolidated_model", lambda self, model: None)
    config = load_config(write_config(tmp_path / "none", tiny_bert, steps=1))
    result = Trainer(config).train(show_progress=False)
    assert not result.model_dir.exists()


def test_steps_report_texts_and_real_tokens_for_throughput(tmp_path, tiny_bert):
    """``samples`` = texts encoded this step, ``tokens`` = their attention-mask sum (no
    padding); the engine turns them into samples_per_s / tokens_per_s."""
    from conan_embedding.config import TrainConfig
    from conan_embedding.data.sampler import TaskStream

    rng = np.random.default_rng(1)
    rows = [{"query": toy_sentence(rng, 2 + i % 5), "pos": toy_sentence(rng, 3)} for i in range(16)]
    config = TrainConfig.model_validate(
        weak_pairs_config(
            tmp_path,
            tiny_bert,
            rows,
            seed=4,
            model={"name": str(tiny_bert), "max_seq_length": 32},
            optim={"max_steps": 1},
        )
    )
    trainer = Trainer(config)
    drawn = TaskStream("pairs", 16, 4).next_indices(4)
    texts = [rows[i]["query"] for i in drawn] + [rows[i]["pos"] for i in drawn]
    tokenizer = trainer.model.tokenizer
    real = sum(len(tokenizer(t, truncation=True, max_length=32)["input_ids"]) for t in texts)
    result = trainer.train(show_progress=False)
    (row,) = read_log(result.output_dir / "train_log.jsonl")
    assert row["samples"] == 8 and row["tokens"] == real
    assert row["samples_per_s"] > 0 and row["tokens_per_s"] > 0


def test_dhnm_providers_remine_on_the_engines_device(tmp_path, tiny_bert):
    from tests.test_dynamic import _data

    from conan_embedding.mining.dynamic import DHNMConfig, DynamicNegatives

    records, pools = _data()
    provider = DynamicNegatives(records, 2, pools, DHNMConfig(rule="v2"))
    provider.index_device = "elsewhere"
    config = load_config(write_config(tmp_path, tiny_bert, steps=2))
    trainer = Trainer(config, negative_providers={"ret": provider})
    assert provider.index_device == trainer.engine.device


def _fsdp2_plugin(names=None):
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=names,
    )


def _wrapped(plugin, model) -> set[str]:
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    return {type(m).__name__ for m in model.modules() if policy(m)}


def test_fsdp_wraps_the_backbones_layers_of_a_sentence_transformer(tiny_bert):
    """Without names, accelerate wraps nothing in a SentenceTransformer (its
    _no_split_modules is []): one FSDP unit for the whole encoder (audit §11). A shared list
    naming other families' layers too would make accelerate raise; only present ones stay."""
    from conan_embedding.modeling.embedder import build_embedder
    from conan_embedding.training.trainer import name_fsdp_layers

    model = build_embedder(str(tiny_bert), dense_dim=16)
    assert _wrapped(_fsdp2_plugin(), model) == set()  # accelerate on its own
    plugin = _fsdp2_plugin()
    assert name_fsdp_layers(plugin, model) == ["BertEmbeddings", "BertLayer"]
    assert _wrapped(plugin, model) == {"BertEmbeddings", "BertLayer"}
    shared = _fsdp2_plugin(["BertLayer", "LlamaDecoderLayer", "Qwen2DecoderLayer"])
    with pytest.raises(ValueError, match="LlamaDecoderLayer"):
        _wrapped(shared, model)  # what the shipped list would do without the filter
    shared = _fsdp2_plugin(["BertLayer", "LlamaDecoderLayer", "Qwen2DecoderLayer"])
    assert name_fsdp_layers(shared, model) == ["BertLayer"]
    assert _wrapped(shared, model) == {"BertLayer"}


def test_the_trainer_names_fsdp_layers_before_preparing(tmp_path, tiny_bert, monkeypatch):
    plugin = _fsdp2_plugin()
    monkeypatch.setattr(Trainer, "_fsdp_plugin", lambda self: plugin)
    Trainer(load_config(write_config(tmp_path, tiny_bert, steps=2)))
    assert plugin.transformer_cls_names_to_wrap == ["BertEmbeddings", "BertLayer"]
