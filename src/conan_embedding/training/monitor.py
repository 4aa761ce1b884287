"""What a run reports about the machine: trackers, throughput and peak memory per step.

Why apart from the loop: these numbers measure the machine, not the training (a comparison
of two trajectories leaves them out, :data:`THROUGHPUT_KEYS`), and each stage's log gets
them the same way through :class:`~conan_embedding.training.engine.Engine`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist


def chosen_trackers(names: list[str]) -> list[str]:
    """``auto`` = TensorBoard when installed, plus W&B when installed and logged in."""
    import importlib.util

    chosen: list[str] = []
    for name in names:
        if name != "auto":
            chosen.append(name)
            continue
        if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            chosen.append("tensorboard")
        if importlib.util.find_spec("wandb") and os.environ.get("WANDB_API_KEY"):
            chosen.append("wandb")
    return list(dict.fromkeys(chosen))


THROUGHPUT_KEYS = ("samples_per_s", "tokens_per_s", "peak_mem_mb")
"""Keys of a step's log record that measure the machine, not the training: a comparison of
two runs' trajectories (1 vs 2 processes, resumed vs not) must leave them out."""


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA's max allocated on a GPU, else max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def speed_text(record: dict[str, Any]) -> str:
    """``123 samples/s 4567 tok/s 890 MB`` for the progress bar and the log line."""
    parts = []
    if "samples_per_s" in record:
        parts.append(f"{record['samples_per_s']:.1f} samples/s")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    parts.append(f"{record.get('peak_mem_mb', 0):.0f} MB")
    return " ".join(parts)


def step_throughput(
    record: dict[str, Any], began: float, device: torch.device, distributed: bool
) -> dict[str, Any]:
    """The step's rates and peak memory (see :data:`THROUGHPUT_KEYS`).

    A program's ``step()`` may report ``samples`` (examples) and ``tokens`` (non-padding
    tokens) it processed on this rank; they are summed over ranks (one small all-reduce
    per step, on every rank whatever it reported, so the ranks never disagree about the
    collective) and replaced by the sums, and divided by the step's wall time (forward,
    backward and optimizer, not ``after_step``: evaluation and mining are not
    throughput). ``peak_mem_mb`` is this rank's peak since the run began: CUDA's
    ``max_memory_allocated`` on a GPU, the process's max RSS elsewhere.
    """
    counts = [
        float(record.get("samples", 0)),
        float(record.get("tokens", 0)),
        float("samples" in record),
        float("tokens" in record),
    ]
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the optimizer step runs asynchronously
    seconds = max(time.perf_counter() - began, 1e-9)
    if distributed:
        total = torch.tensor(counts, dtype=torch.float64, device=device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        counts = total.tolist()
    out: dict[str, Any] = {}
    for index, key in enumerate(("samples", "tokens")):
        if counts[index + 2]:  # some rank reported it
            out[key] = int(counts[index])
            out[f"{key}_per_s"] = counts[index] / seconds
    out["peak_mem_mb"] = peak_memory_mb(device)
    return out
