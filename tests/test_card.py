"""The model card a run leaves in its saved model folder (issue #14, part 6; in the reporting
layer since issue #25)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from sentence_transformers import SentenceTransformer

from conan_embedding.config import TrainConfig
from conan_embedding.modeling.embedder import build_embedder, save_embedder
from conan_embedding.reporting.card import (
    SoftMaskCard,
    card_info_from_config,
    card_writer,
    render_model_card,
    write_model_card,
)


def _config(tmp_path, **extra) -> TrainConfig:
    raw = {
        "stage": "supervised",
        "seed": 7,
        "model": {
            "name": "runs/models/base",
            "max_seq_length": 32,
            "prompts": {"query": "query: "},
            "query_prompt": "query",
            "matryoshka_dims": [8, 16],
        },
        "optim": {"lr": 3e-5, "max_steps": 40},
        "temperature": 0.02,
        "tasks": [
            {
                "name": "bge",
                "kind": "retrieval",
                "path": str(tmp_path / "bge-finetune.jsonl"),
                "batch_size": 4,
                "negatives": 3,
                "dynamic_negatives": {"rule": "v1", "check_every": 25, "v1_decay": 1.1},
            },
            {
                "name": "stsb",
                "kind": "sts",
                "path": str(tmp_path / "sts.jsonl"),
                "batch_size": 8,
                "max_rows": 500,
            },
        ],
        **extra,
    }
    return TrainConfig.model_validate(raw)


def _section(card: str, heading: str) -> str:
    return card.split(heading, 1)[1].split("\n## ", 1)[0]


def test_card_holds_data_losses_mechanisms_and_evaluation(tmp_path, tiny_bert):
    config = _config(
        tmp_path, cbb={"world_size": 3, "task_ranks": {"bge": [1, 0], "stsb": [2]}, "beta": 0.5}
    )
    info = card_info_from_config(config, {"bge": 2688, "stsb": 500}, stages=["weak"])
    model = build_embedder(str(tiny_bert), dense_dim=24, matryoshka_dims=[8, 16], seed=0)
    folder = save_embedder(
        model, tmp_path / "my-model", readme=card_writer(info, {"STSB": 0.7737, "LCQMC": 0.727})
    )
    card = (folder / "README.md").read_text(encoding="utf-8")

    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "sentence-transformers"
    assert "base_model" not in front  # a local folder is no hub id
    assert card.count("# my-model") == 1  # titled by the final folder, not the temp one

    model_part = _section(card, "## Model")
    assert "`runs/models/base`" in model_part
    assert "Transformer → Pooling (mean) → Dense (32 -> 24) → Normalize" in model_part
    assert "| output dimension | 24 |" in model_part

    data = _section(card, "### Data and losses")
    assert re.search(
        r"\| bge \| retrieval \| `bge-finetune.jsonl` from public `retrieval/bge_finetune_data.jsonl` \| 2,688 \| 4 \|",
        data,
    )
    assert "| stsb | sts | `sts.jsonl` | 500 (cap 500) | 8 |" in data
    assert "InfoNCE (τ = 0.02, 3 hard negatives per device, in-batch negatives)" in data
    assert "CoSENT (τ = 0.02), weight β = 0.5" in data

    training = _section(card, "## Training")
    assert "weak → supervised (this run: **supervised**)" in training
    assert "40 steps, AdamW lr 3e-05" in training
    assert "bge → devices [0, 1]; stsb → devices [2]" in training  # ranks sorted
    assert "β = 0.5" in training
    assert "on `bge`: rule v1; check_every 25, decay 1.1, abs_cap 0.8" in training
    assert "dims [8, 16]" in training
    assert "no task's data is marked as CLR" in training

    evaluation = _section(card, "## Evaluation")
    assert "| STSB | 0.7737 |" in evaluation and "| LCQMC | 0.727 |" in evaluation

    # the embedded YAML is the config itself
    block = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert TrainConfig.model_validate(yaml.safe_load(block)) == config

    facts = json.loads((folder / "conan_card.json").read_text(encoding="utf-8"))
    assert facts["card"]["tasks"][0]["rows"] == 2688
    assert facts["evaluation"] == {"STSB": 0.7737, "LCQMC": 0.727}
    # the folder is still a plain sentence-transformers model
    assert SentenceTransformer(str(folder), device="cpu").encode(["a cat"]).shape == (1, 24)


def test_mechanisms_that_were_off_say_so(tmp_path):
    config = _config(tmp_path)
    config.tasks[0].dynamic_negatives.rule = "none"
    config.model.matryoshka_dims = []
    card = render_model_card(card_info_from_config(config, {}))
    assert "**Cross-GPU batch balance (CBB)**: not used (one task per step, `round_robin`)" in card
    assert "**Dynamic hard negative mining (DHNM)**: not used (static negatives on bge)." in card
    assert "**Matryoshka (MRL)**: not used." in card
    assert "Soft mask" not in card
    assert "## Evaluation" not in card
    assert "| ? |" in card  # rows unknown are shown as such, never invented
    assert "- Stage: **supervised**" in card


def test_clr_reports_soft_mask_and_nested_evaluation(tmp_path):
    config = _config(tmp_path)
    (tmp_path / "bge-finetune.report.json").write_text(
        json.dumps({"translator": "parallel", "weights": {"en": 0.5, "zh": 0.5}, "x": 1}),
        encoding="utf-8",
    )
    info = card_info_from_config(
        config, soft_mask=SoftMaskCard(schedule="linear", variant="L_over_i", steps=200)
    )
    card = render_model_card(info, {"SciFact": {"ndcg_at_10": 0.6, "recall_at_100": 0.9}})
    assert "**Cross-lingual retrieval (CLR) data** in `bge`: translator parallel" in card
    assert "schedule `linear`, variant `L_over_i`, over 200 steps" in card
    assert "| task | ndcg_at_10 | recall_at_100 |" in card
    assert "| SciFact | 0.6 | 0.9 |" in card


def test_hub_base_model_goes_in_the_front_matter(tmp_path):
    config = _config(tmp_path)
    config.model.name = "intfloat/multilingual-e5-small"
    card = render_model_card(card_info_from_config(config))
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == config.model.name


def test_unknown_task_rows_and_missing_folder_are_errors(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(ValueError, match=r"task_rows names tasks not in the config: \['nope'\]"):
        card_info_from_config(config, {"nope": 3})
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        write_model_card(tmp_path / "absent", card_info_from_config(config))


def test_without_a_card_the_folder_keeps_sentence_transformers_card(tmp_path, tiny_bert):
    folder = save_embedder(build_embedder(str(tiny_bert)), tmp_path / "plain")
    assert not (folder / "conan_card.json").exists()
    assert "Conan mechanisms" not in (folder / "README.md").read_text(encoding="utf-8")


def test_task_rows_in_files_counts_lines_up_to_max_rows(tmp_path):
    from conan_embedding.reporting.card import task_rows_in_files

    config = _config(tmp_path)
    (tmp_path / "sts.jsonl").write_text("{}\n\n" * 600, encoding="utf-8")  # blanks not counted
    assert task_rows_in_files(config) == {"stsb": 500}  # capped; the absent file left out


def test_weak_stage_card_shows_the_soft_mask_and_lora(tmp_path):
    from conan_embedding.config import LoraSettings, WeakStageConfig
    from conan_embedding.reporting.card import card_info_from_weak_stage

    config = WeakStageConfig(
        output_dir=str(tmp_path / "out"),
        llm=str(tmp_path / "sft"),
        data=str(tmp_path / "sft.jsonl"),
        schedule="accelerating",
        lora=LoraSettings(r=8),
        matryoshka_dims=[16],
        steps=50,
    )
    card = render_model_card(card_info_from_weak_stage(config, rows=1234))
    assert "- Stages: pretrain → sft → weak (LLM, soft mask)" in card
    assert "schedule `accelerating`, variant `L_over_i`, over 50 steps" in card
    assert "LoRA r 8, alpha 32" in card
    assert "| weak-pairs | pairs | `sft.jsonl` | 1,234 | 64 |" in card
    assert "gradient clip 1.0" in card
    block = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert WeakStageConfig.model_validate(yaml.safe_load(block)) == config


def test_llm_stages_follow_the_folders_back_to_the_first_stage(tmp_path):
    """The weak stage's card names the LLM's history as its folders record it, and nothing
    when they record nothing (a plain Hugging Face checkpoint)."""
    import json

    from conan_embedding.reporting.card import llm_stages

    pre, sft, gguf, plain = (tmp_path / n for n in ("pre", "sft", "gguf", "plain"))
    for folder in (pre, sft, gguf, plain):
        folder.mkdir()
    (pre / "conan_llm.json").write_text(json.dumps({"stage": "pretrain"}), encoding="utf-8")
    (sft / "conan_llm.json").write_text(
        json.dumps({"stage": "sft", "base_model": str(pre)}), encoding="utf-8"
    )
    (gguf / "conan_import.json").write_text(json.dumps({"source": "org/x-GGUF"}), encoding="utf-8")
    assert llm_stages(sft) == ["pretrain", "sft"]
    assert llm_stages(gguf) == ["import (org/x-GGUF)"]
    assert llm_stages(plain) == []


def test_save_embedder_takes_card_text_or_the_older_card_argument(tmp_path, tiny_bert):
    """``readme`` as plain text replaces the generic card; ``card=`` (the form
    training/llm_embedding.py still uses) keeps working through ``CardInfo.writer``."""
    model = build_embedder(str(tiny_bert))
    text = save_embedder(model, tmp_path / "text", readme="# hand-written\n")
    assert (text / "README.md").read_text(encoding="utf-8") == "# hand-written\n"
    info = card_info_from_config(_config(tmp_path))
    old = save_embedder(model, tmp_path / "old-form", card=info, evaluation={"STSB": 0.5})
    card = (old / "README.md").read_text(encoding="utf-8")
    assert "# old-form" in card and "| STSB | 0.5 |" in card
    assert (old / "conan_card.json").is_file()


def test_the_card_quotes_the_one_prepare_table():
    """The card says where a prepared task file came from through ``data/prepare.py``'s one
    source table (output, kind, reader, public file)."""
    from conan_embedding.data.prepare import SOURCES, prepared_source
    from conan_embedding.reporting.card.adapters import _data_source

    assert len({s.output for s in SOURCES}) == len(SOURCES)
    for source in SOURCES:
        assert _data_source(f"runs/data/{source.output}.jsonl") == source.relative
    assert prepared_source("runs/data/cnsd-stsb-train.jsonl") == "sts/cnsd-stsb.train.data"
    assert prepared_source("elsewhere/mine.jsonl") is None


def test_the_embedder_does_not_import_the_card():
    import ast
    import inspect

    from conan_embedding.modeling import embedder

    tree = ast.parse(inspect.getsource(embedder))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any("card" in m or "reporting" in m for m in imported)
