"""CBB training: device map, virtual devices, and 2-process gloo runs that must agree with them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tests.conftest import WORDS, build_tiny_bert

from conan_embedding.config import load_config
from conan_embedding.data.records import write_records
from conan_embedding.losses.cbb import cbb_info_nce_loss
from conan_embedding.losses.cosent import cosent_loss
from conan_embedding.training.distributed import CBBTrainer, RankLayout
from conan_embedding.training.trainer import _stable_text_ids, encode_with_grad, read_log

TOL = 1e-5


def _sentence(rng: np.random.Generator, n: int = 4) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def tiny_bert_without_dropout(folder: Path, dropout: float = 0.0) -> Path:
    """Dropout draws different masks per process; equivalence is about the maths, so 0."""
    path = build_tiny_bert(folder)
    config = json.loads((path / "config.json").read_text())
    config["hidden_dropout_prob"] = config["attention_probs_dropout_prob"] = dropout
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_cbb_config(folder: Path, model: Path, steps: int = 3, **cbb) -> Path:
    rng = np.random.default_rng(0)
    retrieval = []
    for _ in range(24):
        q = _sentence(rng)
        retrieval.append(
            {
                "query": q,
                "pos": [q + " " + _sentence(rng, 2)],
                "neg": [_sentence(rng) for _ in range(4)],
            }
        )
    sts = []
    for _ in range(24):
        a = _sentence(rng)
        score = float(rng.integers(0, 6))
        sts.append(
            {"sentence1": a, "sentence2": a if score >= 4 else _sentence(rng), "score": score}
        )
    write_records(folder / "ret.jsonl", retrieval)
    write_records(folder / "sts.jsonl", sts)
    config = {
        "output_dir": str(folder / "run"),
        "seed": 5,
        "model": {"name": str(model), "dense_dim": 16, "max_seq_length": 24},
        "optim": {"lr": 1e-3, "max_steps": steps, "warmup_ratio": 0.0},
        "checkpoint_every": 100,
        "tasks": [
            {
                "name": "ret",
                "kind": "retrieval",
                "path": str(folder / "ret.jsonl"),
                "batch_size": 3,
                "negatives": 2,
            },
            {"name": "sts", "kind": "sts", "path": str(folder / "sts.jsonl"), "batch_size": 6},
        ],
        "cbb": {"world_size": 2, "task_ranks": {"ret": [0, 1], "sts": [1]}, **cbb},
    }
    path = folder / "cbb.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the device map
def _layout(tmp_path, tiny_bert, **cbb):
    return RankLayout.from_config(load_config(write_cbb_config(tmp_path, tiny_bert, **cbb)))


def test_default_map_puts_retrieval_on_all_but_the_last_device(tmp_path, tiny_bert):
    layout = _layout(tmp_path, tiny_bert, world_size=4, task_ranks={})
    assert layout.task_ranks == {"ret": (0, 1, 2), "sts": (3,)}
    assert layout.tasks_of(3) == ["sts"] and layout.position("ret", 2) == 2
    assert _layout(tmp_path, tiny_bert, world_size=1, task_ranks={}).task_ranks == {
        "ret": (0,),
        "sts": (0,),
    }


@pytest.mark.parametrize(
    ("cbb", "message"),
    [
        ({"task_ranks": {"ret": [0, 1], "sts": [2]}}, r"devices \[2\] outside 0..1"),
        ({"task_ranks": {"ret": [0]}}, r"no devices to tasks \['sts'\]"),
        ({"task_ranks": {"ret": [0], "sts": [0], "nope": [1]}}, "unknown tasks"),
        ({"world_size": 3, "task_ranks": {"ret": [0], "sts": [1]}}, r"devices \[2\] run no task"),
    ],
)
def test_bad_maps_are_explained(tmp_path, tiny_bert, cbb, message):
    with pytest.raises(ValueError, match=message):
        _layout(tmp_path, tiny_bert, **cbb)


# --------------------------------------------------------------------------- virtual devices
def _direct_joint_gradients(trainer: CBBTrainer, step: int = 0):
    """The CBB loss of step 0 computed the plain way: everything encoded with a graph at once."""
    ret, sts = trainer.tasks["ret"], trainer.tasks["sts"]
    rows = trainer.streams["ret"].next_indices(ret.batch_size)
    rng = np.random.default_rng([trainer.config.seed, step, len("ret")])
    batch = [trainer.records["ret"][i] for i in rows]
    positives = [r.pos[int(rng.integers(len(r.pos)))] for r in batch]
    negatives = trainer.providers["ret"].negatives(rows)  # 2 devices x 2 = 4 per query
    model = trainer.model
    q = encode_with_grad(model, [r.query for r in batch])
    p = encode_with_grad(model, positives)
    per_rank = [
        encode_with_grad(model, [t for negs in negatives for t in negs[k * 2 : k * 2 + 2]]).reshape(
            len(rows), 2, -1
        )
        for k in range(2)
    ]
    ids = _stable_text_ids(positives + [t for negs in negatives for t in negs])
    retrieval = cbb_info_nce_loss(
        q,
        p,
        per_rank,
        temperature=trainer.config.temperature,
        groups=ids[: len(rows)],
        negative_groups=ids[len(rows) :].reshape(len(rows), 4),
    )
    sts_rows = trainer.streams["sts"].next_indices(sts.batch_size)
    pairs = [trainer.records["sts"][i] for i in sts_rows]
    a = encode_with_grad(model, [r.sentence1 for r in pairs])
    b = encode_with_grad(model, [r.sentence2 for r in pairs])
    gold = torch.tensor([r.score for r in pairs])
    similarity = cosent_loss(a, b, gold, temperature=trainer.config.temperature)
    total = retrieval + 0.8 * similarity
    total.backward()
    return float(total.detach()), _grads(model)


@pytest.mark.parametrize("grad_cache", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_virtual_devices_equal_the_joint_loss_computed_at_once(tmp_path, dropout, grad_cache):
    """GradCache passes + per-device accumulation give the gradient of the joint loss; with
    dropout, too (the RNG is replayed, so the re-encode draws the masks of the first pass).
    Without GradCache the one pass is the joint loss itself."""
    model = tiny_bert_without_dropout(tmp_path / "bert", dropout)
    config = load_config(write_cbb_config(tmp_path, model, grad_cache=grad_cache))
    virtual = CBBTrainer(config)
    virtual.model.train()
    torch.manual_seed(11)
    record: dict = {}
    total = virtual._accumulate_step(0, record)
    got = _grads(virtual.model)

    direct = CBBTrainer(config)
    direct.model.train()
    torch.manual_seed(11)
    expected_total, expected = _direct_joint_gradients(direct)
    assert total == pytest.approx(expected_total, abs=TOL)
    assert record["loss/ret"] + 0.8 * record["loss/sts"] == pytest.approx(total, abs=TOL)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=TOL, rtol=0, msg=name)
    assert sum(float(g.abs().sum()) for g in got.values()) > 0


# --------------------------------------------------------------------------- real devices
def _spawned_rank(rank: int, world: int, port: int, config_path: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        trainer = CBBTrainer(load_config(config_path), distributed=True)
        trainer.model.train()
        record: dict = {}
        total = trainer._accumulate_step(0, record)
        tensors = _grads(trainer.model)
        tensors["__total__"] = torch.tensor([total], dtype=torch.float64)
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_loss_and_gradients_of_virtual_devices(tmp_path):
    import torch.multiprocessing as mp

    model = tiny_bert_without_dropout(tmp_path / "bert")
    config_path = write_cbb_config(tmp_path, model)
    mp.spawn(
        _spawned_rank,
        args=(2, _free_port(), str(config_path), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    virtual = CBBTrainer(load_config(config_path))
    virtual.model.train()
    total = virtual._accumulate_step(0, {})
    expected = _grads(virtual.model)
    for rank in range(2):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        assert float(got.pop("__total__")) == pytest.approx(total, abs=TOL)
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, atol=TOL, rtol=0, msg=f"{rank}:{name}")


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_torchrun_two_processes_trains_like_virtual_devices(tmp_path):
    """The CI form: ``torchrun --nproc_per_node 2`` on gloo, default map (ret on 0, STS on 1)
    and the shared map; the logged losses equal the single-process run's step by step."""
    model = tiny_bert_without_dropout(tmp_path / "bert")
    config_path = write_cbb_config(tmp_path, model, steps=3)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    _run(
        [
            *torchrun,
            "--nproc_per_node",
            "2",
            "-m",
            "conan_embedding.training.distributed",
            str(config_path),
            "--output-dir",
            str(tmp_path / "real"),
            "--no-progress",
        ],
        tmp_path,
    )
    done = _run(
        [
            sys.executable,
            "-m",
            "conan_embedding.training.distributed",
            str(config_path),
            "--output-dir",
            str(tmp_path / "virtual"),
            "--no-progress",
        ],
        tmp_path,
    )
    assert "final loss" in done.stdout
    real = read_log(tmp_path / "real" / "train_log.jsonl")
    virtual = read_log(tmp_path / "virtual" / "train_log.jsonl")
    assert [r["step"] for r in real] == [1, 2, 3]
    for a, b in zip(real, virtual, strict=True):
        for key in ("loss", "loss/ret", "loss/sts"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a, b)
    # rank 1 keeps its own log and checkpoint (its STS sampler is its own state)
    assert read_log(tmp_path / "real" / "rank-1" / "train_log.jsonl")[-1]["loss"] == pytest.approx(
        real[-1]["loss"], abs=1e-6
    )
    assert (tmp_path / "real" / "model" / "config_sentence_transformers.json").exists()


def test_configs_without_cbb_or_process_group_are_refused(tmp_path, tiny_bert):
    from conan_embedding.training.distributed import run_cbb

    path = write_cbb_config(tmp_path, tiny_bert)
    raw = yaml.safe_load(path.read_text())
    raw.pop("cbb")
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"plain.yaml: no 'cbb' section"):
        run_cbb(plain)
    with pytest.raises(RuntimeError, match="init_process_group"):
        CBBTrainer(load_config(path), distributed=True)


def test_the_plain_trainer_refuses_a_cbb_config(tmp_path, tiny_bert):
    from conan_embedding.training.trainer import Trainer

    with pytest.raises(ValueError, match="train-cbb"):
        Trainer(load_config(write_cbb_config(tmp_path, tiny_bert)))
