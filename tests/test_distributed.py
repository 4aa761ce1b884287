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
from tests.conftest import build_tiny_bert

from conan_embedding.config import load_config
from conan_embedding.losses.cbb import cbb_info_nce_loss
from conan_embedding.losses.cosent import cosent_loss
from conan_embedding.toy import toy_cbb_config
from conan_embedding.training.cbb import CBBTrainer, RankLayout
from conan_embedding.training.trainer import _stable_text_ids, encode_with_grad, read_log

TOL = 1e-5


def tiny_bert_without_dropout(folder: Path, dropout: float = 0.0) -> Path:
    """Dropout draws different masks per process; equivalence is about the maths, so 0."""
    path = build_tiny_bert(folder)
    config = json.loads((path / "config.json").read_text())
    config["hidden_dropout_prob"] = config["attention_probs_dropout_prob"] = dropout
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_cbb_config(folder: Path, model: Path, steps: int = 3, **cbb) -> Path:
    """:func:`toy_cbb_config` as ``folder/cbb.yaml``."""
    path = folder / "cbb.yaml"
    path.write_text(yaml.safe_dump(toy_cbb_config(folder, model, steps, **cbb)), encoding="utf-8")
    return path


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    """Two saved sentence-transformers folders hold the same weights, module by module."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files, f"no weights under {a}"
    for name in files:
        left, right = load_file(a / name), load_file(b / name)
        assert left.keys() == right.keys()
        for key in left:
            torch.testing.assert_close(
                left[key], right[key], atol=atol, rtol=0, msg=f"{name}:{key}"
            )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_as_rank(rank: int, world: int, port: int) -> None:
    """Set the environment torchrun gives rank ``rank`` of ``world`` on this machine (the
    engine joins the gloo group from it), one thread a process."""
    os.environ.update(
        {
            "HF_HUB_OFFLINE": "1",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)


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
        in_batch=False,  # the paper's L_CBB, CBB's default
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
    dropout, GradCache equals the one-pass graph (each chunk's dropout seed is replayed)."""
    model = tiny_bert_without_dropout(tmp_path / "bert", dropout)
    config = load_config(write_cbb_config(tmp_path, model, grad_cache=grad_cache))
    virtual = CBBTrainer(config)
    virtual.model.train()
    record = virtual.step(0)
    total = record["loss"]
    got = _grads(virtual.model)
    assert record["loss/ret"] + 0.8 * record["loss/sts"] == pytest.approx(total, abs=TOL)
    assert sum(float(g.abs().sum()) for g in got.values()) > 0
    if dropout:  # GradCache replays each chunk's dropout seed: equal to the one-pass graph
        other = CBBTrainer(
            load_config(write_cbb_config(tmp_path, model, grad_cache=not grad_cache))
        )
        other.model.train()
        assert other.step(0)["loss"] == pytest.approx(total, abs=TOL)
        for name, grad in _grads(other.model).items():
            torch.testing.assert_close(got[name], grad, atol=TOL, rtol=0, msg=name)
        return
    direct = CBBTrainer(config)
    direct.model.train()
    expected_total, expected = _direct_joint_gradients(direct)
    assert total == pytest.approx(expected_total, abs=TOL)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=TOL, rtol=0, msg=name)


# --------------------------------------------------------------------------- real devices
def _spawned_rank(rank: int, world: int, port: int, config_path: str, out: str) -> None:
    """One torchrun-like process: the engine (accelerate) joins the gloo group from the env."""
    join_as_rank(rank, world, port)
    import torch.distributed as dist

    try:
        trainer = CBBTrainer(load_config(config_path))
        assert trainer.engine.world_size == world  # not N lone processes (DistributedType.NO)
        trainer.model.train()
        record = trainer.step(0)
        tensors = _grads(trainer.model)
        tensors["__total__"] = torch.tensor([record["loss"]], dtype=torch.float64)
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/rank{rank}.safetensors")
        trainer.engine.release()  # as a finished run does: barrier, then DDP is dropped
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("task_ranks", [{"ret": [0, 1], "sts": [1]}, {"ret": [1, 0], "sts": [0]}])
def test_two_gloo_processes_give_the_loss_and_gradients_of_virtual_devices(tmp_path, task_ranks):
    """With dropout on, and with a task's ranks given unsorted (they are sorted)."""
    import torch.multiprocessing as mp

    model = tiny_bert_without_dropout(tmp_path / "bert", dropout=0.2)
    config_path = write_cbb_config(tmp_path, model, task_ranks=task_ranks)
    mp.spawn(
        _spawned_rank,
        args=(2, free_port(), str(config_path), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    virtual = CBBTrainer(load_config(config_path))
    virtual.model.train()
    total = virtual.step(0)["loss"]
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
    """The CI form: ``torchrun --nproc_per_node 2`` on gloo with dropout on; the logged losses
    and the final weights equal the single-process (virtual devices) run's."""
    model = tiny_bert_without_dropout(tmp_path / "bert", dropout=0.2)
    config_path = write_cbb_config(tmp_path, model, steps=3)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    _run(
        [
            *torchrun,
            "--nproc_per_node",
            "2",
            "-m",
            "conan_embedding.cli",
            "train",
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
            "conan_embedding.cli",
            "train",
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
    # one log and one model (rank 0); each rank's own state in the checkpoint
    assert not (tmp_path / "real" / "rank-1").exists()
    checkpoint = tmp_path / "real" / "checkpoints" / "step-000002"
    assert {p.name for p in checkpoint.glob("rank-*")} == {
        "rank-00000.json",
        "rank-00000.safetensors",
        "rank-00001.json",
        "rank-00001.safetensors",
    }
    assert_same_weights(tmp_path / "real" / "model", tmp_path / "virtual" / "model")


def test_configs_without_cbb_are_refused(tmp_path, tiny_bert):
    from conan_embedding.training.cbb import run_cbb

    path = write_cbb_config(tmp_path, tiny_bert)
    raw = yaml.safe_load(path.read_text())
    raw.pop("cbb")
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"plain.yaml: no 'cbb' section"):
        run_cbb(plain)


def test_the_plain_trainer_refuses_a_cbb_config(tmp_path, tiny_bert):
    from conan_embedding.training.trainer import Trainer

    with pytest.raises(
        ValueError, match=r"conan-embed train CONFIG.*-m conan_embedding\.cli train"
    ):
        Trainer(load_config(write_cbb_config(tmp_path, tiny_bert)))


def test_four_processes_run_two_cbb_groups_on_their_own_rows(tmp_path):
    """cbb.world_size 2 on 4 processes: 2 groups of 2 devices (64 GPUs = 8 groups of 8). Each
    group trains on its own slice of the step's rows, so the logged losses (the mean over
    groups) differ from one group's, and every rank checkpoints the same sampler state."""
    model = tiny_bert_without_dropout(tmp_path / "bert", dropout=0.2)
    config_path = write_cbb_config(tmp_path, model, steps=2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    for procs, out in ((4, "groups"), (2, "one-group")):
        _run(
            [
                *torchrun,
                "--nproc_per_node",
                str(procs),
                "-m",
                "conan_embedding.training.distributed",
                str(config_path),
                "--output-dir",
                str(tmp_path / out),
                "--no-progress",
            ],
            tmp_path,
        )
    groups = read_log(tmp_path / "groups" / "train_log.jsonl")
    single = read_log(tmp_path / "one-group" / "train_log.jsonl")
    assert all(np.isfinite(r["loss"]) for r in groups)
    assert groups[0]["loss/ret"] != pytest.approx(single[0]["loss/ret"], abs=1e-4)
    checkpoint = tmp_path / "groups" / "checkpoints" / "step-000001"
    states = [json.loads((checkpoint / f"rank-{r:05d}.json").read_text()) for r in range(4)]
    assert all(s["program"]["streams"] == states[0]["program"]["streams"] for s in states)


# ------------------------------------------------------- refusals before the first step (§6, §15)
@pytest.mark.parametrize(
    ("kind", "stage", "per_rank", "virtual", "setting"),
    [
        ("FSDP", None, [1, 1], False, "FSDP"),
        ("FSDP", None, [1], True, "FSDP"),
        ("DEEPSPEED", 3, [1, 1], False, "ZeRO-3"),
        ("DEEPSPEED", 2, [2, 1], False, "ZeRO-2"),
        ("DEEPSPEED", 2, [1, 1], True, "DeepSpeed"),
        ("DEEPSPEED", 1, [1], True, "DeepSpeed"),
    ],
)
def test_cbb_refuses_what_would_hang_or_skip_deepspeed(kind, stage, per_rank, virtual, setting):
    from conan_embedding.training.cbb import check_cbb_supported

    with pytest.raises(ValueError) as info:
        check_cbb_supported(kind, stage, per_rank, virtual)
    message = str(info.value)
    assert setting in message and "DDP" in message


@pytest.mark.parametrize(
    ("kind", "stage", "per_rank", "virtual"),
    [
        ("MULTI_GPU", None, [2, 1, 1], False),
        ("MULTI_CPU", None, [1, 2], False),
        ("NO", None, [2, 1], True),
        ("DEEPSPEED", 2, [1, 1, 1], False),
        ("DEEPSPEED", 1, [2, 1], False),
    ],
)
def test_cbb_allows_ddp_and_zero2_with_one_task_per_rank(kind, stage, per_rank, virtual):
    from conan_embedding.training.cbb import check_cbb_supported

    check_cbb_supported(kind, stage, per_rank, virtual)


def test_cbb_trainer_refuses_fsdp_before_preparing(tmp_path, tiny_bert, monkeypatch):
    from conan_embedding.training.engine import Engine
    from conan_embedding.training.trainer import Trainer

    def never(*args, **kwargs):
        raise AssertionError("the refusal must come before engine.prepare")

    monkeypatch.setattr(Engine, "prepare", never)
    monkeypatch.setattr(Trainer, "_engine_sharding", lambda self: ("FSDP", None))
    with pytest.raises(ValueError, match="FSDP"):
        CBBTrainer(load_config(write_cbb_config(tmp_path, tiny_bert)))


@pytest.mark.parametrize("grad_cache", [True, False])
def test_cbb_steps_report_the_texts_they_encode(tmp_path, tiny_bert, grad_cache):
    """Virtual devices, ret on [0, 1] (3 queries, 3 positives, 2 x 2 x 3 negatives) and sts on
    [1] (6 + 6 sentences): 30 texts a step; GradCache's replay is not counted twice."""
    trainer = CBBTrainer(load_config(write_cbb_config(tmp_path, tiny_bert, grad_cache=grad_cache)))
    record = trainer.step(0)
    assert record["samples"] == 30
    assert 30 * 3 <= record["tokens"] < 30 * 24  # [CLS] word... [SEP], no padding counted
