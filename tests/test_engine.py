"""The training engine: processes, resume across ranks, precision, checkpointing, devices.

Multi-process tests run ``torchrun`` with gloo on this CPU machine; each asserts the process
count the engine saw (accelerate 1.15 leaves N lone processes unless told it is on the CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tests.device_guard import DeviceGuard, DeviceMixError
from tests.test_distributed import assert_same_weights, write_cbb_config
from tests.test_llm_embedding import _config as weak_config
from tests.test_trainer import write_config

from conan_embedding.config import load_config
from conan_embedding.training.monitor import THROUGHPUT_KEYS
from conan_embedding.training.trainer import Trainer, read_log

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


def _engine_config(folder: Path, model: Path, steps: int, **changes) -> Path:
    path = write_config(folder, model, steps=steps)
    raw = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _same_trajectory(a: Path, b: Path, tol: float = 1e-5) -> None:
    left, right = read_log(a / "train_log.jsonl"), read_log(b / "train_log.jsonl")
    assert [r["step"] for r in left] == [r["step"] for r in right]
    for x, y in zip(left, right, strict=True):
        assert x.keys() == y.keys()
        for key, value in x.items():
            if key in THROUGHPUT_KEYS:  # the machine's speed, not the training
                continue
            assert value == pytest.approx(y[key], abs=tol), (key, x, y)
    assert_same_weights(a / "model", b / "model", atol=tol)


def _ranks_in_checkpoint(run: Path) -> set[str]:
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    return {p.stem for p in newest.glob("rank-*.json")}


# --------------------------------------------------------------------------- processes
def test_two_processes_train_like_one_at_the_same_global_batch(tmp_path, tiny_bert):
    """Data parallel with dropout on: each rank encodes its shard under the shard's own
    dropout seed, negatives are gathered with gradient; 2 processes = 1 process with 2 shards,
    for retrieval (hard + in-batch negatives), STS and classification steps."""
    config = _engine_config(tmp_path, tiny_bert, steps=6, engine__shards=2)
    train = ["-m", "conan_embedding.cli", "train", str(config), "--no-progress"]
    _run([*TORCHRUN, "2", *train, "--output-dir", str(tmp_path / "two")], tmp_path)
    _run([sys.executable, *train, "--output-dir", str(tmp_path / "one")], tmp_path)
    assert _ranks_in_checkpoint(tmp_path / "two") == {"rank-00000", "rank-00001"}
    assert _ranks_in_checkpoint(tmp_path / "one") == {"rank-00000"}
    _same_trajectory(tmp_path / "two", tmp_path / "one")


_KILL_RANK_1_AT_THIRD_CHECKPOINT = """
import os, signal, sys
from conan_embedding.training.engine import Engine
from conan_embedding.cli import app

real_save = Engine.save_checkpoint
calls = []

def save_or_die(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3 and self.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(self, *args, **kwargs)

Engine.save_checkpoint = save_or_die
sys.argv = ["conan-embed", *sys.argv[1:]]
app()
"""


def test_a_killed_rank_resumes_on_the_uninterrupted_trajectory(tmp_path, tiny_bert):
    """Rank 1 of 2 dies as the third checkpoint (step 9) is written; both ranks resume from
    the step they agree on (6) and end where a run that never stopped ends."""
    config = _engine_config(tmp_path, tiny_bert, steps=10, engine__shards=2, checkpoint_every=3)
    script = tmp_path / "die.py"
    script.write_text(_KILL_RANK_1_AT_THIRD_CHECKPOINT)
    args = ["train", str(config), "--no-progress", "--output-dir"]
    killed = _run([*TORCHRUN, "2", str(script), *args, str(tmp_path / "two")], tmp_path, False)
    assert killed.returncode != 0
    run = tmp_path / "two"
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))] == [
        "step-000003",
        "step-000006",
    ]
    assert read_log(run / "train_log.jsonl")[-1]["step"] == 9
    _run([*TORCHRUN, "2", "-m", "conan_embedding.cli", *args, str(run), "--resume"], tmp_path)
    _run([sys.executable, "-m", "conan_embedding.cli", *args, str(tmp_path / "one")], tmp_path)
    _same_trajectory(run, tmp_path / "one")


# --------------------------------------------------------------------------- precision, memory
def test_bf16_autocast_step_on_the_cpu(tmp_path, tiny_bert):
    config = load_config(
        _engine_config(tmp_path, tiny_bert, steps=2, engine__mixed_precision="bf16")
    )
    trainer = Trainer(config)
    seen: list[torch.dtype] = []
    linear = trainer.model[0].auto_model.encoder.layer[0].intermediate.dense
    linear.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    result = trainer.train(show_progress=False)
    assert seen and set(seen) == {torch.bfloat16}  # the matmuls ran in bf16
    assert linear.weight.dtype == torch.float32  # the master weights stay fp32
    assert torch.isfinite(torch.tensor(result.final_loss))


def _grads_after_one_step(trainer: Trainer) -> dict[str, torch.Tensor]:
    trainer.model.train()
    trainer.step(0)
    return {
        n: p.grad.detach().clone()
        for n, p in trainer.model.named_parameters()
        if p.grad is not None
    }


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tiny_bert):
    plain = Trainer(load_config(_engine_config(tmp_path / "a", tiny_bert, steps=2)))
    checkpointed = Trainer(
        load_config(
            _engine_config(tmp_path / "b", tiny_bert, steps=2, engine__gradient_checkpointing=True)
        )
    )
    assert checkpointed.model[0].auto_model.is_gradient_checkpointing
    expected, got = _grads_after_one_step(plain), _grads_after_one_step(checkpointed)
    assert expected.keys() == got.keys() and expected
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------- devices
def test_the_guard_catches_a_cpu_tensor_meeting_a_model_device_tensor():
    with DeviceGuard(), pytest.raises(DeviceMixError, match="mixes devices"):
        _ = torch.zeros(3, device="meta") + torch.ones(3)


def _embedding_step_on_meta(tmp_path: Path, model: Path) -> None:
    trainer = Trainer(
        load_config(_engine_config(tmp_path, model, steps=2, task_schedule="all_tasks"))
    )
    trainer.model.to("meta")
    with DeviceGuard() as guard:
        record = trainer.step(0)
    assert {"loss/ret", "loss/sts", "loss/cls"} <= set(record) and guard.ops > 100


def _cbb_step_on_meta(tmp_path: Path, model: Path) -> None:
    from conan_embedding.training.cbb import CBBTrainer

    trainer = CBBTrainer(load_config(write_cbb_config(tmp_path, model)))
    trainer.model.to("meta")
    with DeviceGuard():
        record = trainer.step(0)
    assert {"loss/ret", "loss/sts"} <= set(record)


def _weak_llm_step_on_meta(tmp_path: Path, llm: Path) -> None:
    from conan_embedding.config import OptimConfig
    from conan_embedding.modeling.llm_embedder import LLMEmbedder
    from conan_embedding.training.engine import Engine, LoopSettings
    from conan_embedding.training.soft_mask_weak import SoftMaskWeakProgram, weak_pairs

    config = weak_config(llm, tmp_path, steps=4, schedule="linear")
    engine = Engine(config.engine, LoopSettings(tmp_path / "w", 4, OptimConfig(max_steps=4)))
    embedder = LLMEmbedder.from_llm(config.llm, "lasttoken", config.max_len)
    program = SoftMaskWeakProgram(engine, embedder, weak_pairs(config.data), config, [])
    embedder.to("meta")
    with DeviceGuard():
        record = program.step(1)  # alpha strictly between 0 and 1: the soft mask itself
    assert 0 < record["alpha"] < 1


def _causal_lm_step_on_meta(tmp_path: Path, llm: Path) -> None:
    from tests.test_pretrain import lm_stage_config

    from conan_embedding.config import OptimConfig
    from conan_embedding.modeling.llm import load_llm
    from conan_embedding.training.causal_lm import CausalLMProgram
    from conan_embedding.training.engine import Engine, LoopSettings

    model, tokenizer = load_llm(llm / "model")
    config = lm_stage_config(tmp_path)
    engine = Engine(config.engine, LoopSettings(tmp_path / "lm", 4, OptimConfig(max_steps=4)))
    ids = torch.randint(0, len(tokenizer), (4, 16))
    program = CausalLMProgram(
        engine,
        model,
        tokenizer,
        lambda step: (ids, ids, {}),
        lambda m: 0.0,
        config,
        description="pretrain",
        extra_meta={},
    )
    model.to("meta")
    with DeviceGuard():
        record = program.step(1)
    assert "loss" in record


@pytest.mark.parametrize("stage", ["embedding", "cbb", "weak_llm", "causal_lm"])
def test_every_stage_builds_its_helper_tensors_on_the_model_device(
    tmp_path,
    tiny_bert,
    tiny_llm,
    stage,
):
    """One step of each stage with the model on ``meta``: no label, group, gold-score or mask
    tensor may stay on the CPU (the bug a CUDA run would hit at its first step)."""
    if stage == "embedding":
        _embedding_step_on_meta(tmp_path, tiny_bert)
    elif stage == "cbb":
        _cbb_step_on_meta(tmp_path, tiny_bert)
    elif stage == "weak_llm":
        _weak_llm_step_on_meta(tmp_path, tiny_llm)
    else:
        _causal_lm_step_on_meta(tmp_path, tiny_llm)


def test_training_writes_tensorboard_events_and_no_carriage_returns(tmp_path, tiny_bert):
    """A run logged to a pipe stays readable (no progress-bar redraws); TensorBoard gets the
    losses when it is installed (the engine's `trackers: [auto]`)."""
    pytest.importorskip("tensorboard")
    config = _engine_config(tmp_path, tiny_bert, steps=3, log_every=1)
    done = _run(
        [sys.executable, "-m", "conan_embedding.cli", "train", str(config)],
        tmp_path,
    )
    assert "\r" not in done.stderr and "step 3/3" in done.stderr
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_dhnm_state_is_identical_on_every_rank_with_dropout_on(tmp_path, tiny_bert):
    """2 processes, DHNM v2 with thresholds that replace often: rank 0 decides and broadcasts,
    and every rank observes the gathered scores, so the arrays checkpointed by both ranks are
    the same after the run, and negatives were really replaced."""
    from safetensors.torch import load_file
    from tests.test_dynamic_integration import _config as dhnm_config
    from tests.test_dynamic_integration import _toy_pools

    train = _toy_pools(tmp_path)
    config = dhnm_config(tmp_path / "run", str(tiny_bert), train, "v2", 8, v2_never_hard=0.99)
    path = tmp_path / "dhnm.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    _run(
        [*TORCHRUN, "2", "-m", "conan_embedding.cli", "train", str(path), "--no-progress"], tmp_path
    )
    newest = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    ranks = [load_file(newest / f"rank-{r:05d}.safetensors") for r in range(2)]
    arrays = [k for k in ranks[0] if "provider_arrays" in k]
    assert any(k.endswith("assigned") for k in arrays)
    for key in arrays:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, equal_nan=True)
    replaced = next(k for k in arrays if k.endswith("replacements"))
    assert int(ranks[0][replaced].sum()) > 0
