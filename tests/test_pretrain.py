"""Causal-LM pretraining and SFT: mixing, packing, resume, loss on outputs only."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conan_embedding.config import PretrainConfig, SFTConfig, SourceConfig
from conan_embedding.data.packing import MixtureBatcher
from conan_embedding.data.records import RecordError, SFTRecord, read_documents, read_sft_records
from conan_embedding.data.sources import local_data_available
from conan_embedding.training.causal_lm import IGNORE_INDEX, encode_sft, run_pretraining, run_sft

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
        optim={"max_steps": steps, "lr": 3e-3},
        eval_every=4,
        eval_blocks=4,
        holdout_every=10,
        seed=0,
        engine={"threads": 1},
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
    # throughput inputs: this rank's blocks and their tokens (packed, so no padding)
    assert all(e["samples"] == 4 and e["tokens"] == 4 * 32 for e in train)
    lrs = [e["lr"] for e in train]
    assert lrs[0] > 0 and max(lrs) == pytest.approx(3e-3) and lrs[-1] < 1e-4  # warmup + decay


def test_resume_from_checkpoint_reproduces_an_uninterrupted_run(tmp_path):
    run_pretraining(_config(tmp_path, "straight", steps=8, checkpoint_every=100))
    # first half: 8-step schedule stopped after 4 steps via a checkpoint
    first = _config(tmp_path, "resumed", steps=8, checkpoint_every=4)
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
    from conan_embedding.training.causal_lm import CausalLMProgram

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
            optim={"max_steps": 6, "lr": 3e-3},
            eval_every=3,
            engine={"threads": 1},
        )
    )
    assert summary["final_val_ppl"] < summary["first_val_ppl"]
    log = [json.loads(line) for line in (tmp_path / "sft" / "log.jsonl").read_text().splitlines()]
    train = [e for e in log if e["kind"] == "train"]
    # real tokens: prompt + output + eos of each row (run_sft's seeded draw), padding not counted
    records = read_sft_records(data)[4:]  # the first 40 // 10 rows are held out
    for entry in train:
        rng = random.Random(f"0-{entry['step'] - 1}")
        batch = [records[rng.randrange(len(records))] for _ in range(4)]
        _, mask, _ = encode_sft(batch, tokenizer, 128)
        assert entry["samples"] == 4 and entry["tokens"] == int(mask.sum())


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
    from conan_embedding.data.builders.v2_corpus import build_shared_corpus
    from conan_embedding.data.leakage import normalize_text as _norm
    from conan_embedding.data.sources import data_file

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


# ---------------------------------------------------------------- the GPU path, on the CPU


def lm_stage_config(tmp_path: Path, micro: int | None = 2) -> SFTConfig:
    """An LM stage of 4 steps at lr 1e-3 (linear, no warmup or decay), evaluated every 10."""
    return SFTConfig(
        output_dir=str(tmp_path / "lm"),
        base_model="-",
        data="-",
        optim={"max_steps": 4, "lr": 1e-3, "warmup_ratio": 0.0, "weight_decay": 0.0,
               "scheduler": "linear"},
        eval_every=10,
        checkpoint_every=10,
        keep_checkpoints=1,
        micro_batch_size=micro,
    )  # fmt: skip


def _lm_program(tmp_path: Path, llm: Path, evaluate, next_batch=None, micro: int = 2):
    """A CausalLMProgram on the tiny LLM with a fixed batch of 4 rows of 16 tokens."""
    from conan_embedding.config import OptimConfig
    from conan_embedding.modeling.llm import load_llm
    from conan_embedding.training.causal_lm import CausalLMProgram
    from conan_embedding.training.engine import Engine, LoopSettings

    model, tokenizer = load_llm(llm / "model")
    config = lm_stage_config(tmp_path, micro)
    engine = Engine(config.engine, LoopSettings(tmp_path / "lm", 4, OptimConfig(max_steps=4)))
    ids = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    batch = next_batch or (lambda step: (ids, ids, {}))
    program = CausalLMProgram(
        engine, model, tokenizer, batch, evaluate(model), config,
        description="pretrain", extra_meta={},
    )  # fmt: skip
    return program, model, tokenizer


def test_held_out_evaluation_at_step_zero_feeds_the_model_device(tmp_path, tiny_llm):
    """Finding 1: step 0 evaluates the held-out blocks, which ``pack_blocks`` builds on the CPU;
    with the model on ``meta`` under the device guard, a CPU block reaching the embedding
    fails (what ``Expected all tensors to be on the same device`` is on a GPU)."""
    from tests.device_guard import DeviceGuard

    from conan_embedding.training.causal_lm import _held_out_loss

    held = torch.randint(0, 100, (3, 16))  # CPU, as run_pretraining / run_sft make them
    program, model, _ = _lm_program(tmp_path, tiny_llm, lambda m: lambda m: _held_out_loss(m, held))
    model.to("meta")
    with DeviceGuard() as guard:
        record = program.step(0)  # the real evaluate, at step 0 (not stubbed, not step 1)
    assert [e["step"] for e in program.evals] == [0] and "loss" in record and guard.ops > 50


def _reference_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's own causal-LM loss: mean over the shifted labels that are not -100."""
    return model(input_ids=ids, labels=labels).loss


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, :9] = IGNORE_INDEX  # an SFT prompt
    labels[-1, 30:] = IGNORE_INDEX  # right padding
    return labels


def test_chunked_loss_equals_hf_loss_and_gradients_with_bounded_logits(tiny_llm):
    """Finding 2 / 17: the loss from hidden states in slices of positions equals HF's loss and
    its gradients, while lm_head never sees more than ``chunk_tokens`` positions at once."""
    from conan_embedding.modeling.llm import load_llm
    from conan_embedding.training.causal_lm import causal_lm_loss_sums

    model, tokenizer = load_llm(tiny_llm / "model")
    ids = torch.randint(0, len(tokenizer), (3, 40), generator=torch.Generator().manual_seed(1))
    labels = _labels(ids)
    reference = _reference_loss(model, ids, labels)
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    seen: list[tuple[int, ...]] = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    total, count = causal_lm_loss_sums(model, model, ids, labels, chunk_tokens=16)
    (total / count).backward()
    hook.remove()
    assert total.dtype == torch.float32
    assert count.item() == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close((total / count).detach(), reference.detach(), rtol=0, atol=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-4, atol=1e-6)
    vocab = model.config.vocab_size
    # forward + recompute in backward; every logits tensor is at most 16 positions x vocab
    assert len(seen) >= 2 * ((3 * 39 + 15) // 16)
    assert max(math.prod(shape) for shape in seen) <= 16 * vocab
    # under bf16 autocast (the training step's precision) the slices give HF's value too
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        reference = _reference_loss(model, ids, labels)
        total, count = causal_lm_loss_sums(model, model, ids, labels, chunk_tokens=16)
    torch.testing.assert_close(total / count, reference.float(), rtol=0, atol=1e-4)


def test_held_out_loss_is_hf_loss_in_bounded_memory(tiny_llm):
    """The held-out loss is HF's token-weighted mean, computed a few rows per forward and a
    chunk of positions per lm_head call (the 1.4B config: 2 rows x 4096, 1024 positions)."""
    from conan_embedding.modeling.llm import load_llm
    from conan_embedding.training.causal_lm import _held_out_loss

    model, tokenizer = load_llm(tiny_llm / "model")
    ids = torch.randint(0, len(tokenizer), (5, 40), generator=torch.Generator().manual_seed(2))
    labels = _labels(ids)
    with torch.no_grad():
        n = (labels[:, 1:] != IGNORE_INDEX).sum()
        expected = float(_reference_loss(model, ids, labels))  # one forward, mean over tokens
    seen: list[tuple[int, ...]] = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    value = _held_out_loss(model, ids, labels, rows_per_forward=2, chunk_tokens=16)
    hook.remove()
    assert value == pytest.approx(expected, abs=1e-5) and int(n) > 0
    vocab = model.config.vocab_size
    assert max(math.prod(shape) for shape in seen) <= 16 * vocab
    # HF's own forward only ever projected one position per row (logits_to_keep=1)
    assert all(shape[0] <= 2 for shape in seen if len(shape) == 3)


class _FakeRanks:
    """The engine's rank API for one rank of ``world`` (sums are checked by the test)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world_size, self.distributed = rank, world, True
        self.reduced: list[torch.Tensor] = []

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        self.reduced.append(values.clone())
        return values.double() / self.world_size  # this rank's share of the mean


def test_held_out_loss_splits_blocks_over_ranks_with_equal_forwards(tiny_llm):
    """Each rank scores its own blocks and one all-reduce sums (loss, tokens); every rank runs
    the same forwards and lm_head slices on the same shapes (under FSDP/ZeRO-3 they are
    collectives), a rank short of rows padding with fully ignored rows."""
    from conan_embedding.modeling.llm import load_llm
    from conan_embedding.training.causal_lm import _held_out_loss

    model, tokenizer = load_llm(tiny_llm / "model")
    ids = torch.randint(0, len(tokenizer), (5, 24), generator=torch.Generator().manual_seed(3))
    whole = _held_out_loss(model, ids, rows_per_forward=2)
    sums, forwards = torch.zeros(2, dtype=torch.float64), []
    for rank in (0, 1):
        ranks = _FakeRanks(rank, 2)
        calls: list[tuple[int, ...]] = []
        hooks = [
            module.register_forward_hook(
                lambda m, a, out, calls=calls: calls.append(tuple(out[0].shape))
            )
            for module in (model, model.lm_head)
        ]
        _held_out_loss(model, ids, engine=ranks, rows_per_forward=2, chunk_tokens=16)
        for hook in hooks:
            hook.remove()
        (reduced,) = ranks.reduced
        sums += reduced.double()
        forwards.append(calls)
    # rows 0-2 and rows 3-4 (+ one ignored row): 2 forwards of 2 rows, each = the model,
    # HF's one-position head and 3 slices of 16 of the 2 x 23 positions; the same on both
    assert forwards[0] == forwards[1] and len(forwards[0]) == 2 * (1 + 1 + 3)
    assert float(sums[1]) == 5 * 23
    assert float(sums[0] / sums[1]) == pytest.approx(whole, abs=1e-6)


def test_causal_lm_step_reports_samples_and_real_tokens(tmp_path, tiny_llm):
    """Throughput inputs: rows this rank trained on, and their non-padding tokens."""
    ids = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    mask[3, 5:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    program, model, _ = _lm_program(
        tmp_path, tiny_llm, lambda m: lambda m: 0.0, lambda step: (ids, labels, {}, mask)
    )
    with torch.no_grad():  # the step's loss is HF's, micro-batch by micro-batch, as before
        expected = sum(float(_reference_loss(model, ids[k : k + 2], labels[k : k + 2])) / 2
                       for k in (0, 2))  # fmt: skip
    record = program.step(1)
    assert record["loss"] == pytest.approx(expected, abs=1e-5)
    assert record["samples"] == 4 and record["tokens"] == 16 + 10 + 16 + 5
    assert isinstance(record["samples"], int) and isinstance(record["tokens"], int)


def test_only_rank_zero_decides_whether_a_run_is_finished(tmp_path, tiny_llm, monkeypatch):
    """Finding 12: whether ``summary.json`` + model exist is read on rank 0 and broadcast, so
    ranks on node-local disks cannot disagree (one training, one returning: a hang)."""
    from conan_embedding.modeling.llm import load_llm
    from conan_embedding.training import causal_lm
    from conan_embedding.training.causal_lm import HeldOut, train_causal_lm
    from conan_embedding.training.engine import Engine

    reads: list[Path] = []
    monkeypatch.setattr(causal_lm, "_finished_summary", lambda out, steps: reads.append(out))
    monkeypatch.setattr(Engine, "is_main", property(lambda self: False))
    monkeypatch.setattr(Engine, "broadcast_object", lambda self, value: {"from": "rank 0"})
    model, tokenizer = load_llm(tiny_llm / "model")
    config = lm_stage_config(tmp_path)
    ids = torch.zeros(4, 16, dtype=torch.long)
    summary = train_causal_lm(
        model,
        tokenizer,
        lambda s: (ids, ids, {}),
        HeldOut(ids),
        config,
        tmp_path / "run",
        description="pretrain",
    )
    assert summary == {"from": "rank 0"} and reads == []


def marked_consolidation(calls: list[bool], weight: str):
    """A stand-in for ``Engine.consolidated_model``: it notes in ``calls`` whether it was asked
    for the engine's prepared model and returns a copy whose ``weight`` is all 0.25."""
    import copy

    def consolidated(self, model):
        calls.append(model is self.model)
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin.get_parameter(weight).fill_(0.25)
        return twin

    return consolidated


def test_finish_saves_the_engines_consolidated_model(tmp_path, monkeypatch):
    """Finding 3: finish() saves what Engine.consolidated_model returns (under FSDP2/ZeRO-3 a
    gathered CPU copy: a full state dict cannot be loaded into the sharded module), called on
    every rank with the prepared module; a rank that gets None saves nothing."""
    from conan_embedding.training.engine import Engine

    calls: list[bool] = []
    monkeypatch.setattr(
        Engine, "consolidated_model", marked_consolidation(calls, "model.embed_tokens.weight")
    )
    run_pretraining(_config(tmp_path, "run", steps=1))
    assert calls == [True]
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert torch.all(saved["model.embed_tokens.weight"] == 0.25)

    monkeypatch.setattr(Engine, "consolidated_model", lambda self, model: None)
    run_pretraining(_config(tmp_path, "none", steps=1))
    assert not (tmp_path / "none" / "model").exists()


def test_two_processes_pretrain_and_evaluate_like_one(tmp_path, tiny_llm):
    """2 gloo processes (DDP, find_unused_parameters off, the chunked loss through the DDP
    wrapper, held-out blocks split over the ranks and summed by all-reduce) log the same
    training and held-out losses as 1 process, and save the same weights."""
    import subprocess
    import sys

    import yaml

    raw = _config(tmp_path, "unused", steps=4).model_dump()
    raw.update(tokenizer=str(tiny_llm / "model"), micro_batch_size=2, eval_every=2, eval_blocks=6)
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cli = ["-m", "conan_embedding.cli", "pretrain", str(path)]
    for name, launcher in (
        ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]),
        ("one", [sys.executable]),
    ):  # fmt: skip
        done = subprocess.run(
            [*launcher, *cli, "--output-dir", str(tmp_path / name)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logs = {
        name: [
            json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()
        ]
        for name in ("two", "one")
    }
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    assert len(logs["two"]) == len(logs["one"]) == 4
    for two, one in zip(logs["two"], logs["one"], strict=True):
        for key in ("loss", "val_loss"):
            assert (key in two) == (key in one)
            if key in one:
                assert two[key] == pytest.approx(one[key], abs=1e-5), (key, two, one)
        # each rank reports its own rows; the engine logs their sum over the ranks
        assert two["samples"] == one["samples"] == 4 and two["tokens"] == one["tokens"] == 128
    a = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


def test_older_flat_keys_load_as_the_optim_and_engine_blocks(tmp_path):
    """The previous release's flat keys still load, for one release, into the one vocabulary
    (``optim:``, ``engine:``, ``checkpoint_every``) with a FutureWarning; keys a file leaves out
    keep the stage's own defaults (pretraining's cosine schedule, not OptimConfig's linear)."""
    from conan_embedding.config import load_yaml

    flat = tmp_path / "flat.yaml"
    flat.write_text(
        "output_dir: out\nsources: [{name: a, path: a.txt}]\n"
        "steps: 7\nlr: 2.0e-3\nsave_every: 3\nthreads: 1\n",
        encoding="utf-8",
    )
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        "output_dir: out\nsources: [{name: a, path: a.txt}]\n"
        "optim: {max_steps: 7, lr: 2.0e-3}\ncheckpoint_every: 3\nengine: {threads: 1}\n",
        encoding="utf-8",
    )
    with pytest.warns(FutureWarning, match=r"`save_every` is deprecated.*`checkpoint_every`"):
        old = load_yaml(flat, PretrainConfig)
    assert old == load_yaml(nested, PretrainConfig)
    assert old.optim.scheduler == "cosine" and old.optim.warmup_ratio == 0.05
    assert (old.optim.max_steps, old.checkpoint_every, old.engine.threads) == (7, 3, 1)
    # engine.threads wins over the older flat threads, as it did
    both = SFTConfig(output_dir="o", base_model="b", data="d", threads=1, engine={"threads": 4})
    assert both.engine.threads == 4 and both.optim.lr == 5e-4


def test_cli_steps_overrides_an_older_flat_file(tmp_path, monkeypatch):
    """``conan-embed pretrain --steps N`` wins over a file's flat ``steps:`` as before."""
    from typer.testing import CliRunner

    from conan_embedding.cli import app
    from conan_embedding.training import causal_lm

    seen: list[PretrainConfig] = []

    def run(config, *, resume):
        seen.append(config)
        return {"first_val_ppl": 2.0, "final_val_ppl": 1.0}

    monkeypatch.setattr(causal_lm, "run_pretraining", run)
    path = tmp_path / "old.yaml"
    path.write_text(
        "output_dir: out\nsources: [{name: a, path: a.txt}]\nsteps: 600\n", encoding="utf-8"
    )
    result = CliRunner().invoke(app, ["pretrain", str(path), "--steps", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert seen[0].optim.max_steps == 5 and seen[0].engine.device == "cpu"
