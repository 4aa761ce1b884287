"""The torch backends: the model's own modules, as saved, on the engine's device.

- ``torch``: float32, unless the caller runs the engine inside an autocast region (then the
  vectors are that autocast's, and :meth:`TorchBackend.precision` says so, so caches keep them
  apart from float32 ones: :func:`~conan_embedding.runtime.ambient_autocast`);
- ``torch-bf16``: under bf16 autocast, on a GPU as on a CPU with AVX512-BF16 / AMX (faster
  there; vectors at cosine ~0.9999 to float32 ones).

The module is named ``torch_modules`` so that it never shadows ``import torch``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar

from conan_embedding.encoding.backends import InferenceBackend, Runner, register_backend

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer


@register_backend
class TorchBackend(InferenceBackend):
    """The whole ``SentenceTransformer.forward`` in torch (float32, or the caller's autocast)."""

    name = "torch"
    runs_torch_modules = True
    list_order = 0
    autocast: ClassVar[str] = "no"
    """The autocast this backend runs under (``runtime.autocast_for``'s ``mixed_precision``)."""

    def precision(self, device: torch.device) -> str | None:
        from conan_embedding.runtime import ambient_autocast

        return ambient_autocast(device)

    def load(
        self,
        model: SentenceTransformer,
        *,
        model_path: str | os.PathLike[str] | None,
        export_dir: str | os.PathLike[str] | None,
        device: torch.device,
        threads: int,
    ) -> Runner:
        from conan_embedding.runtime import autocast_for

        autocast = self.autocast

        def run(features: dict[str, Any]) -> torch.Tensor:
            with autocast_for(device, autocast):
                return model(features)["sentence_embedding"]

        return run


@register_backend
class TorchBf16Backend(TorchBackend):
    """The model's modules under bf16 autocast."""

    name = "torch-bf16"
    autocast = "bf16"

    def precision(self, device: torch.device) -> str | None:
        return "bf16"
