"""CBB with the plain trainer's task options (issue #27): false-negative control over the union
of the devices' candidates, per-task instructions and per-side token limits.

The equivalence checks run fp32 with dropout off: CBB on one virtual device against the plain
trainer on the same rows and candidates, and CBB on two virtual devices (two negatives each)
against one device holding all four.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conan_embedding.config import TrainConfig
from conan_embedding.data.records import write_records
from conan_embedding.losses.cbb import cbb_info_nce_loss, cbb_info_nce_loss_with_count
from conan_embedding.toy import (
    WORDS,
    build_tiny_bert,
    toy_cbb_config,
    toy_retrieval_rows,
    toy_sts_rows,
)
from conan_embedding.training.cbb import CBBTrainer
from conan_embedding.training.trainer import Trainer

TOL = 1e-5
FN_OPTIONS = {"false_negative_margin": 0.0, "query_negatives": True, "passage_negatives": True}


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    """A tiny BERT without dropout: the checks are about the maths, not the masks."""
    return build_tiny_bert(tmp_path_factory.mktemp("bert-no-dropout"), dropout=0.0)


def _retrieval_config(
    data: Path,
    model: Path,
    *,
    devices: int | None,
    negatives: int,
    in_batch: bool = True,
    grad_cache: bool = True,
    model_extra: dict[str, Any] | None = None,
    **task: Any,
) -> TrainConfig:
    """One retrieval task (batch 4, the rows of ``data``), plain when ``devices`` is None,
    else CBB with the task on ``devices`` virtual devices, ``negatives`` each. The plain
    trainer's in-batch switch is the task's, CBB's is ``cbb.in_batch_negatives``: both are
    set alike so the two see the same candidates."""
    out = data.parent / f"run-{data.stem}-{devices}-{negatives}-{grad_cache}"
    raw: dict[str, Any] = {
        "output_dir": str(out),
        "seed": 5,
        "model": {
            "name": str(model),
            "dense_dim": 16,
            "max_seq_length": 24,
            "matryoshka_dims": [8, 16],
            **(model_extra or {}),
        },
        "optim": {"lr": 1e-3, "max_steps": 1, "warmup_ratio": 0.0},
        "tasks": [
            {
                "name": "ret",
                "kind": "retrieval",
                "path": str(data),
                "batch_size": 4,
                "negatives": negatives,
                "in_batch_negatives": in_batch,
                **task,
            }
        ],
    }
    if devices is not None:
        raw["cbb"] = {
            "world_size": devices,
            "task_ranks": {"ret": list(range(devices))},
            "in_batch_negatives": in_batch,
            "grad_cache": grad_cache,
        }
    return TrainConfig.model_validate(raw)


def _step(trainer: Trainer | CBBTrainer) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Step 0's record and the gradients it left on the model."""
    trainer.model.train()
    record = trainer.step(0)
    grads = {
        name: p.grad.detach().clone()
        for name, p in trainer.model.named_parameters()
        if p.grad is not None
    }
    assert grads and sum(float(g.abs().sum()) for g in grads.values()) > 0
    return record, grads


def _assert_same_step(got: tuple[dict, dict], expected: tuple[dict, dict], key: str) -> None:
    (record, grads), (expected_record, expected_grads) = got, expected
    assert record["loss/ret"] == pytest.approx(expected_record["loss/ret"], abs=TOL)
    assert record.get(key) == expected_record.get(key)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=TOL, rtol=0, msg=name)


# --------------------------------------------------------------------------- false negatives
@pytest.mark.parametrize(
    ("options", "in_batch"),
    [
        ({"false_negative_margin": 0.0}, False),  # the paper's L_CBB denominators
        (FN_OPTIONS, True),  # every candidate kind, in-batch on
    ],
    ids=["margin", "margin+query+passage"],
)
def test_cbb_false_negative_control_equals_the_plain_step(tmp_path, bert, options, in_batch):
    """Plain trainer (4 negatives) == CBB on 1 device (4) == CBB on 2 devices (2 + 2), with
    and without GradCache: the margin sees the union of the devices' candidates."""
    data = tmp_path / "ret.jsonl"
    write_records(data, toy_retrieval_rows(np.random.default_rng(0), 24, 4, negatives=4))

    def config(devices: int | None, negatives: int, grad_cache: bool = True) -> TrainConfig:
        return _retrieval_config(
            data,
            bert,
            devices=devices,
            negatives=negatives,
            in_batch=in_batch,
            grad_cache=grad_cache,
            **options,
        )

    key = "masked_negatives/ret"
    plain = _step(Trainer(config(None, 4)))
    assert plain[0][key] > 0  # an untrained model ranks some candidates above the positive
    _assert_same_step(_step(CBBTrainer(config(1, 4))), plain, key)
    _assert_same_step(_step(CBBTrainer(config(2, 2))), plain, key)
    _assert_same_step(_step(CBBTrainer(config(2, 2, grad_cache=False))), plain, key)


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees)), 0.0]


def test_a_negative_duplicating_the_positive_is_masked_and_counted():
    """By hand, two devices: query 0's negative on device 1 is its positive moved 5 degrees
    toward the query (a near-duplicate scoring above it). Margin 0 masks it, and only it,
    from the merged denominator: the loss equals the loss with that term left out by its
    group, and the count is 1; a margin wider than the gap keeps it."""
    q = torch.tensor([_unit(0.0), _unit(180.0)])
    p = torch.tensor([_unit(20.0), _unit(200.0)])
    device0 = torch.tensor([[_unit(120.0)], [_unit(300.0)]])
    device1 = torch.tensor([[_unit(15.0)], [_unit(60.0)]])  # query 0: p_0 at 15 degrees
    kwargs: dict[str, Any] = {"temperature": 0.1, "in_batch": False}
    loss, masked = cbb_info_nce_loss_with_count(
        q, p, [device0, device1], false_negative_margin=0.0, **kwargs
    )
    assert int(masked) == 1
    left_out = cbb_info_nce_loss(
        q,
        p,
        [device0, device1],
        groups=torch.tensor([0, 1]),
        negative_groups=torch.tensor([[2, 0], [3, 4]]),  # the near-duplicate in query 0's group
        **kwargs,
    )
    assert loss.item() == pytest.approx(left_out.item(), abs=1e-6)
    kept, none = cbb_info_nce_loss_with_count(
        q, p, [device0, device1], false_negative_margin=0.1, **kwargs
    )
    assert int(none) == 0 and kept.item() > loss.item()
    assert kept.item() == pytest.approx(
        cbb_info_nce_loss(q, p, [device0, device1], **kwargs).item(), abs=1e-6
    )


def test_a_cbb_step_masks_and_counts_a_duplicated_negative(tmp_path, bert):
    """Through the CBB step on 2 devices: the last negative of one row (device 1's) is the
    row's own query text, a false negative scoring above the positive. With margin 0 it
    leaves the denominator and is counted; an exact copy of the positive in its place is left
    out by the duplicate-text groups (not counted): the same loss and gradients, one count
    fewer. Without the margin the false negative stays and the loss is higher."""
    rows = toy_retrieval_rows(np.random.default_rng(1), 4, 4, negatives=4)

    def run(name: str, last_negative: str, margin: float | None) -> tuple[dict, dict]:
        data = tmp_path / f"{name}.jsonl"
        write_records(data, [{**rows[0], "neg": [*rows[0]["neg"][:3], last_negative]}, *rows[1:]])
        extra = {} if margin is None else {"false_negative_margin": margin}
        config = _retrieval_config(data, bert, devices=2, negatives=2, in_batch=False, **extra)
        return _step(CBBTrainer(config))

    query, positive = rows[0]["query"], rows[0]["pos"][0]
    masked = run("masked", query, 0.0)
    grouped = run("grouped", positive, 0.0)
    kept = run("kept", query, None)
    key = "masked_negatives/ret"
    assert masked[0][key] == grouped[0][key] + 1
    assert masked[0]["loss/ret"] == pytest.approx(grouped[0]["loss/ret"], abs=TOL)
    for name, grad in grouped[1].items():
        torch.testing.assert_close(masked[1][name], grad, atol=TOL, rtol=0, msg=name)
    assert key not in kept[0] and kept[0]["loss/ret"] > masked[0]["loss/ret"] + 1e-3


# --------------------------------------------------------------------------- real devices
def _fn_cbb_config(folder: Path, model: Path, task_ranks: dict[str, list[int]]) -> Path:
    """The toy CBB config with false-negative control on its retrieval task (pooled over
    devices) and on an added pairs task (data parallel: each device its own batch)."""
    raw = toy_cbb_config(folder, model, steps=1, task_ranks=task_ranks)
    rows = toy_retrieval_rows(np.random.default_rng(4), 24, 4, negatives=0)
    write_records(folder / "pairs.jsonl", [{"query": r["query"], "pos": r["pos"][0]} for r in rows])
    raw["tasks"][0] |= FN_OPTIONS
    pairs = {"name": "pairs", "kind": "pairs", "path": str(folder / "pairs.jsonl")}
    raw["tasks"].append({**pairs, "batch_size": 4, **FN_OPTIONS})
    path = folder / "cbb.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _rank_step(rank: int, world: int, port: int, config_path: str, out: str) -> None:
    """One torchrun-like gloo process: step 0's record and gradients to ``out``."""
    import torch.distributed as dist
    from tests.test_distributed import join_as_rank

    from conan_embedding.config import load_config

    join_as_rank(rank, world, port)
    try:
        trainer = CBBTrainer(load_config(config_path))
        assert trainer.engine.world_size == world
        record, grads = _step(trainer)
        numbers = {k: v for k, v in record.items() if k.startswith(("loss", "masked"))}
        grads |= {
            f"__{k}__": torch.tensor([float(v)], dtype=torch.float64) for k, v in numbers.items()
        }
        save_file({k: v.contiguous() for k, v in grads.items()}, f"{out}/rank{rank}.safetensors")
        trainer.engine.release()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 20 s on 2 CPU cores
def test_two_gloo_processes_count_and_mask_like_virtual_devices(tmp_path):
    """Real devices, dropout on: both devices of the retrieval task compute the same masked
    loss over the gathered candidates and its count is logged once (not once per device);
    the pairs task runs on rank 1 only, and its count still reaches rank 0, which logs."""
    import torch.multiprocessing as mp

    from conan_embedding.config import load_config

    model = build_tiny_bert(tmp_path / "bert", dropout=0.2)
    config_path = _fn_cbb_config(tmp_path, model, {"ret": [0, 1], "sts": [0], "pairs": [1]})
    from tests.test_distributed import free_port

    mp.spawn(
        _rank_step, args=(2, free_port(), str(config_path), str(tmp_path)), nprocs=2, join=True
    )
    record, expected = _step(CBBTrainer(load_config(config_path)))
    assert record["masked_negatives/ret"] > 0 and record["masked_negatives/pairs"] > 0
    for rank in range(2):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        for key in ("loss", "loss/ret", "loss/pairs", "loss/sts"):
            assert float(got.pop(f"__{key}__")) == pytest.approx(record[key], abs=TOL), key
        for key in ("masked_negatives/ret", "masked_negatives/pairs"):
            assert float(got.pop(f"__{key}__")) == record[key], key
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, atol=TOL, rtol=0, msg=f"{rank}:{name}")


# --------------------------------------------------------------------------- prompts, lengths
Q_LEN, P_LEN, SEQ = 8, 12, 30
INSTRUCTION, STS_INSTRUCTION = "find the answer", "same meaning"
PROMPT = f"Instruct: {INSTRUCTION}\nQuery: "
STS_PROMPT = f"Instruct: {STS_INSTRUCTION}\nQuery: "


def _long(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words))


def _instructed_config(
    folder: Path, model: Path, cbb: bool, grad_cache: bool = True
) -> TrainConfig:
    """A retrieval task and an sts task, both instructed, with texts far over both lengths;
    under CBB retrieval runs on virtual devices 0 and 1 (a negative each), sts on 1."""
    rng = np.random.default_rng(2)
    ret = [
        {"query": _long(rng, 20), "pos": [_long(rng, 30)], "neg": [_long(rng, 30) for _ in "ab"]}
        for _ in range(8)
    ]
    sts = toy_sts_rows(rng, 8, words=20)
    folder.mkdir(parents=True, exist_ok=True)
    write_records(folder / "ret.jsonl", ret)
    write_records(folder / "sts.jsonl", sts)
    raw: dict[str, Any] = {
        "output_dir": str(folder / ("cbb" if cbb else "plain")),
        "seed": 1,
        "model": {
            "name": str(model),
            "max_seq_length": SEQ,
            "query_max_length": Q_LEN,
            "passage_max_length": P_LEN,
        },
        "optim": {"lr": 1e-4, "max_steps": 1},
        "tasks": [
            {
                "name": "ret",
                "kind": "retrieval",
                "path": str(folder / "ret.jsonl"),
                "batch_size": 4,
                "negatives": 1 if cbb else 2,  # per device under CBB: the same 2 a query
                "instruction": INSTRUCTION,
            },
            {
                "name": "sts",
                "kind": "sts",
                "path": str(folder / "sts.jsonl"),
                "batch_size": 4,
                "instruction": STS_INSTRUCTION,
            },
        ],
    }
    if cbb:
        raw["cbb"] = {
            "world_size": 2,
            "task_ranks": {"ret": [0, 1], "sts": [1]},
            "grad_cache": grad_cache,
        }
    return TrainConfig.model_validate(raw)


def _spy(model: Any) -> list[tuple[list[str], list[int]]]:
    """Every batch ``model.preprocess`` tokenizes: its texts and their real token counts."""
    seen: list[tuple[list[str], list[int]]] = []
    original = model.preprocess

    def preprocess(texts: list[str], *args: Any, **kwargs: Any) -> dict[str, Any]:
        features = original(texts, *args, **kwargs)
        seen.append((list(texts), features["attention_mask"].sum(1).tolist()))
        return features

    model.preprocess = preprocess
    return seen


@pytest.mark.parametrize("grad_cache", [True, False])
def test_cbb_encodes_instructions_on_the_query_side_at_each_sides_length(
    tmp_path, tiny_bert, grad_cache
):
    """Retrieval: the instruction before the queries only, queries cut at query_max_length,
    positives and negatives at passage_max_length; sts (symmetric): both texts instructed and
    at the query length. The texts are those the plain trainer encodes for the same rows."""
    trainer = CBBTrainer(_instructed_config(tmp_path, tiny_bert, cbb=True, grad_cache=grad_cache))
    seen = _spy(trainer.model)
    trainer.step(0)
    ret = trainer.records["ret"]
    queries = {r.query for r in ret}
    documents = {t for r in ret for t in (*r.pos, *r.neg)}
    cbb_queries, cbb_documents, cbb_sts = [], [], []
    for texts, tokens in seen:
        stripped = [t.removeprefix(PROMPT).removeprefix(STS_PROMPT) for t in texts]
        if set(stripped) <= queries:
            assert all(t.startswith(PROMPT) for t in texts) and tokens == [Q_LEN] * len(texts)
            cbb_queries += texts
        elif set(stripped) <= documents:
            assert not any("Instruct" in t for t in texts)
            assert tokens == [P_LEN] * len(texts)
            cbb_documents += texts
        else:  # sts: both sentences are the query side
            assert all(t.startswith(STS_PROMPT) for t in texts)
            assert tokens == [Q_LEN] * len(texts)
            cbb_sts += texts
    assert cbb_queries and cbb_documents and cbb_sts

    # the plain trainer on the same rows (its streams draw the same first batch)
    plain = Trainer(_instructed_config(tmp_path / "plain", tiny_bert, cbb=False))
    plain_seen = _spy(plain.model)
    tasks = {t.name: t for t in plain.config.tasks}
    plain.task_loss(tasks["ret"], step=0)
    (plain_queries, _), (plain_documents, _) = plain_seen
    plain_seen.clear()
    plain.task_loss(tasks["sts"], step=0)
    plain_sts = [t for texts, _ in plain_seen for t in texts]
    unique = dict.fromkeys  # GradCache replays a chunk's texts: compare each text once
    assert list(unique(cbb_queries)) == plain_queries
    assert sorted(unique(cbb_documents)) == sorted(plain_documents)
    assert sorted(unique(cbb_sts)) == sorted(unique(plain_sts))


def test_cbb_dhnm_re_encodes_with_the_task_prompt_and_side_length(tmp_path, tiny_bert):
    """DHNM's no-grad re-scores between CBB steps go through the composed trainer's encode:
    the task's instruction and the side's length, as the loss's encodes."""
    trainer = CBBTrainer(_instructed_config(tmp_path, tiny_bert, cbb=True))
    seen = _spy(trainer.model)
    long = "dog " * 30
    trainer.embedding._encode_no_grad([long], role="query", task="ret")
    trainer.embedding._encode_no_grad([long], role="passage", task="ret")
    assert seen[0][0][0].startswith(PROMPT) and seen[0][1] == [Q_LEN]
    assert seen[1][0][0] == long and seen[1][1] == [P_LEN]


def test_query_max_length_cuts_cbb_query_encodes(tmp_path, tiny_bert):
    """Only the query length set: CBB's queries are cut at it, passages keep max_seq_length,
    and the step's loss changes with it (the cut queries are different inputs)."""
    rng = np.random.default_rng(3)
    rows = [
        {"query": _long(rng, 20), "pos": [_long(rng, 20)], "neg": [_long(rng, 20)]}
        for _ in range(4)
    ]
    data = tmp_path / "ret.jsonl"
    write_records(data, rows)

    def step(query_max_length: int | None) -> tuple[float, list[tuple[list[str], list[int]]]]:
        lengths = {"query_max_length": query_max_length}
        config = _retrieval_config(data, tiny_bert, devices=1, negatives=1, model_extra=lengths)
        trainer = CBBTrainer(config)
        seen = _spy(trainer.model)
        return trainer.step(0)["loss/ret"], seen

    cut, seen = step(6)
    whole, seen_whole = step(None)
    queries = {r["query"] for r in rows}
    for texts, tokens in seen:
        expected = 6 if set(texts) <= queries else 22  # 20 words + [CLS] [SEP] (< SEQ 24)
        assert tokens == [expected] * len(texts)
    assert all(tokens == [22] * len(texts) for texts, tokens in seen_whole)
    assert not math.isclose(cut, whole, abs_tol=1e-4)
