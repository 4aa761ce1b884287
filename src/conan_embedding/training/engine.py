"""The one training engine: every stage's loop, on Hugging Face ``accelerate``.

Why: Conan's stages differ only in what a step is (an embedding batch per task, every task
across devices for CBB, a packed block of tokens for the LM, pairs under the soft mask).
Devices, precision, processes, the optimizer and its schedule, clipping, checkpoints,
logging, trackers and progress are the same for all of them, so they live here once. The
process and device work is accelerate's (the engine under the HF and sentence-transformers
trainers): ``Accelerator`` picks the device (``cuda:LOCAL_RANK`` under torchrun), joins the
process group (NCCL on GPUs, gloo on CPUs), wraps the model for DDP, FSDP or DeepSpeed as the
accelerate config says, and runs bf16/fp16 autocast.

How a run goes (:meth:`Engine.run`):

1. ``program.step(step)`` computes the step's losses and calls :meth:`Engine.backward`;
   it returns the numbers to log (``loss`` at least, already averaged over ranks), and
   may return ``samples`` and ``tokens`` (int: examples and non-padding tokens this rank
   processed): the engine sums those over ranks and logs ``samples_per_s``,
   ``tokens_per_s`` and, on every step, ``peak_mem_mb`` (:data:`THROUGHPUT_KEYS`).
2. The engine clips, steps AdamW and the learning-rate schedule (warmup, then linear or
   cosine decay), zeroes the gradients, then calls ``program.after_step(step)`` (dynamic
   hard negatives, held-out evaluation), logs a JSONL row (rank 0), updates trackers and
   progress, and every ``checkpoint_every`` steps writes a checkpoint.
3. At the end ``program.finish(engine, summary)`` runs on every rank and saves
   :meth:`Engine.consolidated_model` (the gathered model under FSDP/DeepSpeed) on rank 0.

A step program is plain PyTorch around a few engine calls:

- :meth:`prepare` once (model -> the module to call for forward; builds AdamW + schedule);
- :meth:`sync` around a forward/backward that is not the step's last (DDP reduces
  gradients once per step, in the last backward);
- :meth:`seeded` around an encode whose dropout must not depend on the process count:
  shard ``k`` of step ``t`` draws its masks from ``(seed, t, k, ...)`` on whatever rank
  runs it, so 1 process and 2 processes give the same trajectory with dropout on;
- :func:`all_gather_with_grad`, :meth:`mean_over_ranks`, :meth:`broadcast_object`.

Checkpoints (``checkpoints/step-NNNNNN/``, safetensors and JSON, never a pickle for the plain
and DDP cases) are written by every rank into one hidden folder that rank 0 renames into
place after a barrier: ``model.safetensors`` and ``optimizer.safetensors`` (rank 0; under
FSDP/DeepSpeed ``accelerate/`` from ``Accelerator.save_state``, sharded per rank),
``state.json`` (step, world size, schedule; written last), and per rank
``rank-RRRRR.json`` / ``rank-RRRRR.safetensors`` (the program's cursors and negative state,
CPU and this rank's CUDA RNG states). On resume rank 0 picks the newest complete checkpoint
and every rank loads that same step. ``output_dir`` must be on a filesystem every rank sees
(a shared filesystem across nodes); a rank that cannot see rank 0's folder stops with that
message. FSDP and DeepSpeed also checkpoint the last step, before ``finish`` gathers the model.

Trust boundary: under FSDP/DeepSpeed the ``accelerate/`` folder is what
``Accelerator.save_state`` writes, which includes pickles (``random_states_*.pkl``,
DeepSpeed's ``*.pt`` optimizer shards); resuming unpickles them, so resume only from
checkpoints you wrote yourself. The plain and DDP layouts hold no pickle.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from conan_embedding.config import EngineConfig, OptimConfig
from conan_embedding.runtime import resolve_device
from conan_embedding.training.checkpoint import (
    list_checkpoints,
    optimizer_from_flat,
    optimizer_to_flat,
)

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class LoopSettings:
    """What every stage's loop needs besides its step: where, how long, how to optimise."""

    output_dir: Path
    steps: int
    optim: OptimConfig
    seed: int = 42
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    description: str = "training"
    log_name: str = "train_log.jsonl"


def stage_engine(
    config: EngineConfig,
    output_dir: Path,
    *,
    steps: int,
    lr: float,
    warmup_ratio: float,
    weight_decay: float,
    seed: int,
    description: str,
    scheduler: str = "linear",
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 2,
    log_name: str = "train_log.jsonl",
    find_unused_parameters: bool = False,
) -> Engine:
    """An engine for a stage whose config spells its optimiser out flat (the LLM stages).

    ``find_unused_parameters`` is the stage's DDP default (off: a decoder uses every
    weight; a stage with unused trainable weights passes True); ``engine.find_unused_parameters``
    in the config overrides it.
    """
    optim = OptimConfig(
        lr=lr,
        warmup_ratio=warmup_ratio,
        weight_decay=weight_decay,
        max_steps=steps,
        grad_clip=1.0,
        scheduler=scheduler,
    )
    settings = LoopSettings(
        output_dir=output_dir,
        steps=steps,
        optim=optim,
        seed=seed,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        description=description,
        log_name=log_name,
    )
    return Engine(config, settings, find_unused_parameters=find_unused_parameters)


@dataclass
class RunResult:
    steps: int
    start_step: int
    final_loss: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


class StepProgram(Protocol):
    """What a stage tells the engine: one step, its state, and what to save at the end."""

    def step(self, step: int) -> dict[str, float]: ...

    def after_step(self, step: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def finish(self, engine: Engine, result: RunResult) -> None: ...


# --------------------------------------------------------------------------- devices
def _trackers(names: list[str]) -> list[str]:
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


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


def _speed_text(record: dict[str, Any]) -> str:
    """``123 samples/s 4567 tok/s 890 MB`` for the progress bar and the log line."""
    parts = []
    if "samples_per_s" in record:
        parts.append(f"{record['samples_per_s']:.1f} samples/s")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    parts.append(f"{record.get('peak_mem_mb', 0):.0f} MB")
    return " ".join(parts)


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
    return _jsonable(state), tensors


def merge_state(state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(state, dict):
        if set(state) == {"__tensor__"}:
            return tensors[state["__tensor__"]]
        return {k: merge_state(v, tensors) for k, v in state.items()}
    return state


_LAUNCHED_WITH_DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
"""Whether the launcher (``accelerate launch`` with a DeepSpeed config) asked for DeepSpeed,
read before any engine ran: accelerate writes the same variable itself whenever an
``Accelerator`` gets a DeepSpeed plugin, so later it no longer tells the two apart."""


def _forget_previous_stage_plugins() -> None:
    """Undo what an earlier engine of this process left in accelerate's process-wide state.

    One process may run several stages (the v2 demo). An ``Accelerator`` given a DeepSpeed
    plugin sets ``ACCELERATE_USE_DEEPSPEED=true`` for the whole process, and the next
    ``Accelerator`` would silently build a default ``DeepSpeedPlugin()`` from it. It also
    writes its distributed type (DEEPSPEED, FSDP) into ``PartialState``, which survives the
    engine's reset and which accelerate does not recompute, so a plain stage would go on
    as DeepSpeed (or FSDP without its plugin). Called when this engine has no DeepSpeed of
    its own; what the launcher asked for (DeepSpeed or FSDP from its environment) is kept.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if _LAUNCHED_WITH_DEEPSPEED:
        return
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    shared = PartialState._shared_state
    if shared.get("distributed_type") in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        state = PartialState()
        if state.backend is None:
            shared["distributed_type"] = DistributedType.NO
        else:  # what PartialState itself chose for this launcher and device
            _, shared["distributed_type"] = state._prepare_backend(state._cpu, False, state.backend)


def set_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 for fp32 matmuls/convolutions on CUDA (``engine.tf32``), set either way so a
    previous stage's choice does not leak into this one; nothing on other devices."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


class Engine:
    """Owns devices, precision, processes, optimisation, checkpoints and logging for a run."""

    def __init__(
        self,
        config: EngineConfig,
        settings: LoopSettings,
        *,
        find_unused_parameters: bool = True,
    ):
        """``find_unused_parameters`` is the stage's default for DDP's unused-parameter search
        (on: the sentence-transformers stages, whose BERT pooler gets no gradient); the
        config's ``engine.find_unused_parameters`` overrides it when set."""
        from accelerate import Accelerator
        from accelerate.utils import (
            DeepSpeedPlugin,
            DistributedDataParallelKwargs,
            InitProcessGroupKwargs,
        )

        self.config = config
        self.settings = settings
        self.output_dir = Path(settings.output_dir)
        if config.threads:
            torch.set_num_threads(config.threads)
        device = resolve_device(config.device, per_process=False).type
        if config.find_unused_parameters is not None:
            find_unused_parameters = config.find_unused_parameters
        handlers: list[Any] = [
            # ranks run different numbers of forwards per step (CBB: different tasks), so
            # DDP must not broadcast buffers at each forward (a collective per call); our
            # encoders' buffers are constants (position ids), never updated by training
            DistributedDataParallelKwargs(
                broadcast_buffers=False, find_unused_parameters=find_unused_parameters
            )
        ]
        if config.timeout_minutes is not None:
            # only takes effect where this engine creates the process group (the first
            # engine of a process); NCCL's own default is 10 minutes
            handlers.append(
                InitProcessGroupKwargs(timeout=timedelta(minutes=config.timeout_minutes))
            )
        deepspeed_plugin = None
        if config.deepspeed:
            if not Path(config.deepspeed).is_file():
                raise FileNotFoundError(f"engine.deepspeed: no such file {config.deepspeed}")
            deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=str(config.deepspeed))
        trackers = _trackers(config.trackers)
        # one process may run several stages (the v2 demo: pretrain, SFT, weak, supervised),
        # each with its own precision: accelerate keeps that choice in a process-wide
        # singleton, so forget it (the process group, PartialState, is kept)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
        if deepspeed_plugin is None:
            _forget_previous_stage_plugins()
        # cpu=True is what makes torchrun on a CPU machine a MULTI_CPU (gloo, DDP) run
        # instead of N processes that each train alone; accelerate refuses DeepSpeed under
        # cpu=True, and DeepSpeed picks its device itself (DS_ACCELERATOR=cpu on a CPU
        # machine). mixed_precision None lets the launcher's choice through (accelerate
        # reads ACCELERATE_MIXED_PRECISION then)
        self.accelerator = Accelerator(
            cpu=device == "cpu" and deepspeed_plugin is None,
            mixed_precision=config.mixed_precision,
            deepspeed_plugin=deepspeed_plugin,
            log_with=trackers or None,
            project_dir=str(self.output_dir),
            step_scheduler_with_optimizer=False,
            kwargs_handlers=handlers,
        )
        set_tf32(config.tf32, self.accelerator.device)
        self.trackers = trackers
        self.model: torch.nn.Module | None = None
        self.forward_model: torch.nn.Module | None = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        self._skeleton: torch.nn.Module | None = None

    # ------------------------------------------------------------------ processes
    @property
    def mixed_precision(self) -> str:
        """The precision this run really uses: ``no``, ``bf16`` or ``fp16``, as accelerate
        resolved it (the config's value, else the launcher's; a DeepSpeed JSON's wins)."""
        return str(self.accelerator.mixed_precision)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded_state(self) -> bool:
        """FSDP / DeepSpeed: weights and optimizer state live in shards across ranks."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (
            DistributedType.FSDP,
            DistributedType.DEEPSPEED,
        )

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def broadcast_object(self, value: Any, src: int = 0, group: Any = None) -> Any:
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=src, group=group)
        return box[0]

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise mean over all ranks (a copy; for logging and summaries)."""
        if not self.distributed:
            return values
        out = values.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return (out / self.world_size).cpu()

    # ------------------------------------------------------------------ model and optimiser
    def prepare(self, model: torch.nn.Module, *, decay_filter: Any = None) -> torch.nn.Module:
        """Move ``model`` to the device, build AdamW (+ schedule) and wrap both for the
        distributed type; returns the module to call for forward passes."""
        optim = self.settings.optim
        if self.config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            upcast_trainable(model)  # DeepSpeed keeps its own fp32 master weights
        model.to(self.device)
        decay, no_decay = [], []
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            is_decay = decay_filter(name, parameter) if decay_filter else parameter.ndim >= 2
            (decay if is_decay else no_decay).append(parameter)
        # the fused kernel (what the HF trainer uses by default) is about 3x faster per
        # step on the CPU too; DeepSpeed brings its own optimizer step
        fused = (
            self.device.type in ("cpu", "cuda")
            and self.accelerator.state.deepspeed_plugin is None
            and all(p.dtype.is_floating_point for p in decay + no_decay)
        )
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=optim.lr,
            fused=fused,
        )
        from transformers import get_scheduler

        total = self.settings.steps
        self.scheduler = get_scheduler(
            optim.scheduler,
            optimizer,
            num_warmup_steps=max(1, round(optim.warmup_ratio * total)),
            num_training_steps=total,
        )
        if self.accelerator.state.deepspeed_plugin is not None:
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            if ds.get("train_micro_batch_size_per_gpu") in (None, "auto"):
                ds["train_micro_batch_size_per_gpu"] = 1  # batches are per task in our YAML
        # FSDP2 / ZeRO-3 convert the module in place: the plain copy that
        # consolidated_model loads the gathered weights into must be taken now
        self._skeleton = meta_skeleton(model) if self.sharded_state else None
        self.forward_model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.model = model
        return self.forward_model

    def unwrap(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.forward_model)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a forward + backward: gradients are reduced across ranks only when ``last``.

        DDP skips its all-reduce inside ``no_sync``; DeepSpeed is told the backward is not a
        gradient-accumulation boundary (else accelerate would step its optimizer after every
        backward of a step). That holds with ONE process too: accelerate's DeepSpeed backward
        steps the optimizer whenever ``sync_gradients`` is on, whatever the world size.
        """
        if last:
            return contextlib.nullcontext()
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            return self._deepspeed_accumulating()
        if not self.distributed or self.sharded_state:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.forward_model)

    @contextlib.contextmanager
    def _deepspeed_accumulating(self) -> Iterator[None]:
        state = self.accelerator.gradient_state
        state._set_sync_gradients(False)
        self.forward_model.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.forward_model.set_gradient_accumulation_boundary(True)
            state._set_sync_gradients(True)

    @contextlib.contextmanager
    def seeded(self, *keys: int) -> Iterator[None]:
        """Dropout (and any torch RNG draw) inside depends on ``(seed, *keys)`` only."""
        devices = [self.device] if self.device.type == "cuda" else []
        seed = int(np.random.SeedSequence([self.settings.seed, *keys]).generate_state(1)[0])
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(seed)
            yield

    def check_finite(self, loss: torch.Tensor, what: str, step: int) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDivergedError(
                f"loss of {what} is {loss.item()} at step {step + 1}; "
                "lower optim.lr or check the data (see train.log)"
            )

    # ------------------------------------------------------------------ the loop
    def run(
        self, program: StepProgram, *, resume: bool = False, show_progress: bool = True
    ) -> RunResult:
        if self.forward_model is None:
            raise RuntimeError("Engine.prepare(model) must be called before run()")
        settings = self.settings
        out = self.output_dir
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
        self.wait()
        handler = self._file_logging()
        try:
            start = self._resume(program) if resume else 0
            log_path = out / settings.log_name
            if self.is_main and start == 0:
                log_path.unlink(missing_ok=True)
            if self.trackers:
                self.accelerator.init_trackers(settings.description.replace(" ", "-"))
            history: list[dict[str, Any]] = []
            if self.is_main:
                logger.info(
                    "%s: %d process(es) on %s, %s, mixed precision %s",
                    settings.description,
                    self.world_size,
                    self.device,
                    self.accelerator.distributed_type,
                    self.mixed_precision,
                )
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            began = time.perf_counter()
            self.forward_model.train()
            interactive = show_progress and self.is_main and sys.stderr.isatty()
            bar = tqdm(
                total=settings.steps,
                initial=start,
                disable=not interactive,
                desc=settings.description,
                unit="step",
                dynamic_ncols=True,
            )
            loss_value = float("nan")
            for step in range(start, settings.steps):
                step_began = time.perf_counter()
                with self.autocast():
                    record: dict[str, Any] = {"step": step + 1, **program.step(step)}
                optim = settings.optim
                if optim.grad_clip:
                    self.accelerator.clip_grad_norm_(
                        self.forward_model.parameters(), optim.grad_clip
                    )
                self.optimizer.step()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                record.update(self._throughput(record, step_began))
                record.update(program.after_step(step + 1) or {})
                record["lr"] = self.scheduler.get_last_lr()[0]
                record = {
                    k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()
                }
                loss_value = float(record.get("loss", float("nan")))
                history.append(record)
                if self.is_main:
                    with open(log_path, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(_jsonable(record)) + "\n")
                if self.trackers:
                    numbers = {k: v for k, v in record.items() if isinstance(v, int | float)}
                    self.accelerator.log(numbers, step=step + 1)
                bar.update(1)
                speed = _speed_text(record)
                bar.set_postfix_str(f"loss={loss_value:.4f} {speed}", refresh=False)
                if self.is_main and (
                    (step + 1) % settings.log_every == 0 or not interactive and step == start
                ):
                    logger.info(
                        "%s step %d/%d loss %.4f lr %.2e %s",
                        settings.description,
                        step + 1,
                        settings.steps,
                        loss_value,
                        record["lr"],
                        speed,
                    )
                # a finished run leaves its model; checkpoints serve an interrupted one. A
                # sharded run also checkpoints its last step: gathering the model in finish
                # is the riskiest part of it, and a crash there must not lose the training
                last = step + 1 == settings.steps
                if (
                    (step + 1) % settings.checkpoint_every == 0
                    and not last
                    or (last and self.sharded_state)
                ):
                    self.save_checkpoint(step + 1, program)
            bar.close()
            result = RunResult(
                steps=settings.steps,
                start_step=start,
                final_loss=loss_value,
                seconds=time.perf_counter() - began,
                history=history,
            )
            self.wait()
            program.finish(self, result)
            self.release()
            if self.trackers:
                # flushes the trackers; accelerate also ends the process group here, so last
                for tracker in self.accelerator.trackers:
                    tracker.finish()
            return result
        finally:
            if handler is not None:
                logging.getLogger("conan_embedding").removeHandler(handler)
                handler.close()

    def _throughput(self, record: dict[str, Any], began: float) -> dict[str, Any]:
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
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the optimizer step runs asynchronously
        seconds = max(time.perf_counter() - began, 1e-9)
        if self.distributed:
            total = torch.tensor(counts, dtype=torch.float64, device=self.device)
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            counts = total.tolist()
        out: dict[str, Any] = {}
        for index, key in enumerate(("samples", "tokens")):
            if counts[index + 2]:  # some rank reported it
                out[key] = int(counts[index])
                out[f"{key}_per_s"] = counts[index] / seconds
        out["peak_mem_mb"] = peak_memory_mb(self.device)
        return out

    def _file_logging(self) -> logging.Handler | None:
        root = logging.getLogger("conan_embedding")
        root.setLevel(logging.INFO)
        if not self.is_main:
            return None
        handler = logging.FileHandler(self.output_dir / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(handler)
        return handler

    def release(self) -> None:
        """Drop the DDP/FSDP wrapper once training is over (the model itself stays usable).

        The barrier first lets every rank's last collective finish: destroying DDP's reducer
        while gloo's worker thread still releases a finished all-reduce deadlocks on the GIL.
        """
        import gc

        self.wait()
        if self.forward_model is not None:
            self.forward_model = self.unwrap()
        self.accelerator.free_memory()
        gc.collect()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU, gathered under FSDP/DeepSpeed (a collective:
        call it on every rank; under ZeRO-3 only the main rank's dict is filled)."""
        state = self.accelerator.get_state_dict(self.forward_model)
        return {k: v.detach().cpu() for k, v in state.items()}

    def consolidated_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The trained model as one plain module to save, on the main rank; None elsewhere.

        Call it on EVERY rank (in ``finish``): under FSDP/DeepSpeed it gathers the weights,
        a collective. Not sharded: ``model`` itself on the main rank. Sharded: a fresh,
        unsharded CPU copy of ``model`` (from the skeleton :meth:`prepare` kept) holding the
        gathered weights, in the dtype the model had before training; ``model`` itself is
        left alone (its parameters are DTensors or ZeRO-3 partitions, which cannot take a
        full state dict). ``model`` must be the module given to :meth:`prepare`.
        """
        if not self.sharded_state:
            return model if self.is_main else None
        if self.model is None or model is not self.model:
            raise ValueError("consolidated_model: pass the module given to Engine.prepare")
        full = self.full_state_dict()
        if not self.is_main:
            return None
        assert self._skeleton is not None  # prepare keeps it whenever sharded_state
        return load_full_state(self._skeleton, full)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, program: StepProgram) -> Path:
        directory = self.output_dir / "checkpoints"
        final = directory / f"step-{step:06d}"
        tmp = directory / f".tmp-step-{step:06d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.wait()
        check_shared_folder(tmp, self.rank)
        try:
            if self.sharded_state:
                self.accelerator.save_state(str(tmp / "accelerate"), safe_serialization=True)
            elif self.is_main:
                from safetensors.torch import save_model

                save_model(self.unwrap(), str(tmp / "model.safetensors"))
                tensors, meta = optimizer_to_flat(self.optimizer)
                save_file(tensors, str(tmp / "optimizer.safetensors"))
                (tmp / "optimizer.json").write_text(json.dumps(meta), encoding="utf-8")
            self._save_rank_state(tmp, program)
            self.wait()
            if self.is_main:
                sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
                state = {"step": step, "world_size": self.world_size, "scheduler": sched}
                (tmp / "state.json").write_text(json.dumps(_jsonable(state)), encoding="utf-8")
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                for old in list_checkpoints(directory)[: -self.settings.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.wait()
        return final

    def _save_rank_state(self, folder: Path, program: StepProgram) -> None:
        rng: dict[str, Any] = {"torch_cpu": torch.get_rng_state(), **cuda_rng_state(self.device)}
        py_state = random.getstate()
        np_state = np.random.get_state()
        payload = {
            "program": program.state_dict(),
            "rng": rng,
            "python_random": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy_random": {
                "kind": np_state[0],
                "keys": np_state[1].astype(np.int64),
                "pos": int(np_state[2]),
                "has_gauss": int(np_state[3]),
                "cached_gaussian": float(np_state[4]),
            },
        }
        meta, tensors = split_state(payload)
        name = f"rank-{self.rank:05d}"
        save_file(tensors, str(folder / f"{name}.safetensors"))
        (folder / f"{name}.json").write_text(json.dumps(meta), encoding="utf-8")

    def _resume(self, program: StepProgram) -> int:
        found = list_checkpoints(self.output_dir / "checkpoints") if self.is_main else []
        chosen = str(found[-1]) if found else None
        chosen = self.broadcast_object(chosen)
        if chosen is None:
            logger.info("no checkpoint in %s: starting from step 0", self.output_dir)
            return 0
        path = Path(chosen)
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"{path}: written by {state['world_size']} processes, resumed with "
                f"{self.world_size}; resume with the same process count"
            )
        if self.sharded_state:
            self.accelerator.load_state(str(path / "accelerate"))
        else:
            from safetensors.torch import load_model

            # safetensors names the CPU "cpu" (accelerate's MULTI_CPU device is "cpu:0")
            device = "cpu" if self.device.type == "cpu" else str(self.device)
            load_model(self.unwrap(), str(path / "model.safetensors"), device=device)
            meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
            optimizer_from_flat(
                self.optimizer, load_file(str(path / "optimizer.safetensors")), meta
            )
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), **state["scheduler"]})
        name = f"rank-{self.rank:05d}"
        meta = json.loads((path / f"{name}.json").read_text(encoding="utf-8"))
        payload = merge_state(meta, load_file(str(path / f"{name}.safetensors")))
        program.load_state_dict(payload["program"])
        torch.set_rng_state(payload["rng"]["torch_cpu"])
        cuda_state = pick_cuda_rng_state(payload["rng"], self.device)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, self.device)
        version, internal, gauss = payload["python_random"]
        random.setstate((version, tuple(internal), gauss))
        nps = payload["numpy_random"]
        keys = nps["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (nps["kind"], keys, nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
        )
        step = int(state["step"])
        log_path = self.output_dir / self.settings.log_name
        if self.is_main and log_path.exists():  # drop the killed run's steps past the checkpoint
            kept = [
                line
                for line in log_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step
            ]
            log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        logger.info("resumed from %s at step %d", path, step)
        return step


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


def upcast_trainable(model: torch.nn.Module) -> list[str]:
    """Make every trainable floating parameter fp32 (in place); returns the names changed.

    Why: a model loaded with ``torch_dtype: bfloat16`` would get AdamW straight over bf16
    weights, with no fp32 master copy: at lr 2e-5 and weights ~0.05 (bf16's step there is
    ~2.4e-4) most updates round to nothing and training stalls without an error. fp32
    master weights plus autocast (``engine.mixed_precision: bf16``) computes in bf16 all
    the same. Frozen parameters keep their dtype (they take no updates, and a frozen bf16
    backbone is what saves the memory). Upcasting is always possible for floating
    tensors, so this warns instead of refusing.
    """
    changed: list[str] = []
    for name, parameter in model.named_parameters():
        if (
            parameter.requires_grad
            and parameter.dtype.is_floating_point
            and parameter.dtype != torch.float32
        ):
            parameter.data = parameter.data.float()
            changed.append(name)
    if changed:
        logger.warning(
            "%d trainable parameters were not float32 (e.g. %s): upcast to float32 so the "
            "optimizer keeps full-precision weights; for bf16 compute set "
            "engine.mixed_precision: bf16 instead of loading the model in bf16",
            len(changed),
            changed[0],
        )
    return changed


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


# --------------------------------------------------------------------------- consolidation
def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters live on the ``meta`` device (no memory).

    Why: FSDP2's ``fully_shard`` turns the module itself into a sharded one (DTensor
    parameters) and ZeRO-3 partitions its parameters in place, so once ``prepare`` has run
    there is no plain module left to load the gathered weights into. The skeleton is taken
    before ``prepare``; the parameters are swapped for meta tensors through ``deepcopy``'s
    memo, so the copy never duplicates the weights (a 1.4B model would need 5.6 GB more).
    Buffers are copied for real: they are small, and the non-persistent ones (rotary
    frequencies, position ids) are not in any state dict. Tied parameters stay one object.
    A ZeRO-3 parameter born partitioned (``zero3_init_flag``) has shape ``[0]``; its full
    shape is ``ds_shape``.
    """
    memo: dict[int, Any] = {}
    for parameter in model.parameters():  # remove_duplicate: a tied weight once
        shape = tuple(getattr(parameter, "ds_shape", parameter.shape))
        memo[id(parameter)] = torch.nn.Parameter(
            torch.empty(shape, dtype=parameter.dtype, device="meta"),
            requires_grad=parameter.requires_grad,
        )
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:  # noqa: BLE001 - any copy failure gets the same advice
        raise RuntimeError(
            f"the engine keeps an unsharded skeleton of the model for FSDP/DeepSpeed runs "
            f"(to save the trained weights at the end), but {type(model).__name__} cannot be "
            f"deep-copied: {error}"
        ) from error


def load_full_state(skeleton: torch.nn.Module, full: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh CPU module: a copy of ``skeleton`` (see :func:`meta_skeleton`) holding ``full``.

    Each tensor is cast to the dtype the skeleton's parameter had before training (a
    DeepSpeed bf16 run gathers 16-bit weights; the model was built fp32). ``assign=True``
    replaces the meta tensors, which unties tied weights, so every group of names that
    shared one parameter in the skeleton shares the loaded one again; a tied name missing
    from ``full`` is filled that way too. Anything still on ``meta`` afterwards is an error
    naming the keys, never a silently random weight.
    """
    model = copy.deepcopy(skeleton)  # meta parameters: free; the skeleton stays reusable
    expected = model.state_dict(keep_vars=True)
    unexpected = sorted(set(full) - set(expected))
    if unexpected:
        raise ValueError(f"gathered state has keys the model lacks: {unexpected[:5]}")
    cast = {
        k: v.detach().to(device="cpu", dtype=expected[k].dtype)
        if v.is_floating_point() and expected[k].is_floating_point()
        else v.detach().cpu()
        for k, v in full.items()
    }
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    model.load_state_dict(cast, strict=False, assign=True)
    for names in groups.values():
        present = [n for n in names if n in cast]
        if len(names) < 2 or not present:
            continue
        source = model.get_parameter(present[0])
        for name in names:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = source
    still_meta = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if still_meta:
        raise ValueError(f"gathered state lacks weights for {still_meta[:5]}")
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Turn on activation checkpointing in every Hugging Face model inside ``model``
    (non-reentrant, so it composes with DDP and frozen embeddings); returns how many."""
    from transformers import PreTrainedModel

    count = 0
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            module.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            count += 1
    if not count:
        raise ValueError(
            "gradient_checkpointing: the model holds no Hugging Face model that supports it"
        )
    return count
