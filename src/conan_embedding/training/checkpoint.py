"""Checkpoints in safetensors + JSON: one :class:`Checkpointer` owns their layout.

Why one owner: a checkpoint is written by every rank into one folder, renamed into place
atomically, rotated, and read back on every rank at the same step; the layout, the atomic
rename, the rotation, the per-rank files and the RNG states change together, so they live
here and nowhere else. The engine (:mod:`conan_embedding.training.engine`) only says when.

Layout of ``<output_dir>/checkpoints/step-NNNNNN/``:

- ``model.safetensors``, ``optimizer.safetensors`` + ``optimizer.json`` (rank 0; plain and
  DDP runs), or ``accelerate/`` (FSDP/DeepSpeed: ``Accelerator.save_state``, sharded per rank);
- ``rank-RRRRR.json`` + ``rank-RRRRR.safetensors`` per rank: the state of every object
  :meth:`Checkpointer.register`-ed (the engine registers the step program as ``program``), the
  CPU RNG and this rank's own CUDA RNG, Python's and numpy's RNG;
- ``state.json`` (step, world size, schedule), written last: a folder without it is
  incomplete and never resumed from.

Every rank writes into ``.tmp-step-NNNNNN`` (made by rank 0 before a barrier); after a second
barrier rank 0 writes ``state.json``, renames the folder into place and keeps the newest
``keep``.

No-pickle guarantee: everything here is safetensors (tensors and arrays, found anywhere in a
registered object's ``state_dict`` by :func:`split_state`) or JSON; nothing is unpickled on
resume. The one exception is outside this module's control: under FSDP/DeepSpeed the
``accelerate/`` folder is what ``Accelerator.save_state`` writes, which includes pickles
(``random_states_*.pkl``, DeepSpeed's ``*.pt`` optimizer shards), so resume sharded runs
only from checkpoints you wrote yourself.

An optimizer's ``state_dict`` is tensors (``exp_avg``, ``exp_avg_sq`` per parameter index)
plus scalars and hyper-parameters: the tensors go to safetensors keyed ``<param>.<name>``, the
rest to JSON.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from conan_embedding.config import CheckpointSettings
    from conan_embedding.training.engine import Engine

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
CHECKPOINTS = "checkpoints"
"""The folder under a run's ``output_dir`` that holds its checkpoints."""


def checkpoint_dir(output_dir: str | os.PathLike[str]) -> Path:
    """Where a run writing to ``output_dir`` keeps its checkpoints."""
    return Path(output_dir) / CHECKPOINTS


def discard_checkpoints(output_dir: str | os.PathLike[str]) -> None:
    """Delete a run's checkpoints (a finished experiment that will never ``--resume``)."""
    shutil.rmtree(checkpoint_dir(output_dir), ignore_errors=True)


class Stateful(Protocol):
    """What :meth:`Checkpointer.register` takes (accelerate's ``register_for_checkpointing``
    idiom): tensors and arrays anywhere in the state go to safetensors, the rest to JSON."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# --------------------------------------------------------------------------- pieces
def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers and keys as strings (for ``json``)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def split_state(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Tensors and arrays of a nested dict go to safetensors, the rest stays JSON."""
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(state, torch.Tensor | np.ndarray):
        key = prefix or "value"
        tensors[key] = torch.as_tensor(state).detach().cpu().contiguous()
        return {"__tensor__": key}, tensors
    if isinstance(state, dict):
        out = {}
        for k, v in state.items():
            out[k], found = split_state(v, f"{prefix}.{k}" if prefix else str(k))
            tensors.update(found)
        return out, tensors
    return jsonable(state), tensors


def merge_state(state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_state`."""
    if isinstance(state, dict):
        if set(state) == {"__tensor__"}:
            return tensors[state["__tensor__"]]
        return {k: merge_state(v, tensors) for k, v in state.items()}
    return state


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


def check_shared_folder(folder: Path, rank: int) -> None:
    """Fail clearly when ``folder``, made by rank 0 before a barrier, is not visible here.

    Every rank writes its own files into rank 0's checkpoint folder, so ``output_dir`` must
    be on a filesystem every node sees; on node-local disks the other nodes would otherwise
    die on a bare ``FileNotFoundError`` inside accelerate or safetensors.
    """
    if not folder.is_dir():
        raise RuntimeError(
            f"rank {rank} cannot see the checkpoint folder {folder} that rank 0 created: "
            "output_dir must be on a filesystem every rank sees (a shared filesystem such "
            "as NFS or Lustre for multi-node runs, not a node-local disk)"
        )


def cuda_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's own CUDA generator state, keyed ``torch_cuda`` (empty off CUDA).

    Only the rank's device: torchrun shows every rank all 8 GPUs, and saving all of them
    made a resume with fewer visible devices (SLURM's per-task GPUs) fail.
    """
    if device.type != "cuda":
        return {}
    return {"torch_cuda": torch.cuda.get_rng_state(device)}


def pick_cuda_rng_state(rng: dict[str, Any], device: torch.device) -> torch.Tensor | None:
    """The CUDA RNG state for ``device`` from a checkpoint's rank file, or None.

    New checkpoints hold ``torch_cuda``. Older ones hold ``torch_cuda_<i>`` for every visible
    GPU: the rank's own index is ``device.index`` (LOCAL_RANK), taken from that key alone,
    never by sorting the keys (which put 10 before 2).
    """
    if device.type != "cuda":
        return None
    if "torch_cuda" in rng:
        return rng["torch_cuda"]
    return rng.get(f"torch_cuda_{device.index or 0}")


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG a step may draw from, as the rank file stores them (keys kept since v1)."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    return {
        "rng": {"torch_cpu": torch.get_rng_state(), **cuda_rng_state(device)},
        "python_random": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy_random": {
            "kind": np_state[0],
            "keys": np_state[1].astype(np.int64),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }


def set_rng_state(payload: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`rng_state` (reads old checkpoints' per-GPU CUDA keys too)."""
    torch.set_rng_state(payload["rng"]["torch_cpu"])
    cuda_state = pick_cuda_rng_state(payload["rng"], device)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)
    version, internal, gauss = payload["python_random"]
    random.setstate((version, tuple(internal), gauss))
    nps = payload["numpy_random"]
    keys = nps["keys"].numpy().astype(np.uint32)
    np.random.set_state((nps["kind"], keys, nps["pos"], nps["has_gauss"], nps["cached_gaussian"]))


# --------------------------------------------------------------------------- the owner
class Checkpointer:
    """Writes and resumes the checkpoints of one engine's run (see the module docstring).

    The engine's model, optimizer and schedule are always saved; anything else with
    ``state_dict``/``load_state_dict`` joins the per-rank files through :meth:`register`.
    Collective: :meth:`save` and :meth:`resume` must be called on every rank.
    """

    def __init__(self, engine: Engine, output_dir: Path, settings: CheckpointSettings) -> None:
        self.engine = engine
        self.directory = checkpoint_dir(output_dir)
        self.settings = settings
        self.keep = settings.keep
        self._registered: dict[str, Stateful] = {}

    def due(self, step: int, last: bool) -> bool:
        """Whether the loop saves after ``step``: every ``settings.every`` steps but the last
        (a finished run leaves its model), and the last step of a sharded run (gathering the
        model at the end is the riskiest part of it, and a crash there must not lose the run)."""
        if last:
            return self.engine.sharded_state
        every = self.settings.every
        return every is not None and step % every == 0

    def register(self, name: str, obj: Stateful) -> None:
        """Save ``obj.state_dict()`` in each rank's file under ``name``, restore it on resume
        (a name registered again is replaced: the engine registers each run's program)."""
        if name in {"rng", "python_random", "numpy_random"}:
            raise ValueError(f"'{name}' is the rank file's RNG entry: register under another name")
        self._registered[name] = obj

    # ------------------------------------------------------------------ save
    def save(self, step: int) -> Path:
        engine = self.engine
        final = self.directory / f"step-{step:06d}"
        tmp = self.directory / f".tmp-step-{step:06d}"
        if engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        engine.wait()
        check_shared_folder(tmp, engine.rank)
        try:
            if engine.sharded_state:
                engine.accelerator.save_state(str(tmp / "accelerate"), safe_serialization=True)
            elif engine.is_main:
                from safetensors.torch import save_model

                save_model(engine.unwrap(), str(tmp / "model.safetensors"))
                tensors, meta = optimizer_to_flat(engine.optimizer)
                save_file(tensors, str(tmp / "optimizer.safetensors"))
                (tmp / "optimizer.json").write_text(json.dumps(meta), encoding="utf-8")
            self._save_rank_state(tmp)
            engine.wait()
            if engine.is_main:
                schedule = {
                    k: v for k, v in engine.scheduler.state_dict().items() if k != "lr_lambdas"
                }
                state = {"step": step, "world_size": engine.world_size, "scheduler": schedule}
                (tmp / "state.json").write_text(json.dumps(jsonable(state)), encoding="utf-8")
                # the folder is complete only once renamed (state.json marks it, too)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                for old in list_checkpoints(self.directory)[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            if engine.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        engine.wait()
        return final

    def _rank_name(self) -> str:
        return f"rank-{self.engine.rank:05d}"

    def _save_rank_state(self, folder: Path) -> None:
        payload = {name: obj.state_dict() for name, obj in self._registered.items()}
        payload.update(rng_state(self.engine.device))
        meta, tensors = split_state(payload)
        save_file(tensors, str(folder / f"{self._rank_name()}.safetensors"))
        (folder / f"{self._rank_name()}.json").write_text(json.dumps(meta), encoding="utf-8")

    # ------------------------------------------------------------------ resume
    def resume(self) -> int:
        """Load the newest complete checkpoint (rank 0 picks it, every rank loads that same
        step); returns its step, 0 when there is none."""
        engine = self.engine
        found = list_checkpoints(self.directory) if engine.is_main else []
        chosen = engine.broadcast_object(str(found[-1]) if found else None)
        if chosen is None:
            logger.info("no checkpoint in %s: starting from step 0", self.directory.parent)
            return 0
        path = Path(chosen)
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if state["world_size"] != engine.world_size:
            raise ValueError(
                f"{path}: written by {state['world_size']} processes, resumed with "
                f"{engine.world_size}; resume with the same process count"
            )
        if engine.sharded_state:
            engine.accelerator.load_state(str(path / "accelerate"))
        else:
            from safetensors.torch import load_model

            # safetensors names the CPU "cpu" (accelerate's MULTI_CPU device is "cpu:0")
            device = "cpu" if engine.device.type == "cpu" else str(engine.device)
            load_model(engine.unwrap(), str(path / "model.safetensors"), device=device)
            meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
            optimizer_from_flat(
                engine.optimizer, load_file(str(path / "optimizer.safetensors")), meta
            )
        engine.scheduler.load_state_dict({**engine.scheduler.state_dict(), **state["scheduler"]})
        meta = json.loads((path / f"{self._rank_name()}.json").read_text(encoding="utf-8"))
        payload = merge_state(meta, load_file(str(path / f"{self._rank_name()}.safetensors")))
        for name, obj in self._registered.items():
            obj.load_state_dict(payload[name])
        set_rng_state(payload, engine.device)
        logger.info("resumed from %s at step %d", path, int(state["step"]))
        return int(state["step"])
