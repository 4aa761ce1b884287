"""Each task's rows for an embedding stage: the file opened, capped, held out, checked and
teacher-filtered, and the negative providers of the tasks given none.

Why here rather than in the trainer: what a task trains on is decided once, before the first
step, and the same way on every rank (every rank draws the *global* batch by index, so every
rank holds the same rows); the step program only reads the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from conan_embedding.config import TaskConfig, TrainConfig
from conan_embedding.data.builders.filter import keep_by_teacher
from conan_embedding.data.records import Record, RecordDataset, open_records
from conan_embedding.data.sampler import cap_indices
from conan_embedding.mining.base import NegativeProvider, StaticNegatives
from conan_embedding.training.collectives import all_gather_arrays
from conan_embedding.training.sharding import whole_weights
from conan_embedding.training.task_kinds import task_kind
from conan_embedding.training.validation import split_heldout

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from conan_embedding.training.engine import Engine
    from conan_embedding.training.prompts import Prompts

logger = logging.getLogger(__name__)

OpenRecords = Callable[[TaskConfig], Sequence[Record]]


def open_task_records(task: TaskConfig) -> Sequence[Record]:
    """The task file as a lazy :class:`~conan_embedding.data.records.RecordDataset`.

    Why lazy: a weak-stage file has millions of pairs, and holding them all as pydantic
    objects costs gigabytes per process (every rank holds the whole file, since every
    rank draws the *global* batch by index). The byte-offset index gives each rank random
    access for 12 bytes a row; a row is validated when it is read, so a malformed row
    raises ``file:line: field`` when a batch (or a full pass in :meth:`TaskData.load_task`)
    reaches it. A dataset input (``data/hf_sources.py``) is the same lazy view over
    memory-mapped Arrow.
    """
    return open_records(task.path, task.kind, columns=task.columns, split=task.split)


def take(records: Sequence[Record], positions: np.ndarray) -> Sequence[Record]:
    """The rows at ``positions``: a view of a lazy dataset (nothing read), a list otherwise."""
    if isinstance(records, RecordDataset):
        return records.select(positions)
    return [records[int(i)] for i in positions]


class TaskData:
    """Every task's rows of one run, loaded at construction (``records``).

    ``open_records`` opens a task's file (default :func:`open_task_records`; the trainer
    passes its overridable ``_open_records``; it is not kept); ``engine`` gives the rank, the
    world and the device the teacher filter scores on.
    """

    def __init__(
        self, config: TrainConfig, engine: Engine, open_records: OpenRecords = open_task_records
    ) -> None:
        self.config = config
        self.engine = engine
        self.source_rows: dict[str, np.ndarray | None] = {}
        """Per task, the file positions of the rows kept (None once a filter dropped some)."""
        self.heldout_records: dict[str, Sequence[Record]] = {}
        """Per task, the rows ``validation.heldout`` keeps out of training."""
        self.filter_report: dict[str, Any] | None = None
        """The teacher filter's last task: its name, rows kept and rows read."""
        self._teacher: SentenceTransformer | None = None
        self.records = {t.name: self.load_task(t, open_records) for t in config.tasks}
        self._teacher = None  # the filter's model is freed once every task is loaded

    def load_task(
        self, task: TaskConfig, open_records: OpenRecords = open_task_records
    ) -> Sequence[Record]:
        """The rows ``task`` trains on (its ``source_rows`` and held-out rows as it goes)."""
        records = open_records(task)
        rows = cap_indices(len(records), task.max_rows, self.config.seed, task.name)
        if len(rows) < len(records):
            records = take(records, rows)
        self.source_rows[task.name] = rows
        if task.name in self.config.heldout_tasks():
            records = self.hold_out(task, records)
        mined = task_kind(task.kind).mined_negatives
        if mined and task.negatives and task.dynamic_negatives.rule == "none":
            # one streaming pass (it validates every row before the first step, too)
            short = [i for i, r in enumerate(records) if not r.neg]
            if short:
                raise ValueError(
                    f"{task.path}: task '{task.name}' wants {task.negatives} negatives but "
                    f"{len(short)} rows have none (first: row {short[0] + 1})"
                )
        if self.config.teacher_filter is not None:
            records = self.teacher_filter(task, records)
            self.source_rows[task.name] = None
        if not len(records):
            raise ValueError(f"task '{task.name}' has no rows left ({task.path})")
        return records

    def hold_out(self, task: TaskConfig, records: Sequence[Record]) -> Sequence[Record]:
        """Keep ``validation.heldout``'s slice of the task out of training (the rows trained
        on, the stream's indices and the negative pools all see only the rest)."""
        heldout = self.config.validation.heldout  # type: ignore[union-attr]
        assert heldout is not None
        train, held = split_heldout(
            len(records), heldout, self.config.seed, task.name, task.batch_size
        )
        self.heldout_records[task.name] = take(records, held)
        rows = self.source_rows[task.name]
        self.source_rows[task.name] = None if rows is None else rows[train]
        return take(records, train)

    def teacher_filter(self, task: TaskConfig, records: Sequence[Record]) -> Sequence[Record]:
        """Keep the pairs the teacher scores at ``threshold`` or above (each rank scores its
        share, see :func:`~conan_embedding.data.builders.filter.keep_by_teacher`)."""
        tf = self.config.teacher_filter
        assert tf is not None
        engine = self.engine
        kept = take(
            records,
            keep_by_teacher(
                records,  # type: ignore[arg-type]
                self.teacher_model,
                tf.threshold,
                batch_size=tf.batch_size,
                rank=engine.rank,
                world=engine.world_size,
                gather=all_gather_arrays if engine.distributed else None,
            ),
        )
        logger.info(
            "teacher filter on '%s': kept %d of %d pairs (threshold %.2f)",
            task.name,
            len(kept),
            len(records),
            tf.threshold,
        )
        self.filter_report = {"task": task.name, "kept": len(kept), "total": len(records)}
        return kept

    def teacher_model(self) -> SentenceTransformer:
        """The teacher filter's model, loaded once for all tasks with whole weights."""
        if self._teacher is None:
            from conan_embedding.modeling.embedder import load_embedder

            assert self.config.teacher_filter is not None
            with whole_weights(self.engine.accelerator):
                self._teacher = load_embedder(
                    self.config.teacher_filter.model, device=str(self.engine.device)
                )
        return self._teacher

    def providers(
        self,
        given: Mapping[str, NegativeProvider],
        model: SentenceTransformer,
        prompts: Prompts,
        negatives_per_query: Callable[[TaskConfig], int] | None = None,
    ) -> dict[str, NegativeProvider]:
        """``given``, plus a default provider for every task of a kind with mined negatives
        that has none: static file negatives, or DHNM (``dynamic_negatives``) on the task's
        rows. ``negatives_per_query`` (a device layout's) replaces ``task.negatives``."""
        out = dict(given)
        trained_with = None  # the pool's scores count as S_0 if they match
        for task in self.config.tasks:
            if not task_kind(task.kind).mined_negatives or task.name in out:
                continue
            if negatives_per_query is not None:
                task = task.model_copy(update={"negatives": negatives_per_query(task)})
            records = self.records[task.name]
            if task.dynamic_negatives.rule == "none":
                out[task.name] = StaticNegatives(records, task.negatives)
                continue
            from conan_embedding.mining.dynamic import build_dynamic_negatives
            from conan_embedding.mining.offline import PoolMeta

            if trained_with is None:
                trained_with = PoolMeta.of(model, prompts.query, prompts.passage)
            out[task.name] = build_dynamic_negatives(
                records,
                task.negatives,
                task.dynamic_negatives,
                task.path,
                rows=self.source_rows.get(task.name),
                trained_with=trained_with,
                last_step=self.config.optim.max_steps,
            )
        return out
