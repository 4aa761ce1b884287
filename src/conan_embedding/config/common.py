"""The blocks every stage's config shares: ``optim:`` (:class:`OptimConfig`), ``engine:``
(:class:`EngineConfig`), ``lora:`` (:class:`LoraSettings`), and the one way an older flat key
is still read (:func:`move_flat_keys`).

Why one vocabulary: the embedding stages, the LM stages (pretraining, SFT) and the v2 stages
3 and 4 run on the same engine, so they spell the optimiser and the loop the same way; a key
learnt for one stage means the same in every other.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    """Every config model: an unknown key is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class LoraSettings(StrictModel):
    """LoRA adapters (peft) instead of full fine-tuning; merged into the weights at save.

    The default targets are the Llama-family projection names (Llama, Qwen, Mistral, Gemma);
    GPT-2 style models name theirs ``c_attn``/``c_proj``/``c_fc``.
    """

    r: int = Field(16, gt=0)
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or ``all-linear`` (peft: every linear layer of the backbone but
    an output head): on a Llama/Qwen/Gemma/Mistral decoder that is q/k/v/o and gate/up/down,
    on a BERT encoder query/key/value/dense, so a new model family needs no list here."""


class OptimConfig(StrictModel):
    """AdamW with linear warmup then linear decay. Defaults are the Conan-v1 paper's."""

    lr: float = 1e-5
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = 0.001
    max_steps: int = Field(100, gt=0)
    grad_clip: float | None = 1.0
    scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "linear"


class CheckpointSettings(StrictModel):
    """When a stage checkpoints and how many it keeps: the one home of checkpoint options,
    read by ``training/checkpoint.py::Checkpointer`` and the engine's loop. A new option
    (asynchronous saves, say) is a field here and its use there; every stage's config
    exposes it through :class:`CheckpointFields`."""

    every: int | None = Field(None, gt=0)
    """Steps between checkpoints; ``None``: none during the run. A finished run leaves its
    model instead; a sharded run (FSDP, ZeRO-3) also checkpoints its last step."""
    keep: int = Field(2, gt=0)
    """The newest checkpoints kept; older ones are deleted after each save."""


class CheckpointFields(BaseModel):
    """The checkpoint keys every stage's YAML spells the same way (``checkpoint_every``,
    ``keep_checkpoints``); a stage re-declares a field only to change its default."""

    checkpoint_every: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)

    @property
    def checkpoint(self) -> CheckpointSettings:
        return CheckpointSettings(every=self.checkpoint_every, keep=self.keep_checkpoints)


class EngineConfig(StrictModel):
    """Devices, precision and processes (``training.engine``); the same for every stage.

    Multi-process runs start with ``torchrun`` or ``accelerate launch``; an accelerate config
    file (``accelerate launch --config_file configs/accelerate/fsdp.yaml``) picks DDP, FSDP or
    DeepSpeed, or ``deepspeed`` names a DeepSpeed JSON here.
    """

    device: str = "auto"
    """``auto`` (``cuda:LOCAL_RANK`` when a GPU is visible, else the CPU), ``cpu``, ``cuda``."""
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    """``None`` (default): whatever the launcher says (``accelerate launch --config_file
    configs/accelerate/ddp.yaml`` or ``--mixed_precision bf16``, i.e. the environment's
    ``ACCELERATE_MIXED_PRECISION``), else fp32; a value here overrides the launcher. A
    DeepSpeed JSON's ``bf16``/``fp16`` block wins over both. The precision a run really used
    is ``Engine.mixed_precision`` (logged in train.log at the start)."""
    gradient_checkpointing: bool = False
    deepspeed: str | None = None
    """Path of a DeepSpeed JSON (``configs/deepspeed-zero2.json``); needs ``pip install deepspeed``."""
    shards: int | None = Field(None, gt=0)
    """Split each step's batch into this many equal shards, each encoded with its own dropout
    seed; processes share the shards out. Default: one per process. Setting it makes a run
    give the same trajectory on any process count that divides it."""
    trackers: list[str] = Field(default_factory=lambda: ["auto"])
    """accelerate trackers (``tensorboard``, ``wandb``, ...); ``auto`` = TensorBoard when
    installed, W&B when installed and ``WANDB_API_KEY`` is set; ``[]`` = none."""
    threads: int | None = Field(None, gt=0)
    timeout_minutes: int | None = Field(30, gt=0)
    """How long a collective may wait for the slowest rank before the process group gives up
    (NCCL's watchdog, gloo's timeout). 30 minutes: rank 0 alone searches a re-mine's index or
    saves the model while the others wait at a broadcast or barrier, which NCCL's own
    10-minute default kills on a large corpus. ``None``: torch's default for the backend."""
    find_unused_parameters: bool | None = None
    """DDP's search for parameters that got no gradient (a graph walk every step). ``None``:
    the stage decides: on for the sentence-transformers stages (BERT's pooler is in no
    embedding loss), off for the LM stages (every weight is used)."""
    tf32: bool = False
    """On CUDA, fp32 matmuls and convolutions use TF32 tensor cores
    (``torch.set_float32_matmul_precision("high")``): ~2-3x faster fp32 on A100/H100 with a
    10-bit mantissa. Irrelevant under bf16/fp16 autocast; ignored on CPUs."""


def move_flat_keys(
    data: Any,
    aliases: Mapping[str, str],
    *,
    owner: str,
    fill_only: Collection[str] = (),
) -> Any:
    """``data`` (a config's raw mapping) with each older flat key of ``aliases`` moved to its
    dotted place (``steps`` -> ``optim.max_steps``), with a ``FutureWarning`` naming both.

    The flat key is applied over a value already at its place, as an override would be (the
    v2 demo merges its quick settings over a YAML section that way), except the keys of
    ``fill_only``, which only fill a place left unset or null (the older ``threads`` gave way
    to ``engine.threads``). Anything that is not a mapping is returned as is, for pydantic.
    """
    if not isinstance(data, Mapping) or not any(key in data for key in aliases):
        return data
    moved = dict(data)
    for flat, dotted in aliases.items():
        if flat not in moved:
            continue
        value = moved.pop(flat)
        warnings.warn(
            f"{owner}: the key `{flat}` is deprecated and will be removed in the next release; "
            f"write `{dotted}`",
            FutureWarning,
            stacklevel=2,
        )
        *parents, leaf = dotted.split(".")
        node = moved
        for key in parents:
            child = node.get(key)
            if isinstance(child, BaseModel):
                child = child.model_dump()
            # a copy: the caller's nested mapping is left as it was
            child = dict(child) if isinstance(child, Mapping) else {}
            node[key] = child
            node = child
        if flat not in fill_only or node.get(leaf) is None:
            node[leaf] = value
    return moved
