"""Pretraining batches: weighted sources packed into full blocks (no padding).

Why: a batch that depends only on ``(seed, step)`` makes a resumed run replay exactly the data
of an uninterrupted one, with nothing to save but the step.

How: for step ``s`` a generator seeded with ``(seed, s)`` draws a source with probability
``w_k / sum(w)``, then a document of it, appends the end-of-text token and repeats until
``batch * seq_len`` tokens are filled; the stream is cut into ``[batch, seq_len]``. Held-out
documents are packed in order by :func:`pack_blocks`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class MixtureBatcher:
    """Packed ``[batch, seq_len]`` blocks drawn from weighted sources; batch ``s`` depends only
    on ``(seed, s)`` so training can resume mid-run on exactly the same data."""

    def __init__(
        self,
        sources: dict[str, list[list[int]]],
        weights: dict[str, float],
        *,
        seq_len: int,
        batch_size: int,
        eos_id: int,
        seed: int = 0,
    ):
        empty = [name for name, docs in sources.items() if not docs]
        if empty:
            raise ValueError(f"sources without documents: {empty}")
        self.names = list(sources)
        self.sources = sources
        total = sum(weights[name] for name in self.names)
        self.probabilities = np.array([weights[name] / total for name in self.names])
        self.seq_len, self.batch_size, self.eos_id, self.seed = seq_len, batch_size, eos_id, seed

    def batch(self, step: int) -> tuple[torch.Tensor, dict[str, int]]:
        """The step's input ids and how many tokens each source contributed."""
        rng = np.random.default_rng([self.seed, step])
        needed = self.batch_size * self.seq_len
        stream: list[int] = []
        drawn = dict.fromkeys(self.names, 0)
        while len(stream) < needed:
            name = self.names[rng.choice(len(self.names), p=self.probabilities)]
            documents = self.sources[name]
            document = documents[int(rng.integers(len(documents)))]
            piece = [*document, self.eos_id][: needed - len(stream)]
            stream.extend(piece)
            drawn[name] += len(piece)
        return torch.tensor(stream, dtype=torch.long).view(self.batch_size, self.seq_len), drawn


def pack_blocks(
    documents: Sequence[list[int]], seq_len: int, eos_id: int, limit: int
) -> torch.Tensor:
    """Held-out documents packed in order into at most ``limit`` full blocks."""
    stream: list[int] = []
    for document in documents:
        stream.extend([*document, eos_id])
        if len(stream) >= seq_len * limit:
            break
    count = min(limit, len(stream) // seq_len)
    if count == 0:
        raise ValueError("held-out text is shorter than one block; lower seq_len or holdout_every")
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)
