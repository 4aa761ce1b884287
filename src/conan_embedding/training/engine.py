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
   ``tokens_per_s`` and, on every step, ``peak_mem_mb``
   (:data:`~conan_embedding.training.monitor.THROUGHPUT_KEYS`).
2. The engine clips, steps AdamW and the learning-rate schedule (warmup, then linear or
   cosine decay), zeroes the gradients, then calls ``program.after_step(step)`` (dynamic
   hard negatives, held-out evaluation), logs a JSONL row (rank 0), updates trackers and
   progress, and every ``checkpoint_every`` steps writes a checkpoint.
   A program may end the run early (validation's early stopping): it calls
   :meth:`Engine.request_stop` on every rank in ``after_step``; the engine logs the step,
   says why in ``train.log`` and goes on to ``finish`` as after the last step.
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

Checkpoints (``checkpoints/step-NNNNNN/``, every ``checkpoint_every`` steps, and the last
step of a sharded run) are :class:`~conan_embedding.training.checkpoint.Checkpointer`'s: it
owns their layout, atomic rename, rotation, per-rank files and RNG states, and the
no-pickle guarantee. ``output_dir`` must be on a filesystem every rank sees.
"""

from __future__ import annotations

import contextlib
import json
import logging
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
from tqdm.auto import tqdm

from conan_embedding.config import CheckpointSettings, EngineConfig, OptimConfig
from conan_embedding.runtime import resolve_device
from conan_embedding.training.accelerate_state import forget_previous_stage_plugins
from conan_embedding.training.checkpoint import Checkpointer, jsonable
from conan_embedding.training.monitor import (
    chosen_trackers,
    speed_text,
    step_throughput,
)
from conan_embedding.training.precision import (
    enable_gradient_checkpointing,
    load_full_state,
    meta_skeleton,
    set_tf32,
    upcast_trainable,
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
    checkpoint: CheckpointSettings = field(default_factory=lambda: CheckpointSettings(every=50))
    description: str = "training"
    log_name: str = "train_log.jsonl"


@dataclass
class RunResult:
    steps: int
    start_step: int
    final_loss: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    """Why the run ended before ``settings.steps`` (:meth:`Engine.request_stop`), else None;
    ``steps`` is then the last step run."""


class StepProgram(Protocol):
    """What a stage tells the engine: one step, its state, and what to save at the end."""

    def step(self, step: int) -> dict[str, float]: ...

    def after_step(self, step: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def finish(self, engine: Engine, result: RunResult) -> None: ...


# --------------------------------------------------------------------------- devices
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
        trackers = chosen_trackers(config.trackers)
        # one process may run several stages (the v2 demo: pretrain, SFT, weak, supervised),
        # each with its own precision: accelerate keeps that choice in a process-wide
        # singleton, so forget it (the process group, PartialState, is kept)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
        if deepspeed_plugin is None:
            forget_previous_stage_plugins()
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
        self.checkpointer = Checkpointer(self, self.output_dir, settings.checkpoint)
        self._stop: str | None = None

    def request_stop(self, reason: str) -> None:
        """End the run after the current step (call it on EVERY rank, in ``after_step``):
        the step is logged, then ``finish`` runs as after the last step."""
        self._stop = reason

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
            self._stop = None
            last_step = start
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
                record.update(step_throughput(record, step_began, self.device, self.distributed))
                record.update(program.after_step(step + 1) or {})
                record["lr"] = self.scheduler.get_last_lr()[0]
                record = {
                    k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()
                }
                loss_value = float(record.get("loss", float("nan")))
                history.append(record)
                if self.is_main:
                    with open(log_path, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(jsonable(record)) + "\n")
                if self.trackers:
                    numbers = {k: v for k, v in record.items() if isinstance(v, int | float)}
                    self.accelerator.log(numbers, step=step + 1)
                bar.update(1)
                speed = speed_text(record)
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
                # a finished run leaves its model; checkpoints serve an interrupted one
                last_step = step + 1
                last = step + 1 == settings.steps or self._stop is not None
                if self.checkpointer.due(step + 1, last):
                    self.save_checkpoint(step + 1, program)
                if self._stop is not None:
                    if self.is_main:
                        logger.info("%s stopped at step %d: %s", settings.description,
                                    step + 1, self._stop)  # fmt: skip
                    break
            bar.close()
            result = RunResult(
                steps=last_step if self._stop is not None else settings.steps,
                start_step=start,
                final_loss=loss_value,
                seconds=time.perf_counter() - began,
                history=history,
                stopped=self._stop,
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
        accelerate's ``free_memory`` collects garbage before it drops its references; a second
        collection frees a wrapper's cycles, so a plain one-process model (no wrapper) skips
        it (half a second on a loaded 2-core machine, issue #26 item 8).
        """
        import gc

        self.wait()
        wrapped = self.distributed or self.sharded_state
        if self.forward_model is not None:
            wrapped = wrapped or self.forward_model is not self.model
            self.forward_model = self.unwrap()
        self.accelerator.free_memory()
        if wrapped:
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
        """Write ``checkpoints/step-NNNNNN`` with ``program``'s state (every rank)."""
        self.checkpointer.register("program", program)
        return self.checkpointer.save(step)

    def _resume(self, program: StepProgram) -> int:
        """Load the newest checkpoint into the model, optimizer, schedule, ``program`` and
        RNGs; returns its step (0: none). The log keeps only the steps up to it."""
        self.checkpointer.register("program", program)
        step = self.checkpointer.resume()
        log_path = self.output_dir / self.settings.log_name
        if step and self.is_main and log_path.exists():  # drop the killed run's later steps
            kept = [
                line
                for line in log_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step
            ]
            log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        return step
