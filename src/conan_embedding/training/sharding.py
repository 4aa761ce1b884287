"""What the engine's sharding (accelerate's DDP / FSDP / DeepSpeed) lets an embedding stage
run, and the settings a stage gives it before ``Engine.prepare``: the device of a process
before the engine exists, FSDP's layer classes, whole weights for models never prepared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from conan_embedding.config import TrainConfig
from conan_embedding.training.task_kinds import task_kind
from conan_embedding.training.validation import check_validation_supported

if TYPE_CHECKING:
    from conan_embedding.mining.base import NegativeProvider

__all__ = [
    "check_dhnm_supported",
    "check_stage_supported",
    "engine_sharding",
    "name_fsdp_layers",
    "rank_device",
    "whole_weights",
]


def rank_device(engine_device: str) -> str:
    """This process's device before the engine exists: ``cuda:LOCAL_RANK`` on GPUs (what
    accelerate will pick), else the engine's device kind."""
    from conan_embedding.runtime import resolve_device

    kind = resolve_device(engine_device, per_process=False).type
    return str(resolve_device("auto")) if kind == "cuda" else kind


def engine_sharding(accelerator: Any) -> tuple[str, int | None]:
    """accelerate's distributed type (``"FSDP"``, ``"DEEPSPEED"``, ``"MULTI_GPU"``, ...) and
    the DeepSpeed ZeRO stage (None without DeepSpeed)."""
    plugin = accelerator.state.deepspeed_plugin
    stage = None if plugin is None else int(plugin.zero_stage)
    return str(accelerator.distributed_type.value), stage


def whole_weights(accelerator: Any) -> contextlib.AbstractContextManager:
    """Models loaded inside get whole weights even under DeepSpeed ZeRO-3's
    ``zero3_init_flag`` (which the engine's plugin turns on for every later
    ``from_pretrained``): a model that is never prepared must not be born partitioned."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return contextlib.nullcontext()
    return plugin.zero3_init_context_manager(enable=False)


def check_dhnm_supported(
    distributed_type: str, zero_stage: int | None, dynamic_tasks: Sequence[str]
) -> None:
    """Refuse dynamic hard-negative mining where its rank-0 re-encoding would deadlock.

    Why: DHNM's rules, re-scores and re-mining run on rank 0 alone while the other ranks wait
    in a broadcast. With sharded parameters (FSDP, DeepSpeed ZeRO-3) every forward all-gathers
    the weights from all ranks, so rank 0's lone forward waits for ranks that never join.
    DDP and ZeRO-0/1/2 keep whole weights on every rank: no collective in a forward.
    ``distributed_type`` is accelerate's ``DistributedType`` value (``"FSDP"``, ...).
    """
    if not dynamic_tasks:
        return
    if distributed_type == "FSDP":
        setting = "FSDP"
    elif distributed_type == "DEEPSPEED" and zero_stage == 3:
        setting = "DeepSpeed ZeRO-3"
    else:
        return
    names = ", ".join(f"'{name}'" for name in dynamic_tasks)
    raise ValueError(
        f"dynamic hard-negative mining (task {names}: dynamic_negatives.rule / remine_every) "
        f"does not run under {setting}: rank 0 re-encodes texts alone, and with sharded "
        "parameters every forward all-gathers weights from all ranks, so it deadlocks. "
        "Launch with DDP (configs/accelerate/ddp.yaml or plain torchrun) or DeepSpeed ZeRO-2, "
        "or set dynamic_negatives.rule: none (negatives mined offline)"
    )


def check_stage_supported(
    sharding: tuple[str, int | None],
    config: TrainConfig,
    providers: Mapping[str, NegativeProvider],
) -> None:
    """Refuse, before anything expensive, what an embedding stage's ``config`` cannot run
    under the engine's ``sharding`` (:func:`engine_sharding`): DHNM (a given
    ``DynamicNegatives`` provider, or a task's ``dynamic_negatives`` without a given
    provider) and validation with sharded parameters, GradCache under DeepSpeed."""
    from conan_embedding.mining.dynamic import DynamicNegatives

    dynamic = [
        t.name
        for t in config.tasks
        if task_kind(t.kind).mined_negatives
        and (
            isinstance(providers.get(t.name), DynamicNegatives)
            or t.name not in providers
            and t.dynamic_negatives.rule != "none"
        )
    ]
    check_dhnm_supported(*sharding, dynamic)
    if config.validation is not None:
        check_validation_supported(*sharding)
    cached = [t.name for t in config.tasks if t.mini_batch_size is not None]
    if cached and sharding[0] == "DEEPSPEED":
        raise ValueError(
            f"tasks {cached}: mini_batch_size (GradCache) does not run under DeepSpeed: "
            "its second pass back-propagates each mini-batch's embedding gradient with "
            "autograd, outside DeepSpeed's engine (which must own every backward). "
            "Launch with DDP or FSDP, or remove mini_batch_size"
        )


def name_fsdp_layers(plugin: Any, model: torch.nn.Module) -> list[str]:
    """Give FSDP's ``TRANSFORMER_BASED_WRAP`` the layer classes of ``model``'s backbone.

    Why: accelerate takes the classes to wrap from ``model._no_split_modules`` when the
    accelerate config names none, and a SentenceTransformer reports ``[]``: the whole encoder
    becomes one FSDP unit, all-gathered at once (no per-layer sharding, DDP-like peak memory;
    audit §11). The backbone (a transformers model) knows its layers (``BertLayer``,
    ``Qwen2DecoderLayer``, ...). A list set in the accelerate config is kept, but only the
    classes this model has: accelerate raises on a name the model lacks, so one shared config
    can list the layers of several model families (none of them present: the backbone's own
    are used). Returns the names set.
    """
    from accelerate.utils.dataclasses import get_module_class_from_name

    def present(names: Any) -> list[str]:
        return sorted(n for n in set(names or ()) if get_module_class_from_name(model, n))

    names = present(plugin.transformer_cls_names_to_wrap)
    if not names:  # none configured (or none of them here): the backbone's own
        names = present(
            {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
        )
    plugin.transformer_cls_names_to_wrap = names
    return names
