"""Causal-LM pretraining and SFT: mixing, packing, resume, loss on outputs only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conan_embedding.data.records import RecordError
from conan_embedding.data.sources import local_data_available
from conan_embedding.training.pretrain import (
    IGNORE_INDEX,
    MixtureBatcher,
    PretrainConfig,
    SFTConfig,
    SFTRecord,
    SourceConfig,
    encode_sft,
    read_documents,
    read_sft_records,
    run_pretraining,
    run_sft,
)

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}


def _write_sources(folder: Path) -> list[SourceConfig]:
    folder.mkdir(parents=True, exist_ok=True)
    news = [f"News {k}: the market rose by {k % 7} percent today." for k in range(120)]
    qa = [f"问：{k}加{k}等于几？\n答：{2 * k}" for k in range(120)]
    (folder / "news.txt").write_text("\n".join(news) + "\n", encoding="utf-8")
    with open(folder / "qa.jsonl", "w", encoding="utf-8") as handle:
        for text in qa:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return [
        SourceConfig(name="news", path=str(folder / "news.txt"), weight=3.0),
        SourceConfig(name="qa", path=str(folder / "qa.jsonl"), weight=1.0),
    ]


def _config(tmp_path: Path, name: str, steps: int, **extra) -> PretrainConfig:
    return PretrainConfig(
        output_dir=str(tmp_path / name),
        sources=_write_sources(tmp_path / "corpus"),
        model_overrides=TINY,
        vocab_size=300,
        seq_len=32,
        batch_size=4,
        steps=steps,
        lr=3e-3,
        eval_every=4,
        eval_blocks=4,
        holdout_every=10,
        seed=0,
        threads=1,
        **extra,
    )


def test_mixture_is_packed_weighted_and_replayable():
    sources = {"a": [[1, 2, 3]] * 50, "b": [[4, 5, 6, 7, 8]] * 50}
    batcher = MixtureBatcher(
        sources, {"a": 9.0, "b": 1.0}, seq_len=16, batch_size=8, eos_id=0, seed=3
    )
    ids, drawn = batcher.batch(0)
    assert ids.shape == (8, 16) and (ids == 0).any()  # packed with eos between documents
    assert sum(drawn.values()) == 8 * 16
    torch.testing.assert_close(batcher.batch(5)[0], batcher.batch(5)[0])
    assert not torch.equal(batcher.batch(5)[0], batcher.batch(6)[0])
    total = {"a": 0, "b": 0}
    for step in range(40):
        for name, count in batcher.batch(step)[1].items():
            total[name] += count
    docs_a, docs_b = total["a"] / 4, total["b"] / 6  # tokens per document incl. eos
    assert 6 < docs_a / docs_b < 14  # drawn ~9:1 as weighted


def test_pretraining_lowers_perplexity_and_writes_curve(tmp_path):
    summary = run_pretraining(_config(tmp_path, "run", steps=12))
    out = tmp_path / "run"
    assert summary["final_val_ppl"] < summary["first_val_ppl"]
    assert (out / "curve.png").stat().st_size > 1000
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "model" / "tokenizer.json").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [e for e in log if e["kind"] == "train"]
    assert [e["step"] for e in log if "val_ppl" in e][-1] == 12  # evaluated at the end
    assert len(train) == 12 and {"tokens_news", "tokens_qa"} <= set(train[0])
    lrs = [e["lr"] for e in train]
    assert lrs[0] > 0 and max(lrs) == pytest.approx(3e-3) and lrs[-1] < 1e-4  # warmup + decay


def test_resume_from_checkpoint_reproduces_an_uninterrupted_run(tmp_path):
    run_pretraining(_config(tmp_path, "straight", steps=8, save_every=100))
    interrupted = _config(tmp_path, "resumed", steps=4, save_every=4)
    # first half: 8-step schedule stopped after 4 steps via a checkpoint
    first = interrupted.model_copy(update={"steps": 8, "save_every": 4})
    _run_until(first, stop_after=4)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-000004"
    assert (checkpoint / "optimizer.safetensors").is_file()
    assert not list(checkpoint.glob("*.pt")) and not list(checkpoint.glob("*.bin"))
    summary = run_pretraining(first, resume=True)
    assert summary["resumed_from"] == 4
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def _run_until(config: PretrainConfig, stop_after: int) -> None:
    """Run ``config`` but crash right after step ``stop_after`` (simulated interruption)."""
    from conan_embedding.training.pretrain import CausalLMProgram

    original = CausalLMProgram.after_step

    def crash(self, step):
        if step == stop_after + 1:
            raise KeyboardInterrupt
        return original(self, step)

    CausalLMProgram.after_step = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            run_pretraining(config)
    finally:
        CausalLMProgram.after_step = original


def test_sft_labels_cover_the_output_only(tmp_path):
    run_pretraining(_config(tmp_path, "base", steps=2))
    from conan_embedding.modeling.llm import load_tokenizer

    tokenizer = load_tokenizer(tmp_path / "base" / "model")
    rows = [
        SFTRecord(instruction="Translate.", input="hello", output="你好"),
        SFTRecord(instruction="Answer.", output="42"),
    ]
    ids, attention, labels = encode_sft(rows, tokenizer, max_len=64)
    prompt_len = len(tokenizer("Translate.\nhello\n", add_special_tokens=False)["input_ids"])
    answer = tokenizer("你好", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert torch.all(labels[0, :prompt_len] == IGNORE_INDEX)
    assert labels[0, prompt_len : prompt_len + len(answer)].tolist() == answer
    assert torch.all(labels[attention == 0] == IGNORE_INDEX)  # padding never scored
    assert ids.shape == labels.shape == attention.shape

    data = tmp_path / "sft.jsonl"
    with open(data, "w", encoding="utf-8") as handle:
        for k in range(40):
            row = {"instruction": "Double it.", "input": str(k), "output": str(2 * k)}
            handle.write(json.dumps(row) + "\n")
    summary = run_sft(
        SFTConfig(
            output_dir=str(tmp_path / "sft"),
            base_model=str(tmp_path / "base" / "model"),
            data=str(data),
            batch_size=4,
            steps=6,
            lr=3e-3,
            eval_every=3,
            threads=1,
        )
    )
    assert summary["final_val_ppl"] < summary["first_val_ppl"]


def test_bad_rows_name_file_line_and_field(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n', encoding="utf-8")
    with pytest.raises(RecordError, match=r"rows.jsonl:2: field 'output'"):
        read_sft_records(bad)
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "ok"}\n{"txt": "typo"}\n', encoding="utf-8")
    with pytest.raises(RecordError, match=r"docs.jsonl:2: field 'text'"):
        read_documents(docs)


@pytest.mark.integration
@pytest.mark.skipif(not local_data_available(), reason="shared/data not found")
def test_shared_corpus_drops_every_tatoeba_test_sentence(tmp_path):
    from conan_embedding.data.sources import data_file
    from conan_embedding.training.pretrain import _norm, build_shared_corpus

    summary = build_shared_corpus(tmp_path)
    assert summary["removed_for_leakage"]["parallel"] >= 457  # README: 457 test items overlap
    tatoeba = {
        _norm(line)
        for name in ("bitext/tatoeba.cmn-eng.eng", "bitext/tatoeba.cmn-eng.cmn")
        for line in data_file(name).read_text(encoding="utf-8").splitlines()
    }
    for text in read_documents(summary["sources"]["parallel"]):
        assert not any(_norm(side) in tatoeba for side in text.split("\n"))
    rows = read_sft_records(summary["sft"])
    assert len(rows) == summary["sft_rows"] > 1000
