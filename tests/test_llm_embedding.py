"""Stages 3 and 4 on a tiny random LLM: soft-mask weak training, LoRA, export to
sentence-transformers, the foundation trainer on the export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from tests.conftest import LLM_WORDS

from conan_embedding.config import LoraSettings, SupervisedStageConfig, WeakStageConfig
from conan_embedding.modeling.decoders import pool
from conan_embedding.modeling.embedder import load_embedder, matryoshka_dims
from conan_embedding.modeling.llm_embedder import LLMEmbedder, export_sentence_transformer
from conan_embedding.training.soft_mask_weak import apply_lora, train_weak_stage, weak_pairs

WORDS = LLM_WORDS


def _config(tiny_llm, tmp_path, **extra) -> WeakStageConfig:
    return WeakStageConfig(
        output_dir=str(tmp_path / "weak"),
        llm=str(tiny_llm / "model"),
        data=str(tiny_llm / "sft.jsonl"),
        batch_size=8,
        optim={"max_steps": extra.pop("steps", 12), "lr": 3e-3},
        max_len=24,
        engine={"threads": 1},
        **extra,
    )


def test_pooling_mean_and_last_token_respect_padding():
    hidden = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "lasttoken")[0], hidden[0, 1])
    torch.testing.assert_close(pool(hidden, mask, "lasttoken")[1], hidden[1, 2])


def test_weak_pairs_join_instruction_and_input(tiny_llm):
    pairs = weak_pairs(tiny_llm / "sft.jsonl")
    assert pairs[0][0].startswith("Translate.\n") and pairs[0][1] == "river apple 0"


@pytest.mark.parametrize("pooling", ["mean", "lasttoken"])
def test_export_matches_the_embedder_at_alpha_one(tiny_llm, tmp_path, pooling):
    embedder = LLMEmbedder.from_llm(tiny_llm / "model", pooling=pooling, max_len=24)
    texts = ["apple river", "高山 绿色 音乐 music", "green"]
    export_sentence_transformer(
        embedder, tmp_path / "bi", bidirectional=True, matryoshka_dims=[16, 32]
    )
    export_sentence_transformer(embedder, tmp_path / "causal", bidirectional=False)
    bidirectional = SentenceTransformer(str(tmp_path / "bi"), device="cpu").encode(texts)
    causal = SentenceTransformer(str(tmp_path / "causal"), device="cpu").encode(texts)
    np.testing.assert_allclose(bidirectional, embedder.encode(texts, alpha=1.0), atol=1e-5)
    np.testing.assert_allclose(causal, embedder.encode(texts, alpha=0.0), atol=1e-5)
    assert np.abs(bidirectional - causal).max() > 1e-3
    assert matryoshka_dims(load_embedder(tmp_path / "bi")) == [16, 32]


def test_soft_mask_weak_stage_learns_and_ends_bidirectional(tiny_llm, tmp_path):
    summary = train_weak_stage(
        _config(tiny_llm, tmp_path, matryoshka_dims=[16]), show_progress=False
    )
    assert summary["final_loss_mean_last_10"] < summary["first_loss"]
    log = [
        json.loads(line)
        for line in (tmp_path / "weak" / "train_log.jsonl").read_text().splitlines()
    ]
    alphas = [row["alpha"] for row in log]
    assert alphas[0] == 0.0 and alphas == sorted(alphas) and alphas[-1] == pytest.approx(11 / 12)
    saved = json.loads((tmp_path / "weak" / "model" / "config.json").read_text())
    assert saved["is_causal"] is False
    model = load_embedder(tmp_path / "weak" / "model")
    assert matryoshka_dims(model) == [16, 32]
    assert (tmp_path / "weak" / "loss.png").is_file()
    # Conan's card, not sentence-transformers' generic one: what was trained, on what, how
    card = (tmp_path / "weak" / "model" / "README.md").read_text(encoding="utf-8")
    assert f"`{tiny_llm / 'model'}`" in card and "- Stage: **weak (LLM, soft mask)**" in card
    assert f"| weak-pairs | pairs | `sft.jsonl` | {summary['pairs']:,} | 8 |" in card
    assert "schedule `linear`, variant `L_over_i`, over 12 steps" in card
    assert "12 steps on 1 task, 32-dimensional normalised vectors" in card
    assert "- 12 steps, AdamW lr 0.003" in card and "pooling" in (
        tmp_path / "weak" / "model" / "conan_card.json"
    ).read_text(encoding="utf-8")
    first, last = summary["first_loss"], summary["final_loss_mean_last_10"]
    assert f"Loss {first:.4g} at step 1, {last:.4g} mean of the last 10 steps (of 12)" in card
    assert "**Matryoshka (MRL)**: loss summed over dims [16]" in card


def test_lora_trains_only_adapters_and_merges_on_export(tiny_llm, tmp_path):
    config = _config(tiny_llm, tmp_path, steps=4, schedule="hard", lora=LoraSettings(r=4, alpha=8))
    summary = train_weak_stage(config, show_progress=False)
    full = sum(p.numel() for p in LLMEmbedder.from_llm(tiny_llm / "model").parameters())
    assert 0 < summary["trainable_parameters"] < full / 2
    model = SentenceTransformer(str(tmp_path / "weak" / "model"), device="cpu")
    names = [name for name, _ in model.named_parameters()]
    assert not any("lora" in name for name in names)  # merged into plain Llama weights
    base = LLMEmbedder.from_llm(tiny_llm / "model").encode(["apple river"])
    assert np.abs(model.encode(["apple river"]) - base).max() > 1e-4  # the adapters did something
    card = (tmp_path / "weak" / "model" / "README.md").read_text(encoding="utf-8")
    assert "schedule `hard`" in card and "LoRA r 4, alpha 8" in card


def test_causal_baseline_stays_causal(tiny_llm, tmp_path):
    train_weak_stage(_config(tiny_llm, tmp_path, steps=2, schedule="causal"), show_progress=False)
    saved = json.loads((tmp_path / "weak" / "model" / "config.json").read_text())
    assert saved["is_causal"] is True


def test_supervised_stage_runs_the_foundation_trainer_on_the_export(tiny_llm, tmp_path):
    from conan_embedding.training.supervised_stage import run_supervised_stage

    embedder = LLMEmbedder.from_llm(tiny_llm / "model", max_len=24)
    export_sentence_transformer(embedder, tmp_path / "weak", bidirectional=True)
    rows = [(f"{WORDS[k % 10]} {k}", f"{WORDS[(k + 1) % 10]} {k}") for k in range(24)]
    records = {
        "retrieval": tmp_path / "retrieval.jsonl",
        "clr": tmp_path / "clr.jsonl",
        "sts": tmp_path / "sts.jsonl",
    }
    for name in ("retrieval", "clr"):
        records[name].write_text(
            "\n".join(
                json.dumps({"query": q, "pos": [p], "neg": [rows[(k + 5) % 24][1]]})
                for k, (q, p) in enumerate(rows)
            ),
            encoding="utf-8",
        )
    records["sts"].write_text(
        "\n".join(
            json.dumps({"sentence1": q, "sentence2": p, "score": float(k % 5)})
            for k, (q, p) in enumerate(rows)
        ),
        encoding="utf-8",
    )
    model_dir = run_supervised_stage(
        SupervisedStageConfig(
            model_dir=str(tmp_path / "weak"),
            records={k: str(v) for k, v in records.items()},
            output_dir=str(tmp_path / "supervised"),
            optim={"max_steps": 3, "lr": 1e-3},
            negatives=1,
            batch_size=4,
            sts_batch_size=8,
        )
    )
    texts = ["apple 1", "河流 2"]
    before = SentenceTransformer(str(tmp_path / "weak"), device="cpu").encode(texts)
    after = SentenceTransformer(str(model_dir), device="cpu")
    assert json.loads((model_dir / "config.json").read_text())["is_causal"] is False
    assert np.abs(after.encode(texts) - before).max() > 1e-5


def test_teacher_filter_drops_low_scoring_pairs(tiny_llm, tmp_path, tiny_bert):
    teacher = SentenceTransformer(str(tiny_bert), device="cpu")
    pairs = weak_pairs(tiny_llm / "sft.jsonl")
    queries = teacher.encode([q for q, _ in pairs], normalize_embeddings=True)
    positives = teacher.encode([p for _, p in pairs], normalize_embeddings=True)
    cosines = (queries * positives).sum(1)
    # a threshold in the widest gap between scores, so float noise cannot move a pair across it
    ordered = np.sort(cosines)
    gaps = np.diff(ordered)[2:-2]
    cut = int(np.argmax(gaps)) + 2
    threshold = float((ordered[cut] + ordered[cut + 1]) / 2)
    config = _config(
        tiny_llm, tmp_path, steps=1, teacher=str(tiny_bert), teacher_threshold=threshold
    )
    summary = train_weak_stage(config, show_progress=False)
    report = summary["teacher_filter"]
    assert report["scored"] == 60
    assert report["kept"] == summary["pairs"] == int((cosines >= threshold).sum())
    assert 2 <= report["kept"] < 60


# ---------------------------------------------------------------- the GPU path, on the CPU


def test_fsdp_transformer_wrap_finds_the_decoder_layers(tiny_llm):
    """Finding 11: accelerate's TRANSFORMER_BASED_WRAP reads ``_no_split_modules`` from the root
    module; the embedder forwards its backbone's, so every decoder layer is its own unit."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    embedder = LLMEmbedder.from_llm(tiny_llm / "model")
    assert embedder._no_split_modules == ["LlamaDecoderLayer"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap"
    )
    policy = fsdp2_prepare_auto_wrap_policy(plugin, embedder)
    wrapped = [name for name, module in embedder.named_modules() if policy(module)]
    assert wrapped == ["backbone.layers.0", "backbone.layers.1"]
    lora = apply_lora(LLMEmbedder.from_llm(tiny_llm / "model"), LoraSettings(r=4))
    assert lora._no_split_modules == ["LlamaDecoderLayer"]  # through peft's wrapper too


@pytest.mark.parametrize("kind", ["full", "frozen_embeddings", "lora"])
def test_weak_stage_leaves_no_trainable_parameter_unused(tiny_llm, tmp_path, kind):
    """Finding 16: the weak stage runs DDP with ``find_unused_parameters=False``, which is only
    right if one step gives every trainable parameter a gradient."""
    from conan_embedding.config import OptimConfig
    from conan_embedding.training.engine import Engine, LoopSettings
    from conan_embedding.training.soft_mask_weak import SoftMaskWeakProgram

    config = _config(tiny_llm, tmp_path, steps=4, pooling="lasttoken")
    embedder = LLMEmbedder.from_llm(config.llm, config.pooling, config.max_len)
    if kind == "frozen_embeddings":
        embedder.backbone.get_input_embeddings().weight.requires_grad_(False)
    if kind == "lora":
        apply_lora(embedder, LoraSettings(r=4))
    engine = Engine(config.engine, LoopSettings(tmp_path / "w", 4, OptimConfig(max_steps=4)))
    program = SoftMaskWeakProgram(engine, embedder, weak_pairs(config.data), config, [])
    program.step(1)
    trainable = {n: p for n, p in embedder.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None for p in trainable.values()), [
        n for n, p in trainable.items() if p.grad is None
    ]


def test_weak_step_reports_texts_and_real_tokens(tiny_llm, tmp_path):
    """Throughput inputs: texts this rank encoded (queries + positives) and their non-padding
    tokens (EOS appended for last-token pooling counts; padding does not)."""
    from conan_embedding.data.sampler import TaskStream

    config = _config(tiny_llm, tmp_path, steps=2, pooling="lasttoken")
    train_weak_stage(config, show_progress=False)
    log = [
        json.loads(line)
        for line in (tmp_path / "weak" / "train_log.jsonl").read_text().splitlines()
    ]
    pairs = weak_pairs(config.data, config.max_rows, config.seed)
    tokenizer = LLMEmbedder.from_llm(config.llm, config.pooling, config.max_len)
    stream = TaskStream("weak", len(pairs), config.seed)
    for record in log:
        batch = [pairs[i] for i in stream.next_indices(8)]
        queries = tokenizer.tokenize([q for q, _ in batch])["attention_mask"]
        positives = tokenizer.tokenize([p for _, p in batch])["attention_mask"]
        assert record["samples"] == 16
        assert record["tokens"] == int(queries.sum() + positives.sum())
        assert record["tokens"] < queries.numel() + positives.numel()  # padding not counted


def test_weak_stage_builds_the_model_before_the_engine_and_filters_on_rank_zero(
    tiny_llm, tmp_path, monkeypatch
):
    """Finding 10: the embedder exists before the Accelerator (ZeRO-3's zero3_init_flag would
    build it partitioned); the teacher filter runs on the main rank only and the others take
    its result (here: this process plays rank 1)."""
    from conan_embedding.training import engine as engine_module
    from conan_embedding.training import soft_mask_weak

    events: list[str] = []
    real_from_llm, real_engine = LLMEmbedder.from_llm.__func__, engine_module.Engine

    def from_llm(cls, *args, **kwargs):
        events.append("model")
        return real_from_llm(cls, *args, **kwargs)

    def engine(*args, **kwargs):
        events.append("engine")
        assert kwargs["find_unused_parameters"] is False
        return real_engine(*args, **kwargs)

    class Stop(Exception):
        pass

    def program(engine, embedder, pairs, config, dims):
        raise Stop(pairs)

    shared = ([("q", "p"), ("q2", "p2")], {"kept": 2})
    monkeypatch.setattr(LLMEmbedder, "from_llm", classmethod(from_llm))
    monkeypatch.setattr(soft_mask_weak, "Engine", engine)
    monkeypatch.setattr(engine_module.Engine, "is_main", property(lambda self: False))
    monkeypatch.setattr(engine_module.Engine, "broadcast_object", lambda self, value: shared)
    monkeypatch.setattr(soft_mask_weak, "teacher_filtered", lambda *a: events.append("teacher"))
    monkeypatch.setattr(soft_mask_weak, "SoftMaskWeakProgram", program)
    config = _config(tiny_llm, tmp_path, steps=1, teacher="unused-teacher")
    with pytest.raises(Stop) as stopped:
        train_weak_stage(config, show_progress=False)
    assert events == ["model", "engine"]  # no teacher on rank 1
    assert stopped.value.args[0] == shared[0]


def test_weak_finish_exports_the_engines_consolidated_model(tiny_llm, tmp_path, monkeypatch):
    """Finding 3: the weak stage exports what Engine.consolidated_model returns (a gathered
    CPU copy under FSDP2/ZeRO-3), asked on every rank for the prepared embedder."""
    from tests.test_pretrain import marked_consolidation

    from conan_embedding.training.engine import Engine

    calls: list[bool] = []
    monkeypatch.setattr(
        Engine, "consolidated_model", marked_consolidation(calls, "backbone.norm.weight")
    )
    train_weak_stage(_config(tiny_llm, tmp_path, steps=1), show_progress=False)
    assert calls == [True]
    model = SentenceTransformer(str(tmp_path / "weak" / "model"), device="cpu")
    assert torch.all(model[0].auto_model.norm.weight == 0.25)


def test_lora_by_default_adapts_every_linear_layer_of_any_family(tiny_llm, tiny_bert):
    """``target_modules: all-linear`` (the default) gives a Llama decoder the projections the
    old explicit list named, and a BERT encoder its own: no per-family list to maintain."""
    from conan_embedding.modeling.lora import add_lora

    def adapted(backbone) -> set[str]:
        wrapped = add_lora(backbone, LoraSettings(r=2))
        names = [n for n, _ in wrapped.named_parameters() if ".lora_A." in n]
        return {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in names}

    llama = LLMEmbedder.from_llm(tiny_llm / "model").backbone
    assert adapted(llama) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                              "down_proj"}  # fmt: skip
    bert = SentenceTransformer(str(tiny_bert), device="cpu")[0].auto_model
    assert {"query", "key", "value"} <= adapted(bert)
