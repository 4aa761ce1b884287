"""What the engine does to a model's weights besides training them: precision and memory.

Why apart from the loop: these are pure functions of a module (no process group, no
optimizer), each with its own reason, and the engine is about the loop. They are:

- :func:`upcast_trainable`: fp32 master weights whatever dtype the model was loaded in;
- :func:`set_tf32`: TF32 matmuls on CUDA, set either way for every stage;
- :func:`enable_gradient_checkpointing`: activation checkpointing in every HF model inside;
- :func:`meta_skeleton` / :func:`load_full_state`: the unsharded copy that FSDP2 / ZeRO-3
  runs load their gathered weights into at the end (:meth:`Engine.consolidated_model`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


def upcast_trainable(model: torch.nn.Module) -> list[str]:
    """Make every trainable floating parameter fp32 (in place); returns the names changed.

    Why: a model loaded with ``torch_dtype: bfloat16`` would get AdamW straight over bf16
    weights, with no fp32 master copy: at lr 2e-5 and weights ~0.05 (bf16's step there is
    ~2.4e-4) most updates round to nothing and training stalls without an error. fp32
    master weights plus autocast (``engine.mixed_precision: bf16``) computes in bf16 all
    the same. Frozen parameters keep their dtype (they take no updates, and a frozen bf16
    backbone is what saves the memory). Upcasting is always possible for floating
    tensors, so this warns instead of refusing.
    """
    changed: list[str] = []
    for name, parameter in model.named_parameters():
        if (
            parameter.requires_grad
            and parameter.dtype.is_floating_point
            and parameter.dtype != torch.float32
        ):
            parameter.data = parameter.data.float()
            changed.append(name)
    if changed:
        logger.warning(
            "%d trainable parameters were not float32 (e.g. %s): upcast to float32 so the "
            "optimizer keeps full-precision weights; for bf16 compute set "
            "engine.mixed_precision: bf16 instead of loading the model in bf16",
            len(changed),
            changed[0],
        )
    return changed


def set_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 for fp32 matmuls/convolutions on CUDA (``engine.tf32``), set either way so a
    previous stage's choice does not leak into this one; nothing on other devices."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Turn on activation checkpointing in every Hugging Face model inside ``model``
    (non-reentrant, so it composes with DDP and frozen embeddings); returns how many."""
    from transformers import PreTrainedModel

    count = 0
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            module.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            count += 1
    if not count:
        raise ValueError(
            "gradient_checkpointing: the model holds no Hugging Face model that supports it"
        )
    return count


def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters live on the ``meta`` device (no memory).

    Why: FSDP2's ``fully_shard`` turns the module itself into a sharded one (DTensor
    parameters) and ZeRO-3 partitions its parameters in place, so once ``prepare`` has run
    there is no plain module left to load the gathered weights into. The skeleton is taken
    before ``prepare``; the parameters are swapped for meta tensors through ``deepcopy``'s
    memo, so the copy never duplicates the weights (a 1.4B model would need 5.6 GB more).
    Buffers are copied for real: they are small, and the non-persistent ones (rotary
    frequencies, position ids) are not in any state dict. Tied parameters stay one object.
    A ZeRO-3 parameter born partitioned (``zero3_init_flag``) has shape ``[0]``; its full
    shape is ``ds_shape``.
    """
    memo: dict[int, Any] = {}
    for parameter in model.parameters():  # remove_duplicate: a tied weight once
        shape = tuple(getattr(parameter, "ds_shape", parameter.shape))
        memo[id(parameter)] = torch.nn.Parameter(
            torch.empty(shape, dtype=parameter.dtype, device="meta"),
            requires_grad=parameter.requires_grad,
        )
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:  # noqa: BLE001 - any copy failure gets the same advice
        raise RuntimeError(
            f"the engine keeps an unsharded skeleton of the model for FSDP/DeepSpeed runs "
            f"(to save the trained weights at the end), but {type(model).__name__} cannot be "
            f"deep-copied: {error}"
        ) from error


def load_full_state(skeleton: torch.nn.Module, full: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh CPU module: a copy of ``skeleton`` (see :func:`meta_skeleton`) holding ``full``.

    Each tensor is cast to the dtype the skeleton's parameter had before training (a
    DeepSpeed bf16 run gathers 16-bit weights; the model was built fp32). ``assign=True``
    replaces the meta tensors, which unties tied weights, so every group of names that
    shared one parameter in the skeleton shares the loaded one again; a tied name missing
    from ``full`` is filled that way too. Anything still on ``meta`` afterwards is an error
    naming the keys, never a silently random weight.
    """
    model = copy.deepcopy(skeleton)  # meta parameters: free; the skeleton stays reusable
    expected = model.state_dict(keep_vars=True)
    unexpected = sorted(set(full) - set(expected))
    if unexpected:
        raise ValueError(f"gathered state has keys the model lacks: {unexpected[:5]}")
    cast = {
        k: v.detach().to(device="cpu", dtype=expected[k].dtype)
        if v.is_floating_point() and expected[k].is_floating_point()
        else v.detach().cpu()
        for k, v in full.items()
    }
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    model.load_state_dict(cast, strict=False, assign=True)
    for names in groups.values():
        present = [n for n in names if n in cast]
        if len(names) < 2 or not present:
            continue
        source = model.get_parameter(present[0])
        for name in names:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = source
    still_meta = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if still_meta:
        raise ValueError(f"gathered state lacks weights for {still_meta[:5]}")
    return model
