"""Checks the GPU paths of the training engine on a real GPU (see scripts/gpu_check.sh).

Each check runs a real stage for a couple of steps on tiny random models built here (the
1.4B check uses the real 1.4B configuration) and reports pass/fail, seconds per step and peak
GPU memory. ``--device cpu`` runs the single-device checks on the CPU (how CI keeps this
script working); nothing here claims a GPU result unless it ran on one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny-model builders of the test suite

from tests.conftest import WORDS, build_tiny_bert, build_tiny_llm  # noqa: E402
from tests.test_trainer import write_toy_tasks  # noqa: E402


def _peak_mb(device: str) -> float | None:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def _embedding_config(work: Path, model: Path, device: str, steps: int, **extra) -> Path:
    paths = write_toy_tasks(work)
    config = {
        "output_dir": str(work / "run"),
        "model": {"name": str(model), "dense_dim": 24, "max_seq_length": 32},
        "optim": {"lr": 5e-4, "max_steps": steps},
        "engine": {"device": device, "mixed_precision": "bf16", "trackers": []},
        "task_schedule": "all_tasks",
        "tasks": [
            {
                "name": "ret",
                "kind": "retrieval",
                "path": str(paths["retrieval"]),
                "batch_size": 4,
                "negatives": 2,
            },
            {"name": "sts", "kind": "sts", "path": str(paths["sts"]), "batch_size": 8},
        ],
        **extra,
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def check_embedding(work: Path, model: Path, device: str, steps: int) -> None:
    from conan_embedding.config import load_config
    from conan_embedding.training.trainer import Trainer

    Trainer(load_config(_embedding_config(work, model, device, steps))).train(show_progress=False)


def check_cbb(work: Path, model: Path, device: str, steps: int) -> None:
    from conan_embedding.config import load_config
    from conan_embedding.training.distributed import CBBTrainer

    path = _embedding_config(
        work, model, device, steps, cbb={"world_size": 2, "task_ranks": {"ret": [0, 1], "sts": [1]}}
    )
    CBBTrainer(load_config(path)).train(show_progress=False)


def check_pretrain(work: Path, llm: Path, device: str, steps: int) -> None:
    from conan_embedding.training.pretrain import PretrainConfig, run_pretraining

    run_pretraining(
        PretrainConfig(
            output_dir=str(work / "pretrain"),
            sources=[{"name": "toy", "path": str(llm.parent / "docs.txt")}],
            tokenizer=str(llm),
            seq_len=32,
            batch_size=8,
            micro_batch_size=4,
            steps=steps,
            eval_every=steps,
            holdout_every=10,
            eval_blocks=2,
            engine={"device": device, "mixed_precision": "bf16", "trackers": []},
        ),
        resume=False,
    )


def check_sft(work: Path, llm: Path, device: str, steps: int) -> None:
    from conan_embedding.training.pretrain import SFTConfig, run_sft

    run_sft(
        SFTConfig(
            output_dir=str(work / "sft"),
            base_model=str(llm),
            data=str(llm.parent / "sft.jsonl"),
            batch_size=8,
            steps=steps,
            eval_every=steps,
            eval_rows=8,
            engine={"device": device, "mixed_precision": "bf16", "trackers": []},
        ),
        resume=False,
    )


def check_weak_llm(work: Path, llm: Path, device: str, steps: int) -> None:
    from conan_embedding.training.llm_embedding import WeakStageConfig, train_weak_stage

    train_weak_stage(
        WeakStageConfig(
            output_dir=str(work / "weak"),
            llm=str(llm),
            data=str(llm.parent / "sft.jsonl"),
            batch_size=8,
            steps=steps,
            pooling="lasttoken",
            engine={"device": device, "mixed_precision": "bf16", "trackers": []},
        ),
        show_progress=False,
    )


def check_1_4b(work: Path, llm: Path, device: str, steps: int) -> None:
    from conan_embedding.training.pretrain import PretrainConfig, run_pretraining

    run_pretraining(
        PretrainConfig(
            output_dir=str(work / "pretrain-1.4b"),
            preset="conan-v2-1.4b",
            sources=[{"name": "toy", "path": str(llm.parent / "docs.txt")}],
            tokenizer=str(llm),
            seq_len=512,
            batch_size=8,
            micro_batch_size=2,
            steps=steps,
            eval_every=steps,
            holdout_every=10,
            eval_blocks=1,
            engine={
                "device": device,
                "mixed_precision": "bf16",
                "gradient_checkpointing": True,
                "trackers": [],
            },
        ),
        resume=False,
    )


def _torchrun(args: list[str], work: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *args,
    ]
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])


def check_bf16_encode(bert: Path, device: str) -> None:
    """The ``torch-bf16`` encode backend on ``device``: the model lands there, its matrix
    products run in bf16, and the vectors stay within cosine 0.99 of the float32 ones."""
    import numpy as np

    from conan_embedding.encoding.engine import EmbeddingEngine
    from conan_embedding.modeling.embedder import build_embedder

    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 9)) for i in range(64)]
    fp32 = EmbeddingEngine(build_embedder(str(bert)), device=device).embed(texts)
    engine = EmbeddingEngine(build_embedder(str(bert)), backend="torch-bf16", device=device)
    if engine.device.type != torch.device(device).type:
        raise RuntimeError(f"the encoder runs on {engine.device}, not {device}")
    linear = next(m for m in engine.model.modules() if isinstance(m, torch.nn.Linear))
    seen: list[torch.dtype] = []
    hook = linear.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        bf16 = engine.embed(texts)
    finally:
        hook.remove()
    if set(seen) != {torch.bfloat16}:
        raise RuntimeError(f"the matrix products ran in {set(seen)}, not bfloat16")
    cosine = float(np.min(np.sum(fp32 * bf16, axis=1)))
    if cosine < 0.99:
        raise RuntimeError(f"bf16 vectors drift from fp32: min cosine {cosine:.4f}")


def check_sharded_mining(work: Path, bert: Path) -> None:
    """``conan-embed mine`` on 2 GPUs (NCCL barrier, each rank on cuda:LOCAL_RANK) writes the
    pools of one GPU: the same scores column by column (1e-4) and >= 99% of the same ids
    (the GPU may order near-ties differently)."""
    import random

    import numpy as np

    from conan_embedding.mining.pools import read_pools
    from conan_embedding.modeling.embedder import build_embedder, save_embedder

    work.mkdir(parents=True, exist_ok=True)
    model = save_embedder(build_embedder(str(bert)), work / "model")
    rng = random.Random(0)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))

    rows = [json.dumps({"query": sentence(), "pos": [sentence()]}) for _ in range(500)]
    (work / "train.jsonl").write_text("\n".join(rows) + "\n")
    (work / "corpus.txt").write_text("\n".join(sentence() for _ in range(20_000)) + "\n")
    options = ["--model", str(model), "--corpus", str(work / "corpus.txt"), "--chunk-size", "512"]
    options += ["--range-min", "1", "--range-max", "21", "--relative-margin", "-1"]
    mine = ["-m", "conan_embedding.cli", "mine", str(work / "train.jsonl")]
    one = subprocess.run(
        [sys.executable, *mine, str(work / "one.jsonl"), *options, "--cache-dir", "one-cache"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if one.returncode:
        raise RuntimeError(one.stderr[-2000:])
    _torchrun([*mine, str(work / "two.jsonl"), *options, "--cache-dir", "two-cache"], work)
    a, b = read_pools(work / "one.pool.json"), read_pools(work / "two.pool.json")
    same = float((np.asarray(a.ids) == np.asarray(b.ids)).mean())
    gap = float(np.nanmax(np.abs(np.asarray(a.scores) - np.asarray(b.scores))))
    if same < 0.99 or gap > 1e-4:
        raise RuntimeError(f"2 GPUs differ from 1: {same:.4f} of ids equal, max score gap {gap}")
    if list((work / "two-cache").glob("*.shard-*")):
        raise RuntimeError("rank 0 left shard files behind after merging them")


def _accelerate(config: str, args: list[str], work: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / config),
        "--num_processes",
        "1",
        *args,
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke run)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="runs/gpu_check")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False);")
        print("nothing to check here. Run `bash scripts/gpu_check.sh` on a GPU machine.")
        return 0
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bert = build_tiny_bert(work / "tiny-bert")
    llm = build_tiny_llm(work / "tiny-llm", hidden=64) / "model"
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    checks: list[tuple[str, Callable[[], None] | None, str]] = [
        (
            "embedding step, bf16",
            lambda: check_embedding(work / "emb", bert, args.device, args.steps),
            "",
        ),
        (
            "CBB, 2 virtual devices, bf16",
            lambda: check_cbb(work / "cbb", bert, args.device, args.steps),
            "",
        ),
        (
            "LLM pretraining, micro-batches",
            lambda: check_pretrain(work, llm, args.device, args.steps),
            "",
        ),
        ("LLM SFT", lambda: check_sft(work, llm, args.device, args.steps), ""),
        ("encode, torch-bf16 backend", lambda: check_bf16_encode(bert, args.device), ""),
        (
            "v2 weak stage, soft mask",
            lambda: check_weak_llm(work, llm, args.device, args.steps),
            "",
        ),
    ]
    cfg = _embedding_config(work / "ddp", bert, args.device, args.steps)
    cbb_cfg = _embedding_config(
        work / "cbb2",
        bert,
        args.device,
        args.steps,
        cbb={"world_size": 2, "task_ranks": {"ret": [0, 1], "sts": [1]}},
    )
    checks.append(
        (
            "DDP, 2 GPUs",
            (
                lambda: _torchrun(
                    ["-m", "conan_embedding.cli", "train", str(cfg), "--no-progress"], work
                )
            )
            if gpus >= 2
            else None,
            "needs 2 GPUs",
        )
    )
    checks.append(
        (
            "CBB, 2 GPUs",
            (
                lambda: _torchrun(
                    ["-m", "conan_embedding.training.distributed", str(cbb_cfg), "--no-progress"],
                    work,
                )
            )
            if gpus >= 2
            else None,
            "needs 2 GPUs",
        )
    )
    checks.append(
        (
            "mining encoded on 2 GPUs",
            (lambda: check_sharded_mining(work / "mine", bert)) if gpus >= 2 else None,
            "needs 2 GPUs",
        )
    )
    try:
        import deepspeed  # noqa: F401

        has_ds = True
    except ImportError:
        has_ds = False
    ds_cfg = _embedding_config(work / "ds", bert, args.device, args.steps)
    checks.append(
        (
            "DeepSpeed ZeRO-2 step",
            (
                lambda: _accelerate(
                    "configs/accelerate/deepspeed-zero2.yaml",
                    ["-m", "conan_embedding.cli", "train", str(ds_cfg), "--no-progress"],
                    work,
                )
            )
            if gpus >= 1 and has_ds
            else None,
            "needs a GPU and `pip install deepspeed`",
        )
    )
    big = gpus >= 1 and torch.cuda.get_device_properties(0).total_memory >= 40 * 2**30
    checks.append(
        (
            "1.4B pretraining, bf16 + checkpointing",
            (lambda: check_1_4b(work, llm, args.device, args.steps)) if big else None,
            "needs a GPU of 40 GB or more",
        )
    )

    rows = []
    for name, run, why in checks:
        if run is None:
            rows.append({"check": name, "result": "skipped", "why": why})
            continue
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        try:
            run()
            result, why = "pass", ""
        except Exception as err:  # a failed check is a row of the report, not the end
            result, why = "FAIL", f"{type(err).__name__}: {err}"[:300]
            traceback.print_exc()
        rows.append(
            {
                "check": name,
                "result": result,
                "why": why,
                "seconds_per_step": round((time.perf_counter() - began) / args.steps, 3),
                "peak_mb": _peak_mb(args.device),
            }
        )
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"\ngpu_check on {device_name} ({gpus} GPU(s)), torch {torch.__version__}")
    print(f"{'check':42} {'result':8} {'s/step':>8} {'peak MB':>9}  note")
    for row in rows:
        peak = f"{row['peak_mb']:.0f}" if row.get("peak_mb") else "-"
        step = f"{row['seconds_per_step']:.3f}" if "seconds_per_step" in row else "-"
        print(f"{row['check']:42} {row['result']:8} {step:>8} {peak:>9}  {row['why']}")
    (work / "report.json").write_text(json.dumps({"device": device_name, "rows": rows}, indent=2))
    return 1 if any(r["result"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
