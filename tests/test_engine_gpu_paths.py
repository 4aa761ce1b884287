"""The engine's GPU-path fixes (``../shared/audits/gpu-readiness.md``), proven on the CPU.

Each test names the audit section it covers. Where the failing library path only exists on a
GPU or under FSDP/DeepSpeed (accelerate never picks FSDP for a CPU run), the test drives the
engine's own decision or helper, and the GPU row of ``scripts/gpu_check.py`` covers the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from conan_embedding.config import EngineConfig, OptimConfig
from conan_embedding.training.engine import Engine, LoopSettings, RunResult
from conan_embedding.training.precision import load_full_state, meta_skeleton

REPO = Path(__file__).resolve().parents[1]


class _Tied(torch.nn.Module):
    """Embedding and output head share one weight, like a tied LM head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.mid = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.emb(ids)))) * self.scale


class _Program:
    """A minimal step program: one regression batch per step through the engine."""

    def __init__(self, engine: Engine, model: torch.nn.Module, report: bool = True) -> None:
        self.engine = engine
        self.model = model
        self.forward = engine.prepare(model)
        self.report = report
        self.saved: torch.nn.Module | None = None
        self.finished_on: list[int] = []

    def step(self, step: int) -> dict[str, Any]:
        ids = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(step))
        loss = self.forward(ids.to(self.engine.device)).float().pow(2).mean()
        self.engine.backward(loss)
        record: dict[str, Any] = {"loss": loss.item()}
        if self.report:
            record.update(samples=4, tokens=10)  # 10 of the 12 positions are "real"
        return record

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def finish(self, engine: Engine, result: RunResult) -> None:
        self.finished_on.append(result.steps)
        self.saved = engine.consolidated_model(self.model)


def _engine(tmp_path: Path, steps: int = 2, **config: Any) -> Engine:
    settings = LoopSettings(tmp_path / "run", steps, OptimConfig(max_steps=steps, lr=1e-2))
    return Engine(EngineConfig(device="cpu", trackers=[], **config), settings)


# --------------------------------------------------------------------------- §3 consolidation
def test_the_meta_skeleton_holds_no_weights_and_keeps_ties():
    model = _Tied()
    skeleton = meta_skeleton(model)
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.head.weight is skeleton.emb.weight
    assert not model.emb.weight.is_meta  # the original is untouched
    assert skeleton.scale.item() == 2.0  # non-persistent buffers are real copies


def test_a_gathered_state_loads_into_a_fresh_copy_with_ties_and_dtypes():
    """What consolidated_model does on the main rank: skeleton + full dict -> equal weights;
    the tie survives ``assign=True``; 16-bit gathered weights go back to the model's fp32."""
    model = _Tied()
    skeleton = meta_skeleton(model)
    full = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    del full["head.weight"]  # a consolidated dict may list a tied weight once
    loaded = load_full_state(skeleton, full)
    assert loaded.head.weight is loaded.emb.weight
    assert all(p.dtype == torch.float32 and not p.is_meta for p in loaded.parameters())
    for name, value in full.items():
        torch.testing.assert_close(loaded.state_dict()[name], value.float())
    assert loaded.scale.item() == 2.0
    with pytest.raises(ValueError, match="lacks weights for.*mid.weight"):
        load_full_state(skeleton, {k: v for k, v in full.items() if k != "mid.weight"})


_FSDP2 = """
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
from tests.test_engine_gpu_paths import _Tied
from conan_embedding.training.precision import meta_skeleton, load_full_state
dist.init_process_group("gloo")
torch.manual_seed(0)
model = _Tied()
skeleton = meta_skeleton(model)           # before fully_shard, as Engine.prepare does
fully_shard(model.mid); fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
for _ in range(2):
    model(torch.randint(0, 10, (4, 3))).sum().backward(); opt.step(); opt.zero_grad()
assert type(model.mid.weight).__name__ == "DTensor"
try:
    model.load_state_dict({k: v.full_tensor() for k, v in model.state_dict().items()})
    print("PLAIN_LOAD_OK")
except Exception as error:
    print("PLAIN_LOAD_FAILS", type(error).__name__)
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if dist.get_rank() == 0:
    saved = load_full_state(skeleton, full)
    assert saved.head.weight is saved.emb.weight
    for k, v in full.items():
        assert torch.equal(saved.state_dict()[k], v), k
    from safetensors.torch import save_model
    save_model(saved, "saved.safetensors")
    print("CONSOLIDATED_OK")
# both ranks leave together: rank 1 tearing gloo down while rank 0 still saves can abort it
dist.barrier()
dist.destroy_process_group()
"""


def test_fsdp2_on_two_gloo_processes_consolidates_into_a_loadable_model(tmp_path):
    """§3 with torch's real ``fully_shard`` (2 CPU processes): the sharded module refuses a
    plain ``load_state_dict`` (today's finish), the skeleton taken before sharding takes
    the gathered weights. accelerate does not run FSDP on a CPU, so this drives torch
    directly; gpu_check's sharded-finish row runs it through the engine."""
    script = tmp_path / "fsdp2.py"
    script.write_text(_FSDP2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "PLAIN_LOAD_FAILS" in done.stdout and "CONSOLIDATED_OK" in done.stdout
    from safetensors.torch import load_model

    fresh = _Tied()
    load_model(fresh, str(tmp_path / "saved.safetensors"))  # what the stages save loads again
    assert fresh.head.weight is fresh.emb.weight


def test_consolidated_model_unsharded_is_the_model_itself(tmp_path):
    engine = _engine(tmp_path)
    program = _Program(engine, _Tied())
    engine.run(program, show_progress=False)
    assert program.saved is program.model


def test_a_sharded_engine_consolidates_a_copy_and_checkpoints_its_last_step(tmp_path, monkeypatch):
    """The engine's wiring for FSDP/DeepSpeed: ``prepare`` keeps a skeleton, finish gets a
    fresh copy with the trained weights, and the last step is checkpointed before finish.
    (The accelerate distributed type is the edge forced here; the gather is accelerate's.)"""
    monkeypatch.setattr(Engine, "sharded_state", property(lambda self: True))
    engine = _engine(tmp_path, steps=3)
    program = _Program(engine, _Tied())
    engine.run(program, show_progress=False)
    assert program.saved is not None and program.saved is not program.model
    trained = program.model.state_dict()
    for name, value in program.saved.state_dict().items():
        torch.testing.assert_close(value, trained[name])
    assert program.saved.head.weight is program.saved.emb.weight
    assert (tmp_path / "run" / "checkpoints" / "step-000003" / "state.json").is_file()
    with pytest.raises(ValueError, match="given to Engine.prepare"):
        engine.consolidated_model(_Tied())


# --------------------------------------------------------------------------- §4 precision
def test_the_launchers_precision_is_honoured_and_the_config_overrides_it(tmp_path, monkeypatch):
    """``accelerate launch --mixed_precision bf16`` (or a config file saying bf16) sets
    ACCELERATE_MIXED_PRECISION; the default config must let it through, an explicit value
    must win, and the resolved precision is what the engine reports and logs."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    engine = _engine(tmp_path / "a")
    assert EngineConfig().mixed_precision is None
    assert engine.mixed_precision == "bf16"
    with engine.autocast():
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16
    program = _Program(engine, _Tied())
    engine.run(program, show_progress=False)
    assert "mixed precision bf16" in (tmp_path / "a" / "run" / "train.log").read_text()
    assert _engine(tmp_path / "b", mixed_precision="no").mixed_precision == "no"


_PRECISION = """
from pathlib import Path
from conan_embedding.config import EngineConfig, OptimConfig
from conan_embedding.training.engine import Engine, LoopSettings
engine = Engine(EngineConfig(trackers=[]), LoopSettings(Path("out"), 1, OptimConfig(max_steps=1)))
print("PRECISION", engine.mixed_precision)
"""


def test_accelerate_launch_with_the_shipped_ddp_config_trains_in_bf16(tmp_path):
    """The real launcher with ``configs/accelerate/ddp.yaml`` (``mixed_precision: bf16``),
    one CPU process: the engine runs bf16 (it ran fp32 before, the config's "no" won)."""
    script = tmp_path / "precision.py"
    script.write_text(_PRECISION)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    config = REPO / "configs" / "accelerate" / "ddp.yaml"
    cmd = ["--config_file", str(config), "--num_processes", "1", "--cpu", str(script)]
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *cmd],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "PRECISION bf16" in done.stdout


# --------------------------------------------------------------------------- §5 DeepSpeed sync
class _FakeDeepSpeedEngine(torch.nn.Module):
    """Records what the engine tells DeepSpeed about accumulation boundaries."""

    def __init__(self) -> None:
        super().__init__()
        self.boundaries: list[bool] = []

    def set_gradient_accumulation_boundary(self, value: bool) -> None:
        self.boundaries.append(value)


def test_deepspeed_backwards_before_the_last_never_step_even_with_one_process(
    tmp_path, monkeypatch
):
    """accelerate's DeepSpeed backward steps the optimizer whenever ``sync_gradients`` is on;
    with one process the old ``sync`` left it on, so every backward of a step stepped."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    engine = _engine(tmp_path)
    assert not engine.distributed
    monkeypatch.setattr(
        Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED)
    )
    engine.forward_model = fake = _FakeDeepSpeedEngine()
    with engine.sync(last=False):
        assert not engine.accelerator.sync_gradients
    assert engine.accelerator.sync_gradients and fake.boundaries == [False, True]
    with engine.sync(last=True):
        assert engine.accelerator.sync_gradients
    assert fake.boundaries == [False, True]


_DEEPSPEED = """
import json
from pathlib import Path
import torch
from conan_embedding.config import EngineConfig, OptimConfig
from conan_embedding.training.engine import Engine, LoopSettings
Path("ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0}}))
engine = Engine(EngineConfig(device="cpu", trackers=[], deepspeed="ds.json"),
                LoopSettings(Path("out"), 3, OptimConfig(max_steps=3)))
assert str(engine.accelerator.distributed_type).endswith("DEEPSPEED")
class Program:
    def __init__(self):
        self.forward = engine.prepare(torch.nn.Linear(4, 1))
    def step(self, step):
        for last in (False, True):  # two backwards per step, like all_tasks or micro-batches
            with engine.sync(last):
                loss = self.forward(torch.randn(2, 4)).pow(2).mean()
                engine.backward(loss)
        return {"loss": loss.item()}
    def after_step(self, step): return {}
    def state_dict(self): return {}
    def load_state_dict(self, state): pass
    def finish(self, engine, result): pass
program = Program()
deepspeed_engine = engine.forward_model
engine.run(program, show_progress=False)
print("GLOBAL_STEPS", deepspeed_engine.global_steps)
"""


def test_one_process_deepspeed_steps_once_per_engine_step(tmp_path):
    """Real DeepSpeed on the CPU (``DS_ACCELERATOR=cpu``, torchrun with 1 process): 3 engine
    steps of 2 backwards each are 3 DeepSpeed optimizer steps (6 before the fix)."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)")
    script = tmp_path / "ds.py"
    script.write_text(_DEEPSPEED)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    done = subprocess.run(
        [*cmd, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "GLOBAL_STEPS 3" in done.stdout, done.stdout[-2000:]


# --------------------------------------------------------------------------- §8 §16 §17 settings
def test_the_process_group_timeout_and_ddp_settings_reach_accelerate(tmp_path):
    from conan_embedding.config import OptimConfig
    from conan_embedding.training.engine import Engine, LoopSettings

    engine = _engine(tmp_path / "a", timeout_minutes=45)
    # what accelerate passes to init_process_group when it creates the group
    assert engine.accelerator.init_handler.to_kwargs() == {"timeout": timedelta(minutes=45)}
    assert EngineConfig().timeout_minutes == 30
    assert _engine(tmp_path / "b", timeout_minutes=None).accelerator.init_handler is None
    # the embedding stages (Engine) search for unused parameters, the LM stages do not
    assert engine.accelerator.ddp_handler.find_unused_parameters is True
    lm_loop = LoopSettings(
        output_dir=tmp_path / "lm", steps=1, optim=OptimConfig(max_steps=1), seed=0
    )
    # what the LM stages (causal_lm, soft_mask_weak) pass
    lm = Engine(EngineConfig(device="cpu", trackers=[]), lm_loop, find_unused_parameters=False)
    assert lm.accelerator.ddp_handler.find_unused_parameters is False
    forced = _engine(tmp_path / "c", find_unused_parameters=False)
    assert forced.accelerator.ddp_handler.find_unused_parameters is False


def test_a_previous_stages_deepspeed_does_not_leak_into_the_next(tmp_path, monkeypatch):
    """An Accelerator with a DeepSpeed plugin leaves ACCELERATE_USE_DEEPSPEED=true and its
    distributed type in PartialState; the next stage of the same process (no DeepSpeed)
    must come up plain, not as a default DeepSpeed run."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    first = _engine(tmp_path / "a")
    plain = first.accelerator.distributed_type
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what the DeepSpeed stage left
    monkeypatch.setitem(PartialState._shared_state, "distributed_type", DistributedType.DEEPSPEED)
    second = _engine(tmp_path / "b")
    assert second.accelerator.distributed_type == plain
    assert "ACCELERATE_USE_DEEPSPEED" not in os.environ
    assert second.accelerator.state.deepspeed_plugin is None


def test_tf32_is_set_on_cuda_only_and_either_way(monkeypatch):
    from conan_embedding.training.precision import set_tf32

    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        set_tf32(True, torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == before[0]
        set_tf32(True, torch.device("cuda", 0))
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32 is True
        set_tf32(False, torch.device("cuda", 0))  # a later stage without it
        assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cudnn.allow_tf32 is False
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_auto_device_wraps_local_rank_onto_the_visible_gpus(monkeypatch):
    """SLURM ``--gpus-per-task=1``: LOCAL_RANK 3 but one visible GPU -> cuda:0."""
    from conan_embedding.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert resolve_device("auto") == torch.device("cuda", 3)


# --------------------------------------------------------------------------- §9 master weights
def test_a_model_loaded_in_bf16_trains_with_fp32_master_weights(tmp_path, tiny_bert, caplog):
    """``model_kwargs: {torch_dtype: bfloat16}`` as the docs suggested: trainable weights are
    upcast (AdamW on bf16 weights loses most updates), with a warning; frozen ones stay bf16."""
    from transformers import BertModel

    model = BertModel.from_pretrained(str(tiny_bert), dtype=torch.bfloat16)
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    assert model.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
    engine = _engine(tmp_path)
    with caplog.at_level("WARNING", logger="conan_embedding"):
        engine.prepare(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert model.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert "upcast to float32" in caplog.text
    for group in engine.optimizer.param_groups:  # the optimizer holds the fp32 tensors
        assert all(p.dtype == torch.float32 for p in group["params"])


# --------------------------------------------------------------------------- §12 shared folder
def test_a_rank_that_cannot_see_the_checkpoint_folder_says_why(tmp_path, monkeypatch):
    """Multi-node on node-local disks: rank 0's folder does not exist on another node. Here
    the single process plays a non-main rank, so nobody creates the folder."""
    engine = _engine(tmp_path)
    program = _Program(engine, _Tied())
    monkeypatch.setattr(Engine, "is_main", property(lambda self: False))
    with pytest.raises(RuntimeError, match="filesystem every rank sees") as error:
        engine.save_checkpoint(1, program)
    assert ".tmp-step-000001" in str(error.value)


# --------------------------------------------------------------------------- §13 CUDA RNG
def test_only_the_ranks_own_cuda_rng_is_saved_and_old_checkpoints_still_resume():
    from conan_embedding.training.checkpoint import cuda_rng_state, pick_cuda_rng_state

    assert cuda_rng_state(torch.device("cpu")) == {}
    own, other = torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)
    # an old checkpoint of a rank on cuda:2 saw 11 GPUs (sorted keys put 10 before 2)
    old = {f"torch_cuda_{i}": (own if i == 2 else other) for i in range(11)}
    assert pick_cuda_rng_state(old, torch.device("cuda", 2)) is own
    assert pick_cuda_rng_state({"torch_cuda": own, **old}, torch.device("cuda", 5)) is own
    assert pick_cuda_rng_state({"torch_cuda_0": own}, torch.device("cuda", 3)) is None
    assert pick_cuda_rng_state({"torch_cuda": own}, torch.device("cpu")) is None


# --------------------------------------------------------------------------- throughput
def test_every_step_logs_throughput_and_peak_memory(tmp_path):
    import json

    engine = _engine(tmp_path / "a", steps=3)
    engine.settings.log_every = 1
    engine.run(_Program(engine, _Tied()), show_progress=False)
    rows = [
        json.loads(line) for line in (tmp_path / "a/run/train_log.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 3
    for row in rows:
        assert row["samples"] == 4 and row["tokens"] == 10
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] == pytest.approx(
            row["samples_per_s"] * 2.5, rel=1e-3
        )
        assert row["peak_mem_mb"] > 10  # max RSS of this process on the CPU
    assert "samples/s" in (tmp_path / "a/run/train.log").read_text()

    quiet = _engine(tmp_path / "b", steps=1)
    quiet.run(_Program(quiet, _Tied(), report=False), show_progress=False)
    row = json.loads((tmp_path / "b/run/train_log.jsonl").read_text())
    assert "peak_mem_mb" in row and not {"samples", "samples_per_s", "tokens_per_s"} & set(row)


_TWO_RANKS = """
import json
from pathlib import Path
import torch
from tests.test_engine_gpu_paths import _Program, _Tied
from conan_embedding.config import EngineConfig, OptimConfig
from conan_embedding.training.engine import Engine, LoopSettings
engine = Engine(EngineConfig(device="cpu", trackers=[]),
                LoopSettings(Path("out"), 2, OptimConfig(max_steps=2)))
assert engine.world_size == 2
engine.run(_Program(engine, _Tied()), show_progress=False)
"""


def test_throughput_counts_are_summed_over_ranks(tmp_path):
    """2 gloo processes, each reporting 4 samples / 10 tokens: the log says 8 / 20."""
    import json

    script = tmp_path / "two.py"
    script.write_text(_TWO_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [
        json.loads(line) for line in (tmp_path / "out/train_log.jsonl").read_text().splitlines()
    ]
    assert [(r["samples"], r["tokens"]) for r in rows] == [(8, 20), (8, 20)]
