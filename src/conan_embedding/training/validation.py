"""Validation during training: held-out rows, the curve, the best step and early stopping.

Why here, in training: the held-out loss needs only the training files and the losses, and
the bookkeeping (which step was best, how many validations in a row did not improve) is part
of the run's state that a checkpoint must carry, so a resumed run picks the same best step.
Scores on evaluation tasks (mteb) are the evaluation layer's: that layer builds the function
(:func:`conan_embedding.evaluation.validation.task_validator`) and the trainer takes it as
``validate``; training never imports evaluation (docs/architecture.md).

How a validation runs (:meth:`Validation.at_step`, called from the trainer's ``after_step``, at
the steps :meth:`Validation.due` names): rank 0 scores the model (eval mode, no gradient, the
training RNGs untouched, so a run with validation trains exactly like one without) while
the other ranks wait in the broadcast of its numbers (the engine's ``timeout_minutes`` bounds
that wait); every rank then updates the same :class:`ValidationState`, so all of them agree
on the best step and on stopping.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from conan_embedding.config import TaskConfig, TrainConfig, ValidationConfig
from conan_embedding.config.train import HeldoutConfig
from conan_embedding.training.task_kinds import task_kind

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from conan_embedding.data.records import Record
    from conan_embedding.modeling.embedder import ReadmeWriter
    from conan_embedding.training.engine import Engine

logger = logging.getLogger(__name__)

Validate = Callable[["SentenceTransformer"], dict[str, float]]
"""A validation function: the model in, named numbers out (higher or lower is better as the
config's ``validation.mode`` says). Called on rank 0 only."""


# --------------------------------------------------------------------------- held-out rows
def split_heldout(
    total: int, heldout: HeldoutConfig, seed: int, name: str, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (of ``total`` rows) to train on and to hold out, both sorted.

    A seeded draw keyed by the task name (the same on every rank and every resume); at
    least one training batch is left to train on.
    """
    size = heldout.rows if heldout.rows is not None else math.ceil(total * (heldout.fraction or 0))
    size = int(max(1, size))
    if total - size < batch_size:
        raise ValueError(
            f"task '{name}': holding out {size} of {total} rows leaves fewer than one batch "
            f"({batch_size}) to train on; lower validation.heldout.rows / fraction"
        )
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8")), 11])
    held = np.sort(rng.choice(total, size=size, replace=False)).astype(np.int64)
    keep = np.ones(total, dtype=bool)
    keep[held] = False
    return np.flatnonzero(keep).astype(np.int64), held


@dataclass
class HeldoutLoss:
    """The training loss of each held-out task, on rows never trained on.

    Deterministic: eval mode (no dropout), a retrieval row's first positive and its first
    ``negatives`` file negatives, fixed batches in file order. The loss is the task's training
    loss at full width (InfoNCE with in-batch negatives for retrieval/pairs, CoSENT for STS);
    ``loss`` is their sum weighted like the training total.
    """

    tasks: list[tuple[TaskConfig, Sequence[Record]]]
    temperature: float
    query_prompt: str | None = None
    passage_prompt: str | None = None
    batch_size: int | None = None

    def __call__(self, model: SentenceTransformer) -> dict[str, float]:
        out: dict[str, float] = {}
        total = 0.0
        for task, records in self.tasks:
            size = self.batch_size or task.batch_size
            losses, counts = [], []
            for start in range(0, len(records), size):
                batch = [records[i] for i in range(start, min(start + size, len(records)))]
                if len(batch) < 2:  # one row: no in-batch pair, no STS order
                    continue
                losses.append(self._batch_loss(model, task, batch))
                counts.append(len(batch))
            value = float(np.average(losses, weights=counts)) if losses else float("nan")
            out[f"loss/{task.name}"] = value
            total += task.weight * value
        out["loss"] = total
        return out

    def _encode(self, model: SentenceTransformer, texts: list[str], prompt: str | None) -> Any:
        return model.encode(
            [prompt + t for t in texts] if prompt else texts,
            convert_to_tensor=True,
            show_progress_bar=False,
            batch_size=len(texts),
        ).float()

    def _batch_loss(self, model: SentenceTransformer, task: TaskConfig, batch: list[Any]) -> float:
        """The task kind's own held-out loss (``TaskKindSpec.heldout_loss``)."""

        def encode(texts: list[str], side: str) -> torch.Tensor:
            prompt = self.query_prompt if side == "query" else self.passage_prompt
            return self._encode(model, texts, prompt)

        return float(task_kind(task.kind).heldout_loss(task, batch, encode, self.temperature))


# --------------------------------------------------------------------------- bookkeeping
@dataclass
class ValidationState:
    """The curve, the best step and the early-stopping counter (checkpointed, JSON only)."""

    metric: str
    mode: str
    min_delta: float = 0.0
    curve: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    best_value: float | None = None
    since_best: int = 0
    """Validations since the last improvement (early stopping's patience counter)."""
    stopped: str | None = None

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        if self.mode == "max":
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def update(self, step: int, value: float) -> bool:
        """Record ``value`` at ``step``; True when it is the new best."""
        self.curve.append((step, value))
        if self.improves(value):
            self.best_step, self.best_value, self.since_best = step, value, 0
            return True
        self.since_best += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "curve": [[s, v] for s, v in self.curve],
            "best_step": self.best_step,
            "best_value": self.best_value,
            "since_best": self.since_best,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curve = [(int(s), float(v)) for s, v in state["curve"]]
        self.best_step = state["best_step"]
        self.best_value = state["best_value"]
        self.since_best = int(state["since_best"])
        self.stopped = state.get("stopped")

    def summary(self) -> dict[str, Any]:
        """What the model card shows (``CardInfo.validation``)."""
        return {
            "metric": self.metric,
            "mode": self.mode,
            "curve": [[s, v] for s, v in self.curve],
            "best_step": self.best_step,
            "best_value": self.best_value,
            "stopped": self.stopped,
        }


@contextlib.contextmanager
def untouched_rng() -> Iterator[None]:
    """Python's, numpy's and torch's RNGs come out as they went in (a validation that
    samples, such as mteb's classification probe, must not change the training trajectory)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def check_validation_supported(distributed_type: str, zero_stage: int | None) -> None:
    """Rank 0 scores the model alone: with sharded parameters (FSDP, ZeRO-3) its lone
    forward would wait for ranks that never join."""
    if distributed_type == "FSDP" or (distributed_type == "DEEPSPEED" and zero_stage == 3):
        setting = "FSDP" if distributed_type == "FSDP" else "DeepSpeed ZeRO-3"
        raise ValueError(
            f"validation does not run under {setting}: rank 0 scores the model alone, and "
            "with sharded parameters every forward all-gathers weights from all ranks. Launch "
            "with DDP or DeepSpeed ZeRO-2, or validate the saved checkpoints afterwards"
        )


class Validation:
    """Validation of one run: when, what, the state, and what a result decides.

    ``validate`` (the evaluation layer's task scores) and ``heldout`` (the held-out loss) are
    merged into one dict of numbers; ``config.metric`` picks the one that ranks.
    """

    def __init__(
        self,
        config: ValidationConfig,
        steps: int,
        *,
        validate: Validate | None = None,
        heldout: HeldoutLoss | None = None,
    ) -> None:
        if config.tasks and validate is None:
            raise ValueError(
                f"validation.tasks {config.tasks} need the evaluation layer's function: train "
                "with `conan-embed train CONFIG`, or pass Trainer(validate="
                "conan_embedding.evaluation.validation.task_validator(config.validation))"
            )
        self.config = config
        self.steps = steps
        self.validate = validate
        self.heldout = heldout
        early = config.early_stopping
        assert config.metric is not None and config.mode is not None  # filled by the config
        self.state = ValidationState(
            metric=config.metric, mode=config.mode, min_delta=early.min_delta if early else 0.0
        )

    def due(self, step: int) -> bool:
        """Every ``every`` steps, and the last step."""
        return step % self.config.every == 0 or step == self.steps

    def score(self, model: SentenceTransformer) -> dict[str, float]:
        """Every number (eval mode, no gradient, RNGs untouched; rank 0 calls it)."""
        was_training = model.training
        model.eval()
        try:
            with untouched_rng(), torch.no_grad():
                metrics: dict[str, float] = {}
                if self.heldout is not None:
                    metrics.update(self.heldout(model))
                if self.validate is not None:
                    metrics.update(self.validate(model))
        finally:
            model.train(was_training)
        if self.config.metric not in metrics:
            raise KeyError(
                f"validation.metric '{self.config.metric}' is not among the validation's "
                f"numbers {sorted(metrics)}"
            )
        return {k: float(v) for k, v in metrics.items()}

    def record(self, step: int, metrics: dict[str, float]) -> tuple[bool, str | None]:
        """Update the state with ``metrics`` (the same on every rank); returns whether this
        step is the new best and, when early stopping fires, why the run stops."""
        value = metrics[self.state.metric]
        best = self.state.update(step, value)
        early = self.config.early_stopping
        if early is not None and not best and self.state.since_best >= early.patience:
            self.state.stopped = (
                f"early stopping at step {step}: val/{self.state.metric} did not improve by "
                f"more than {early.min_delta:g} in {early.patience} validation(s) since step "
                f"{self.state.best_step} ({self.state.best_value:.6g})"
            )
        return best, self.state.stopped

    @classmethod
    def of(
        cls,
        config: TrainConfig,
        validate: Validate | None,
        heldout_records: dict[str, Sequence[Record]],
        query_prompt: str | None,
        passage_prompt: str | None,
    ) -> Validation | None:
        """The run's validation (None without ``validation:``): ``validate``'s task scores and
        the held-out loss on ``heldout_records``, with the training prompts."""
        vc = config.validation
        if vc is None:
            return None
        tasks = {t.name: t for t in config.tasks}
        heldout = None
        if vc.heldout is not None:
            heldout = HeldoutLoss(
                [(tasks[name], rows) for name, rows in heldout_records.items()],
                config.temperature,
                query_prompt,
                passage_prompt,
                vc.heldout.batch_size,
            )
        return cls(vc, config.optim.max_steps, validate=validate, heldout=heldout)

    def at_step(
        self,
        step: int,
        engine: Engine,
        model: SentenceTransformer,
        *,
        best_dir: Path,
        stage: str,
        readme: Callable[[], str | ReadmeWriter | None],
    ) -> dict[str, float]:
        """Validation at ``step`` when due (rank 0 scores, every rank records): the
        ``val/...`` numbers to log; keeps the best model (:meth:`save_best`) and requests
        early stopping."""
        if not self.due(step):
            return {}
        metrics = self.score(model) if engine.is_main else None
        metrics = engine.broadcast_object(metrics)
        best, stop = self.record(step, metrics)
        record = {f"val/{k}": v for k, v in metrics.items()}
        if best and self.config.keep_best:
            self.save_best(step, engine, model, best_dir, stage=stage, readme=readme)
        record["val/best_step"] = self.state.best_step or step
        if stop is not None:
            engine.request_stop(stop)
        return record

    def save_best(
        self,
        step: int,
        engine: Engine,
        model: SentenceTransformer,
        folder: Path,
        *,
        stage: str,
        readme: Callable[[], str | ReadmeWriter | None],
    ) -> None:
        """``folder`` (``<output_dir>/best``): the model of ``step`` (every rank: a collective
        when sharded)."""
        from conan_embedding.modeling.embedder import save_embedder
        from conan_embedding.modeling.lora import has_lora, merged

        saved = engine.consolidated_model(model)
        if saved is None:
            return
        if has_lora(saved[0].model):  # merge a copy: training goes on with the adapters
            saved = copy.deepcopy(saved)
            saved[0].model = merged(saved[0].model)
        state = self.state
        was_training = model.training  # saving puts the model in eval mode (no dropout)
        save_embedder(
            saved,
            folder,
            extra_meta={
                "stage": stage,
                "step": step,
                "validation": {"metric": state.metric, "value": state.best_value},
            },
            readme=readme(),
        )
        model.train(was_training)
        logger.info("best val/%s = %.6g at step %d: saved to %s", state.metric,
                    state.best_value, step, folder)  # fmt: skip
