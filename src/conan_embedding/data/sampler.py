"""Task-homogeneous batches with per-task batch sizes, reproducible from (seed, step).

Conan trains every batch on one task (retrieval batches of 4, STS batches of 32 in the
paper), because mixing tasks in one InfoNCE denominator would turn an STS sentence into a
false retrieval negative. Each task is a :class:`TaskStream` that walks a seeded permutation
of its rows epoch by epoch; its whole state is two integers, so a resumed run draws exactly
the batches an uninterrupted run would. :class:`TaskSchedule` decides which task(s) a step
trains on.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from conan_embedding.data.records import ClassificationRecord, Record

ScheduleKind = Literal["round_robin", "random_task", "proportional", "all_tasks"]


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


@dataclass
class TaskStream:
    """Draws batches of row indices from one task, one seeded permutation per epoch."""

    name: str
    size: int
    seed: int
    epoch: int = 0
    cursor: int = 0
    _order: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"task '{self.name}' has no rows")

    def _permutation(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, _stable_hash(self.name), self.epoch])
            self._order = rng.permutation(self.size)
        return self._order

    def next_indices(self, batch_size: int) -> list[int]:
        """The next ``batch_size`` distinct rows (fewer only if the task is smaller)."""
        batch_size = min(batch_size, self.size)
        out: list[int] = []
        while len(out) < batch_size:
            order = self._permutation()
            take = order[self.cursor : self.cursor + batch_size - len(out)].tolist()
            out.extend(i for i in take if i not in out)
            self.cursor += len(take)
            if self.cursor >= self.size:
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None


class TaskSchedule:
    """Which tasks a step trains on.

    - ``round_robin``: task ``step mod T`` (every task equally often);
    - ``random_task``: one task drawn uniformly each step (what Conan's CBB replaced);
    - ``proportional``: one task drawn with probability proportional to ``weight * rows``;
    - ``all_tasks``: every task at every step (losses summed before one optimizer step).
    """

    def __init__(
        self,
        kind: ScheduleKind,
        names: Sequence[str],
        sizes: Sequence[int],
        weights: Sequence[float],
        seed: int,
    ):
        self.kind, self.names, self.seed = kind, list(names), seed
        mass = np.asarray(weights, dtype=float) * np.asarray(sizes, dtype=float)
        self.probabilities = mass / mass.sum()

    def tasks_for_step(self, step: int) -> list[str]:
        if self.kind == "all_tasks":
            return list(self.names)
        if self.kind == "round_robin":
            return [self.names[step % len(self.names)]]
        rng = np.random.default_rng([self.seed, step])
        if self.kind == "random_task":
            return [self.names[int(rng.integers(len(self.names)))]]
        return [self.names[int(rng.choice(len(self.names), p=self.probabilities))]]


class LabelIndex:
    """Classification-as-retrieval: same-label positives and other-label negatives."""

    def __init__(self, records: Sequence[ClassificationRecord]):
        # one pass (a lazy dataset parses each row once): ids in order of first appearance,
        # then renumbered so that label ids follow the sorted label names
        seen: dict[str, int] = {}
        first = np.fromiter(
            (seen.setdefault(r.label, len(seen)) for r in records), np.int64, count=len(records)
        )
        self.labels = sorted(seen)
        self.label_id = {label: i for i, label in enumerate(self.labels)}
        renumber = np.array([self.label_id[label] for label in seen], dtype=np.int64)
        self.ids = renumber[first] if len(first) else first
        self.rows_of = {i: np.flatnonzero(self.ids == i) for i in range(len(self.labels))}
        if len(self.labels) < 2:
            raise ValueError("classification needs at least two labels")

    def positive(self, row: int, rng: np.random.Generator) -> int:
        same = self.rows_of[int(self.ids[row])]
        if len(same) == 1:
            return row
        while True:
            pick = int(same[rng.integers(len(same))])
            if pick != row:
                return pick

    def negatives(self, row: int, n: int, rng: np.random.Generator) -> list[int]:
        own = int(self.ids[row])
        others = [i for i in range(len(self.labels)) if i != own]
        labels = rng.choice(others, size=n, replace=len(others) < n)
        return [
            int(self.rows_of[int(lab)][rng.integers(len(self.rows_of[int(lab)]))]) for lab in labels
        ]


def cap_indices(total: int, max_rows: int | None, seed: int, name: str) -> np.ndarray:
    """Positions of a seeded subset of at most ``max_rows`` of ``total`` rows, in file order
    (int64; an array, not a list, since ``total`` may be tens of millions of rows)."""
    if max_rows is None or max_rows >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng([seed, _stable_hash(name), 7])
    return np.sort(rng.choice(total, size=max_rows, replace=False)).astype(np.int64)


def cap_rows(records: Sequence[Record], max_rows: int | None, seed: int, name: str) -> list[Record]:
    """A seeded subset of at most ``max_rows`` rows (all rows when ``max_rows`` is None)."""
    return [records[i] for i in cap_indices(len(records), max_rows, seed, name)]
