"""Cross-GPU batch balance training: a task-to-device map, gathers with gradient, virtual devices.

Why: Conan-v1 replaces "one random task per iteration" with steps that hold every task, laid
out across devices: retrieval on devices ``0..N-1`` with the same queries and positives but
different hard negatives (each query's InfoNCE denominator holds all ``N`` devices' negatives,
:mod:`conan_embedding.losses.cbb`), STS on another device with a larger batch, and one
optimiser step on ``L = InfoNCE + beta * CoSENT``. The same YAML runs on 1 to ``W`` devices:

- **real devices**: ``torchrun --nproc_per_node W -m conan_embedding.training.distributed
  CONFIG`` (gloo on CPU, NCCL on GPU), one process per device;
- **virtual devices**: ``conan-embed train-cbb CONFIG`` on one CPU or GPU steps through the
  ``W`` devices in one process and produces the same loss and gradients (checked to 1e-5 by
  ``tests/test_distributed.py`` against a 2-process gloo run).

How, on real devices (rank ``r``, world ``W``; task ``t`` on the ranks ``R_t``, ``|R_t| = N``):

1. Every rank of a retrieval task draws the same rows (the sampler is seeded by task and step)
   and asks the task's negative provider for ``N * n`` negatives per query; rank ``k`` of
   ``R_t`` encodes the queries, the positives and slice ``k`` of the negatives.
2. :func:`all_gather_with_grad` collects every rank's negatives; its backward sums the
   gradients all ranks send to a rank's own negatives. Each rank then computes the *same*
   ``L_t`` with the merged negatives.
3. Data-parallel tasks (STS, classification, pairs) give each of their ranks its own batch.
4. Each rank back-propagates ``W / N * w_t * L_t`` for its tasks, and gradients are averaged
   over all ``W`` ranks (what DDP does, done explicitly after backward because ranks run
   different tasks with different graphs). The sum over ``R_t`` of the local gradients is
   ``N * grad L_t`` (each of the ``N`` identical losses reaches every rank's negatives through
   the gather), so the average is exactly ``sum_t w_t * grad L_t``, with ``w_t = beta`` for
   STS tasks, 1 otherwise (times the task's ``weight``).

On virtual devices the retrieval term is computed GradCache-style (``cbb.grad_cache``, the
default), so peak memory stays that of one device's share: pass 1 encodes the queries, the positives and each device's negatives
without gradient (recording the RNG state so dropout can be replayed), the loss is
back-propagated to those embeddings only, and pass 2 re-encodes each chunk with gradient and
back-propagates the cached embedding gradients into the weights (gradient accumulation over the
virtual devices). Data-parallel tasks loop over their virtual devices and accumulate
``w_t / N * L``. With ``grad_cache: false`` every device's share is encoded with its graph in
one pass instead: the same loss and gradients for about a third less compute, when the
activations of all devices fit in memory (small models, CPU).

Each real rank writes its own log, checkpoints and model under ``output_dir`` (rank 0) or
``output_dir/rank-<r>`` (rank ``r > 0``): the weights are identical on all ranks, while the
sampler cursors and negative-provider state a rank checkpoints are its own, so ``--resume``
continues every rank exactly.
"""

from __future__ import annotations

import argparse
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
from conan_embedding.data.sampler import LabelIndex, TaskStream
from conan_embedding.losses.cbb import cbb_info_nce_loss, merge_rank_negatives
from conan_embedding.losses.infonce import info_nce_loss, own_negative_scores
from conan_embedding.losses.matryoshka import matryoshka_loss
from conan_embedding.mining.base import NegativeProvider
from conan_embedding.training.trainer import (
    Trainer,
    TrainingDivergedError,
    TrainResult,
    _stable_text_ids,
    encode_with_grad,
)

logger = logging.getLogger(__name__)

SHARED_KINDS = ("retrieval",)
"""Task kinds whose devices share queries/positives and pool negatives (the CBB part)."""


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
            ranks = {name: tuple(config.cbb.task_ranks[name]) for name in kinds}
        elif world == 1:
            ranks = {name: (0,) for name in kinds}
        else:
            shared = tuple(range(world - 1))
            ranks = {
                name: shared if kind in SHARED_KINDS else (world - 1,)
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


# --------------------------------------------------------------------------- collectives
class _AllGatherWithGrad(torch.autograd.Function):
    """``all_gather`` whose backward sends each rank the sum of the gradients of its slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, tensor, group=group)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        # gloo has no reduce_scatter: all-reduce the stacked gradients, keep our own slice
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=ctx.group)
        return stacked[dist.get_rank(ctx.group)], None


def all_gather_with_grad(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """The tensors of every rank of ``group``, in rank order, differentiable w.r.t. our own."""
    if dist.get_world_size(group) == 1:
        return [tensor]
    return list(_AllGatherWithGrad.apply(tensor, group))


def average_gradients(model: torch.nn.Module, world_size: int) -> None:
    """Average the gradients of every trainable parameter over all ranks (one all-reduce)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # a rank whose tasks never reached this parameter
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def broadcast_model(model: torch.nn.Module) -> None:
    """Make every rank start from rank 0's weights (as DDP does on construction)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


class _RngReplay:
    """Captures the RNG state before an encode so a re-encode draws the same dropout masks."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state(device)
            if device.type == "cuda" and torch.cuda.is_available()
            else None
        )
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


# --------------------------------------------------------------------------- the trainer
def _alias(task: str, position: int) -> str:
    """Name of the sampler of device ``position`` of a data-parallel task (0 = the task)."""
    return task if position == 0 else f"{task}#dev{position}"


class CBBTrainer(Trainer):
    """:class:`~conan_embedding.training.trainer.Trainer` whose steps follow cross-GPU batch balance.

    ``distributed=False`` runs every device of ``config.cbb`` in this process (virtual
    devices); ``distributed=True`` runs this process's rank of an initialised
    ``torch.distributed`` group of ``cbb.world_size`` processes.
    """

    def __init__(
        self,
        config: TrainConfig,
        model: SentenceTransformer | None = None,
        negative_providers: dict[str, NegativeProvider] | None = None,
        on_step: Any = None,
        *,
        distributed: bool = False,
    ):
        self.layout = RankLayout.from_config(config)
        self.distributed = distributed
        self.rank: int | None = None
        if distributed:
            if not dist.is_initialized():
                raise RuntimeError("distributed=True needs torch.distributed.init_process_group()")
            if dist.get_world_size() != self.layout.world_size:
                raise ValueError(
                    f"cbb.world_size is {self.layout.world_size} but {dist.get_world_size()} "
                    "processes were started (torchrun --nproc_per_node must match)"
                )
            self.rank = dist.get_rank()
            if self.rank > 0:
                out = str(Path(config.output_dir) / f"rank-{self.rank}")
                config = config.model_copy(update={"output_dir": out})
        super().__init__(config, model, negative_providers, on_step)
        self.tasks = {t.name: t for t in config.tasks}
        # data-parallel tasks: one sampler per device, registered under an alias name so the
        # base class's per-kind losses (and checkpoints) use it unchanged
        for task in config.tasks:
            if task.kind in SHARED_KINDS:
                continue
            for position in range(1, len(self.layout.task_ranks[task.name])):
                alias = _alias(task.name, position)
                self.records[alias] = self.records[task.name]
                self.streams[alias] = TaskStream(alias, len(self.records[task.name]), config.seed)
                if task.kind == "classification":
                    self.label_index[alias] = LabelIndex(self.records[task.name])
        self.groups: dict[str, Any] = {}
        if distributed:
            # new_group must be called by every rank, in the same order
            for task in config.tasks:
                group = dist.new_group(list(self.layout.task_ranks[task.name]))
                self.groups[task.name] = group
            broadcast_model(self.model)
        logger.info(
            "CBB on %s %d device(s): %s",
            "real" if distributed else "virtual",
            self.layout.world_size,
            self.layout.describe(),
        )

    # ------------------------------------------------------------------ setup
    def _default_provider(self, task: TaskConfig) -> NegativeProvider:
        # each of the task's N devices takes its own n of the N * n negatives per query
        shared = len(self.layout.task_ranks[task.name])
        return super()._default_provider(
            task.model_copy(update={"negatives": task.negatives * shared})
        )

    def task_weight(self, task: TaskConfig) -> float:
        """``w_t``: the task's weight, times ``beta`` for STS (``L = InfoNCE + beta * CoSENT``)."""
        assert self.config.cbb is not None
        return task.weight * (self.config.cbb.beta if task.kind == "sts" else 1.0)

    # ------------------------------------------------------------------ one step
    def _accumulate_step(self, step: int, record: dict[str, Any]) -> float:
        """Back-propagate ``sum_t w_t L_t`` (averaged over real ranks); returns its value."""
        names = [t.name for t in self.config.tasks]
        local = torch.zeros(len(names), dtype=torch.float64)
        for index, name in enumerate(names):
            task = self.tasks[name]
            devices = self.layout.task_ranks[name]
            positions = (
                range(len(devices))
                if self.rank is None
                else ([self.layout.position(name, self.rank)] if self.rank in devices else [])
            )
            if not positions:
                continue
            if task.kind in SHARED_KINDS:
                if self.rank is None:
                    value, stats = self._virtual_shared_step(task, step)
                else:
                    value, stats = self._rank_shared_step(task, step, positions[0])
                local[index] += value / (1 if self.rank is None else len(devices))
            else:
                stats = {}
                for position in positions:
                    value, task_stats = self._data_parallel_step(task, step, position)
                    local[index] += value / len(devices)
                    stats.update(task_stats)
            record.update({k: round(v, 6) for k, v in stats.items()})
        if self.rank is not None:
            average_gradients(self.model, self.layout.world_size)
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
        total = 0.0
        for index, name in enumerate(names):
            record[f"loss/{name}"] = round(float(local[index]), 6)
            total += self.task_weight(self.tasks[name]) * float(local[index])
        return total

    def _backward_scale(self, task: TaskConfig) -> float:
        """Factor on the local loss so that the average over ranks is ``w_t * grad L_t``."""
        n_devices = len(self.layout.task_ranks[task.name])
        if self.rank is None:  # one process: accumulate w_t * (mean over virtual devices)
            return self.task_weight(task) / (1 if task.kind in SHARED_KINDS else n_devices)
        return self.task_weight(task) * self.layout.world_size / n_devices

    def _check_finite(self, task: TaskConfig, loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"loss of task '{task.name}' is {loss.item()} at step {step + 1}; "
                "lower optim.lr or check the data (see train.log)"
            )

    def _data_parallel_step(
        self, task: TaskConfig, step: int, position: int
    ) -> tuple[float, dict[str, float]]:
        device_task = task.model_copy(update={"name": _alias(task.name, position)})
        loss, stats = self._loss(device_task, step)
        self._check_finite(task, loss, step)
        (self._backward_scale(task) * loss).backward()
        return loss.item(), stats

    def _shared_batch(
        self, task: TaskConfig, step: int
    ) -> tuple[list[int], list[str], list[str], list[list[str]], int]:
        """Rows, queries, positives and the ``N * n`` negatives per query every device shares."""
        records = self.records[task.name]
        rows = self.streams[task.name].next_indices(task.batch_size)
        rng = np.random.default_rng([self.config.seed, step, len(task.name)])
        batch = [records[i] for i in rows]
        positives = [r.pos[int(rng.integers(len(r.pos)))] for r in batch]
        negatives = self.providers[task.name].negatives(rows)
        wanted = task.negatives * len(self.layout.task_ranks[task.name])
        got = {len(n) for n in negatives}
        if got != {wanted} and not (wanted == 0 and got <= {0}):
            raise ValueError(
                f"task '{task.name}': the negative provider returned {sorted(got)} negatives per "
                f"query, CBB needs negatives x devices = {wanted}"
            )
        return rows, [r.query for r in batch], positives, negatives, task.negatives

    def _shared_loss_fn(self, task: TaskConfig, positives: list[str], negatives: list[list[str]]):
        n_total = len(negatives[0]) if negatives else 0
        flat = [t for negs in negatives for t in negs]
        ids = _stable_text_ids(positives + flat)
        groups = ids[: len(positives)]
        neg_groups = ids[len(positives) :].reshape(len(positives), n_total) if n_total else None
        tau = self.config.temperature

        def loss_fn(q: torch.Tensor, p: torch.Tensor, *per_rank: torch.Tensor) -> torch.Tensor:
            if not n_total:
                return info_nce_loss(q, p, None, temperature=tau, in_batch=task.in_batch_negatives)
            return cbb_info_nce_loss(
                q,
                p,
                per_rank,
                temperature=tau,
                in_batch=task.in_batch_negatives,
                groups=groups,
                negative_groups=neg_groups,
            )

        dims = self.config.model.matryoshka_dims
        weights = self.config.model.matryoshka_weights
        return lambda embeddings: matryoshka_loss(loss_fn, embeddings, dims, weights)

    def _observe(self, task: TaskConfig, step: int, rows, q, per_rank) -> dict[str, float]:
        if not per_rank:
            return {}
        scores = own_negative_scores(
            q.detach(), merge_rank_negatives([n.detach() for n in per_rank])
        )
        self.providers[task.name].observe(step, rows, scores)
        return {f"{task.name}/neg_score": float(scores.mean())}

    def _rank_shared_step(
        self, task: TaskConfig, step: int, position: int
    ) -> tuple[float, dict[str, float]]:
        """This rank's share of a retrieval task: own negatives, everyone's in the loss."""
        rows, queries, positives, negatives, n = self._shared_batch(task, step)
        mine = [t for negs in negatives for t in negs[position * n : (position + 1) * n]]
        q = encode_with_grad(self.model, queries, self.query_prompt)
        p = encode_with_grad(self.model, positives, self.passage_prompt)
        per_rank: list[torch.Tensor] = []
        if n:
            own = encode_with_grad(self.model, mine, self.passage_prompt)
            own = own.reshape(len(rows), n, -1)
            per_rank = all_gather_with_grad(own, self.groups[task.name])
        loss = self._shared_loss_fn(task, positives, negatives)([q, p, *per_rank])
        self._check_finite(task, loss, step)
        (self._backward_scale(task) * loss).backward()
        return loss.item(), self._observe(task, step, rows, q, per_rank)

    def _virtual_shared_step(self, task: TaskConfig, step: int) -> tuple[float, dict[str, float]]:
        """All devices of a retrieval task in one process, GradCache-style (two passes)."""
        rows, queries, positives, negatives, n = self._shared_batch(task, step)
        chunks: list[tuple[list[str], str | None]] = [
            (queries, self.query_prompt),
            (positives, self.passage_prompt),
        ]
        for position in range(len(self.layout.task_ranks[task.name]) if n else 0):
            share = [t for negs in negatives for t in negs[position * n : (position + 1) * n]]
            chunks.append((share, self.passage_prompt))
        if not self.config.cbb.grad_cache:  # one pass: every device's activations at once
            direct = [encode_with_grad(self.model, texts, prompt) for texts, prompt in chunks]
            embeddings = direct[:2] + [e.reshape(len(rows), n, -1) for e in direct[2:]]
            loss = self._shared_loss_fn(task, positives, negatives)(embeddings)
            self._check_finite(task, loss, step)
            (self._backward_scale(task) * loss).backward()
            return loss.item(), self._observe(task, step, rows, embeddings[0], embeddings[2:])
        # pass 1: embeddings without a graph, remembering the RNG for each chunk
        replays, cached = [], []
        for texts, prompt in chunks:
            replays.append(_RngReplay(self.model.device))
            with torch.no_grad():
                cached.append(encode_with_grad(self.model, texts, prompt))
        leaves = [e.detach().requires_grad_(True) for e in cached]
        embeddings = leaves[:2] + [e.reshape(len(rows), n, -1) for e in leaves[2:]]
        loss = self._shared_loss_fn(task, positives, negatives)(embeddings)
        self._check_finite(task, loss, step)
        (self._backward_scale(task) * loss).backward()
        # pass 2: each device's chunk again with a graph; accumulate its share into the weights
        after = _RngReplay(self.model.device)
        for (texts, prompt), replay, leaf in zip(chunks, replays, leaves, strict=True):
            replay.restore()
            encode_with_grad(self.model, texts, prompt).backward(leaf.grad)
        after.restore()
        return loss.item(), self._observe(task, step, rows, embeddings[0], embeddings[2:])


# --------------------------------------------------------------------------- entry points
def init_from_env() -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` etc.); False if not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "LOCAL_RANK" not in os.environ:
        return False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def run_cbb(
    config_path: str | os.PathLike[str],
    *,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> TrainResult:
    """Train with CBB: real devices under torchrun, virtual devices otherwise."""
    from conan_embedding.config import load_config

    config = load_config(config_path, {k: v for k, v in (overrides or {}).items() if v is not None})
    if config.cbb is None:
        raise ValueError(f"{config_path}: no 'cbb' section (see configs/cbb-demo.yaml)")
    distributed = init_from_env()
    try:
        trainer = CBBTrainer(config, distributed=distributed)
        rank = trainer.rank or 0
        return trainer.train(resume=resume, show_progress=show_progress and rank == 0)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m conan_embedding.training.distributed",
        description="CBB training; run under torchrun for real devices, alone for virtual ones.",
    )
    parser.add_argument("config", help="YAML training config with a 'cbb' section")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = run_cbb(
        args.config,
        overrides={"output_dir": args.output_dir, "optim.max_steps": args.max_steps},
        resume=args.resume,
        show_progress=not args.no_progress,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final loss {result.final_loss:.6f} after {result.steps} steps")
        print(f"model saved to {result.model_dir}")


if __name__ == "__main__":
    main()
