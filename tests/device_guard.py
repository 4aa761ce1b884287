"""A device guard for tests: any op whose tensor arguments sit on two devices fails.

This machine has one device, so a CPU helper tensor meeting CUDA logits cannot happen here
for real. The guard makes the same mistake visible: run a step with the model on the
``meta`` device (shapes only, no data) under :class:`DeviceGuard`, and a label, group or gold
score tensor built on the CPU meets meta tensors and the op fails with its name. Reading a
meta value (``.item()``, ``bool()``, ``.cpu()``) answers with a placeholder so the step runs
to its end; 0-dim CPU tensors are allowed with any device, as PyTorch allows them.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

_READS = {torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.tolist}
_TRUTH = {torch.Tensor.__bool__}
_TO_CPU = {torch.Tensor.cpu, torch.Tensor.numpy}


class DeviceMixError(AssertionError):
    pass


class DeviceGuard(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            shapes = [(t.device.type, tuple(t.shape)) for t in tensors]
            raise DeviceMixError(f"{getattr(func, '__name__', func)} mixes devices: {shapes}")
        first = tensors[0] if tensors else None
        if first is not None and first.is_meta:
            if func in _READS:
                return 0.0 if func is not torch.Tensor.tolist else torch.zeros(first.shape).tolist()
            if func in _TRUTH:
                return True
            if func in _TO_CPU or (func is torch.Tensor.to and _target_is_cpu(args[1:], kwargs)):
                out = torch.zeros(first.shape, dtype=first.dtype)
                return out.numpy() if func is torch.Tensor.numpy else out
        return func(*args, **kwargs)


def _target_is_cpu(args, kwargs) -> bool:
    target = kwargs.get("device", args[0] if args else None)
    if isinstance(target, str | torch.device):
        return torch.device(target).type == "cpu"
    return False
