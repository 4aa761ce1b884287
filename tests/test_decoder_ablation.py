"""The decoder conversion ablation end to end on a tiny random LLM, and what it rests on:
LoRA in the foundation trainer, frozen embeddings in the weak stage, sampled STS test sets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conan_embedding.config import (
    LoraSettings,
    ModelConfig,
    OptimConfig,
    TaskConfig,
    TrainConfig,
    WeakStageConfig,
)
from conan_embedding.data.records import write_records
from conan_embedding.data.sources import local_data_available
from conan_embedding.experiments.decoder_v2 import (
    AblationArm,
    ConversionAblationConfig,
    check_stage_settings,
    run_conversion_ablation,
)
from conan_embedding.training.soft_mask_weak import train_weak_stage
from conan_embedding.training.trainer import Trainer

needs_data = pytest.mark.skipif(not local_data_available(), reason="shared/data not found")


def test_trainer_with_lora_trains_only_adapters_and_saves_merged_weights(tiny_bert, tmp_path):
    rows = [
        {"query": f"q{i} apple", "pos": [f"p{i} river"], "neg": [f"n{i} stone"]} for i in range(16)
    ]
    write_records(tmp_path / "r.jsonl", rows)
    config = TrainConfig(
        stage="supervised",
        output_dir=str(tmp_path / "out"),
        model=ModelConfig(
            name=str(tiny_bert),
            max_seq_length=16,
            lora=LoraSettings(r=4, alpha=8, target_modules=["query", "value"]),
        ),
        optim=OptimConfig(lr=1e-2, max_steps=3),
        tasks=[
            TaskConfig(
                name="r",
                kind="retrieval",
                path=str(tmp_path / "r.jsonl"),
                batch_size=4,
                negatives=1,
            )
        ],
    )
    trainer = Trainer(config)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    model_dir = trainer.train(show_progress=False).model_dir
    saved = load_file(next(model_dir.glob("**/model.safetensors")))
    assert not any("lora" in key for key in saved)  # merged: a plain BERT again
    base = load_file(next(tiny_bert.glob("**/model.safetensors")))
    query = next(k for k in saved if k.endswith("layer.0.attention.self.query.weight"))
    key = next(k for k in saved if k.endswith("layer.0.attention.self.key.weight"))
    base_query = next(
        v for k, v in base.items() if k.endswith("layer.0.attention.self.query.weight")
    )
    base_key = next(v for k, v in base.items() if k.endswith("layer.0.attention.self.key.weight"))
    assert not torch.equal(saved[query], base_query)  # the adapter was folded in
    torch.testing.assert_close(saved[key], base_key)  # untargeted weights untouched


def test_weak_stage_freeze_embeddings_keeps_the_matrix(tiny_llm, tmp_path):
    config = WeakStageConfig(
        output_dir=str(tmp_path / "weak"),
        llm=str(tiny_llm / "model"),
        data=str(tiny_llm / "sft.jsonl"),
        batch_size=8,
        steps=3,
        lr=3e-3,
        max_len=24,
        threads=1,
        freeze_embeddings=True,
    )
    train_weak_stage(config, show_progress=False)
    card = (tmp_path / "weak" / "model" / "README.md").read_text(encoding="utf-8")
    assert "embedding matrix frozen" in card
    before = load_file(str(tiny_llm / "model" / "model.safetensors"))
    after = load_file(next((tmp_path / "weak" / "model").glob("**/model.safetensors")))
    name = next(k for k in before if k.endswith("embed_tokens.weight"))
    torch.testing.assert_close(
        after[next(k for k in after if k.endswith("embed_tokens.weight"))], before[name]
    )
    layer = next(k for k in before if k.endswith("layers.0.mlp.up_proj.weight"))
    assert not torch.equal(
        after[next(k for k in after if k.endswith("layers.0.mlp.up_proj.weight"))], before[layer]
    )


@needs_data
def test_max_pairs_samples_long_sts_sets_the_same_way_every_time():
    from conan_embedding.evaluation.tasks import build_task

    first, second, full = (build_task("LCQMC", max_pairs=m) for m in (100, 100, None))
    for task in (first, second, full):
        task.load_data()
    assert len(first.dataset["test"]) == 100 and first.pairs_capped
    assert first.dataset["test"]["sentence1"] == second.dataset["test"]["sentence1"]
    assert len(full.dataset["test"]) == 12500 and not full.pairs_capped
    assert set(first.dataset["test"]["sentence1"]) <= set(full.dataset["test"]["sentence1"])
    tatoeba = build_task("Tatoeba", max_pairs=10)  # bitext mining is not sampled
    tatoeba.load_data()
    assert len(tatoeba.dataset["cmn-eng"]["test"]) == 1000 and not tatoeba.pairs_capped


def test_bad_arm_settings_fail_before_any_run(tmp_path):
    def config(**arm: object) -> ConversionAblationConfig:
        return ConversionAblationConfig(
            output_dir=str(tmp_path / "ablation"),
            base_llm=str(tmp_path / "no-such-llm"),
            weak={"steps": 2},
            arms=[AblationArm(name="ok"), AblationArm(name="odd", **arm)],
        )

    with pytest.raises(ValueError, match="arm 'odd': stage-3 settings.*pooling"):
        run_conversion_ablation(config(weak={"pooling": "last"}), log=lambda line: None)
    with pytest.raises(ValueError, match="arm 'odd': stage-3 settings.*stepz"):
        run_conversion_ablation(config(weak={"stepz": 3}), log=lambda line: None)
    with pytest.raises(ValueError, match=r"arm 'odd': stage-4 settings \['learning_rate'\]"):
        run_conversion_ablation(config(supervised={"learning_rate": 1e-4}), log=lambda line: None)
    assert not (tmp_path / "ablation").exists()  # nothing started
    check_stage_settings(config(weak={"pooling": "lasttoken"}, supervised={"lr": 5e-4}))


@needs_data
@pytest.mark.slow
def test_ablation_runs_every_arm_resumes_and_writes_the_table(tiny_llm, tiny_bert, tmp_path):
    config = ConversionAblationConfig(
        output_dir=str(tmp_path / "ablation"),
        base_llm=str(tiny_llm / "model"),
        weak={
            "steps": 2,
            "batch_size": 4,
            "max_len": 24,
            "max_rows": 64,
            "freeze_embeddings": True,
        },
        supervised={
            "steps": 2,
            "batch_size": 2,
            "sts_batch_size": 4,
            "max_rows": 32,
            "max_seq_length": 24,
            "negatives": 1,
        },
        arms=[
            AblationArm(
                name="causal",
                schedule="causal",
                seeds=[0],
                weak={"pooling": "lasttoken"},  # an arm's own settings override the table's
            ),
            AblationArm(
                name="lora-soft",
                schedule="linear",
                lora=LoraSettings(r=2, alpha=4),
                seeds=[0, 1],
            ),
        ],
        tasks=["STSBenchmark"],
        max_pairs=60,
        reference=str(tiny_bert),
        runs=["causal-s0", "lora-soft-s1", "reference"],
    )
    report = run_conversion_ablation(config, log=lambda line: None)
    runs = report["runs"]
    assert runs["lora-soft-s0"]["scores"] is None  # not this process's run
    for name in ("causal-s0", "lora-soft-s1"):
        assert -1.0 < runs[name]["scores"]["STSBenchmark"] < 1.0
        assert runs[name]["cost"]["weak"]["cpu_s"] > 0
    assert runs["lora-soft-s1"]["weak"]["lora"]["r"] == 2
    assert runs["causal-s0"]["weak"]["pooling"] == "lasttoken"
    assert runs["lora-soft-s1"]["weak"]["pooling"] == "mean"
    causal = tmp_path / "ablation" / "runs" / "causal-s0" / "supervised" / "model"
    assert json.loads((causal / "config.json").read_text())["is_causal"]
    soft = tmp_path / "ablation" / "runs" / "lora-soft-s1" / "supervised" / "model"
    assert json.loads((soft / "config.json").read_text())["is_causal"] is False
    assert runs["reference"]["scores_base"] and runs["reference"]["scores"]
    table = (tmp_path / "ablation" / "ablation.md").read_text(encoding="utf-8")
    assert "| causal | full, causal; stage 3 pooling lasttoken | 1 |" in table
    assert "| lora-soft | LoRA r2, linear | 1 |" in table

    stamp = (causal / "model.safetensors").stat().st_mtime_ns
    again = run_conversion_ablation(config.model_copy(update={"runs": None}), log=lambda line: None)
    assert (causal / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    assert again["runs"]["lora-soft-s0"]["scores"] is not None
    assert "| lora-soft | LoRA r2, linear | 2 |" in (
        tmp_path / "ablation" / "ablation.md"
    ).read_text(encoding="utf-8")
