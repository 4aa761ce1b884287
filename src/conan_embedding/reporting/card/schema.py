"""The model card's data model: every fact the card states about a run, JSON-serialisable.

A :class:`CardInfo` is what ``conan_card.json`` holds and what :mod:`.render` turns into
markdown; :mod:`.adapters` builds one from a training config. The models forbid unknown
fields, so a fact renamed in one place and not the other fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskCard(_Strict):
    """One training task: its data, how much of it was used, and its loss."""

    name: str
    kind: str
    data: str
    """The data file (as the config resolved it)."""
    source: str | None = None
    """Where the file came from, when known (e.g. ``sts/cnsd-stsb.train.data`` of the public
    data, for files written by ``conan-embed data prepare``)."""
    rows: int | None = None
    """Rows the run used (after ``max_rows`` and any teacher filter); None when unknown."""
    max_rows: int | None = None
    batch_size: int
    weight: float = 1.0
    negatives: int = 0
    in_batch_negatives: bool = True
    loss: str
    dhnm: dict[str, Any] | None = None
    """The DHNM rule and its settings; None when the task's negatives are static."""
    clr: dict[str, Any] | None = None
    """Cross-lingual retrieval data: its build report (translator, languages), when known."""
    instruction: str | None = None
    """The task's instruction (its query side; saved as the model prompt named ``name``)."""


class CBBCard(_Strict):
    world_size: int
    task_devices: dict[str, list[int]]
    beta: float
    grad_cache: bool
    layout_given: bool
    """True when ``cbb.task_ranks`` was set, False for the default layout."""


class SoftMaskCard(_Strict):
    """Conan-v2's causal -> bidirectional soft mask (``modeling.soft_mask``)."""

    schedule: str
    variant: str
    steps: int


class ValidationCard(_Strict):
    """Validation during training (``validation:``): the curve and the best step."""

    metric: str
    mode: str
    curve: list[tuple[int, float]]
    """(step, metric) at every validation, in step order."""
    best_step: int | None = None
    best_value: float | None = None
    stopped: str | None = None
    """Why the run stopped early (early stopping), else None."""


class CardInfo(_Strict):
    """Everything the card says about a run (JSON-serialisable)."""

    title: str | None = None
    base_model: str
    stage: str
    stages: list[str] = Field(default_factory=list)
    """Earlier stages of this model, oldest first (e.g. ``["weak"]`` for a supervised run
    that started from a weak-stage checkpoint)."""
    steps: int
    seed: int
    temperature: float
    task_schedule: str
    optim: dict[str, Any]
    model: dict[str, Any]
    """pooling, dense_dim, normalize, max_seq_length, query_max_length, passage_max_length,
    prompts, instruction_template, freeze_word_embeddings."""
    matryoshka_dims: list[int] = Field(default_factory=list)
    matryoshka_weights: list[float] | None = None
    tasks: list[TaskCard]
    cbb: CBBCard | None = None
    teacher_filter: dict[str, Any] | None = None
    soft_mask: SoftMaskCard | None = None
    validation: ValidationCard | None = None
    notes: list[str] = Field(default_factory=list)
    """Further facts of the run, one bullet each under Training (e.g. LoRA settings)."""
    config_yaml: str | None = None
    """The training config, to retrain the model."""

    def writer(
        self, evaluation: Mapping[str, Any] | None = None, title: str | None = None
    ) -> Callable[[Path], Path]:
        """:func:`card_writer` for this card (what ``save_embedder(card=...)`` still calls)."""
        # Imported here, not at the top: render.py imports this module for CardInfo, and the
        # data model should load without the renderer.
        from conan_embedding.reporting.card.render import card_writer

        return card_writer(self, evaluation, title)
