"""Training objectives, one per module, each with its formula in the docstring."""

from __future__ import annotations

from conan_embedding.losses.classification import classification_as_retrieval_loss
from conan_embedding.losses.cosent import cosent_loss
from conan_embedding.losses.infonce import info_nce_loss, info_nce_loss_with_count
from conan_embedding.losses.matryoshka import matryoshka_loss

__all__ = [
    "classification_as_retrieval_loss",
    "cosent_loss",
    "info_nce_loss",
    "info_nce_loss_with_count",
    "matryoshka_loss",
]
