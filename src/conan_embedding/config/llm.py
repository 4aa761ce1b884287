"""Configs of the Conan-v2 stages: LLM pretraining (:class:`PretrainConfig`), SFT
(:class:`SFTConfig`), the soft-mask weak stage (:class:`WeakStageConfig`) and stage 4 on the
exported embedder (:class:`SupervisedStageConfig`).

Every stage spells its loop as the embedding stages do (:class:`~.train.TrainConfig`):
``optim:`` (an :class:`OptimConfig`, with this stage's defaults for the keys left out),
``engine:`` (an :class:`EngineConfig`), ``checkpoint_every`` and ``keep_checkpoints``. The
flat keys of the previous release (``steps``, ``lr``, ``warmup_ratio``, ``weight_decay``,
``scheduler``, ``save_every``, ``threads``) are still read for one release, moved to their
place with a ``FutureWarning`` (:func:`~.common.move_flat_keys`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from conan_embedding.config.common import (
    CheckpointFields,
    EngineConfig,
    LoraSettings,
    OptimConfig,
    StrictModel,
    move_flat_keys,
)

Schedule = Literal["linear", "accelerating", "decelerating", "hard", "causal"]
"""How the soft mask opens from causal to bidirectional over a stage (``modeling.soft_mask``)."""
Variant = Literal["L_over_i", "i_over_L"]
"""Which of the paper's two soft-mask formulas (``modeling.soft_mask``)."""
Pooling = Literal["mean", "lasttoken"]
"""How a decoder's hidden states become one vector (``modeling.decoders.pool``)."""

# where each flat key of the previous release lives now
_OPTIM_KEYS = {
    "steps": "optim.max_steps",
    "lr": "optim.lr",
    "warmup_ratio": "optim.warmup_ratio",
    "weight_decay": "optim.weight_decay",
    "scheduler": "optim.scheduler",
}
_THREADS = {"threads": "engine.threads"}
_SAVE_EVERY = {"save_every": "checkpoint_every"}


class StageConfig(CheckpointFields, StrictModel):
    """What every v2 stage shares: the ``optim:`` / ``engine:`` blocks, the checkpoint keys
    (:class:`CheckpointFields`) and the older flat keys.

    ``OPTIM_DEFAULTS`` are the stage's own defaults for the ``optim:`` keys a file leaves out
    (pretraining's learning rate is not stage 4's); ``FLAT_KEYS`` maps each older flat key to
    its place.
    """

    OPTIM_DEFAULTS: ClassVar[dict[str, Any]] = {}
    FLAT_KEYS: ClassVar[dict[str, str]] = {}

    optim: OptimConfig = Field(default_factory=OptimConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)

    @model_validator(mode="before")
    @classmethod
    def _read_older_keys(cls, data: Any) -> Any:
        data = move_flat_keys(data, cls.FLAT_KEYS, owner=cls.__name__, fill_only=("threads",))
        if not isinstance(data, Mapping):
            return data
        optim = data.get("optim")
        if isinstance(optim, BaseModel):  # an OptimConfig made by the caller: taken as it is
            return data
        if optim is None or isinstance(optim, Mapping):
            data = {**data, "optim": {**cls.OPTIM_DEFAULTS, **(optim or {})}}
        return data


class SourceConfig(StrictModel):
    """One pretraining source: a ``.txt`` (one document per line) or ``.jsonl`` (``text``)."""

    name: str
    path: str
    weight: float = Field(default=1.0, gt=0)


class PretrainConfig(StageConfig):
    """Stage 1: causal-LM pretraining on weighted, packed sources (``training.causal_lm``).

    ``optim`` defaults: ``lr`` 1e-3, ``max_steps`` 1000, ``scheduler`` cosine, ``warmup_ratio``
    0.05, ``weight_decay`` 0.001.
    """

    OPTIM_DEFAULTS: ClassVar[dict[str, Any]] = {
        "lr": 1e-3,
        "warmup_ratio": 0.05,
        "weight_decay": 0.001,
        "max_steps": 1000,
        "scheduler": "cosine",
    }
    FLAT_KEYS: ClassVar[dict[str, str]] = {**_OPTIM_KEYS, **_SAVE_EVERY, **_THREADS}

    output_dir: str
    sources: list[SourceConfig] = Field(min_length=1)
    # if set, missing source files are first built here from shared/data (build_shared_corpus)
    shared_corpus_dir: str | None = None
    preset: str = "tiny"
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    tokenizer: str | None = None  # a saved tokenizer folder; trained on the sources if absent
    vocab_size: int = 4000
    max_documents: int | None = None  # per source, a seeded sample (quick runs)
    seq_len: int = 128
    batch_size: int = 16
    micro_batch_size: int | None = None
    """Rows per forward/backward; the step's batch is accumulated over micro-batches."""
    eval_every: int = 100
    eval_blocks: int = 32
    holdout_every: int = 50
    checkpoint_every: int | None = Field(500, gt=0)
    seed: int = 0


class SFTConfig(StageConfig):
    """Stage 2: supervised fine-tuning on (instruction, input, output) rows.

    ``optim`` defaults: ``lr`` 5e-4, ``max_steps`` 300, ``scheduler`` cosine, ``warmup_ratio``
    0.02, ``weight_decay`` 0.001.
    """

    OPTIM_DEFAULTS: ClassVar[dict[str, Any]] = {
        "lr": 5e-4,
        "warmup_ratio": 0.02,
        "weight_decay": 0.001,
        "max_steps": 300,
        "scheduler": "cosine",
    }
    FLAT_KEYS: ClassVar[dict[str, str]] = {**_OPTIM_KEYS, **_SAVE_EVERY, **_THREADS}

    output_dir: str
    base_model: str
    data: str
    max_len: int = 128
    batch_size: int = 16
    micro_batch_size: int | None = None
    eval_every: int = 100
    eval_rows: int = 128
    checkpoint_every: int | None = Field(500, gt=0)
    seed: int = 0


class WeakStageConfig(StageConfig):
    """Stage 3 settings; defaults follow the paper where it gives them (batch 64, InfoNCE).

    ``optim`` defaults: ``lr`` 1e-4, ``max_steps`` 200, ``scheduler`` linear, ``warmup_ratio``
    0.05, ``weight_decay`` 0.001.
    """

    OPTIM_DEFAULTS: ClassVar[dict[str, Any]] = {
        "lr": 1e-4,
        "warmup_ratio": 0.05,
        "weight_decay": 0.001,
        "max_steps": 200,
        "scheduler": "linear",
    }
    FLAT_KEYS: ClassVar[dict[str, str]] = {**_OPTIM_KEYS, **_THREADS}

    output_dir: str
    llm: str  # a causal-LM folder: saved by pretrain/sft, or `conan-embed import gguf`
    data: str  # SFT rows {"instruction", "input", "output"}
    schedule: Schedule = "linear"
    variant: Variant = "L_over_i"
    pooling: Pooling = "mean"
    lora: LoraSettings | None = None
    # the input embedding matrix stays as loaded: most of a small multilingual decoder's
    # weights (Gemma 3 270M: 168M of 268M) and of its optimizer state, for little gain
    freeze_embeddings: bool = False
    matryoshka_dims: list[int] = Field(default_factory=list)
    max_len: int = 64
    batch_size: int = 64
    temperature: float = 0.05
    max_rows: int | None = None
    # the paper drops pairs a teacher embedder scores below 0.4 (data.builders.filter)
    teacher: str | None = None
    teacher_threshold: float = 0.4
    teacher_query_prompt: str = ""
    teacher_passage_prompt: str = ""
    checkpoint_every: int | None = Field(1000, gt=0)
    seed: int = 0


class SupervisedStageConfig(StageConfig):
    """Stage 4 on an exported LLM embedder (``training.supervised_stage``): retrieval + CLR
    (InfoNCE, static hard negatives) and STS (CoSENT), every task in every step.

    ``optim`` defaults: ``lr`` 2e-4, ``max_steps`` 100, ``scheduler`` linear, ``warmup_ratio``
    0.05, ``weight_decay`` 0.001.
    """

    OPTIM_DEFAULTS: ClassVar[dict[str, Any]] = {
        "lr": 2e-4,
        "warmup_ratio": 0.05,
        "weight_decay": 0.001,
        "max_steps": 100,
        "scheduler": "linear",
    }
    FLAT_KEYS: ClassVar[dict[str, str]] = {"steps": "optim.max_steps", "lr": "optim.lr", **_THREADS}

    model_dir: str
    records: dict[str, str]
    """The training files by task, ``sts`` / ``retrieval`` / ``clr`` (``build_supervised_records``)."""
    output_dir: str
    negatives: int = Field(3, ge=0)
    batch_size: int = Field(16, gt=0)
    sts_batch_size: int = Field(32, gt=0)
    max_rows: int | None = None
    matryoshka_dims: list[int] = Field(default_factory=list)
    max_seq_length: int = 64
    freeze_word_embeddings: bool = False
    lora: LoraSettings | None = None
    prompt: str | None = None
    """Prompt on queries and passages: a model saved with prompts (e5: ``query: ``) trains with
    the one it is scored with."""
    seed: int = 0
