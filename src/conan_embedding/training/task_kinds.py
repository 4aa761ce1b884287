"""The task-kind registry: for each kind of training task, its record type, how it draws texts
from rows, how it computes its loss from embeddings, how CBB lays it out, and its words for
the model card.

Why: the trainer, CBB (:mod:`conan_embedding.training.cbb`), the model card and the ablation
counters (:mod:`conan_embedding.training.logs`) all ask "what does a task of this kind do";
they ask :func:`task_kind` instead of branching on kind strings, so a new kind is a
:class:`TaskKindSpec` here, its value of the :data:`~conan_embedding.config.train.TaskKind`
Literal and its record schema (``data/records.py``).

A kind's :meth:`TaskKindSpec.loss` gets a :class:`LossContext` from the step program that runs
it: the rows, the settings (temperature, Matryoshka dims, the query offset of this rank's
queries among the gathered candidates) and the program's ways to encode, gather and observe.
The plain trainer encodes this rank's shards and gathers from every rank; CBB gives each
device's batch its own seeds and gathers nothing. Task options reach the kind through
``context.task`` (any :class:`~conan_embedding.config.TaskConfig` field, such as a margin)
and ``context.options`` (what a step program adds).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch

from conan_embedding.config import TaskConfig
from conan_embedding.config.train import TaskKind
from conan_embedding.data.records import (
    RECORD_TYPES,
    ClassificationRecord,
    PairRecord,
    Record,
    RetrievalRecord,
    STSRecord,
)
from conan_embedding.data.sampler import LabelIndex
from conan_embedding.losses.cbb import cbb_info_nce_loss_with_count
from conan_embedding.losses.infonce import info_nce_loss_with_count, own_negative_scores
from conan_embedding.losses.matryoshka import matryoshka_loss
from conan_embedding.losses.registry import LossSpec, loss_spec
from conan_embedding.mining.base import NegativeProvider
from conan_embedding.training.collectives import all_gather_no_grad

__all__ = [
    "ENCODE_DOCUMENTS",
    "ENCODE_QUERIES",
    "TASK_KINDS",
    "LossContext",
    "TaskKindSpec",
    "stable_text_ids",
    "task_kind",
]

ENCODE_QUERIES, ENCODE_DOCUMENTS = 0, 1
"""The role of an encode (its dropout seed): the queries / first sentences, or the rest."""

Encode = Callable[[int, Callable[[slice], list[str]], "str | None"], torch.Tensor]
"""``encode(role, texts_of, prompt)``: the embeddings, with gradient, of this process's part
of the batch; ``texts_of(part)`` gives the texts of the rows in the slice ``part``."""

LossFn = Callable[[list[torch.Tensor]], torch.Tensor]


def stable_text_ids(texts: Sequence[str]) -> torch.Tensor:
    """Equal texts get equal ids, so a duplicate of a positive is never used as its negative."""
    table: dict[str, int] = {}
    return torch.tensor([table.setdefault(t, len(table)) for t in texts])


@dataclass
class LossContext:
    """What a kind's loss needs from the step program running it, for one task's batch."""

    task: TaskConfig
    step: int
    rows: Sequence[int]
    records: Sequence[Record]
    rng: np.random.Generator
    """Draws within rows (which positive of a retrieval row, which same-label text)."""
    temperature: float
    dims: Sequence[int]
    weights: Sequence[float] | None
    query_offset: int
    """Index of this process's first query among the gathered candidates."""
    query_prompt: str | None
    passage_prompt: str | None
    encode: Encode
    gather: Callable[[torch.Tensor], torch.Tensor]
    """Every process's rows of an embedding, with gradient, in batch order."""
    gather_documents: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None]]
    """``(local, n)``: the gathered positives ``[B, d]`` and negatives ``[B, n, d]`` of an
    encode laid out per shard as [positives, n negatives each]."""
    gather_no_grad: Callable[[torch.Tensor], list[torch.Tensor]] = all_gather_no_grad
    """Every process's copy of a tensor, without gradient (counts and DHNM's scores); a step
    program whose devices each hold their own batch (CBB) returns ``[local]``, since its
    devices do not all run the task and a collective over all of them would hang."""
    provider: NegativeProvider | None = None
    label_index: LabelIndex | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    """Extra loss options a step program passes (beyond the task's own config fields)."""
    stats: dict[str, float] = field(default_factory=dict)
    """What the loss reports for the log (``<task>/neg_score``)."""

    @property
    def size(self) -> int:
        return len(self.rows)

    def matryoshka(self, fn: Callable[..., torch.Tensor], embeddings: list[Any]) -> torch.Tensor:
        """``fn`` over ``embeddings``, summed over the Matryoshka dims (plain when none)."""
        return matryoshka_loss(fn, embeddings, list(self.dims), self.weights)


SideEncode = Callable[[list[str], Literal["query", "passage"]], torch.Tensor]
"""``encode(texts, side)``: embeddings of texts as queries or as passages (validation's)."""


class TaskKindSpec(ABC):
    """One task kind. Subclasses set the class attributes and implement :meth:`loss` and
    :meth:`describe`."""

    name: ClassVar[str]
    record_type: ClassVar[type]
    loss_name: ClassVar[str]
    mined_negatives: ClassVar[bool] = False
    """A negative provider serves its rows' hard negatives (static or DHNM)."""
    labelled: ClassVar[bool] = False
    """Needs a :class:`~conan_embedding.data.sampler.LabelIndex` of its rows."""
    shares_devices: ClassVar[bool] = False
    """Under CBB its devices share queries and positives and pool their negatives
    (:meth:`pooled_loss`); otherwise each device draws its own batch (data parallel)."""
    weighted_by_beta: ClassVar[bool] = False
    """Under CBB its weight is multiplied by ``cbb.beta`` (``L = InfoNCE + beta * CoSENT``)."""
    cbb_device_seeds: ClassVar[bool] = False
    """Under CBB each device's encodes are seeded ``(step, task, group, device, role)``, the
    CBB step's own layout (STS, as CBB has always run it: recorded runs stay reproducible);
    otherwise the trainer's shard seeds with ``(group, device)`` appended."""
    symmetric: ClassVar[bool] = False
    """Both texts are the query side (a task's instruction and ``model.query_max_length``
    apply to both, the e5-mistral rule for symmetric tasks); else the second is a passage."""

    @property
    def loss_spec(self) -> LossSpec:
        return loss_spec(self.loss_name)

    def side(self, role: int) -> Literal["query", "passage"]:
        """The side an encode of ``role`` is on (its prompt and token limit:
        :meth:`~conan_embedding.training.prompts.Prompts.of_role`): the queries, and every
        text of a :attr:`symmetric` kind, are the query side; the rest the passage side."""
        return "query" if role == ENCODE_QUERIES or self.symmetric else "passage"

    def texts(self, batch: Sequence[Any], rng: np.random.Generator) -> tuple[list[str], list[str]]:
        """The queries and positives of ``batch`` (kinds of query-document pairs)."""
        raise TypeError(f"task kind {self.name!r} has no query-document pairs")

    @abstractmethod
    def loss(self, context: LossContext) -> torch.Tensor:
        """This process's part of the loss of ``context.rows``."""

    @abstractmethod
    def describe(self, task: Any, temperature: float, cbb: bool, beta: float) -> str:
        """The loss a task of this kind trains with, in words (the model card's column)."""

    def heldout_loss(
        self, task: TaskConfig, batch: Sequence[Any], encode: SideEncode, temperature: float
    ) -> torch.Tensor:
        """The task's loss on held-out rows, without gradient or randomness (validation):
        ``encode(texts, side)`` embeds texts as the ``query`` or ``passage`` side."""
        raise TypeError(f"a {self.name!r} task has no held-out loss")

    def pooled_loss(
        self,
        task: TaskConfig,
        positives: list[str],
        negatives: list[list[str]],
        *,
        temperature: float,
        in_batch: bool,
        dims: Sequence[int],
        weights: Sequence[float] | None,
        stats: dict[str, float] | None = None,
    ) -> LossFn:
        """CBB: the loss of ``[q, p, *per_device_negatives]`` (kinds with ``shares_devices``)
        for ``task``'s group batch, with the task's loss options; what it reports for the
        log (``masked_negatives/<task>``, for the group's batch) goes to ``stats``."""
        raise TypeError(f"task kind {self.name!r} does not pool devices under CBB")


def candidate_groups(
    positives: Sequence[str], negatives: Sequence[Sequence[str]], n_neg: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text ids of the positives ``[B]`` and of each row's first ``n_neg`` negatives
    ``[B, n_neg]`` (None without negatives): equal texts share an id, so InfoNCE never counts
    a copy of a row's positive as its negative."""
    ids = stable_text_ids(list(positives) + [t for negs in negatives for t in negs[:n_neg]])
    size = len(positives)
    return ids[:size], ids[size:].reshape(size, n_neg) if n_neg else None


def false_negative_options(task: Any) -> dict[str, Any]:
    """A task's false-negative control, as the InfoNCE losses take it (losses/infonce.py)."""
    return {
        "false_negative_margin": task.false_negative_margin,
        "query_negatives": task.query_negatives,
        "passage_negatives": task.passage_negatives,
    }


class _Retrieval(TaskKindSpec):
    """Query, one of its positives, mined hard negatives: InfoNCE."""

    name = "retrieval"
    record_type = RetrievalRecord
    loss_name = "infonce"
    mined_negatives = True
    shares_devices = True

    def texts(self, batch: Sequence[Any], rng: np.random.Generator) -> tuple[list[str], list[str]]:
        """Queries and positives of the rows (one positive drawn per row)."""
        return [r.query for r in batch], [r.pos[int(rng.integers(len(r.pos)))] for r in batch]

    def loss(self, context: LossContext) -> torch.Tensor:
        c = context
        queries, positives = self.texts([c.records[i] for i in c.rows], c.rng)
        negatives = c.provider.negatives(c.rows) if c.provider is not None else []
        n_neg = len(negatives[0]) if negatives and negatives[0] else 0
        q = c.encode(ENCODE_QUERIES, lambda s: queries[s], c.query_prompt)

        def documents(part: slice) -> list[str]:
            return positives[part] + [t for negs in negatives[part] for t in negs[:n_neg]]

        p, n = c.gather_documents(c.encode(ENCODE_DOCUMENTS, documents, c.passage_prompt), n_neg)
        groups, neg_groups = candidate_groups(positives, negatives, n_neg)
        # the whole batch's queries, when they are each other's negatives (false-negative
        # control, losses/infonce.py)
        q_all = c.gather(q) if c.task.query_negatives else None
        masked: dict[int, torch.Tensor] = {}  # per Matryoshka width: denominator terms masked

        def loss_fn(
            qe: torch.Tensor,
            pe: torch.Tensor,
            ne: torch.Tensor | None = None,
            qa: torch.Tensor | None = None,
        ) -> torch.Tensor:
            value, masked[qe.shape[-1]] = info_nce_loss_with_count(
                qe,
                pe,
                ne,
                temperature=c.temperature,
                in_batch=c.task.in_batch_negatives,
                groups=groups,
                negative_groups=neg_groups,
                query_offset=c.query_offset,
                all_queries=qa,
                **false_negative_options(c.task),
            )
            return value

        loss = c.matryoshka(loss_fn, [q, p, n, q_all])
        if c.task.false_negative_margin is not None:  # whole batch, widest Matryoshka dim
            count = masked[max(masked)].reshape(1)
            c.stats[f"masked_negatives/{c.task.name}"] = int(
                torch.cat(c.gather_no_grad(count)).sum()
            )
        if n is not None and c.provider is not None:
            own = n[c.query_offset : c.query_offset + q.shape[0]]
            scores = own_negative_scores(q.detach(), own.detach())
            scores = torch.cat(c.gather_no_grad(scores)).cpu()
            queries_now = torch.cat(c.gather_no_grad(q.detach())).cpu()
            c.provider.observe(c.step, c.rows, scores, queries_now)
            c.stats[f"{c.task.name}/neg_score"] = float(scores.mean())
        return loss

    def heldout_positive(self, record: Any) -> str:
        return record.pos[0]

    def heldout_loss(
        self, task: TaskConfig, batch: Sequence[Any], encode: SideEncode, temperature: float
    ) -> torch.Tensor:
        positives = [self.heldout_positive(r) for r in batch]
        negatives = [r.neg for r in batch] if self.mined_negatives else []
        n_neg = min([task.negatives, *(len(negs) for negs in negatives)]) if negatives else 0
        q = encode([r.query for r in batch], "query")
        d = encode(positives + [t for negs in negatives for t in negs[:n_neg]], "passage")
        n = d[len(batch) :].reshape(len(batch), n_neg, -1) if n_neg else None
        groups, neg_groups = candidate_groups(positives, negatives, n_neg)
        value, _ = info_nce_loss_with_count(
            q,
            d[: len(batch)],
            n,
            temperature=temperature,
            in_batch=task.in_batch_negatives,
            groups=groups,
            negative_groups=neg_groups,
        )
        return value

    def describe(self, task: Any, temperature: float, cbb: bool, beta: float) -> str:
        parts = [f"{self.loss_spec.words} (τ = {temperature:g}"]
        if self.mined_negatives and task.negatives:
            plural = "s" if task.negatives != 1 else ""
            parts.append(
                f", {task.negatives} hard negative{plural}" + (" per device" if cbb else "")
            )
        if task.in_batch_negatives:
            parts.append(", in-batch negatives")
        return "".join(parts) + ")"

    def pooled_loss(
        self,
        task: TaskConfig,
        positives: list[str],
        negatives: list[list[str]],
        *,
        temperature: float,
        in_batch: bool,
        dims: Sequence[int],
        weights: Sequence[float] | None,
        stats: dict[str, float] | None = None,
    ) -> LossFn:
        n_total = len(negatives[0]) if negatives else 0
        groups, neg_groups = candidate_groups(positives, negatives, n_total)
        masked: dict[int, torch.Tensor] = {}  # per Matryoshka width: denominator terms masked

        def loss_fn(q: torch.Tensor, p: torch.Tensor, *per_rank: torch.Tensor) -> torch.Tensor:
            # the loss over the union of every device's candidates (losses/cbb.py), with the
            # false-negative options as the plain trainer passes them (loss above)
            value, masked[q.shape[-1]] = cbb_info_nce_loss_with_count(
                q,
                p,
                per_rank if n_total else [],
                temperature=temperature,
                in_batch=in_batch,
                groups=groups,
                negative_groups=neg_groups,
                **false_negative_options(task),
            )
            return value

        def loss_of(embeddings: list[torch.Tensor]) -> torch.Tensor:
            loss = matryoshka_loss(loss_fn, embeddings, list(dims), weights)
            if stats is not None and task.false_negative_margin is not None:
                # the group's whole batch at the widest width, as the plain trainer logs it
                stats[f"masked_negatives/{task.name}"] = int(masked[max(masked)])
            return loss

        return loss_of


class _Pairs(_Retrieval):
    """Weakly supervised (query, passage) pairs: InfoNCE on in-batch negatives."""

    name = "pairs"
    record_type = PairRecord
    mined_negatives = False
    shares_devices = False

    def texts(self, batch: Sequence[Any], rng: np.random.Generator) -> tuple[list[str], list[str]]:
        return [r.query for r in batch], [r.pos for r in batch]

    def heldout_positive(self, record: Any) -> str:
        return record.pos


class _STS(TaskKindSpec):
    """Sentence pairs with graded scores: CoSENT over every pair of the (gathered) batch."""

    name = "sts"
    record_type = STSRecord
    loss_name = "cosent"
    weighted_by_beta = True
    cbb_device_seeds = True
    symmetric = True

    def loss(self, context: LossContext) -> torch.Tensor:
        c = context
        batch = [c.records[i] for i in c.rows]
        first, second = [r.sentence1 for r in batch], [r.sentence2 for r in batch]
        a = c.gather(c.encode(ENCODE_QUERIES, lambda s: first[s], c.query_prompt))
        b = c.gather(c.encode(ENCODE_DOCUMENTS, lambda s: second[s], c.query_prompt))
        gold = torch.tensor([r.score for r in batch], dtype=torch.float32)
        if c.task.score_scale:
            gold = gold / c.task.score_scale
        function = self.loss_spec.function
        # every rank holds the whole batch's loss; DDP's mean over ranks keeps it as is
        return c.matryoshka(lambda x, y: function(x, y, gold, temperature=c.temperature), [a, b])

    def heldout_loss(
        self, task: TaskConfig, batch: Sequence[Any], encode: SideEncode, temperature: float
    ) -> torch.Tensor:
        a = encode([r.sentence1 for r in batch], "query")  # symmetric: both texts as queries
        b = encode([r.sentence2 for r in batch], "query")
        gold = torch.tensor([r.score for r in batch], dtype=torch.float32)
        return self.loss_spec.function(a, b, gold, temperature=temperature)

    def describe(self, task: Any, temperature: float, cbb: bool, beta: float) -> str:
        words = f"{self.loss_spec.words} (τ = {temperature:g})"
        return words + (f", weight β = {beta:g}" if cbb else "")


class _Classification(TaskKindSpec):
    """Labelled texts cast as retrieval: a same-label text is the positive, other labels'
    texts the negatives."""

    name = "classification"
    record_type = ClassificationRecord
    loss_name = "classification"
    labelled = True
    symmetric = True

    def loss(self, context: LossContext) -> torch.Tensor:
        c, rows, records = context, context.rows, context.records
        index = c.label_index
        assert index is not None, "a classification task needs its label index"
        positives = [index.positive(i, c.rng) for i in rows]
        n_neg = c.task.negatives
        negatives = [index.negatives(i, n_neg, c.rng) for i in rows] if n_neg else []
        n_neg = n_neg if negatives else 0
        texts = [records[i].text for i in rows]
        q = c.encode(ENCODE_QUERIES, lambda s: texts[s], c.query_prompt)

        def others(part: slice) -> list[str]:
            return [records[i].text for i in positives[part]] + [
                records[j].text for negs in negatives[part] for j in negs
            ]

        p, n = c.gather_documents(c.encode(ENCODE_DOCUMENTS, others, c.query_prompt), n_neg)
        labels = torch.as_tensor(index.ids[rows])
        neg_labels = torch.as_tensor(index.ids[np.asarray(negatives)]) if negatives else None
        function = self.loss_spec.function
        return c.matryoshka(
            lambda qe, pe, ne=None: function(
                qe,
                pe,
                ne,
                labels,
                neg_labels,
                temperature=c.temperature,
                query_offset=c.query_offset,
            ),
            [q, p, n],
        )

    def describe(self, task: Any, temperature: float, cbb: bool, beta: float) -> str:
        extra = f", {task.negatives} other-label texts" if task.negatives else ""
        return f"{self.loss_spec.words} (InfoNCE, τ = {temperature:g}{extra})"


TASK_KINDS: dict[str, TaskKindSpec] = {
    kind.name: kind for kind in (_Retrieval(), _STS(), _Classification(), _Pairs())
}
if set(TASK_KINDS) != set(get_args(TaskKind)) or any(
    RECORD_TYPES.get(name) is not kind.record_type for name, kind in TASK_KINDS.items()
):
    raise ImportError(
        "training/task_kinds.py::TASK_KINDS, config/train.py::TaskKind and "
        "data/records.py::RECORD_TYPES must name the same kinds and record types"
    )


def task_kind(name: str) -> TaskKindSpec:
    """The spec of a task kind (a :class:`~conan_embedding.config.TaskConfig`'s ``kind``)."""
    if name not in TASK_KINDS:
        raise ValueError(f"unknown task kind {name!r}; expected one of {sorted(TASK_KINDS)}")
    return TASK_KINDS[name]
