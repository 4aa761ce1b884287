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
4. The losses (InfoNCE / CoSENT / classification-as-retrieval, wrapped in Matryoshka when
   dims are set) are weighted and back-propagated; the negative provider sees the scores the
   loss used, gathered from every rank, so its decisions are the same on every rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from conan_embedding._io import atomic_path
from conan_embedding.config import TaskConfig, TrainConfig
from conan_embedding.data.records import PairRecord, Record, RecordDataset, open_records
from conan_embedding.data.sampler import LabelIndex, TaskSchedule, TaskStream, cap_indices
from conan_embedding.losses import (
    classification_as_retrieval_loss,
    cosent_loss,
    matryoshka_loss,
)
from conan_embedding.losses.infonce import info_nce_loss_with_count, own_negative_scores
from conan_embedding.mining.base import (
    NegativeProvider,
    StaticNegatives,
    restore_provider_states,
    split_provider_states,
)
from conan_embedding.modeling.embedder import ReadmeWriter, build_embedder, save_embedder
from conan_embedding.training.collectives import all_gather_no_grad, all_gather_with_grad
from conan_embedding.training.engine import (
    Engine,
    LoopSettings,
    RunResult,
    StepProgram,
    TrainingDivergedError,
)
from conan_embedding.training.validation import (
    HeldoutLoss,
    Validate,
    Validation,
    check_validation_supported,
    split_heldout,
)

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainResult", "TrainingDivergedError", "encode_with_grad", "read_log"]

_QUERIES, _DOCUMENTS = 0, 1
"""Which encode of a shard a dropout seed belongs to."""


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


def _rank_device(engine_device: str) -> str:
    """This process's device before the engine exists: ``cuda:LOCAL_RANK`` on GPUs (what
    accelerate will pick), else the engine's device kind."""
    from conan_embedding.runtime import resolve_device

    kind = resolve_device(engine_device, per_process=False).type
    return str(resolve_device("auto")) if kind == "cuda" else kind


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def encode_with_grad(
    model: SentenceTransformer,
    texts: Sequence[str],
    prompt: str | None = None,
    forward: torch.nn.Module | None = None,
    counts: dict[str, int] | None = None,
) -> torch.Tensor:
    """Sentence embeddings with autograd (``model.encode`` runs without gradient).

    ``forward`` is the module to call (the engine's DDP/FSDP wrapper of ``model``); the
    result is float32 whatever the autocast precision, so losses are computed in float32.
    ``counts`` (if given) gains ``samples`` (texts encoded) and ``tokens`` (their non-padding
    tokens, the attention mask's sum): the engine's throughput numbers. This is the one place
    a training step tokenizes, so every stage built on it counts the same way.
    """
    if prompt:
        texts = [prompt + t for t in texts]
    features = model.preprocess(list(texts))
    if counts is not None:
        mask = features.get("attention_mask", features.get("input_ids"))
        counts["samples"] = counts.get("samples", 0) + len(texts)
        if isinstance(mask, torch.Tensor):  # still on the CPU: no device sync
            real = int(mask.sum()) if "attention_mask" in features else mask.numel()
            counts["tokens"] = counts.get("tokens", 0) + real
    features = {
        k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()
    }
    return (forward or model)(features)["sentence_embedding"].float()


def _stable_text_ids(texts: Sequence[str]) -> torch.Tensor:
    """Equal texts get equal ids, so a duplicate of a positive is never used as its negative."""
    table: dict[str, int] = {}
    return torch.tensor([table.setdefault(t, len(table)) for t in texts])


def _take(records: Sequence[Record], positions: np.ndarray) -> Sequence[Record]:
    """The rows at ``positions``: a view of a lazy dataset (nothing read), a list otherwise."""
    if isinstance(records, RecordDataset):
        return records.select(positions)
    return [records[int(i)] for i in positions]


def _task_key(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode("utf-8"))


def check_dhnm_supported(
    distributed_type: str, zero_stage: int | None, dynamic_tasks: Sequence[str]
) -> None:
    """Refuse dynamic hard-negative mining where its rank-0 re-encoding would deadlock.

    Why: DHNM's rules, re-scores and re-mining run on rank 0 alone while the other ranks wait
    in a broadcast. With sharded parameters (FSDP, DeepSpeed ZeRO-3) every forward all-gathers
    the weights from all ranks, so rank 0's lone forward waits for ranks that never join.
    DDP and ZeRO-0/1/2 keep whole weights on every rank: no collective in a forward.
    ``distributed_type`` is accelerate's ``DistributedType`` value (``"FSDP"``, ...).
    """
    if not dynamic_tasks:
        return
    if distributed_type == "FSDP":
        setting = "FSDP"
    elif distributed_type == "DEEPSPEED" and zero_stage == 3:
        setting = "DeepSpeed ZeRO-3"
    else:
        return
    names = ", ".join(f"'{name}'" for name in dynamic_tasks)
    raise ValueError(
        f"dynamic hard-negative mining (task {names}: dynamic_negatives.rule / remine_every) "
        f"does not run under {setting}: rank 0 re-encodes texts alone, and with sharded "
        "parameters every forward all-gathers weights from all ranks, so it deadlocks. "
        "Launch with DDP (configs/accelerate/ddp.yaml or plain torchrun) or DeepSpeed ZeRO-2, "
        "or set dynamic_negatives.rule: none (negatives mined offline)"
    )


def name_fsdp_layers(plugin: Any, model: torch.nn.Module) -> list[str]:
    """Give FSDP's ``TRANSFORMER_BASED_WRAP`` the layer classes of ``model``'s backbone.

    Why: accelerate takes the classes to wrap from ``model._no_split_modules`` when the
    accelerate config names none, and a SentenceTransformer reports ``[]``: the whole encoder
    becomes one FSDP unit, all-gathered at once (no per-layer sharding, DDP-like peak memory;
    audit §11). The backbone (a transformers model) knows its layers (``BertLayer``,
    ``Qwen2DecoderLayer``, ...). A list set in the accelerate config is kept, but only the
    classes this model has: accelerate raises on a name the model lacks, so one shared config
    can list the layers of several model families (none of them present: the backbone's own
    are used). Returns the names set.
    """
    from accelerate.utils.dataclasses import get_module_class_from_name

    def present(names: Any) -> list[str]:
        return sorted(n for n in set(names or ()) if get_module_class_from_name(model, n))

    names = present(plugin.transformer_cls_names_to_wrap)
    if not names:  # none configured (or none of them here): the backbone's own
        names = present(
            {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
        )
    plugin.transformer_cls_names_to_wrap = names
    return names


class Trainer:
    """Runs one embedding stage from a :class:`~conan_embedding.config.TrainConfig`."""

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
            device=_rank_device(config.engine.device),
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
                checkpoint_every=config.checkpoint_every,
                keep_checkpoints=config.keep_checkpoints,
                description=f"{config.stage} training",
            ),
        )
        self._check_engine_supported(negative_providers or {})
        self.query_prompt = self._prompt(mc.query_prompt)
        self.passage_prompt = self._prompt(mc.passage_prompt)

        self.source_rows: dict[str, np.ndarray | None] = {}
        """Per task, the file positions of the rows kept (None once a filter dropped some)."""
        self._teacher: SentenceTransformer | None = None
        self.heldout_records: dict[str, Sequence[Record]] = {}
        """Per task, the rows ``validation.heldout`` keeps out of training."""
        self.records = {t.name: self._load_task(t) for t in config.tasks}
        self._teacher = None  # the filter's model is freed once every task is loaded
        self.streams = {
            t.name: TaskStream(t.name, len(self.records[t.name]), config.seed) for t in config.tasks
        }
        self.label_index = {
            t.name: LabelIndex(self.records[t.name])
            for t in config.tasks
            if t.kind == "classification"
        }
        self.providers: dict[str, NegativeProvider] = dict(negative_providers or {})
        for task in config.tasks:
            if task.kind == "retrieval" and task.name not in self.providers:
                self.providers[task.name] = self._default_provider(task)
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
        self.validation = self._build_validation(validate)

    def _engine_sharding(self) -> tuple[str, int | None]:
        """accelerate's distributed type (``"FSDP"``, ``"DEEPSPEED"``, ``"MULTI_GPU"``, ...) and
        the DeepSpeed ZeRO stage (None without DeepSpeed)."""
        accelerator = self.engine.accelerator
        plugin = accelerator.state.deepspeed_plugin
        stage = None if plugin is None else int(plugin.zero_stage)
        return str(accelerator.distributed_type.value), stage

    def _fsdp_plugin(self) -> Any:
        """accelerate's FSDP plugin when the engine runs FSDP, else None."""
        if self._engine_sharding()[0] != "FSDP":
            return None
        return self.engine.accelerator.state.fsdp_plugin

    def _check_engine_supported(self, providers: dict[str, NegativeProvider]) -> None:
        """Refuse, before anything expensive, what the engine's sharding cannot run."""
        from conan_embedding.mining.dynamic import DynamicNegatives

        dynamic = [
            t.name
            for t in self.config.tasks
            if t.kind == "retrieval"
            and (
                isinstance(providers.get(t.name), DynamicNegatives)
                or t.name not in providers
                and t.dynamic_negatives.rule != "none"
            )
        ]
        check_dhnm_supported(*self._engine_sharding(), dynamic)
        if self.config.validation is not None:
            check_validation_supported(*self._engine_sharding())
        if self.layout is not None:
            self.layout.check_engine(*self._engine_sharding(), self.engine.distributed)

    def _decide_negatives_on_rank_0(self) -> None:
        """Several processes: DHNM's rules (and any re-encoding) run on rank 0, which
        broadcasts the rows it changed; every rank then draws the same negatives."""
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

    def _prompt(self, name: str | None) -> str | None:
        if name is None:
            return None
        prompts = self.model.prompts or {}
        if name not in prompts:
            raise ValueError(f"prompt '{name}' is not among the model's prompts {sorted(prompts)}")
        return prompts[name]

    def _open_records(self, task: TaskConfig) -> Sequence[Record]:
        """The task file as a lazy :class:`~conan_embedding.data.records.RecordDataset`.

        Why lazy: a weak-stage file has millions of pairs, and holding them all as pydantic
        objects costs gigabytes per process (every rank holds the whole file, since every
        rank draws the *global* batch by index). The byte-offset index gives each rank random
        access for 12 bytes a row; a row is validated when it is read, so a malformed row
        raises ``file:line: field`` when a batch (or a full pass below) reaches it. A subclass
        may return an eager list (tests compare the two trajectories). A dataset input
        (``data/hf_sources.py``) is the same lazy view over memory-mapped Arrow.
        """
        return open_records(task.path, task.kind, columns=task.columns, split=task.split)

    def _load_task(self, task: TaskConfig) -> Sequence[Record]:
        records = self._open_records(task)
        rows = cap_indices(len(records), task.max_rows, self.config.seed, task.name)
        if len(rows) < len(records):
            records = _take(records, rows)
        self.source_rows[task.name] = rows
        if task.name in self.config.heldout_tasks():
            records = self._hold_out(task, records)
        if task.kind == "retrieval" and task.negatives and task.dynamic_negatives.rule == "none":
            # one streaming pass (it validates every row before the first step, too)
            short = [i for i, r in enumerate(records) if not r.neg]
            if short:
                raise ValueError(
                    f"{task.path}: task '{task.name}' wants {task.negatives} negatives but "
                    f"{len(short)} rows have none (first: row {short[0] + 1})"
                )
        if self.config.teacher_filter is not None:
            records = self._teacher_filter(task, records)
            self.source_rows[task.name] = None
        if not len(records):
            raise ValueError(f"task '{task.name}' has no rows left ({task.path})")
        return records

    def _hold_out(self, task: TaskConfig, records: Sequence[Record]) -> Sequence[Record]:
        """Keep ``validation.heldout``'s slice of the task out of training (the rows trained
        on, the stream's indices and the negative pools all see only the rest)."""
        heldout = self.config.validation.heldout  # type: ignore[union-attr]
        assert heldout is not None
        train, held = split_heldout(
            len(records), heldout, self.config.seed, task.name, task.batch_size
        )
        self.heldout_records[task.name] = _take(records, held)
        rows = self.source_rows[task.name]
        self.source_rows[task.name] = None if rows is None else rows[train]
        return _take(records, train)

    def _build_validation(self, validate: Validate | None) -> Validation | None:
        vc = self.config.validation
        if vc is None:
            return None
        tasks = {t.name: t for t in self.config.tasks}
        heldout = None
        if vc.heldout is not None:
            heldout = HeldoutLoss(
                [(tasks[name], rows) for name, rows in self.heldout_records.items()],
                self.config.temperature,
                self.query_prompt,
                self.passage_prompt,
                vc.heldout.batch_size,
            )
        return Validation(vc, self.config.optim.max_steps, validate=validate, heldout=heldout)

    def _validate(self, step: int) -> dict[str, float]:
        """Validation at ``step`` when due (rank 0 scores, every rank records): the
        ``val/...`` numbers to log; keeps the best model and requests early stopping."""
        validation = self.validation
        if validation is None or not validation.due(step):
            return {}
        engine = self.engine
        metrics = validation.score(self.model) if engine.is_main else None
        metrics = engine.broadcast_object(metrics)
        best, stop = validation.record(step, metrics)
        record = {f"val/{k}": v for k, v in metrics.items()}
        if best and validation.config.keep_best:
            self._save_best(step)
        record["val/best_step"] = validation.state.best_step or step
        if stop is not None:
            engine.request_stop(stop)
        return record

    def _save_best(self, step: int) -> None:
        """``<output_dir>/best``: the model of ``step`` (every rank: a collective when sharded)."""
        import copy

        from conan_embedding.modeling.lora import has_lora, merged

        model = self.engine.consolidated_model(self.model)
        if model is None:
            return
        if has_lora(model[0].model):  # merge a copy: training goes on with the adapters
            model = copy.deepcopy(model)
            model[0].model = merged(model[0].model)
        state = self.validation.state  # type: ignore[union-attr]
        was_training = self.model.training  # saving puts the model in eval mode (no dropout)
        save_embedder(
            model,
            self.output_dir / "best",
            extra_meta={
                "stage": self.config.stage,
                "step": step,
                "validation": {"metric": state.metric, "value": state.best_value},
            },
            readme=self._readme(),
        )
        self.model.train(was_training)
        logger.info("best val/%s = %.6g at step %d: saved to %s", state.metric,
                    state.best_value, step, self.output_dir / "best")  # fmt: skip

    def _readme(self) -> str | ReadmeWriter | None:
        if self.readme is None:
            return None
        rows = {name: len(records) for name, records in self.records.items()}
        if self.validation is None:
            return self.readme(rows)
        return self.readme(rows, validation=self.validation.state.summary())

    def _teacher_filter(self, task: TaskConfig, records: Sequence[Record]) -> Sequence[Record]:
        """Keep the pairs the teacher scores at ``threshold`` or above.

        Several processes: each rank scores its own contiguous share of the pairs and the
        scores are gathered, so every rank keeps the same rows. Why not every rank scoring
        everything (the work W times over), nor rank 0 alone (the others would wait in a
        collective, and a large weak-stage file outlasts NCCL's 10-minute default timeout).
        """
        tf = self.config.teacher_filter
        engine = self.engine
        share = np.array_split(np.arange(len(records)), engine.world_size)[engine.rank]
        scores = np.zeros(0, np.float32)
        if len(share):
            teacher = self._teacher_model()
            queries, positives = [], []
            for i in share:  # only the texts are held, never the records
                r = records[int(i)]
                queries.append(r.query)
                positives.append(r.pos if isinstance(r, PairRecord) else r.pos[0])
            q = teacher.encode(queries, batch_size=tf.batch_size, normalize_embeddings=True)
            p = teacher.encode(positives, batch_size=tf.batch_size, normalize_embeddings=True)
            scores = np.asarray((q * p).sum(axis=1), np.float32)
        if engine.distributed:
            parts: list[Any] = [None] * engine.world_size
            torch.distributed.all_gather_object(parts, scores)
            scores = np.concatenate(parts)
        kept = _take(records, np.flatnonzero(scores >= tf.threshold))
        logger.info(
            "teacher filter on '%s': kept %d of %d pairs (threshold %.2f)",
            task.name,
            len(kept),
            len(records),
            tf.threshold,
        )
        self.filter_report = {"task": task.name, "kept": len(kept), "total": len(records)}
        return kept

    def _teacher_model(self) -> SentenceTransformer:
        """The teacher filter's model, loaded once for all tasks with whole weights."""
        if self._teacher is None:
            from conan_embedding.modeling.embedder import load_embedder

            assert self.config.teacher_filter is not None
            with self._whole_weights():
                self._teacher = load_embedder(
                    self.config.teacher_filter.model, device=str(self.engine.device)
                )
        return self._teacher

    def _whole_weights(self) -> contextlib.AbstractContextManager:
        """Models loaded inside get whole weights even under DeepSpeed ZeRO-3's
        ``zero3_init_flag`` (which the engine's plugin turns on for every later
        ``from_pretrained``): a model that is never prepared must not be born partitioned."""
        plugin = self.engine.accelerator.state.deepspeed_plugin
        if plugin is None:
            return contextlib.nullcontext()
        return plugin.zero3_init_context_manager(enable=False)

    def _default_provider(self, task: TaskConfig) -> NegativeProvider:
        if self.layout is not None:
            task = task.model_copy(update={"negatives": self.layout.negatives_per_query(task)})
        records = self.records[task.name]
        if task.dynamic_negatives.rule == "none":
            return StaticNegatives(records, task.negatives)
        from conan_embedding.mining.dynamic import build_dynamic_negatives
        from conan_embedding.mining.offline import PoolMeta

        if not hasattr(self, "_trained_with"):  # the pool's scores count as S_0 if they match
            self._trained_with = PoolMeta.of(self.model, self.query_prompt, self.passage_prompt)
        return build_dynamic_negatives(
            records,
            task.negatives,
            task.dynamic_negatives,
            task.path,
            rows=self.source_rows.get(task.name),
            trained_with=self._trained_with,
        )

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
    ) -> torch.Tensor:
        """This rank's shards of one kind of text, each under its own dropout seed."""
        out = []
        for shard, part in zip(self.my_shards, self._shard_slices(batch), strict=True):
            with self.engine.seeded(step, _task_key(task.name), shard, role, *seed_key):
                out.append(
                    encode_with_grad(
                        self.model,
                        texts_of_shard(part),
                        prompt,
                        self.forward_model,
                        counts=self.step_counts,
                    )
                )
        return torch.cat(out)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        if self.layout is not None:  # a laid-out device's batch is its own: nothing crosses
            return local
        return torch.cat(all_gather_with_grad(local))

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
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This rank's part of the task's loss for the step's global batch (see module doc)."""
        records = self.records[task.name]
        if rows is None:
            rows = self.streams[task.name].next_indices(task.batch_size)
        size = len(rows)
        if size % self.shards:
            raise ValueError(
                f"task '{task.name}' has {size} rows, fewer than a batch that splits into "
                f"{self.shards} shards"
            )
        rng = np.random.default_rng([self.config.seed, step, len(task.name)])
        dims = self.config.model.matryoshka_dims
        weights = self.config.model.matryoshka_weights
        tau = self.config.temperature
        offset = self._query_offset(size)
        stats: dict[str, float] = {}

        if task.kind in ("retrieval", "pairs"):
            batch = [records[i] for i in rows]
            queries = [r.query for r in batch]
            if task.kind == "pairs":
                positives = [r.pos for r in batch]
            else:
                positives = [r.pos[int(rng.integers(len(r.pos)))] for r in batch]
            negatives = (
                self.providers[task.name].negatives(rows) if task.kind == "retrieval" else []
            )
            n_neg = len(negatives[0]) if negatives and negatives[0] else 0
            q = self._encode_shards(
                task,
                step,
                _QUERIES,
                lambda s: queries[s],
                size,
                self.query_prompt,
                seed_key=seed_key,
            )

            def documents(part: slice) -> list[str]:
                return positives[part] + [t for negs in negatives[part] for t in negs[:n_neg]]

            d = self._encode_shards(
                task, step, _DOCUMENTS, documents, size, self.passage_prompt, seed_key=seed_key
            )
            p, n = self._gathered_documents(d, size, n_neg)
            ids = _stable_text_ids(positives + [t for negs in negatives for t in negs[:n_neg]])
            groups = ids[:size]
            neg_groups = ids[size:].reshape(size, n_neg) if n_neg else None

            q_all = self._gather(q) if task.query_negatives else None
            masked: dict[int, torch.Tensor] = {}  # per Matryoshka width: terms masked

            def loss_fn(qe, pe, ne=None, qa=None):
                value, masked[qe.shape[-1]] = info_nce_loss_with_count(
                    qe,
                    pe,
                    ne,
                    temperature=tau,
                    in_batch=task.in_batch_negatives,
                    groups=groups,
                    negative_groups=neg_groups,
                    query_offset=offset,
                    false_negative_margin=task.false_negative_margin,
                    query_negatives=task.query_negatives,
                    passage_negatives=task.passage_negatives,
                    all_queries=qa,
                )
                return value

            loss = matryoshka_loss(loss_fn, [q, p, n, q_all], dims, weights)
            if task.false_negative_margin is not None:  # whole batch, widest Matryoshka dim
                count = masked[max(masked)].reshape(1)
                stats[f"masked_negatives/{task.name}"] = int(
                    torch.cat(all_gather_no_grad(count)).sum()
                )
            if n is not None:
                own = n[offset : offset + q.shape[0]]
                scores = own_negative_scores(q.detach(), own.detach())
                scores = torch.cat(all_gather_no_grad(scores)).cpu()
                queries_now = torch.cat(all_gather_no_grad(q.detach())).cpu()
                self.providers[task.name].observe(step, rows, scores, queries_now)
                stats[f"{task.name}/neg_score"] = float(scores.mean())
            return loss, stats

        if task.kind == "sts":
            batch = [records[i] for i in rows]
            first, second = [r.sentence1 for r in batch], [r.sentence2 for r in batch]
            a = self._gather(
                self._encode_shards(
                    task,
                    step,
                    _QUERIES,
                    lambda s: first[s],
                    size,
                    self.query_prompt,
                    seed_key=seed_key,
                )
            )
            b = self._gather(
                self._encode_shards(
                    task,
                    step,
                    _DOCUMENTS,
                    lambda s: second[s],
                    size,
                    self.query_prompt,
                    seed_key=seed_key,
                )
            )
            gold = torch.tensor([r.score for r in batch], dtype=torch.float32)
            if task.score_scale:
                gold = gold / task.score_scale
            # every rank holds the whole batch's loss; DDP's mean over ranks keeps it as is
            loss = matryoshka_loss(
                lambda x, y: cosent_loss(x, y, gold, temperature=tau), [a, b], dims, weights
            )
            return loss, stats

        # classification cast as retrieval
        index = self.label_index[task.name]
        positives = [index.positive(i, rng) for i in rows]
        negatives = (
            [index.negatives(i, task.negatives, rng) for i in rows] if task.negatives else []
        )
        n_neg = task.negatives if negatives else 0
        texts = [records[i].text for i in rows]
        q = self._encode_shards(
            task, step, _QUERIES, lambda s: texts[s], size, self.query_prompt, seed_key=seed_key
        )

        def others(part: slice) -> list[str]:
            return [records[i].text for i in positives[part]] + [
                records[j].text for negs in negatives[part] for j in negs
            ]

        d = self._encode_shards(
            task, step, _DOCUMENTS, others, size, self.query_prompt, seed_key=seed_key
        )
        p, n = self._gathered_documents(d, size, n_neg)
        labels = torch.as_tensor(index.ids[rows])
        neg_labels = torch.as_tensor(index.ids[np.asarray(negatives)]) if negatives else None
        loss = matryoshka_loss(
            lambda qe, pe, ne=None: classification_as_retrieval_loss(
                qe, pe, ne, labels, neg_labels, temperature=tau, query_offset=offset
            ),
            [q, p, n],
            dims,
            weights,
        )
        return loss, stats

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
                loss, stats = self.task_loss(task, step)
                self.engine.check_finite(loss, f"task '{name}'", step)
                self.engine.backward(task.weight * loss)
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

    def reset_step_counts(self) -> dict[str, int]:
        """Start counting this step's texts and tokens (``step_counts``, returned)."""
        self.step_counts = {"samples": 0, "tokens": 0}
        return self.step_counts

    def after_step(self, step: int) -> dict[str, float]:
        record: dict[str, float] = {}
        for name, provider in self.providers.items():
            # per task ("bge/dhnm/replaced"): two DHNM tasks must not overwrite each other
            stats = provider.on_step_end(step, self._encode_no_grad)
            record.update({f"{name}/{key}": value for key, value in stats.items()})
        record.update(self._validate(step))
        if self.on_step:
            self.on_step(step, record)
        return record

    def _encode_no_grad(self, texts: Sequence[str], role: str | None = None) -> torch.Tensor:
        """The current model's normalised rows, with the training prompt of ``role``
        (``query`` / ``passage``) so DHNM's re-scores compare with the loss's scores."""
        prompt = {"query": self.query_prompt, "passage": self.passage_prompt}.get(role or "")
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.model.encode(
                [prompt + t for t in texts] if prompt else list(texts),
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
                batch_size=64,
            )
        self.model.train(was_training)
        return out.float().cpu()

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


def read_log(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def plot_losses(log_path: str | Path, png_path: str | Path, window: int = 10) -> Path | None:
    """Total and per-task loss (moving average over ``window`` steps) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
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
    try:
        with atomic_path(png_path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return png_path
