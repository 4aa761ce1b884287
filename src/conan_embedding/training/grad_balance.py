"""Per-task gradient balance for the CBB step (``cbb.grad_balance: norm | loss_rate``).

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

``loss_rate`` gives a task less the more of its loss it has already shed. Full ``norm``
balance drives the retrieval losses of the ``full`` recipe from 0.8 to 0.01 within 40 steps
and then keeps feeding them half the step (``docs/results.md``, issue #27). Here each task's
target norm is ``w_t * rho_t * M`` instead of ``w_t * M``::

    rho_t = r_t / mean_s r_s,     r_t = EMA_0.9(L_t) / L_t(0)

where ``L_t(0)`` is the mean of the task's first ten losses (one first loss is too noisy to
divide by for a whole run) and ``mean_s`` runs over the tasks with a non-zero gradient. A task at
a tenth of its starting loss gets a tenth of the share of one that has not moved; a task whose
loss rises (CoSENT under balance) gets more. ``r_t`` is GradNorm's inverse training rate,
used as the target directly instead of through learned weights. On the ``full`` recipe it
settles the retrieval losses at 0.12-0.15 (bge) and 0.03-0.04 (CLR), between the plain sum's
0.19 / 0.09 and ``norm``'s 0.013 / 0.004. The rates (:meth:`LossRate.state_dict`) are part
of the CBB trainer's checkpoint, so a resumed run keeps its ``L_t(0)``.

``rate_floor`` (``cbb.grad_balance_rate_floor``) bounds how far a task can fall: ``r_t`` counts
as ``max(r_t, floor)`` in ``rho_t`` and in the mean. Why: the rate does not know what a task
is for. On ``full-tatoeba`` the en-zh parallel pairs shed 97 % of their loss in 50 steps and
``loss_rate`` gives them 0.04-0.10 of an average task's share from then on; Tatoeba, which they
alone serve, ends 1.9 below the plain baseline, where ``norm`` (every ``rho_t = 1``) kept it
above. With a floor of 0.3 the three retrieval tasks there keep 0.36-0.42 of an average share
and Tatoeba ends between the two (docs/results.md). The logged ``loss_rate/<task>`` is the
rate before the floor.

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

    # loss_rate: pass each task's loss value as well
    balance = TaskGradientBalance(model.parameters(), loss_rate=LossRate())
    ...
        balance.add(name, weight, loss=float(loss))
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class LossRate:
    """Each task's loss against where it started: ``r_t = EMA(L_t) / L_t(0)``.

    ``L_t(0)`` is the mean of the task's first ``warmup`` finite losses (so ``r_t`` is about 1
    while they come in); the EMA keeps ``smoothing`` of its last value at each step.
    """

    def __init__(self, warmup: int = 10, smoothing: float = 0.9):
        if warmup < 1 or not 0.0 <= smoothing < 1.0:
            raise ValueError(
                f"loss rate needs warmup >= 1 and smoothing in [0, 1), got {warmup}, {smoothing}"
            )
        self.warmup, self.smoothing = warmup, smoothing
        self.initial: dict[str, float] = {}
        self.seen: dict[str, int] = {}
        self.smoothed: dict[str, float] = {}

    def update(self, task: str, loss: float) -> float:
        """Take this step's loss of ``task``; returns its rate ``r_t``. A non-finite loss
        (a step the engine will skip) leaves the state as it was."""
        if math.isfinite(loss):
            seen = self.seen.get(task, 0)
            if seen < self.warmup:  # running mean of the first losses
                self.initial[task] = (self.initial.get(task, 0.0) * seen + loss) / (seen + 1)
                self.seen[task] = seen + 1
            previous = self.smoothed.get(task, loss)
            self.smoothed[task] = self.smoothing * previous + (1 - self.smoothing) * loss
        return self.rate(task)

    def rate(self, task: str) -> float:
        """``r_t``; 1 before the task's first loss or while its starting loss is zero."""
        initial = self.initial.get(task, 0.0)
        return self.smoothed[task] / initial if initial > 0 else 1.0

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {
            "initial": dict(self.initial),
            "seen": dict(self.seen),
            "smoothed": dict(self.smoothed),
        }

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        self.initial = {k: float(v) for k, v in state["initial"].items()}
        self.seen = {k: int(v) for k, v in state["seen"].items()}
        self.smoothed = {k: float(v) for k, v in state["smoothed"].items()}


class TaskGradientBalance:
    """Gives every task of a step a gradient of norm ``w_t * M`` (times ``rho_t`` with a
    :class:`LossRate`) before the optimizer step."""

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        alpha: float = 1.0,
        loss_rate: LossRate | None = None,
        rate_floor: float = 0.0,
    ):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"gradient balance alpha must be in [0, 1], got {alpha}")
        if rate_floor < 0.0 or (rate_floor > 0.0 and loss_rate is None):
            raise ValueError(
                f"a rate floor ({rate_floor}) must be >= 0 and needs a loss rate to bound"
            )
        self.alpha = alpha
        self.loss_rate = loss_rate
        self.rate_floor = rate_floor
        self.parameters = [p for p in parameters if p.requires_grad]
        self._carried: list[torch.Tensor | None] = []
        self._sum: list[torch.Tensor | None] = []
        self.norms: dict[str, float] = {}
        self.rates: dict[str, float] = {}  # r_t as measured, for the log
        self._counted: dict[str, float] = {}  # max(r_t, floor), what rho_t is made of

    def start(self) -> None:
        """Set aside what the parameters hold, so the first task's gradient is its own."""
        self._carried = [p.grad for p in self.parameters]
        self._sum = [None] * len(self.parameters)
        self.norms, self.rates, self._counted = {}, {}, {}
        for p in self.parameters:
            p.grad = None

    def add(self, task: str, weight: float, loss: float | None = None) -> float:
        """Take the gradient the parameters hold since the last call as task ``task``'s
        (weight ``weight`` already applied; ``loss``, its value, with a loss rate); returns
        its norm."""
        if task in self.norms:
            raise ValueError(f"task '{task}' was added twice in one step")
        if self.loss_rate is not None:
            if loss is None:
                raise ValueError(f"the loss-rate balance needs task '{task}''s loss value")
            self.rates[task] = self.loss_rate.update(task, loss)
            self._counted[task] = max(self.rates[task], self.rate_floor)
            weight = weight * self._counted[task]  # rho_t's numerator; finish divides by the mean
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
        live = [t for t, n in self.norms.items() if n > 0 and math.isfinite(n)]
        # M, or M / mean(r) with a loss rate: add() put each r_t in, so this makes rho_t
        target = sum(self.norms[t] for t in live) / len(live) if live else 0.0
        if self._counted and live:
            mean_rate = sum(self._counted[t] for t in live) / len(live)
            target = target / mean_rate if mean_rate > 0 else 0.0
        scale = target**self.alpha if live else 0.0
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
