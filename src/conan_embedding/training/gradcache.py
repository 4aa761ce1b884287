"""GradCache: a contrastive loss over more texts than one forward's activations hold.

Why: an InfoNCE denominator wants many candidates, and encoding them all with their graphs
at once costs the activations of all of them. GradCache (Gao et al., 2021) computes the same
loss and the same gradients in two passes, keeping only one chunk's activations at a time:

1. encode every chunk without a graph (embeddings only);
2. make the embeddings leaves, compute the loss on them and back-propagate it to the
   leaves only (``d loss / d embedding``, small);
3. re-encode each chunk with its graph under the *same* dropout seed and back-propagate its
   cached embedding gradient into the weights.

The replay must see exactly pass 1's randomness, so a chunk carries its seed key and
``encode`` runs it under :meth:`~conan_embedding.training.engine.Engine.seeded`. Used by
cross-GPU batch balance on virtual devices (:mod:`conan_embedding.training.cbb`, chunks keyed
by seed: :func:`grad_cache_backward`) and by every task of the plain trainer that sets
``tasks[].mini_batch_size`` (:class:`MiniBatchCache`: a step's encodes cut into mini-batches,
each replayed under the RNG state it was first drawn with, so a kind's loss runs unchanged on
the cached embeddings, with cross-rank gathers, Matryoshka and false-negative control).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Chunk:
    """Texts encoded together, with their prompt, token limit (None: ``max_seq_length``)
    and the seed key of their dropout."""

    texts: list[str]
    prompt: str | None
    seed: tuple[int, ...]
    max_length: int | None = None


EncodeChunk = Callable[[Chunk, bool], torch.Tensor]
"""``encode(chunk, count)``: the chunk's embeddings, with a graph when grad is enabled, drawn
under the chunk's seed; ``count`` False for a replay (its texts were counted in pass 1)."""


def encode_with_graphs(encode: EncodeChunk, chunks: Sequence[Chunk]) -> list[torch.Tensor]:
    """One pass: every chunk's embeddings with its graph (the activations of all at once)."""
    return [encode(chunk, True) for chunk in chunks]


def grad_cache_backward(
    encode: EncodeChunk,
    chunks: Sequence[Chunk],
    backward_loss: Callable[[list[torch.Tensor]], float],
) -> tuple[float, list[torch.Tensor]]:
    """Two passes (see the module docstring); returns what ``backward_loss`` returned (the
    loss) and the embeddings it saw (leaves, detached from the model).

    ``backward_loss(embeddings)`` computes the loss on the leaves and back-propagates it;
    the leaves' gradients are then replayed into the weights chunk by chunk.
    """
    with torch.no_grad():
        cached = [encode(chunk, True) for chunk in chunks]
    leaves = [e.detach().requires_grad_(True) for e in cached]
    value = backward_loss(leaves)
    for chunk, leaf in zip(chunks, leaves, strict=True):
        encode(chunk, False).backward(leaf.grad)
    return value, leaves


# --------------------------------------------------------------------------- mini-batches
EncodeTexts = Callable[[list[str], bool], torch.Tensor]
"""``forward(texts, count)``: the texts' embeddings (a graph when grad is enabled); ``count``
False for a replay (its texts were counted in pass 1)."""


@dataclass(frozen=True)
class RngState:
    """The torch RNG state (CPU, and the device's when it is a GPU) before a forward."""

    cpu: torch.Tensor
    device: torch.device
    accelerator: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        on_gpu = device.type == "cuda"
        return cls(
            torch.get_rng_state(), device, torch.cuda.get_rng_state(device) if on_gpu else None
        )

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Inside, torch draws what it drew after :meth:`capture`; outside is left as it was."""
        devices = [self.device] if self.accelerator is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.set_rng_state(self.cpu)
            if self.accelerator is not None:
                torch.cuda.set_rng_state(self.accelerator, self.device)
            yield


@dataclass
class _MiniBatch:
    texts: list[str]
    forward: EncodeTexts
    rng: RngState
    leaf: torch.Tensor


class MiniBatchCache:
    """GradCache over a step's encodes, cut into mini-batches of at most ``size`` texts.

    :meth:`encode` is pass 1: each mini-batch is encoded without a graph right after its RNG
    state is saved, and its embeddings become a leaf; the caller computes the loss on what
    :meth:`encode` returned (the leaves, concatenated: a loss written for embeddings with
    graphs runs unchanged) and back-propagates it, which stops at the leaves.
    :meth:`backward` is pass 2: each mini-batch is re-encoded with its graph under its saved
    RNG state (the same dropout masks as pass 1) and its leaf's gradient is back-propagated
    into the weights. ``no_sync()`` is entered around every replay but the last, so data
    parallel reduces the accumulated gradients once (the last replay runs in the caller's
    context).

    Mini-batches are drawn in order under the caller's RNG context (one per encode, e.g. a
    shard's dropout seed), so they draw the same masks whether encoded in two passes or with
    their graphs in one: ``graphs=True`` does the latter (the activations of all at once;
    what the two passes are checked against), and :meth:`backward` then has nothing to do.

    The replay's ``backward(grad)`` is autograd's own: the leaves' gradients already carry
    whatever the loss's backward applied (accelerate's fp16 loss scale, the task weight), so
    nothing is applied twice; a sharded engine that must own every backward (DeepSpeed)
    cannot run it (the trainer refuses that combination).
    """

    def __init__(self, size: int, device: torch.device, *, graphs: bool = False):
        if size < 1:
            raise ValueError(f"mini-batch size must be positive, not {size}")
        self.size, self.device, self.graphs = size, device, graphs
        self.pending: list[_MiniBatch] = []

    def encode(self, texts: Sequence[str], forward: EncodeTexts) -> torch.Tensor:
        """Pass 1 for ``texts``: their embeddings, differentiable w.r.t. the cached leaves."""
        texts = list(texts)
        pieces = []
        for start in range(0, len(texts), self.size):
            part = texts[start : start + self.size]
            if self.graphs:
                pieces.append(forward(part, True))
                continue
            rng = RngState.capture(self.device)
            with torch.no_grad():
                leaf = forward(part, True).detach().requires_grad_(True)
            self.pending.append(_MiniBatch(part, forward, rng, leaf))
            pieces.append(leaf)
        if not pieces:
            raise ValueError("GradCache was asked to encode no texts")
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def backward(self, no_sync: Callable[[], contextlib.AbstractContextManager]) -> None:
        """Pass 2 (after the loss's backward): replay every mini-batch with a gradient."""
        todo = [m for m in self.pending if m.leaf.grad is not None]
        self.pending = []
        for index, mini in enumerate(todo):
            last = index == len(todo) - 1
            with contextlib.nullcontext() if last else no_sync(), mini.rng.replayed():
                mini.forward(mini.texts, False).backward(mini.leaf.grad)
