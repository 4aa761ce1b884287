"""Cross-GPU batch balance as a step program on the engine: every task in every step.

Why: Conan-v1 replaces "one random task per iteration" with steps that hold every task, laid
out across devices: retrieval on devices ``0..N-1`` with the same queries and positives but
different hard negatives (each query's InfoNCE denominator holds all ``N`` devices' negatives
of that query, :mod:`conan_embedding.losses.cbb`), STS on another device with a larger batch,
and one optimiser step on ``L = InfoNCE + beta * CoSENT``. The same YAML runs on 1 to ``W``
devices, with the one training command (the config's ``cbb:`` section selects this step
program; ``conan-embed train-cbb`` stays an alias that also refuses a config without it):

- **real devices**: ``torchrun --nproc_per_node W -m conan_embedding.cli train CONFIG`` (or
  ``accelerate launch``); gloo on CPUs, NCCL on GPUs, collectives on the model's device.
  ``W`` may be a multiple ``G * S`` of the group size ``S = cbb.world_size``: ``G`` groups of
  ``S`` devices train side by side on different rows (64 GPUs = 8 groups of 8);
- **virtual devices**: ``conan-embed train CONFIG`` on one process steps through the
  ``S`` devices of one group and produces the same loss and gradients (checked to 1e-5 by
  ``tests/test_distributed.py`` against 2 gloo processes, with dropout on).

How (group ``g``, device ``k`` of the group; task ``t`` on the devices ``R_t``, ``|R_t| = N``):

1. Every rank draws every task's rows for the step (global draw, seeded by task and step) and
   asks each retrieval task's negative provider for ``N * n`` negatives per query, so streams
   and providers advance identically everywhere. Group ``g`` takes slice ``g`` of the rows;
   device ``k`` of a data-parallel task (STS, classification, pairs) takes its own slice of
   the group's rows, so no two devices see the same sample.
2. A retrieval device encodes the queries and positives (same dropout seed on every device,
   so all compute the same ``q``, ``p``) and slice ``k`` of the negatives (seed of ``k``);
   :func:`~conan_embedding.training.collectives.all_gather_with_grad` collects the group's
   negatives; every device computes the same ``L_t``.
3. Each rank back-propagates ``S / N * w_t * L_t`` for its tasks (``w_t = beta`` for STS) and
   DDP averages gradients over all ``W = G * S`` ranks: the step's gradient is
   ``1/G * sum_g sum_t w_t * grad L_t^g``. On virtual devices ``cbb.grad_balance`` rescales
   each task's part to the norm ``w_t * M`` first (``norm``), or ``w_t * rho_t * M`` with the
   task's relative loss rate ``rho_t`` (``loss_rate``)
   (:mod:`conan_embedding.training.grad_balance`).
4. DHNM: the negative scores of each group are gathered to every rank, which observes all of
   them in group order; so every rank's provider makes the same decisions by construction.

Every encode takes the plain trainer's prompt and token limit of its side
(:meth:`~conan_embedding.training.prompts.Prompts.of_role` with
:meth:`~conan_embedding.training.task_kinds.TaskKindSpec.side`: a task's instruction and
``model.query_max_length`` on the query side, ``passage_max_length`` on the passage side), and
a retrieval task's false-negative control (``false_negative_margin``, ``query_negatives``,
``passage_negatives``) applies to the union of the devices' candidates: the same terms as one
plain step over those candidates leave the denominator (:mod:`conan_embedding.losses.cbb`).
``masked_negatives/<task>`` counts them once per group, summed over groups.

Engines: DDP (torchrun, ddp.yaml) or one process; DeepSpeed ZeRO-2 only when every rank runs
exactly one task; FSDP, ZeRO-3, and DeepSpeed on virtual devices are refused before the first
step (:func:`check_cbb_supported` says why).

On virtual devices the retrieval term is computed GradCache-style (``cbb.grad_cache``, the
default), so peak memory stays that of one device's share: pass 1 encodes the queries, the
positives and each device's negatives without gradient, the loss is back-propagated to those
embeddings only, and pass 2 re-encodes each chunk with gradient under the same dropout seed
and back-propagates the cached embedding gradients into the weights. Data-parallel tasks loop
over their virtual devices and accumulate ``w_t / N * L``. With ``grad_cache: false`` every
device's share is encoded with its graph in one pass: the same loss and gradients for about a
third less compute, when the activations of all devices fit in memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from sentence_transformers import SentenceTransformer

from conan_embedding.config import TaskConfig, TrainConfig
from conan_embedding.losses.cbb import merge_rank_negatives
from conan_embedding.losses.infonce import own_negative_scores
from conan_embedding.mining.base import NegativeProvider
from conan_embedding.modeling.embedder import embedding_width
from conan_embedding.training.collectives import all_gather_no_grad, all_gather_with_grad
from conan_embedding.training.encode import encode_with_grad
from conan_embedding.training.engine import Engine, RunResult
from conan_embedding.training.grad_balance import LossRate, TaskGradientBalance
from conan_embedding.training.gradcache import Chunk, encode_with_graphs, grad_cache_backward
from conan_embedding.training.task_kinds import (
    ENCODE_DOCUMENTS,
    ENCODE_QUERIES,
    Encode,
    TaskKindSpec,
    task_kind,
)
from conan_embedding.training.trainer import (
    DeviceLayout,
    ReadmeFor,
    Trainer,
    TrainResult,
    _task_key,
)
from conan_embedding.training.validation import Validate

logger = logging.getLogger(__name__)

_QUERIES, _POSITIVES, _NEGATIVES, _SECOND = 0, 1, 2, 3
"""Which encode of a device a dropout seed belongs to."""


# --------------------------------------------------------------------------- the device map
@dataclass(frozen=True)
class RankLayout:
    """Which devices (ranks) run which task."""

    world_size: int
    task_ranks: dict[str, tuple[int, ...]]
    task_kinds: dict[str, str]

    @classmethod
    def from_config(cls, config: TrainConfig) -> RankLayout:
        if config.cbb is None:
            raise ValueError("the config has no 'cbb' section: CBB training needs one")
        world = config.cbb.world_size
        kinds = {t.name: t.kind for t in config.tasks}
        if config.cbb.task_ranks:
            unknown = sorted(set(config.cbb.task_ranks) - set(kinds))
            if unknown:
                raise ValueError(
                    f"cbb.task_ranks names unknown tasks {unknown}; tasks: {sorted(kinds)}"
                )
            missing = sorted(set(kinds) - set(config.cbb.task_ranks))
            if missing:
                raise ValueError(f"cbb.task_ranks gives no devices to tasks {missing}")
            # sorted: a group's gather returns ranks in ascending order (dist.new_group sorts)
            ranks = {name: tuple(sorted(config.cbb.task_ranks[name])) for name in kinds}
        elif world == 1:
            ranks = {name: (0,) for name in kinds}
        else:
            shared = tuple(range(world - 1))
            ranks = {
                name: shared if task_kind(kind).shares_devices else (world - 1,)
                for name, kind in kinds.items()
            }
        for name, devices in ranks.items():
            if not devices:
                raise ValueError(f"cbb.task_ranks.{name}: needs at least one device")
            if len(set(devices)) != len(devices):
                raise ValueError(f"cbb.task_ranks.{name}: device listed twice in {list(devices)}")
            bad = [r for r in devices if not 0 <= r < world]
            if bad:
                raise ValueError(
                    f"cbb.task_ranks.{name}: devices {bad} outside 0..{world - 1} (world_size {world})"
                )
        idle = sorted(set(range(world)) - {r for devices in ranks.values() for r in devices})
        if idle:
            raise ValueError(
                f"devices {idle} run no task; lower cbb.world_size or map a task there"
            )
        return cls(world, ranks, kinds)

    def tasks_of(self, rank: int) -> list[str]:
        return [name for name, devices in self.task_ranks.items() if rank in devices]

    def position(self, task: str, rank: int) -> int:
        """Index of ``rank`` among the devices of ``task`` (its share of the negatives)."""
        return self.task_ranks[task].index(rank)

    def describe(self) -> str:
        return ", ".join(f"{name} -> {list(r)}" for name, r in self.task_ranks.items())


# --------------------------------------------------------------------------- what CBB runs on
def check_cbb_supported(
    distributed_type: str,
    zero_stage: int | None,
    tasks_per_rank: Sequence[int],
    virtual: bool,
    grad_balance: str = "none",
) -> None:
    """Refuse the engine settings under which CBB would hang or train wrongly.

    ``distributed_type`` is accelerate's ``DistributedType`` value, ``tasks_per_rank`` the
    number of tasks each device of a CBB group runs, ``virtual`` one process stepping through
    the group's devices. Why each refusal:

    - FSDP and DeepSpeed ZeRO-3 all-gather parameters in every forward; a retrieval device
      encodes three times per step and an STS device twice, so the ranks' collectives differ
      in number and the run hangs on its first step;
    - DeepSpeed ZeRO-2 reduces gradients at every backward, boundary or not; a device with
      two tasks runs two backwards against one elsewhere: the same hang. One task per device
      is fine;
    - virtual devices (one process) call ``backward`` outside DeepSpeed's engine in the
      GradCache pass, skipping its loss scaling, gradient flush and accumulation boundary;
    - ``grad_balance`` other than ``none`` on real devices: a rank holds only its share of a
      task's gradient, and the task's norm would need an all-reduce of a whole gradient per
      task (not built).
    """
    if grad_balance != "none" and not virtual:
        raise ValueError(
            f"cbb.grad_balance: {grad_balance} runs on virtual devices only (one process, "
            "`conan-embed train CONFIG`): on real devices a rank holds only its share of a "
            "task's gradient, and the task's norm would need an all-reduce per task. Drop "
            "cbb.grad_balance, or run the group's devices in one process"
        )
    if distributed_type == "FSDP":
        raise ValueError(
            "CBB does not run under FSDP (the accelerate config's distributed_type): CBB devices "
            "run different numbers of forward passes per step and FSDP all-gathers parameters "
            "in every forward, so the ranks hang. Launch with DDP (configs/accelerate/ddp.yaml "
            "or plain torchrun), or DeepSpeed ZeRO-2 with exactly one task per rank"
        )
    if distributed_type != "DEEPSPEED":
        return
    if virtual:
        raise ValueError(
            "virtual-device CBB (one process, `conan-embed train CONFIG`) does not run under "
            "DeepSpeed: its GradCache pass back-propagates outside DeepSpeed's engine. Drop "
            "engine.deepspeed / the DeepSpeed launcher config (one GPU needs no DeepSpeed), or "
            "run CBB on real devices with DDP"
        )
    if zero_stage == 3:
        raise ValueError(
            "CBB does not run under DeepSpeed ZeRO-3: CBB devices run different numbers of "
            "forward passes per step and ZeRO-3 all-gathers parameters in every forward, so the "
            "ranks hang. Launch with DDP (configs/accelerate/ddp.yaml or plain torchrun), or "
            "DeepSpeed ZeRO-2 with exactly one task per rank"
        )
    busy = [rank for rank, count in enumerate(tasks_per_rank) if count != 1]
    if zero_stage == 2 and busy:
        raise ValueError(
            f"CBB under DeepSpeed ZeRO-2 needs exactly one task per rank, but devices {busy} of "
            "each group run several (cbb.task_ranks): ZeRO-2 reduces gradients at every "
            "backward, so the ranks' collectives differ in number and hang. Give each rank one "
            "task in cbb.task_ranks, or launch with DDP (configs/accelerate/ddp.yaml)"
        )


# --------------------------------------------------------------------------- the step program
class CBBTrainer:
    """The cross-GPU batch balance step program: real devices when the engine runs several
    processes, virtual ones otherwise.

    It composes a :class:`~conan_embedding.training.trainer.Trainer` (given this layout, see
    :class:`~conan_embedding.training.trainer.DeviceLayout`) for what every embedding stage
    shares: the model and engine, the task records, streams and negative providers, their
    checkpoint state and the final save; its own part is the step.
    """

    def __init__(
        self,
        config: TrainConfig,
        model: SentenceTransformer | None = None,
        negative_providers: dict[str, NegativeProvider] | None = None,
        on_step: Any = None,
        *,
        readme: ReadmeFor | None = None,
        validate: Validate | None = None,
    ):
        self.layout = RankLayout.from_config(config)
        # read by _check_engine, which the Trainer below calls before self.config is set
        self.config_grad_balance = config.cbb.grad_balance if config.cbb else "none"
        self.embedding = Trainer(
            config,
            model,
            negative_providers,
            on_step,
            readme=readme,
            validate=validate,
            layout=DeviceLayout(
                # each of the task's N devices takes its own n of the N * n negatives per query
                negatives_per_query=lambda task: (
                    task.negatives * len(self.layout.task_ranks[task.name])
                ),
                check_engine=self._check_engine,
            ),
        )
        self.config = config
        self.tasks = {t.name: t for t in config.tasks}
        engine, group_size = self.engine, self.layout.world_size
        self.virtual = not engine.distributed
        if engine.distributed and engine.world_size % group_size:
            raise ValueError(
                f"cbb.world_size is {group_size} but {engine.world_size} processes were started: "
                "the process count must be a multiple of it (groups of cbb.world_size devices)"
            )
        self._balance: TaskGradientBalance | None = None
        self.replicas = 1 if self.virtual else engine.world_size // group_size
        self.replica = 0 if self.virtual else engine.rank // group_size
        self.device_index: int | None = None if self.virtual else engine.rank % group_size
        self.groups: dict[str, Any] = {}
        if not self.virtual:
            # new_group must be called by every rank, for every group, in the same order
            for replica in range(self.replicas):
                for task in config.tasks:
                    ranks = [replica * group_size + r for r in self.layout.task_ranks[task.name]]
                    group = dist.new_group(ranks)
                    if replica == self.replica:
                        self.groups[task.name] = group
        logger.info(
            "CBB on %s: %d group(s) of %d device(s): %s",
            "virtual devices" if self.virtual else f"{engine.world_size} processes",
            self.replicas,
            group_size,
            self.layout.describe(),
        )

    def _check_engine(
        self, distributed_type: str, zero_stage: int | None, distributed: bool
    ) -> None:
        layout = self.layout
        check_cbb_supported(
            distributed_type,
            zero_stage,
            [len(layout.tasks_of(rank)) for rank in range(layout.world_size)],
            virtual=not distributed,
            grad_balance=self.config_grad_balance,
        )

    # ------------------------------------------------------------------ what the trainer holds
    @property
    def engine(self) -> Engine:
        return self.embedding.engine

    @property
    def model(self) -> SentenceTransformer:
        return self.embedding.model

    @property
    def forward_model(self) -> torch.nn.Module:
        return self.embedding.forward_model

    @property
    def output_dir(self) -> Path:
        return self.embedding.output_dir

    @property
    def records(self) -> dict[str, Any]:
        return self.embedding.records

    @property
    def streams(self) -> dict[str, Any]:
        return self.embedding.streams

    @property
    def providers(self) -> dict[str, NegativeProvider]:
        return self.embedding.providers

    @property
    def model_dir(self) -> Path:
        return self.embedding.model_dir

    def task_weight(self, task: TaskConfig) -> float:
        """``w_t``: the task's weight, times ``beta`` for STS (``L = InfoNCE + beta * CoSENT``)."""
        assert self.config.cbb is not None
        beta = self.config.cbb.beta if task_kind(task.kind).weighted_by_beta else 1.0
        return task.weight * beta

    def _positions(self, name: str) -> list[int]:
        """The devices of ``name`` this process runs (all of them on virtual devices)."""
        devices = self.layout.task_ranks[name]
        if self.virtual:
            return list(range(len(devices)))
        return [devices.index(self.device_index)] if self.device_index in devices else []

    # ------------------------------------------------------------------ the engine's calls
    def after_step(self, step: int) -> dict[str, float]:
        return self.embedding.after_step(step)

    def state_dict(self) -> dict[str, Any]:
        state = self.embedding.state_dict()
        balance = self._gradient_balance()
        if balance is not None and balance.loss_rate is not None:  # L_t(0) outlives a resume
            state["loss_rate"] = balance.loss_rate.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.embedding.load_state_dict(state)
        balance = self._gradient_balance()
        if balance is not None and balance.loss_rate is not None and "loss_rate" in state:
            balance.loss_rate.load_state_dict(state["loss_rate"])

    def finish(self, engine: Engine, result: RunResult) -> None:
        self.embedding.finish(engine, result)

    def train(self, resume: bool = False, show_progress: bool = True) -> TrainResult:
        return self.embedding.train(resume=resume, show_progress=show_progress, program=self)

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict[str, float]:
        """Back-propagate ``sum_t w_t L_t`` (averaged over groups); returns the losses."""
        names = [t.name for t in self.config.tasks]
        draws = {name: self._draw(self.tasks[name], step) for name in names}
        mine = [name for name in names if self._positions(name)]
        local = torch.zeros(len(names), dtype=torch.float64)
        masked = torch.zeros(len(names), dtype=torch.float64)  # false-negative counts, summed
        record: dict[str, float] = {}
        self.step_counts = self.embedding.reset_step_counts()
        balance = self._gradient_balance()
        if balance is not None:
            balance.start()
        for order, name in enumerate(mine):
            task, index = self.tasks[name], names.index(name)
            n_devices = len(self.layout.task_ranks[name])
            with self.engine.sync(last=order == len(mine) - 1):
                if task_kind(task.kind).shares_devices:
                    value, count = self._shared_step(task, step, draws[name])
                    local[index] += value if self.virtual else value / n_devices
                    masked[index] += count
                else:
                    for position in self._positions(name):
                        value, count = self._data_parallel_step(task, step, draws[name], position)
                        local[index] += value / n_devices
                        masked[index] += count
            if balance is not None:
                balance.add(name, self.task_weight(task), loss=float(local[index]))
        if balance is not None:
            record.update({f"grad_norm/{n}": norm for n, norm in balance.finish().items()})
            record.update({f"loss_rate/{n}": rate for n, rate in balance.rates.items()})
        for name in names:
            if task_kind(self.tasks[name].kind).shares_devices:
                record.update(self._observe(self.tasks[name], step, draws[name]))
        values, counts = local, masked
        if not self.virtual:  # sum over ranks counts each group's loss once: mean over groups
            summed = (
                self.engine.mean_over_ranks(torch.cat([local, masked])) * self.engine.world_size
            )
            values, counts = summed[: len(names)] / self.replicas, summed[len(names) :]
        total = 0.0
        for index, name in enumerate(names):
            record[f"loss/{name}"] = float(values[index])
            total += self.task_weight(self.tasks[name]) * float(values[index])
            if self.tasks[name].false_negative_margin is not None:
                # every group's batch, as the plain trainer counts its whole global batch
                record[f"masked_negatives/{name}"] = round(float(counts[index]))
        record["loss"] = total
        record.update(self.step_counts)  # this rank's texts and tokens (engine sums ranks)
        return record

    def _gradient_balance(self) -> TaskGradientBalance | None:
        """``cbb.grad_balance``'s balancer over the trainable parameters, or None."""
        assert self.config.cbb is not None
        if self.config.cbb.grad_balance == "none":
            return None
        if self._balance is None:
            by_loss = self.config.cbb.grad_balance == "loss_rate"
            self._balance = TaskGradientBalance(
                self.forward_model.parameters(),
                alpha=self.config.cbb.grad_balance_alpha,
                loss_rate=LossRate() if by_loss else None,
                rate_floor=self.config.cbb.grad_balance_rate_floor,
            )
        return self._balance

    def _draw(self, task: TaskConfig, step: int) -> dict[str, Any]:
        """Every group's rows of the step (and negatives, for retrieval); this group's slice."""
        per_group = task.batch_size * (
            1 if task_kind(task.kind).shares_devices else len(self.layout.task_ranks[task.name])
        )
        wanted = per_group * self.replicas
        if wanted > len(self.records[task.name]):
            raise ValueError(
                f"task '{task.name}' has {len(self.records[task.name])} rows, fewer than one "
                f"step's {wanted} (batch x devices x groups)"
            )
        rows = self.streams[task.name].next_indices(wanted)
        mine = slice(self.replica * per_group, (self.replica + 1) * per_group)
        draw: dict[str, Any] = {"rows": rows, "group_rows": rows[mine]}
        if task_kind(task.kind).shares_devices:
            negatives = self.providers[task.name].negatives(rows)
            wanted_neg = task.negatives * len(self.layout.task_ranks[task.name])
            got = {len(n) for n in negatives}
            if got != {wanted_neg} and not (wanted_neg == 0 and got <= {0}):
                raise ValueError(
                    f"task '{task.name}': the negative provider returned {sorted(got)} negatives "
                    f"per query, CBB needs negatives x devices = {wanted_neg}"
                )
            draw["negatives"] = negatives[mine]
        return draw

    def _backward_scale(self, task: TaskConfig) -> float:
        """Factor on a device's loss so that DDP's mean over ranks is ``w_t * grad L_t``."""
        n_devices = len(self.layout.task_ranks[task.name])
        if self.virtual:  # one process: accumulate w_t * (mean over virtual devices)
            shared = task_kind(task.kind).shares_devices
            return self.task_weight(task) / (1 if shared else n_devices)
        return self.task_weight(task) * self.layout.world_size / n_devices

    def _backward(self, task: TaskConfig, loss: torch.Tensor, step: int) -> float:
        self.engine.check_finite(loss, f"task '{task.name}'", step)
        self.engine.backward(self._backward_scale(task) * loss)
        return loss.item()

    def _data_parallel_step(
        self, task: TaskConfig, step: int, draw: dict[str, Any], position: int
    ) -> tuple[float, int]:
        """Device ``position``'s own batch of a data-parallel task, under its own seeds: the
        plain trainer's loss of its kind on this device's rows; returns the loss and the
        terms the false-negative margin masked in that batch (pairs tasks)."""
        rows = draw["group_rows"][position * task.batch_size : (position + 1) * task.batch_size]
        encode = None
        kind = task_kind(task.kind)
        if kind.cbb_device_seeds:
            key = (step, _task_key(task.name), self.replica, position)
            encode = self._device_encode(key, task.name, kind)
        loss, stats = self.embedding.task_loss(
            task, step, rows=rows, seed_key=(self.replica, position), encode=encode
        )
        count = int(stats.get(f"masked_negatives/{task.name}", 0))
        return self._backward(task, loss, step), count

    def _device_encode(self, key: tuple[int, ...], task: str, kind: TaskKindSpec) -> Encode:
        """One device's whole batch of a role under the seed ``(*key, role)``, at the token
        limit of the role's side (the kind's loss passes the task's prompt)."""

        def encode(role: int, texts_of: Any, prompt: str | None) -> torch.Tensor:
            _, length = self.embedding.prompts.of_role(kind.side(role), task)
            with self.engine.seeded(*key, _QUERIES if role == ENCODE_QUERIES else _SECOND):
                return self._encode(texts_of(slice(None)), prompt, max_length=length)

        return encode

    def _encode(
        self,
        texts: list[str],
        prompt: str | None,
        count: bool = True,
        max_length: int | None = None,
    ) -> torch.Tensor:
        counts = self.step_counts if count else None
        return encode_with_grad(
            self.model, texts, prompt, self.forward_model, counts=counts, max_length=max_length
        )

    # ------------------------------------------------------------------ retrieval, shared
    def _shared_texts(self, task: TaskConfig, draw: dict[str, Any], step: int):
        rows = draw["group_rows"]
        rng = np.random.default_rng([self.config.seed, step, len(task.name), self.replica])
        batch = [self.records[task.name][i] for i in rows]
        queries, positives = task_kind(task.kind).texts(batch, rng)
        return queries, positives, draw["negatives"]

    def _shared_loss_fn(
        self,
        task: TaskConfig,
        positives: list[str],
        negatives: list[list[str]],
        stats: dict[str, float],
    ):
        assert self.config.cbb is not None
        return task_kind(task.kind).pooled_loss(
            task,
            positives,
            negatives,
            temperature=self.config.temperature,
            in_batch=self.config.cbb.in_batch_negatives,
            dims=self.config.model.matryoshka_dims,
            weights=self.config.model.matryoshka_weights,
            stats=stats,
        )

    def _shared_step(self, task: TaskConfig, step: int, draw: dict[str, Any]) -> tuple[float, int]:
        """The group's loss of a retrieval task (every device's negatives in each query's
        denominator); returns it and the terms the false-negative margin masked, counted on
        the task's first device of the group only (every device computes the same loss)."""
        queries, positives, negatives = self._shared_texts(task, draw, step)
        n = task.negatives
        key = (step, _task_key(task.name), self.replica)
        devices = self._positions(task.name)
        # the plain trainer's prompt and token limit per side (the task's instruction on the
        # query side), so a CBB run and a plain run encode the same texts
        kind, prompts = task_kind(task.kind), self.embedding.prompts
        q_prompt, q_length = prompts.of_role(kind.side(ENCODE_QUERIES), task.name)
        d_prompt, d_length = prompts.of_role(kind.side(ENCODE_DOCUMENTS), task.name)
        chunks = [
            Chunk(queries, q_prompt, (*key, _QUERIES), q_length),
            Chunk(positives, d_prompt, (*key, _POSITIVES), d_length),
        ]
        for position in devices if n else []:
            share = [t for negs in negatives for t in negs[position * n : (position + 1) * n]]
            chunks.append(Chunk(share, d_prompt, (*key, _NEGATIVES, position), d_length))
        stats: dict[str, float] = {}
        loss_of = self._shared_loss_fn(task, positives, negatives, stats)
        batch = len(queries)
        first = self.virtual or self.device_index == self.layout.task_ranks[task.name][0]

        def counted(value: float) -> tuple[float, int]:
            masked = int(stats.get(f"masked_negatives/{task.name}", 0))
            return value, masked if first else 0

        def shaped(embeddings: list[torch.Tensor]) -> list[torch.Tensor]:
            return embeddings[:2] + [e.reshape(batch, n, -1) for e in embeddings[2:]]

        def backward_loss(embeddings: list[torch.Tensor]) -> float:
            return self._backward(task, loss_of(shaped(embeddings)), step)

        if not self.virtual:  # this device's share; every device's negatives in the loss
            q, p, *own = encode_with_graphs(self._encode_chunk, chunks)
            per_rank = (
                all_gather_with_grad(own[0].reshape(batch, n, -1), self.groups[task.name])
                if n
                else []
            )
            draw["scores"], draw["queries"] = self._scores(q, per_rank), q.detach().cpu()
            return counted(self._backward(task, loss_of([q, p, *per_rank]), step))
        if self.config.cbb.grad_cache:  # peak memory of one chunk's activations
            value, embeddings = grad_cache_backward(self._encode_chunk, chunks, backward_loss)
        else:  # one pass: every device's activations at once
            embeddings = encode_with_graphs(self._encode_chunk, chunks)
            value = backward_loss(embeddings)
        embeddings = shaped(embeddings)
        draw["scores"] = self._scores(embeddings[0], embeddings[2:])
        draw["queries"] = embeddings[0].detach().cpu()
        return counted(value)

    def _encode_chunk(self, chunk: Chunk, count: bool = True) -> torch.Tensor:
        with self.engine.seeded(*chunk.seed):
            return self._encode(chunk.texts, chunk.prompt, count, chunk.max_length)

    @staticmethod
    def _scores(q: torch.Tensor, per_rank: Sequence[torch.Tensor]) -> torch.Tensor | None:
        if not per_rank:
            return None
        merged = merge_rank_negatives([n.detach() for n in per_rank])
        return own_negative_scores(q.detach(), merged).cpu()

    def _observe(self, task: TaskConfig, step: int, draw: dict[str, Any]) -> dict[str, float]:
        """Every rank observes every group's scores and query rows, in group order, so every
        rank's DHNM state sees the same inputs (and rank 0 decides, see ``sync_from``)."""
        if not task.negatives:
            return {}
        if self.virtual:
            scores, queries = draw["scores"], draw["queries"]
        else:
            n_total = task.negatives * len(self.layout.task_ranks[task.name])
            rows = len(draw["group_rows"])
            if "scores" in draw:
                mine = torch.cat([draw["scores"], draw["queries"]], dim=1)
            else:  # a rank without this task sends a placeholder of the same shape
                mine = torch.zeros(rows, n_total + embedding_width(self.model))
            everyone = all_gather_no_grad(mine.to(self.engine.device, torch.float32))
            first = self.layout.task_ranks[task.name][0]
            size = self.layout.world_size
            merged = torch.cat([everyone[g * size + first] for g in range(self.replicas)]).cpu()
            scores, queries = merged[:, :n_total], merged[:, n_total:]
        self.providers[task.name].observe(step, draw["rows"], scores, queries)
        return {f"{task.name}/neg_score": float(scores.mean())}


# --------------------------------------------------------------------------- entry points
def run_cbb(
    config_path: str | os.PathLike[str],
    *,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> TrainResult:
    """Train with CBB: real devices under torchrun / accelerate launch, virtual otherwise."""
    from conan_embedding.config import load_config

    config = load_config(config_path, {k: v for k, v in (overrides or {}).items() if v is not None})
    if config.cbb is None:
        raise ValueError(f"{config_path}: no 'cbb' section (see configs/cbb-demo.yaml)")
    trainer = CBBTrainer(config)
    return trainer.train(resume=resume, show_progress=show_progress)
