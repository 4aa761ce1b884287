"""The embedding stages (weak and supervised) as a step program on the training engine.

Why a step of our own rather than the sentence-transformers/HF trainer: Conan needs
per-sample negative state that changes *during* training (dynamic hard negative mining reads
the scores the loss just computed and swaps a sample's negatives for the next step) and
steps that hold several task-homogeneous batches at once (cross-GPU batch balance). Both sit
awkwardly behind a Dataset/collator/``compute_loss`` interface; here they are a few explicit
lines. Everything around the step (devices, precision, processes, AdamW and its schedule,
checkpoints, logs) is :class:`~conan_embedding.training.engine.Engine`'s, and the model stays
a stock :class:`~sentence_transformers.SentenceTransformer`, so everything downstream
(saving, ``encode``, mteb, serving) is the ecosystem's own.

How a step runs:

1. :class:`~conan_embedding.data.sampler.TaskSchedule` names the task(s) of the step (the same
   on every rank: it is seeded by step).
2. Each task draws the step's *global* batch from its
   :class:`~conan_embedding.data.sampler.TaskStream` (every rank draws the same rows, so the
   cursors are resumable and identical everywhere) and cuts it into ``S`` equal shards
   (``engine.shards``, default one per process); rank ``r`` of ``W`` encodes shards
   ``r*S/W .. (r+1)*S/W - 1``, each under its own dropout seed ``(seed, step, task, shard)``.
3. Data parallel: the documents (positives, hard negatives) are gathered from every rank with
   gradient; each rank's InfoNCE covers its own queries against the whole batch's candidates
   (``query_offset``), CoSENT covers every pair of the whole batch. DDP's gradient average then
   equals the gradient of the loss of the global batch, so 1 process and ``W`` processes
   follow the same trajectory.
4. Each task's kind (:mod:`~conan_embedding.training.task_kinds`) draws its texts and computes
   its loss (InfoNCE / CoSENT / classification-as-retrieval, wrapped in Matryoshka when dims
   are set); the losses are weighted and back-propagated; the negative provider sees the scores the
   loss used, gathered from every rank, so its decisions are the same on every rank.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from conan_embedding.config import TaskConfig, TrainConfig
from conan_embedding.data.records import Record
from conan_embedding.data.sampler import LabelIndex, TaskSchedule, TaskStream
from conan_embedding.mining.base import (
    NegativeProvider,
    restore_provider_states,
    split_provider_states,
)
from conan_embedding.modeling.embedder import ReadmeWriter, build_embedder, save_embedder
from conan_embedding.training.collectives import all_gather_no_grad, all_gather_with_grad
from conan_embedding.training.encode import encode_no_grad, encode_with_grad
from conan_embedding.training.engine import (
    Engine,
    LoopSettings,
    RunResult,
    StepProgram,
    TrainingDivergedError,
)
from conan_embedding.training.gradcache import MiniBatchCache
from conan_embedding.training.logs import plot_losses, read_log
from conan_embedding.training.prompts import Prompts
from conan_embedding.training.sharding import (
    check_dhnm_supported,
    check_stage_supported,
    engine_sharding,
    name_fsdp_layers,
    rank_device,
)
from conan_embedding.training.task_data import TaskData, open_task_records
from conan_embedding.training.task_kinds import Encode, LossContext, task_kind
from conan_embedding.training.task_kinds import stable_text_ids as _stable_text_ids
from conan_embedding.training.validation import Validate, Validation

logger = logging.getLogger(__name__)

__all__ = [
    "Trainer",
    "TrainResult",
    "TrainingDivergedError",
    "_stable_text_ids",
    "check_dhnm_supported",
    "encode_with_grad",
    "name_fsdp_layers",
    "read_log",
]

ReadmeFor = Callable[..., str | ReadmeWriter]
"""The saved model's ``README.md`` given the rows each task trained on (the model card,
rendered by the layer above training: ``cli/train.py``); None keeps sentence-transformers'.
Called as ``readme(rows)``, or ``readme(rows, validation=summary)`` when the run validated
(:meth:`~conan_embedding.training.validation.ValidationState.summary`: the curve, the best
step), as :func:`conan_embedding.reporting.card.readme_for`'s writer accepts."""


EngineCheck = Callable[[str, "int | None", bool], None]
"""``check(distributed_type, zero_stage, distributed)``: raises for engine settings a step
program cannot run under (accelerate's ``DistributedType`` value, the DeepSpeed ZeRO stage)."""


@dataclass(frozen=True)
class DeviceLayout:
    """How another step program that composes a :class:`Trainer` lays tasks out on devices.

    The plain trainer (``Trainer(config)``, no layout) cuts each task's global batch into
    shards across processes and gathers candidates from every rank. A program with its own
    device map (cross-GPU batch balance, :mod:`conan_embedding.training.cbb`) passes one: each
    of its devices' batches is one unshared shard, a retrieval task's provider serves
    ``negatives_per_query`` negatives, and ``check_engine`` refuses what it cannot run.
    """

    negatives_per_query: Callable[[TaskConfig], int]
    check_engine: EngineCheck


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path
    steps: int
    final_loss: float
    seconds: float
    best_step: int | None = None
    """The step of the best validation (``validation:``), saved as ``output_dir/best``."""
    best_value: float | None = None
    stopped: str | None = None
    """Why the run ended early (early stopping), else None."""


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _task_key(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode("utf-8"))


class Trainer:
    """Runs one embedding stage from a :class:`~conan_embedding.config.TrainConfig`."""

    grad_cache_two_pass: bool = True
    """GradCache tasks (``mini_batch_size``) run two passes; False encodes their mini-batches
    with graphs in one pass (same numbers, the whole batch's activations: for checks)."""

    def __init__(
        self,
        config: TrainConfig,
        model: SentenceTransformer | None = None,
        negative_providers: dict[str, NegativeProvider] | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        *,
        readme: ReadmeFor | None = None,
        layout: DeviceLayout | None = None,
        validate: Validate | None = None,
    ):
        """``validate``: the function that scores ``config.validation.tasks`` (the
        evaluation layer's :func:`~conan_embedding.evaluation.validation.task_validator`;
        training does not import evaluation); the held-out loss is built here."""
        if config.cbb is not None and layout is None:
            raise ValueError(
                "the config has a 'cbb' section: train it with `conan-embed train CONFIG` "
                "(the section selects training.cbb.CBBTrainer; under torchrun: "
                "`torchrun ... -m conan_embedding.cli train CONFIG`), or remove the section"
            )
        self.layout = layout
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.on_step = on_step
        self.readme = readme
        set_seed(config.seed)
        mc = config.model
        # the model is built before the engine: under DeepSpeed ZeRO-3 with zero3_init_flag,
        # creating the engine's plugin turns on deepspeed.zero.Init for every later
        # from_pretrained, and a model born partitioned encodes with empty weights in the
        # pool probe (PoolMeta.of) and anything else before engine.prepare
        self.model = model or build_embedder(
            mc.name,
            pooling=mc.pooling,
            dense_dim=mc.dense_dim,
            normalize=mc.normalize,
            max_seq_length=mc.max_seq_length,
            prompts=mc.prompts or None,
            matryoshka_dims=mc.matryoshka_dims or None,
            seed=config.seed,
            device=rank_device(config.engine.device),
            model_kwargs=mc.model_kwargs or None,
        )
        if mc.freeze_word_embeddings:
            self.model[0].auto_model.get_input_embeddings().weight.requires_grad_(False)
        if mc.lora is not None:
            from conan_embedding.modeling.lora import add_lora

            self.model[0].model = add_lora(self.model[0].model, mc.lora)
        self.engine = Engine(
            config.engine,
            LoopSettings(
                output_dir=self.output_dir,
                steps=config.optim.max_steps,
                optim=config.optim,
                seed=config.seed,
                log_every=config.log_every,
                checkpoint=config.checkpoint,
                description=f"{config.stage} training",
            ),
        )
        self._check_engine_supported(negative_providers or {})
        self.prompts = Prompts.install(self.model, config)
        self.data = TaskData(config, self.engine, self._open_records)
        self.records: dict[str, Sequence[Record]] = self.data.records
        self.heldout_records = self.data.heldout_records
        self.filter_report = self.data.filter_report
        self.streams = {
            t.name: TaskStream(t.name, len(self.records[t.name]), config.seed) for t in config.tasks
        }
        self.label_index = {
            t.name: LabelIndex(self.records[t.name])
            for t in config.tasks
            if task_kind(t.kind).labelled
        }
        self.providers = self.data.providers(
            negative_providers or {},
            self.model,
            self.prompts,
            layout.negatives_per_query if layout is not None else None,
        )
        self.schedule = TaskSchedule(
            config.task_schedule,
            [t.name for t in config.tasks],
            [len(self.records[t.name]) for t in config.tasks],
            [t.weight for t in config.tasks],
            config.seed,
        )
        self._setup_shards()
        self.step_counts: dict[str, int] = {"samples": 0, "tokens": 0}
        """This step's texts encoded and their real tokens, on this rank (for throughput)."""
        fsdp = self._fsdp_plugin()
        if fsdp is not None:
            logger.info("FSDP wraps the layer classes %s", name_fsdp_layers(fsdp, self.model))
        self.engine.prepare(self.model)
        self._decide_negatives_on_rank_0()
        self.validation = Validation.of(
            config, validate, self.heldout_records, self.prompts.query, self.prompts.passage
        )

    def _engine_sharding(self) -> tuple[str, int | None]:
        return engine_sharding(self.engine.accelerator)

    def _fsdp_plugin(self) -> Any:
        """accelerate's FSDP plugin when the engine runs FSDP, else None."""
        if self._engine_sharding()[0] != "FSDP":
            return None
        return self.engine.accelerator.state.fsdp_plugin

    def _check_engine_supported(self, providers: dict[str, NegativeProvider]) -> None:
        """Refuse, before anything expensive, what the engine's sharding cannot run."""
        sharding = self._engine_sharding()
        check_stage_supported(sharding, self.config, providers)
        if self.layout is not None:
            self.layout.check_engine(*sharding, self.engine.distributed)

    def _decide_negatives_on_rank_0(self) -> None:
        """Several processes: DHNM's rules (and their re-scoring) run on rank 0, which
        broadcasts the rows it changed; every rank then draws the same negatives. A re-mine's
        encoding is shared: every rank encodes a slice of the corpus and queries."""
        from conan_embedding.mining.dynamic import DynamicNegatives

        for provider in self.providers.values():
            if isinstance(provider, DynamicNegatives):  # re-mining searches on this GPU
                provider.index_device = self.engine.device
        if not self.engine.distributed:
            return
        for provider in self.providers.values():
            if isinstance(provider, DynamicNegatives):
                provider.sync_from(0, device=self.engine.device)

    @property
    def forward_model(self) -> torch.nn.Module:
        """The module to call for forward passes (the engine's DDP/FSDP wrapper while training)."""
        return self.engine.forward_model

    # ----------------------------------------------------------------- setup helpers
    def _setup_shards(self) -> None:
        if self.layout is not None:  # the layout's owner puts each device's batch itself
            self.shards, self.my_shards = 1, range(1)
            return
        engine = self.engine
        self.shards = self.config.engine.shards or engine.world_size
        if self.shards % engine.world_size:
            raise ValueError(
                f"engine.shards is {self.shards}: it must be a multiple of the "
                f"{engine.world_size} processes"
            )
        for task in self.config.tasks:
            if task.batch_size % self.shards:
                raise ValueError(
                    f"task '{task.name}': batch_size {task.batch_size} does not split into "
                    f"{self.shards} equal shards (one per process unless engine.shards is set)"
                )
        per_rank = self.shards // engine.world_size
        self.my_shards = range(engine.rank * per_rank, (engine.rank + 1) * per_rank)

    def _open_records(self, task: TaskConfig) -> Sequence[Record]:
        """The task file (:func:`~conan_embedding.training.task_data.open_task_records`, lazy);
        a subclass may return an eager list (tests compare the two trajectories)."""
        return open_task_records(task)

    def _readme(self) -> str | ReadmeWriter | None:
        if self.readme is None:
            return None
        rows = {name: len(records) for name, records in self.records.items()}
        if self.validation is None:
            return self.readme(rows)
        return self.readme(rows, validation=self.validation.state.summary())

    # ----------------------------------------------------------------- sharded encoding
    def _shard_slices(self, batch: int) -> list[slice]:
        size = batch // self.shards
        return [slice(k * size, (k + 1) * size) for k in self.my_shards]

    def _encode_shards(
        self,
        task: TaskConfig,
        step: int,
        role: int,
        texts_of_shard: Callable[[slice], list[str]],
        batch: int,
        prompt: str | None,
        seed_key: tuple[int, ...] = (),
        max_length: int | None = None,
        cache: MiniBatchCache | None = None,
    ) -> torch.Tensor:
        """This rank's shards of one kind of text, each under its own dropout seed; with a
        ``cache`` (GradCache), each shard in mini-batches whose graphs are replayed later."""

        def forward(texts: list[str], count: bool = True) -> torch.Tensor:
            return encode_with_grad(
                self.model,
                texts,
                prompt,
                self.forward_model,
                counts=self.step_counts if count else None,
                max_length=max_length,
            )

        out = []
        for shard, part in zip(self.my_shards, self._shard_slices(batch), strict=True):
            with self.engine.seeded(step, _task_key(task.name), shard, role, *seed_key):
                texts = texts_of_shard(part)
                out.append(forward(texts) if cache is None else cache.encode(texts, forward))
        return torch.cat(out)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        if self.layout is not None:  # a laid-out device's batch is its own: nothing crosses
            return local
        return torch.cat(all_gather_with_grad(local))

    def _gather_no_grad(self, local: torch.Tensor) -> list[torch.Tensor]:
        if self.layout is not None:  # as _gather: the layout's owner sums its devices itself
            return [local]
        return all_gather_no_grad(local)

    def _gathered_documents(
        self, local: torch.Tensor, batch: int, n_neg: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every rank's positives ``[B, d]`` and negatives ``[B, n, d]``, in batch order.

        Each shard was encoded as [its positives, its negatives]; they are split back per
        shard before the gather, so positives come first in the candidate layout.
        """
        per = batch // self.shards
        chunks = local.split(per * (1 + n_neg))
        positives = self._gather(torch.cat([c[:per] for c in chunks]))
        if not n_neg:
            return positives, None
        negatives = torch.cat([c[per:].reshape(per, n_neg, -1) for c in chunks])
        return positives, self._gather(negatives)

    def _query_offset(self, batch: int) -> int:
        return self.my_shards.start * (batch // self.shards)

    # ----------------------------------------------------------------- losses per kind
    def task_loss(
        self,
        task: TaskConfig,
        step: int,
        rows: list[int] | None = None,
        seed_key: tuple[int, ...] = (),
        encode: Encode | None = None,
        cache: MiniBatchCache | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This rank's part of the task's loss for the step's global batch (see module doc);
        the task's kind (:mod:`~conan_embedding.training.task_kinds`) computes it. ``encode``
        replaces this rank's sharded encode (a step program with its own seeds). With a
        ``cache`` (GradCache, :meth:`grad_cache`) the loss is computed on cached embeddings:
        back-propagate it, then call ``cache.backward`` to reach the weights."""
        if rows is None:
            rows = self.streams[task.name].next_indices(task.batch_size)
        size = len(rows)
        if size % self.shards:
            raise ValueError(
                f"task '{task.name}' has {size} rows, fewer than a batch that splits into "
                f"{self.shards} shards"
            )
        kind = task_kind(task.kind)

        # the query side (queries; both texts of a symmetric kind) and the passage side
        prompts = self.prompts

        def encode_shards(
            role: int, texts_of: Callable[[slice], list[str]], prompt: str | None
        ) -> torch.Tensor:
            _, length = prompts.of_role(kind.side(role), task.name)
            return self._encode_shards(
                task, step, role, texts_of, size, prompt, seed_key, length, cache
            )

        context = LossContext(
            task=task,
            step=step,
            rows=rows,
            records=self.records[task.name],
            rng=np.random.default_rng([self.config.seed, step, len(task.name)]),
            temperature=self.config.temperature,
            dims=self.config.model.matryoshka_dims,
            weights=self.config.model.matryoshka_weights,
            query_offset=self._query_offset(size),
            query_prompt=prompts.query_of(task.name),
            passage_prompt=prompts.passage,
            encode=encode or encode_shards,
            gather=self._gather,
            gather_documents=lambda local, n_neg: self._gathered_documents(local, size, n_neg),
            gather_no_grad=self._gather_no_grad,
            provider=self.providers.get(task.name) if kind.mined_negatives else None,
            label_index=self.label_index.get(task.name),
        )
        return kind.loss(context), context.stats

    # ----------------------------------------------------------------- the step program
    def step(self, step: int) -> dict[str, float]:
        """Back-propagate every task of the step; returns the losses (mean over ranks)."""
        tasks = {t.name: t for t in self.config.tasks}
        names = self.schedule.tasks_for_step(step)
        record: dict[str, float] = {}
        self.reset_step_counts()
        local = torch.zeros(len(names), dtype=torch.float64)
        for index, name in enumerate(names):
            task = tasks[name]
            with self.engine.sync(last=index == len(names) - 1):
                cache = self.grad_cache(task)
                loss, stats = self.task_loss(task, step, cache=cache)
                self.engine.check_finite(loss, f"task '{name}'", step)
                self.engine.backward(task.weight * loss)
                if cache is not None:  # pass 2: the embeddings' gradients into the weights
                    cache.backward(lambda: self.engine.sync(last=False))
            local[index] = loss.item()
            record.update(stats)
        values = self.engine.mean_over_ranks(local)
        total = 0.0
        for index, name in enumerate(names):
            record[f"loss/{name}"] = float(values[index])
            total += tasks[name].weight * float(values[index])
        record["loss"] = total
        record.update(self.step_counts)  # this rank's texts and tokens (engine sums ranks)
        return record

    def grad_cache(self, task: TaskConfig) -> MiniBatchCache | None:
        """GradCache for ``task``'s step when it sets ``mini_batch_size`` (else None).

        The loss's backward stops at the cached embeddings; :meth:`MiniBatchCache.backward`
        replays each mini-batch with its graph, inside ``engine.sync(last=False)`` (DDP's
        ``no_sync``) for all but the last, so gradients are reduced once per task as without
        it. ``grad_cache_two_pass`` False (tests) encodes the same mini-batches with their graphs
        in one pass instead: the reference the two passes equal.
        """
        if task.mini_batch_size is None:
            return None
        return MiniBatchCache(
            task.mini_batch_size, self.engine.device, graphs=not self.grad_cache_two_pass
        )

    def reset_step_counts(self) -> dict[str, int]:
        """Start counting this step's texts and tokens (``step_counts``, returned)."""
        self.step_counts = {"samples": 0, "tokens": 0}
        return self.step_counts

    def after_step(self, step: int) -> dict[str, float]:
        record: dict[str, float] = {}
        for name, provider in self.providers.items():
            # per task ("bge/dhnm/replaced"): two DHNM tasks must not overwrite each other
            stats = provider.on_step_end(step, functools.partial(self._encode_no_grad, task=name))
            record.update({f"{name}/{key}": value for key, value in stats.items()})
        if self.validation is not None:
            record.update(
                self.validation.at_step(
                    step,
                    self.engine,
                    self.model,
                    best_dir=self.output_dir / "best",
                    stage=self.config.stage,
                    readme=self._readme,
                )
            )
        if self.on_step:
            self.on_step(step, record)
        return record

    def _encode_no_grad(
        self, texts: Sequence[str], role: str | None = None, task: str | None = None
    ) -> torch.Tensor:
        """The current model's normalised rows, with the training prompt and length of ``role``
        (``query`` / ``passage``; ``task``'s instruction on the query side) so DHNM's re-scores
        compare with the loss's scores."""
        prompt, length = self.prompts.of_role(role, task)
        return encode_no_grad(self.model, texts, prompt, length)

    def state_dict(self) -> dict[str, Any]:
        """Sampler cursors and negative-provider state (DHNM arrays go to safetensors)."""
        states, arrays = split_provider_states(self.providers)
        state = {
            "streams": {k: s.state_dict() for k, s in self.streams.items()},
            "providers": states,
            "provider_arrays": arrays,
        }
        if self.validation is not None:  # the curve, best step and patience counter
            state["validation"] = self.validation.state.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, stream_state in state["streams"].items():
            self.streams[name].load_state_dict(stream_state)
        restore_provider_states(self.providers, state["providers"], state.get("provider_arrays"))
        if self.validation is not None and "validation" in state:
            self.validation.state.load_state_dict(state["validation"])

    def finish(self, engine: Engine, result: RunResult) -> None:
        # every rank: under FSDP/DeepSpeed this gathers the weights (a collective) into a
        # plain CPU copy on the main rank; FSDP2's DTensors and ZeRO-3's partitions cannot
        # take a full state dict in place (audit §3)
        model = engine.consolidated_model(self.model)
        if model is None:
            return
        from conan_embedding.modeling.lora import merged

        model[0].model = merged(model[0].model)

        self.model_dir = save_embedder(
            model,
            self.output_dir / "model",
            extra_meta={
                "stage": self.config.stage,
                "steps": result.steps,
                "processes": engine.world_size,
            },
            readme=self._readme(),
        )
        if self.validation is not None:
            state = self.validation.state
            logger.info("validation: best val/%s = %s at step %s%s", state.metric,
                        state.best_value, state.best_step,
                        f" ({state.stopped})" if state.stopped else "")  # fmt: skip
        if self.config.loss_plot:
            plot_losses(self.output_dir / "train_log.jsonl", self.output_dir / "loss.png")
        logger.info("saved the model to %s after %.1f s", self.model_dir, result.seconds)

    # ----------------------------------------------------------------- entry point
    def train(
        self, resume: bool = False, show_progress: bool = True, program: StepProgram | None = None
    ) -> TrainResult:
        """Run the stage on the engine; ``program`` (default: this trainer's own step) is a
        step program composing this trainer, such as CBB's."""
        config = self.config
        if self.engine.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(
                config.model_dump_json(indent=2), encoding="utf-8"
            )
        result = self.engine.run(program or self, resume=resume, show_progress=show_progress)
        state = self.validation.state if self.validation is not None else None
        return TrainResult(
            self.output_dir,
            self.output_dir / "model",
            result.steps,
            result.final_loss,
            result.seconds,
            best_step=state.best_step if state else None,
            best_value=state.best_value if state else None,
            stopped=result.stopped,
        )
