"""Every loss in float32, whatever autocast the caller runs under.

Why: :class:`~conan_embedding.training.engine.Engine` runs a whole step program inside
``accelerator.autocast()`` so the encoder's matmuls use bf16/fp16. The losses would follow:
``query @ candidates.T`` in bf16 quantises cosines to ~2e-3..4e-3, which at ``tau = 0.05`` is
~0.04-0.08 nats of logit noise in the loss and in the scores DHNM compares with thresholds
(gpu-readiness audit, finding 14). The embeddings are cheap next to the encoder, so the loss
math always runs with autocast off and its inputs in float32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _upcast(value: Any, devices: set[str]) -> Any:
    """Half/bf16 tensors (also inside lists and tuples) -> float32; notes their device types."""
    if isinstance(value, torch.Tensor):
        devices.add(value.device.type)
        return value.float() if value.dtype in _LOW_PRECISION else value
    if isinstance(value, (list, tuple)):
        return type(value)(_upcast(v, devices) for v in value)
    return value


def float32_loss(fn: F) -> F:
    """Decorator: run ``fn`` with autocast disabled on its tensors' devices, inputs float32."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        devices: set[str] = set()
        args = tuple(_upcast(a, devices) for a in args)
        kwargs = {k: _upcast(v, devices) for k, v in kwargs.items()}
        with contextlib.ExitStack() as stack:
            # autocast is per device type: switch off every one the inputs live on
            # (the meta device of the device-guard tests has no autocast to switch off)
            for device_type in sorted(devices or {"cpu"}):
                if not torch.amp.is_autocast_available(device_type):
                    continue
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
