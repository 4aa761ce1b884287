"""Per-task gradient balance for the CBB step (``cbb.grad_balance: norm``).

Why: a CBB step back-propagates ``sum_t w_t grad L_t``, and the tasks' gradients differ in
size by an order of magnitude that grows during training. On multilingual-e5-small after 200
steps of the ``full`` recipe the two CoSENT tasks carry 0.98 of the summed gradient (norms 21
and 19) against 0.011 and 0.004 for the two retrieval tasks (``scripts/grad_share.py``,
``bench/results/diagnostics/grad-share-full-s42-trained.json``): CoSENT's loss stays near 3
while InfoNCE falls to 0.1-0.3, so the weights ``w_t`` no longer say what share of the step a
task gets. Balance takes each task's direction and lets the weight alone set its size::

    g = M * sum_t w_t * g_t / ||g_t||,     g_t = w_t grad L_t,     M = mean_t ||g_t||

``M`` (the mean norm over the tasks with a non-zero gradient) keeps the step about as large as
an average task's, so clipping and Adam see gradients of the usual size. ``alpha``
(``cbb.grad_balance_alpha``) goes part of the way: each task's part is
``g_t * (w_t M / ||g_t||) ** alpha``, whose norm is the geometric mean
``||g_t|| ** (1 - alpha) * (w_t M) ** alpha`` of its own norm and its balanced one; ``alpha = 1``
is the formula above and ``alpha = 0`` the plain sum. Why a middle: full balance lifts a task
whose loss is nearly solved (InfoNCE at 0.01) to the size of one that is not, noise included. A task with a zero
gradient adds nothing and does not count in ``M``. It is GradNorm's aim (Chen et al., 2018)
without its learned weights: the norms are measured on the step's own gradients, so nothing
lags and nothing is learned.

How: before the step, gradients already on the parameters are set aside; after each task's
backward the parameters hold that task's gradient alone, whose norm is taken and whose
normalised, weighted copy joins one running sum; at the end the parameters receive
``M * sum`` (plus what was set aside). One extra copy of the trainable parameters' gradients.

Under fp16 loss scaling every ``g_t`` carries the same scale, so the balanced gradient carries
it too (the scaler unscales it as usual); the norms logged as ``grad_norm/<task>`` include it.

Example::

    balance = TaskGradientBalance(model.parameters())
    balance.start()
    for name, weight, loss in tasks:
        (weight * loss).backward()
        balance.add(name, weight)
    norms = balance.finish()  # {task: ||w_t grad L_t||}; the parameters hold g
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class TaskGradientBalance:
    """Gives every task of a step a gradient of norm ``w_t * M`` before the optimizer step."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], alpha: float = 1.0):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"gradient balance alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.parameters = [p for p in parameters if p.requires_grad]
        self._carried: list[torch.Tensor | None] = []
        self._sum: list[torch.Tensor | None] = []
        self.norms: dict[str, float] = {}

    def start(self) -> None:
        """Set aside what the parameters hold, so the first task's gradient is its own."""
        self._carried = [p.grad for p in self.parameters]
        self._sum = [None] * len(self.parameters)
        self.norms = {}
        for p in self.parameters:
            p.grad = None

    def add(self, task: str, weight: float) -> float:
        """Take the gradient the parameters hold since the last call as task ``task``'s
        (weight ``weight`` already applied); returns its norm."""
        if task in self.norms:
            raise ValueError(f"task '{task}' was added twice in one step")
        grads = [p.grad for p in self.parameters]
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        norm = math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0
        self.norms[task] = norm
        # a zero gradient (zero weight or loss) adds nothing; a non-finite one is passed on
        # as it is, for the engine's finite check and the fp16 scaler to see
        balanced = norm > 0 and math.isfinite(norm)
        factor = (weight / norm) ** self.alpha if balanced else float(norm > 0)
        for index, (p, grad) in enumerate(zip(self.parameters, grads, strict=True)):
            if grad is None:
                continue
            part = grad.detach() * factor
            self._sum[index] = part if self._sum[index] is None else self._sum[index].add_(part)
            p.grad = None
        return norm

    def finish(self) -> dict[str, float]:
        """Write ``M * sum + set-aside`` onto the parameters; returns every task's norm."""
        live = [n for n in self.norms.values() if n > 0 and math.isfinite(n)]
        scale = (sum(live) / len(live)) ** self.alpha if live else 0.0
        for p, total, carried in zip(self.parameters, self._sum, self._carried, strict=True):
            if total is not None:
                total.mul_(scale)
                if carried is not None:
                    total.add_(carried)
                p.grad = total
            else:
                p.grad = carried
        self._sum, self._carried = [], []
        return dict(self.norms)
