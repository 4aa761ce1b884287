"""The loss registry: every training objective by name, with its words for the model card.

Why: the step programs (``training/task_kinds.py``, CBB) and the model card
(``reporting/card``) name a loss through its :class:`LossSpec` rather than importing the
function and spelling its name in three places, so a new loss is its module plus one entry
here (and the line of ``training/task_kinds.py`` that selects it for a task kind).

Example::

    spec = loss_spec("cosent")
    loss = spec.function(a, b, gold, temperature=0.05)
    spec.words  # "CoSENT", what the model card writes
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from conan_embedding.losses.cbb import cbb_info_nce_loss
from conan_embedding.losses.classification import classification_as_retrieval_loss
from conan_embedding.losses.cosent import cosent_loss
from conan_embedding.losses.infonce import info_nce_loss

__all__ = ["LOSSES", "LossSpec", "loss_spec", "register_loss"]


@dataclass(frozen=True)
class LossSpec:
    """One objective: its function (formula in its module's docstring), the model card's
    words for it, and where it comes from."""

    name: str
    function: Callable[..., torch.Tensor]
    words: str
    citation: str


LOSSES: dict[str, LossSpec] = {}


def register_loss(spec: LossSpec) -> LossSpec:
    """Add ``spec`` under its name; a name is registered once."""
    if spec.name in LOSSES:
        raise ValueError(f"loss {spec.name!r} is already registered")
    LOSSES[spec.name] = spec
    return spec


def loss_spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered: {sorted(LOSSES)}")
    return LOSSES[name]


register_loss(
    LossSpec(
        "infonce",
        info_nce_loss,
        "InfoNCE",
        "van den Oord et al. 2018, Representation Learning with Contrastive Predictive Coding",
    )
)
register_loss(LossSpec("cosent", cosent_loss, "CoSENT", "Su 2022, CoSENT (kexue.fm/archives/8847)"))
register_loss(
    LossSpec(
        "classification",
        classification_as_retrieval_loss,
        "classification as retrieval",
        "Li et al. 2024, Conan-embedding (arXiv:2408.15710)",
    )
)
register_loss(
    LossSpec(
        "cbb",
        cbb_info_nce_loss,
        "InfoNCE",
        "Li et al. 2024, Conan-embedding (arXiv:2408.15710): cross-GPU batch balance",
    )
)
