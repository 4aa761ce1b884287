"""Checkpoint pieces in safetensors + JSON; nothing is ever unpickled.

The engine (:mod:`conan_embedding.training.engine`) lays a checkpoint out and writes it
atomically across ranks; this module holds what it needs to store an optimizer without
pickling it and to find complete checkpoints.

An optimizer's ``state_dict`` is tensors (``exp_avg``, ``exp_avg_sq`` per parameter index)
plus scalars and hyper-parameters: the tensors go to safetensors keyed ``<param>.<name>``, the
rest to JSON.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = (
                    value.item() if isinstance(value, torch.Tensor) else value
                )
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        for name, value in values.items():
            # AdamW keeps `step` as a 0-d float tensor; restore it as one
            state.setdefault(int(index), {})[name] = (
                torch.tensor(float(value)) if name == "step" else value
            )
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints (``state.json`` is written last), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    found = [p for p in found if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))
