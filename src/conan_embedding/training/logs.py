"""What a finished run's ``train_log.jsonl`` says: its rows (:func:`read_log`), its loss curve
(:func:`plot_losses`), the examples each task saw and how hard its negatives stayed.

Why: an ablation compares arms, and two arms are only comparable when they saw the same
examples; under CBB the count depends on the device layout, not only on steps and batch.
Reading it back from the log (rather than from the config) reports what really ran. These
functions read a training log and its config only; the experiments put their output into
result files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from conan_embedding._io import atomic_path

if TYPE_CHECKING:
    from conan_embedding.config import TrainConfig

__all__ = ["examples_seen", "negative_stats", "plot_losses", "read_log"]


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``train_log.jsonl`` (none when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def plot_losses(log_path: str | Path, png_path: str | Path, window: int = 10) -> Path | None:
    """Total and per-task loss (moving average over ``window`` steps) as a PNG.

    Drawn on a bare :class:`matplotlib.figure.Figure` (Agg when saved), not through pyplot:
    no global backend switch or figure registry, and about half the import time, which the
    end of every training run pays (issue #26 item 8).
    """
    rows = read_log(log_path)
    if not rows:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    keys = ["loss"] + sorted({k for r in rows for k in r if k.startswith("loss/")})
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
        if not pts:
            continue
        steps, values = zip(*pts, strict=True)
        # the total alternates between tasks step by step: average over whole task cycles
        width = window * max(1, len(keys) - 1) if key == "loss" else window
        width = min(width, len(values))
        smooth = np.convolve(values, np.ones(width) / width, "valid")
        ax.plot(steps[len(steps) - len(smooth) :], smooth, label=key, lw=2 if key == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (mean of {window} steps per task)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    return png_path


def examples_seen(config: TrainConfig, log_path: Path) -> dict[str, dict[str, int]]:
    """Per task: the steps it ran (from ``train_log.jsonl``), its batch and devices, examples.

    A step ran a task when the log row holds ``loss/<task>``. Under CBB a data-parallel task
    (STS, classification, pairs) draws its own batch on each of its devices, a kind that
    shares its devices (retrieval, ``TaskKindSpec.shares_devices``) one batch shared by them
    (they split the negatives, not the queries).
    """
    from conan_embedding.training.cbb import RankLayout
    from conan_embedding.training.task_kinds import task_kind

    rows = read_log(log_path)
    layout = RankLayout.from_config(config) if config.cbb is not None else None
    out: dict[str, dict[str, int]] = {}
    for task in config.tasks:
        steps = sum(1 for row in rows if f"loss/{task.name}" in row)
        shared_by = len(layout.task_ranks[task.name]) if layout is not None else 1
        shared = task_kind(task.kind).shares_devices
        devices = 1 if shared else shared_by
        negatives = task.negatives * (shared_by if shared else 1)
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
    from conan_embedding.training.task_kinds import task_kind

    rows = read_log(log_path)
    out: dict[str, dict[str, Any]] = {}
    for task in config.tasks:
        if not task_kind(task.kind).mined_negatives:
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
