"""The contract between the trainer and whoever decides a sample's hard negatives.

The trainer never reads ``record.neg`` itself: it asks a :class:`NegativeProvider` for the
current negatives of the samples in a batch, and reports back the cosine scores the loss
already computed. :class:`StaticNegatives` is the plain recipe (a record's own first ``n``
negatives, forever); ``mining.dynamic`` implements Conan's dynamic hard negative mining on
the same contract, so the trainer does not know which one it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from conan_embedding.data.records import RetrievalRecord

EncodeFn = Callable[..., torch.Tensor]
"""``encode(texts)`` or ``encode(texts, role=...)``: the current model's L2-normalised rows,
no grad. A hook with a ``role`` keyword (``"query"`` or ``"passage"``) is told which side the
texts are, so it can put the training prompts before them (DHNM compares its scores with the
loss's, which were computed with the prompts)."""


@runtime_checkable
class NegativeProvider(Protocol):
    def negatives(self, sample_ids: Sequence[int]) -> list[list[str]]:
        """The current hard negatives of each sample (the same count for every sample)."""

    def observe(
        self,
        step: int,
        sample_ids: Sequence[int],
        neg_scores: torch.Tensor,
        query_embeddings: torch.Tensor | None = None,
    ) -> None:
        """Scores ``cos(query, negative)`` of the batch, shape ``[batch, n]``, detached.

        ``query_embeddings`` (``[batch, dim]``, detached) are the step's query rows: a provider
        that must score a new negative at assignment uses them instead of encoding the query.
        Called once per training step for the batch that was just trained on.
        """

    def on_step_end(self, step: int, encode: EncodeFn) -> dict[str, float]:
        """Hook after the optimizer step; returns numbers to log (may be empty)."""

    def state_dict(self, *, arrays: bool = True) -> dict[str, Any]:
        """JSON-serialisable state; its arrays inline (safetensors bytes, base64), or left
        to :meth:`state_tensors` with ``arrays=False`` (what a checkpoint stores)."""

    def load_state_dict(
        self, state: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Restore :meth:`state_dict`; ``tensors`` are :meth:`state_tensors` stored beside it."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The state's arrays as CPU tensors, for a safetensors file (empty: none)."""

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the arrays of :meth:`state_tensors`."""


class StaticNegatives:
    """Each sample keeps its record's first ``n`` negatives (cycled if it has fewer)."""

    def __init__(self, records: Sequence[RetrievalRecord], n: int):
        if n < 0:
            raise ValueError("the number of negatives must be >= 0")
        self.records, self.n = records, n

    def negatives(self, sample_ids: Sequence[int]) -> list[list[str]]:
        out = []
        for sid in sample_ids:
            neg = self.records[sid].neg
            if self.n and not neg:
                raise ValueError(f"sample {sid} has no negatives but {self.n} are required")
            out.append([neg[k % len(neg)] for k in range(self.n)] if self.n else [])
        return out

    def observe(
        self,
        step: int,
        sample_ids: Sequence[int],
        neg_scores: torch.Tensor,
        query_embeddings: torch.Tensor | None = None,
    ) -> None:
        return None

    def on_step_end(self, step: int, encode: EncodeFn) -> dict[str, float]:
        return {}

    # static negatives have no state: a resumed run rebuilds them from the records
    def state_dict(self, *, arrays: bool = True) -> dict[str, Any]:
        return {}

    def load_state_dict(
        self, state: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        return None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        return None


def split_provider_states(
    providers: Mapping[str, NegativeProvider],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """For a checkpoint: ``(states, tensors)``; ``states`` (JSON) go into ``state.json``,
    ``tensors`` (keyed ``<task>/<array>``) into a ``.safetensors`` file beside it."""
    states: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, provider in providers.items():
        states[name] = provider.state_dict(arrays=False)
        tensors.update({f"{name}/{k}": v for k, v in provider.state_tensors().items()})
    return states, tensors


def restore_provider_states(
    providers: Mapping[str, NegativeProvider],
    states: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Inverse of :func:`split_provider_states` (``tensors`` as loaded from the file)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in (tensors or {}).items():
        name, array = key.rsplit("/", 1)
        grouped.setdefault(name, {})[array] = value
    for name, state in states.items():
        if name not in providers:
            raise ValueError(
                f"the checkpoint holds negative-provider state for unknown task {name!r}"
            )
        providers[name].load_state_dict(state, grouped.get(name))
