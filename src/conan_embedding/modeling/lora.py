"""LoRA adapters on an embedding backbone, and folding them back in before saving.

Why: the Conan-v2 paper compares full fine-tuning (with and without the soft mask) against
LoRA r = 16/32/64; both the v2 weak stage and the foundation trainer offer it, so one arm of
that ablation can stay on adapters through every stage. How: peft's ``get_peft_model`` wraps
the backbone (``W x + (alpha / r) B A x``, only ``A`` and ``B`` trainable); the saved model is
a plain transformers model again (``merge_and_unload``), so every reader of our folders
(sentence-transformers, the server, ONNX export) needs no peft.
"""

from __future__ import annotations

from typing import Any

import torch

from conan_embedding.config import LoraSettings

__all__ = ["add_lora", "merged", "has_lora"]


def lora_targets(settings: LoraSettings) -> str | list[str]:
    """What peft's ``LoraConfig.target_modules`` gets: ``all-linear`` as is, else the names."""
    targets = settings.target_modules
    return targets if isinstance(targets, str) else list(targets)


def target_description(settings: LoraSettings) -> str:
    """The targets in words, for the model card."""
    targets = settings.target_modules
    return "every linear layer" if targets == "all-linear" else ", ".join(targets)


def add_lora(backbone: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """``backbone`` wrapped with LoRA adapters on ``settings.target_modules``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_targets(settings),
        bias="none",
    )
    try:
        return get_peft_model(backbone, config)
    except ValueError as error:  # peft: "Target modules {...} not found in the base model"
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in backbone.named_modules() if name})
        raise ValueError(
            f"LoRA target_modules {settings.target_modules} do not match this "
            f"{type(backbone).__name__}; its module names include {names[:40]}"
        ) from error


def has_lora(module: Any) -> bool:
    return hasattr(module, "merge_and_unload")


def merged(backbone: torch.nn.Module) -> torch.nn.Module:
    """The backbone with its adapters folded into the weights (itself when it has none)."""
    return backbone.merge_and_unload() if has_lora(backbone) else backbone
