"""The one experiment runner: an arm is trained, evaluated and written as a result JSON.

Why: every experiment (the v1 recipe ablation, the CBB and CLR ablations, the v2 conversion
ablation, the v2 demo) compares arms trained and scored the same way, and a result is only
comparable with another when both say where they came from: the commit, the machine, the
threads and the load while they ran. Doing that once here keeps the result files alike
(the same keys, written atomically) whichever experiment wrote them.

How: an :class:`Arm` is a name, an optional ``train()`` (returns the trained model and the
facts of its training), an ``evaluate(model)`` (returns the scores and the facts of the
evaluation) and where its result goes. :func:`run_arm` returns a finished result unchanged
(unless ``force``), else records the provenance (:mod:`conan_embedding.provenance`), trains,
times, evaluates, times again, and writes the JSON with :func:`write_result`
(:mod:`conan_embedding._io`). Experiments whose reports are not one arm (tables over many
runs) write them with :func:`write_result` too.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from conan_embedding._io import write_json_atomic
from conan_embedding.provenance import git_commit, loadavg, machine

__all__ = [
    "CHECKOUT",
    "Arm",
    "provenance_fields",
    "read_result",
    "run_arm",
    "write_result",
]

Model = TypeVar("Model")

CHECKOUT = Path(__file__).resolve().parents[3]
"""The checkout holding this package: the experiments that read ``configs/`` and write
``bench/results/`` (``experiments.cbb``, ``experiments.clr``) resolve their defaults here."""


def provenance_fields() -> dict[str, Any]:
    """Where a run is made: commit (``+dirty`` when tracked files differ), machine, torch
    threads and the load before it starts (other jobs on the machine slow it down)."""
    import torch

    return {
        "git_commit": git_commit(),
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_before": loadavg(),
    }


def read_result(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A result JSON, or None when there is none yet."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_result(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write a result atomically (indent 2, UTF-8; paths and other objects as strings), so a
    run killed mid-write leaves the previous file, never half of one."""
    return write_json_atomic(path, payload, default=str)


@dataclass
class Arm(Generic[Model]):
    """One row of an experiment: how to train it, how to score it, where its result goes."""

    name: str
    evaluate: Callable[[Model], dict[str, Any]]
    """Scores ``model``; returns the keys to add to the result (``scores`` and the facts of
    the evaluation, such as the precision it ran in)."""
    train: Callable[[], tuple[Model, dict[str, Any]]] | None = None
    """Trains the arm; returns the model to evaluate and the facts of the training (steps,
    losses, ...). None evaluates :attr:`model` as it is (an untrained baseline)."""
    model: Model | None = None
    record: dict[str, Any] = field(default_factory=dict)
    """The result's first keys (arm, seed, config, settings)."""
    result_path: Path | None = None
    """Where :func:`run_arm` writes the result; None keeps it in memory (a report collects
    several arms into one file)."""
    provenance: bool = True
    """Add :func:`provenance_fields` and the load after the run to the result."""


def run_arm(arm: Arm[Any], *, force: bool = False) -> dict[str, Any]:
    """Train (if the arm trains), evaluate, and write ``arm.result_path``; returns the result.

    A result already at ``arm.result_path`` is returned as it is unless ``force``: arms are
    resumable, an interrupted experiment reruns only what is missing. ``train_seconds`` and
    ``eval_seconds`` are wall times (the model's loading included).
    """
    if arm.result_path is not None and not force:
        saved = read_result(arm.result_path)
        if saved is not None:
            return saved
    record = dict(arm.record)
    if arm.provenance:
        for key, value in provenance_fields().items():
            record.setdefault(key, value)
    model = arm.model
    if arm.train is not None:
        started = time.perf_counter()
        model, facts = arm.train()
        record["train_seconds"] = round(time.perf_counter() - started, 1)
        record.update(facts)
    started = time.perf_counter()
    record.update(arm.evaluate(model))
    record["eval_seconds"] = round(time.perf_counter() - started, 1)
    if arm.provenance:
        record["loadavg_after"] = loadavg()
    if arm.result_path is not None:
        write_result(arm.result_path, record)
    return record
