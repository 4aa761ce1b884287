"""Pydantic models of the training configs, and :func:`load_yaml`, the one loader of every
YAML config into its pydantic model.

A wrong or misspelt key is an error that names the file and the key path, every problem of
the file at once, e.g. ``configs/x.yaml: optim.lrr: Extra inputs are not permitted``. A file
may start from another: ``base: full`` plus dotted ``set:`` / ``drop:`` keys (list items of
``tasks`` addressed by name), see :func:`read_yaml`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSettings(_Strict):
    """LoRA adapters (peft) instead of full fine-tuning; merged into the weights at save.

    The default targets are the Llama-family projection names (Llama, Qwen, Mistral, Gemma);
    GPT-2 style models name theirs ``c_attn``/``c_proj``/``c_fc``.
    """

    r: int = Field(16, gt=0)
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )


class ModelConfig(_Strict):
    name: str = "all-MiniLM-L6-v2"
    pooling: Literal["cls", "mean", "lasttoken"] | None = None
    dense_dim: int | None = None
    normalize: bool = True
    max_seq_length: int | None = 128
    prompts: dict[str, str] = Field(default_factory=dict)
    query_prompt: str | None = None
    """Prompt name (key of ``prompts``) put before queries/first sentences; None = none."""
    passage_prompt: str | None = None
    freeze_word_embeddings: bool = False
    lora: LoraSettings | None = None
    """Train LoRA adapters on the backbone instead of every weight (merged when saved)."""
    model_kwargs: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Passed to ``from_pretrained`` of the backbone, e.g. ``{torch_dtype: bfloat16,
    attn_implementation: sdpa}``."""
    matryoshka_dims: list[int] = Field(default_factory=list)
    matryoshka_weights: list[float] | None = None


class OptimConfig(_Strict):
    """AdamW with linear warmup then linear decay. Defaults are the Conan-v1 paper's."""

    lr: float = 1e-5
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = 0.001
    max_steps: int = Field(100, gt=0)
    grad_clip: float | None = 1.0
    scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "linear"


class EngineConfig(_Strict):
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
    (NCCL's watchdog, gloo's timeout). 30 minutes: rank 0 alone re-mines hard negatives or
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


class DynamicNegativesConfig(_Strict):
    """Dynamic hard negative mining (``mining.dynamic``); ``rule: none`` keeps negatives static."""

    rule: Literal["none", "v1", "v2"] = "none"
    pool_path: str | None = None
    check_every: int = Field(100, gt=0)
    """v1: check every N steps (paper: 100; the v2 paper says 1k)."""
    v1_decay: float = 1.15
    v1_abs_cap: float = 0.8
    v1_current: Literal["encode", "observed"] = "encode"
    """v1's "current" score: re-encode the sample's negatives at the check (the paper), or
    reuse the last scores the loss computed (free, possibly stale)."""
    v2_never_hard: float = 0.4
    """v2: a negative whose score at assignment ``S_0`` is below this was never hard. The
    paper's 0.4 assumes its model's score scale: set it under the pool's typical scores
    (``conan-embed mine`` reports them) or use ``thresholds: pool_quantile``, else every
    candidate counts as never hard and v2 walks down the pool to easier ones (measured with
    MiniLM on STS-B, see tests/test_dynamic_integration.py)."""
    v2_decay: float = 1.2
    v2_abs_cap: float = 0.7
    thresholds: Literal["absolute", "pool_quantile"] = "absolute"
    """``absolute``: the numbers above are cosine scores (the papers'). ``pool_quantile``: the
    same numbers are applied to each score's quantile ``F(s)`` in the pool's score distribution,
    so the rule works on a model whose scores sit in a narrow band (e.g. me5-small, ~0.89)."""
    initial_score: Literal["auto", "pool", "assignment"] = "auto"
    """``S_0``: the pool's mined score (``pool``), the current model's score at assignment
    (``assignment``), or ``auto``: the pool's when its meta matches the training model's."""
    calibration_size: int = Field(1024, gt=0)
    """``pool_quantile`` without pool scores on the model's scale: fit ``F`` on this many S_0."""
    pool_offset: int = Field(10, ge=0)
    remine_every: int = Field(0, ge=0)
    """Beyond the paper: re-mine the pools with the current model every N steps (0 = off)."""
    remine_relative_margin: float | None = 0.05
    encode_batch: int = Field(256, gt=0)


class TaskConfig(_Strict):
    name: str
    kind: Literal["retrieval", "sts", "classification", "pairs"]
    path: str
    batch_size: int = Field(gt=0)
    weight: float = Field(1.0, ge=0)
    negatives: int = Field(0, ge=0)
    """Hard negatives per query (retrieval) or other-label texts per text (classification)."""
    max_rows: int | None = None
    score_scale: float | None = None
    """Divide STS gold scores by this (CoSENT only needs their order; kept for reporting)."""
    in_batch_negatives: bool = True
    dynamic_negatives: DynamicNegativesConfig = Field(default_factory=DynamicNegativesConfig)

    @model_validator(mode="after")
    def _check_kind(self) -> TaskConfig:
        if self.kind in ("sts", "pairs") and self.negatives:
            raise ValueError(f"task '{self.name}': {self.kind} tasks take no negatives")
        return self


class TeacherFilterConfig(_Strict):
    """Weak stage: drop pairs the teacher embedder scores below ``threshold`` (paper: 0.4)."""

    model: str
    threshold: float = 0.4
    batch_size: int = 64


class CBBConfig(_Strict):
    """Cross-GPU batch balance (``training.distributed``): every task in every step.

    ``world_size`` devices, real (one ``torchrun`` process each) or virtual (one process steps
    through them). ``task_ranks`` maps a task name to the devices that run it; when empty,
    retrieval tasks run on devices ``0..W-2`` and every other task on the last one (all on
    device 0 when ``W == 1``). Devices of a retrieval task share its queries and positives and
    each holds ``negatives`` different hard negatives per query; ``beta`` weighs STS (CoSENT)
    tasks: ``L = InfoNCE + beta * CoSENT``.
    """

    world_size: int = Field(2, ge=1)
    task_ranks: dict[str, list[int]] = Field(default_factory=dict)
    beta: float = Field(0.8, ge=0)
    grad_cache: bool = True
    """Virtual devices: encode each device's share twice (GradCache: memory of one device) or
    all at once with their graphs (faster; needs memory for all of them)."""
    in_batch_negatives: bool = False
    """The paper's L_CBB: a query's denominator holds its positive and the N devices' negatives
    of that query only. True adds the other queries' positives and negatives."""


class TrainConfig(_Strict):
    stage: Literal["weak", "supervised"] = "supervised"
    output_dir: str = "runs/train"
    seed: int = 42
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    temperature: float = Field(0.05, gt=0)
    task_schedule: Literal["round_robin", "random_task", "proportional", "all_tasks"] = (
        "round_robin"
    )
    """How each step picks its task(s); every batch holds one task (task-homogeneous).
    ``all_tasks`` steps through every task each step and sums their losses (the
    single-process reading of Conan's cross-GPU batch balance)."""
    tasks: list[TaskConfig] = Field(min_length=1)
    teacher_filter: TeacherFilterConfig | None = None
    cbb: CBBConfig | None = None
    """Set to train with cross-GPU batch balance (``conan-embed train CONFIG``, or
    ``torchrun ... -m conan_embedding.cli train CONFIG``);
    ``task_schedule`` is then ignored (every task runs every step)."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    checkpoint_every: int = Field(50, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    data_dir: str | None = None
    """Relative task paths resolve against this folder (else the current directory)."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        if self.stage == "weak" and any(t.kind not in ("pairs", "retrieval") for t in self.tasks):
            raise ValueError("the weak stage trains on 'pairs' or 'retrieval' tasks only")
        if self.teacher_filter is not None and self.stage != "weak":
            raise ValueError("teacher_filter applies to the weak stage only")
        return self


class ConfigError(ValueError):
    """A config that cannot be read or validated; the message is ``file: key: problem``
    (every problem of the file, joined with ``; ``)."""


M = TypeVar("M", bound=BaseModel)

# keys of a config file that are loader directives, not config keys
_DIRECTIVES = ("base", "set", "drop")


def recipe_path(name: str) -> Path | None:
    """The packaged recipe called ``name`` (``minilm-v1``, ``v1/full``), if there is one."""
    from importlib import resources

    candidate = Path(str(resources.files("conan_embedding") / "recipes" / f"{name}.yaml"))
    return candidate if candidate.is_file() else None


def resolve_config_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, else the packaged recipe of that name; a ConfigError when neither."""
    if not Path(path).exists() and recipe_path(str(path)) is not None:
        return recipe_path(str(path))  # type: ignore[return-value]
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such config file (nor a packaged recipe of that name)")
    return Path(path)


def _segment(node: Any, key: str, dotted: str) -> tuple[Any, Any]:
    """(container, index) of ``key`` in ``node``: a mapping key, or in a list of mappings the
    item whose ``name`` is ``key`` (index ``None`` when there is no such item)."""
    if isinstance(node, dict):
        return node, key
    if isinstance(node, list) and all(isinstance(item, dict) for item in node):
        for i, item in enumerate(node):
            if item.get("name") == key:
                return node, i
        return node, None
    raise ValueError(f"cannot address {key!r} inside a {type(node).__name__} ({dotted})")


def _walk(raw: dict[str, Any], dotted: str, create: bool) -> tuple[Any, Any, str]:
    """The container holding the last key of ``dotted``, its index there, and that key.
    Mapping keys on the way are created when ``create``; list items never are."""
    *parents, leaf = dotted.split(".")
    node: Any = raw
    for key in parents:
        container, index = _segment(node, key, dotted)
        if index is None:
            raise ValueError(f"no item named {key!r} (list items are addressed by their name)")
        child = container[index] if isinstance(container, list) else container.get(index)
        if child is None:
            if not create or isinstance(container, list):
                raise ValueError(f"{key!r} is not set")
            child = container[index] = {}
        node = child
    container, index = _segment(node, leaf, dotted)
    return container, index, leaf


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Assign ``value`` at ``dotted`` (``optim.lr``, ``tasks.bge.negatives``) in place.

    A list of named mappings (``tasks``) is addressed by item name. Setting an item that does
    not exist adds it (``value`` a mapping; its ``name`` is the key), at the end, or where its
    ``_after: <name>`` / ``_before: <name>`` says. ``None`` sets ``null``; ``drop`` removes."""
    container, index, leaf = _walk(raw, dotted, create=True)
    if isinstance(container, dict):
        container[leaf] = value
        return
    if not isinstance(value, dict):
        raise ValueError(f"a list item ({leaf!r}) must be set to a mapping")
    if value.get("name", leaf) != leaf:
        raise ValueError(f"the item's name {value['name']!r} is not its key {leaf!r}")
    item = {"name": leaf, **{k: v for k, v in value.items() if k not in ("_after", "_before")}}
    if index is not None:
        container[index] = item
        return
    anchor = value.get("_after") or value.get("_before")
    if anchor is None:
        container.append(item)
        return
    names = [other.get("name") for other in container]
    if anchor not in names:
        raise ValueError(f"no item named {anchor!r} to put {leaf!r} next to")
    container.insert(names.index(anchor) + (1 if "_after" in value else 0), item)


def drop_dotted(raw: dict[str, Any], dotted: str) -> None:
    """Remove the key (or named list item) at ``dotted``; an error when it is not there."""
    container, index, leaf = _walk(raw, dotted, create=False)
    if isinstance(container, dict):
        if leaf not in container:
            raise ValueError("not set, nothing to drop")
        del container[leaf]
    elif index is None:
        raise ValueError(f"no item named {leaf!r} to drop")
    else:
        del container[index]


def read_yaml(path: str | os.PathLike[str], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping with its ``base:`` / ``set:`` / ``drop:`` directives resolved.

    ``base: full`` starts from ``full.yaml`` beside this file (a value ending in ``.yaml`` is
    a path relative to this file's folder); the file's other top-level keys then replace the
    base's, ``set:`` assigns dotted keys (see :func:`set_dotted`) and ``drop:`` removes
    dotted keys. A base may itself have a base."""
    path = Path(path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"{path}: base: a cycle ({chain})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    if not any(key in raw for key in _DIRECTIVES):
        return raw
    problems: list[str] = []
    base = raw.pop("base", None)
    edits = raw.pop("set", None) or {}
    drops = raw.pop("drop", None) or []
    merged: dict[str, Any] = {}
    if base is not None:
        name = str(base)
        base_path = path.parent / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if not base_path.is_file():
            raise ConfigError(f"{path}: base: no file {base_path}")
        merged = read_yaml(base_path, (*_seen, path.resolve()))
    merged.update(raw)
    if not isinstance(edits, dict):
        problems.append("set: must be a mapping of dotted keys to values")
        edits = {}
    if not isinstance(drops, list):
        problems.append("drop: must be a list of dotted keys")
        drops = []
    for dotted, value in edits.items():
        try:
            set_dotted(merged, str(dotted), value)
        except ValueError as err:
            problems.append(f"set.{dotted}: {err}")
    for dotted in drops:
        try:
            drop_dotted(merged, str(dotted))
        except ValueError as err:
            problems.append(f"drop.{dotted}: {err}")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return merged


def _location(loc: tuple[Any, ...], raw: Any) -> str:
    """A pydantic error location as a dotted key, list items by name where they have one."""
    parts: list[str] = []
    node = raw
    for part in loc:
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            node = node[part]
            name = node.get("name") if isinstance(node, dict) else None
            parts.append(str(name) if isinstance(name, str) else str(part))
            continue
        node = node.get(part) if isinstance(node, dict) else None
        parts.append(str(part))
    return ".".join(parts) or "<top>"


def load_yaml(
    path: str | os.PathLike[str], model: type[M], overrides: Mapping[str, Any] | None = None
) -> M:
    """The one loader of every YAML config: read ``path`` (or the packaged recipe of that
    name), resolve ``base:`` / ``set:`` / ``drop:`` (:func:`read_yaml`), apply ``overrides``
    (dotted keys, :func:`set_dotted`; ``None`` sets ``null``, so leave out what is unset),
    validate into ``model``. Every problem at once: ``file: key: problem; key: problem``."""
    path = resolve_config_path(path)
    raw = read_yaml(path)
    problems: list[str] = []
    for dotted, value in (overrides or {}).items():
        try:
            set_dotted(raw, dotted, value)
        except ValueError as err:
            problems.append(f"{dotted}: {err}")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = [f"{_location(e['loc'], raw)}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{path}: " + "; ".join(problems)) from None


def load_config(path: str | os.PathLike[str], overrides: dict | None = None) -> TrainConfig:
    """Read and validate a training YAML (a path, or a packaged recipe name such as
    ``minilm-v1`` or ``v1/full``); errors name the file and the offending key. Relative task
    paths resolve against ``data_dir`` (else the current directory)."""
    config = load_yaml(path, TrainConfig, overrides)
    base = Path(config.data_dir) if config.data_dir else Path.cwd()
    for task in config.tasks:
        if not Path(task.path).is_absolute():
            task.path = str((base / task.path).resolve())
    return config
