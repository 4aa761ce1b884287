"""What a finished run's ``train_log.jsonl`` says: the examples each task saw and how hard
its negatives stayed.

Why: an ablation compares arms, and two arms are only comparable when they saw the same
examples; under CBB the count depends on the device layout, not only on steps and batch.
Reading it back from the log (rather than from the config) reports what really ran. These
functions read a training log and its config only; the experiments put their output into
result files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conan_embedding.config import TrainConfig

__all__ = ["examples_seen", "negative_stats"]


def examples_seen(config: TrainConfig, log_path: Path) -> dict[str, dict[str, int]]:
    """Per task: the steps it ran (from ``train_log.jsonl``), its batch and devices, examples.

    A step ran a task when the log row holds ``loss/<task>``. Under CBB a data-parallel task
    (STS, pairs) draws its own batch on each of its devices, a retrieval task one batch shared
    by its devices (they split the negatives, not the queries).
    """
    from conan_embedding.training.cbb import RankLayout
    from conan_embedding.training.trainer import read_log

    rows = read_log(log_path)
    layout = RankLayout.from_config(config) if config.cbb is not None else None
    out: dict[str, dict[str, int]] = {}
    for task in config.tasks:
        steps = sum(1 for row in rows if f"loss/{task.name}" in row)
        shared_by = len(layout.task_ranks[task.name]) if layout is not None else 1
        devices = shared_by if task.kind != "retrieval" else 1
        negatives = task.negatives * (shared_by if task.kind == "retrieval" else 1)
        out[task.name] = {
            "steps": steps,
            "batch_size": task.batch_size,
            "devices": devices,
            "examples": steps * task.batch_size * devices,
            "negatives_per_query": negatives,
        }
    return out


def negative_stats(config: TrainConfig, log_path: Path) -> dict[str, dict[str, Any]]:
    """Per retrieval task: its DHNM rule, replacements, pool exhaustion and how hard its
    negatives stayed (mean ``<task>/neg_score`` over the first 10 logged steps and over the
    second half of the run), from ``train_log.jsonl``.

    Logs written before the trainer named provider stats per task carry one unprefixed
    ``dhnm/*`` set, which the last provider of a step overwrote: those counts are left out.
    """
    from conan_embedding.training.trainer import read_log

    rows = read_log(log_path)
    out: dict[str, dict[str, Any]] = {}
    for task in config.tasks:
        if task.kind != "retrieval":
            continue
        scores = [row[f"{task.name}/neg_score"] for row in rows if f"{task.name}/neg_score" in row]
        totals = [row[k] for row in rows if (k := f"{task.name}/dhnm/replacements_total") in row]
        exhausted = [row[k] for row in rows if (k := f"{task.name}/dhnm/pool_exhausted") in row]
        half = len(scores) // 2
        out[task.name] = {
            "rule": task.dynamic_negatives.rule,
            "replacements": totals[-1] if totals else None,
            "pool_exhausted": exhausted[-1] if exhausted else None,
            "neg_score_first_10": round(sum(scores[:10]) / len(scores[:10]), 4) if scores else None,
            "neg_score_second_half": round(sum(scores[half:]) / len(scores[half:]), 4)
            if scores
            else None,
        }
    return out
