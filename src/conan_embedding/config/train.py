"""The embedding stages' config (weak / supervised / CBB): :class:`TrainConfig` and its
parts, and :func:`load_config`, which reads one and resolves its task paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from conan_embedding.config.common import (
    CheckpointFields,
    EngineConfig,
    LoraSettings,
    OptimConfig,
    StrictModel,
)
from conan_embedding.config.loader import load_yaml

TaskKind = Literal["retrieval", "sts", "classification", "pairs"]
"""The kinds of training task, defined once: each has a record schema
(``data/records.py::RECORD_TYPES``) and a :class:`~conan_embedding.training.task_kinds.TaskKindSpec`
(texts, loss, model-card words) in ``training/task_kinds.py::TASK_KINDS``."""


class ModelConfig(StrictModel):
    name: str = "all-MiniLM-L6-v2"
    pooling: Literal["cls", "mean", "lasttoken"] | None = None
    dense_dim: int | None = None
    normalize: bool = True
    max_seq_length: int | None = 128
    prompts: dict[str, str] = Field(default_factory=dict)
    query_prompt: str | None = None
    """Prompt name (key of ``prompts``) put before queries/first sentences; None = none."""
    passage_prompt: str | None = None
    query_max_length: int | None = Field(None, gt=0)
    """Tokens a query side text is cut at (queries of retrieval / pairs tasks, both texts of
    sts and classification tasks); None = ``max_seq_length``. Saved with the model as
    sentence-transformers' ``query_length`` (``encode_query`` honours it)."""
    passage_max_length: int | None = Field(None, gt=0)
    """Tokens a passage (positive, hard negative, mined corpus text) is cut at; None =
    ``max_seq_length``. Saved as sentence-transformers' ``document_length``."""
    instruction_template: str = "Instruct: {instruction}\nQuery: {text}"
    """How a task's ``instruction`` wraps a query-side text (e5-mistral / Qwen3-Embedding's
    form); ``{text}`` must end it, since the part before it is saved as a prompt prefix."""
    freeze_word_embeddings: bool = False
    lora: LoraSettings | None = None
    """Train LoRA adapters on the backbone instead of every weight (merged when saved)."""
    model_kwargs: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Passed to ``from_pretrained`` of the backbone, e.g. ``{torch_dtype: bfloat16,
    attn_implementation: sdpa}``."""
    matryoshka_dims: list[int] = Field(default_factory=list)
    matryoshka_weights: list[float] | None = None

    @model_validator(mode="after")
    def _check_template(self) -> ModelConfig:
        template = self.instruction_template
        if "{instruction}" not in template or not template.endswith("{text}"):
            raise ValueError(
                "model.instruction_template must contain '{instruction}' and end with "
                f"'{{text}}' (its head is saved as a prompt prefix), got {template!r}"
            )
        return self

    def instruction_prompt(self, instruction: str) -> str:
        """The prompt prefix (text before the query) of a task's ``instruction``."""
        head = self.instruction_template[: -len("{text}")]
        return head.replace("{instruction}", instruction)


class DynamicNegativesConfig(StrictModel):
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


class TaskConfig(StrictModel):
    name: str
    kind: TaskKind
    path: str
    """A JSONL file, or a dataset input (docs/data.md): a ``save_to_disk`` folder, a
    ``.parquet``/``.arrow`` file or ``hf://owner/name[:config][:split]``."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Dataset inputs: schema field -> column, e.g. ``{query: question, pos: answer}``
    (unmapped fields read the column of their own name)."""
    split: str | None = None
    """Dataset inputs: the split of a ``DatasetDict`` folder or hub dataset."""
    streaming: bool = False
    """Refused (kept so the reason is given): the trainer reads by index, and dataset inputs
    are memory-mapped Arrow, which is already lazy (``data/hf_sources.py``)."""
    batch_size: int = Field(gt=0)
    weight: float = Field(1.0, ge=0)
    negatives: int = Field(0, ge=0)
    """Hard negatives per query (retrieval) or other-label texts per text (classification)."""
    max_rows: int | None = None
    score_scale: float | None = None
    """Divide STS gold scores by this (CoSENT only needs their order; kept for reporting)."""
    in_batch_negatives: bool = True
    dynamic_negatives: DynamicNegativesConfig = Field(default_factory=DynamicNegativesConfig)
    false_negative_margin: float | None = Field(None, ge=0)
    """Retrieval / pairs: leave out of a query's InfoNCE denominator every term scoring above
    ``s(q, p) + margin`` (hard, in-batch, and the query-/passage-negative terms below); None =
    off. 0.1 is Qwen3-Embedding's (arXiv:2506.05176, its training objective; ms-swift's
    ``INFONCE_FAKE_NEG_MARGIN``). Logged per step as ``masked_negatives/<task>``."""
    query_negatives: bool = False
    """Retrieval / pairs: the batch's other queries ``q_j`` join query ``i``'s denominator."""
    passage_negatives: bool = False
    """Retrieval / pairs: ``s(p_i, p_j)`` against the other queries' positives joins query
    ``i``'s denominator (gte's improved contrastive loss; ``losses/infonce.py`` has the formula)."""
    instruction: str | None = None
    """A task instruction for the query side, wrapped by ``model.instruction_template``
    (``Instruct: {instruction}\nQuery: {text}``): queries of retrieval / pairs tasks, both texts
    of sts and classification tasks (symmetric, as e5-mistral). It replaces
    ``model.query_prompt`` for this task and is saved as the model's prompt named after the task."""
    mini_batch_size: int | None = Field(None, gt=0)
    """GradCache (Gao et al., 2021; ``training/gradcache.py``): encode the batch in forwards of
    at most this many texts, compute the loss on the cached embeddings, then re-encode each
    mini-batch with its graph (same dropout) and back-propagate its part of the embedding
    gradient. The same loss and gradients as the whole batch at once, at the activation
    memory of one mini-batch (and about one more forward). None = off."""

    @model_validator(mode="after")
    def _check_kind(self) -> TaskConfig:
        if self.kind in ("sts", "pairs") and self.negatives:
            raise ValueError(f"task '{self.name}': {self.kind} tasks take no negatives")
        if self.kind not in ("retrieval", "pairs") and self.false_negative_control():
            raise ValueError(
                f"task '{self.name}': {', '.join(self.false_negative_control())} apply to "
                f"retrieval and pairs tasks only, not {self.kind}"
            )
        self._check_dataset_input()
        return self

    def false_negative_control(self) -> list[str]:
        """The false-negative options this task turns on (their config names)."""
        out = ["false_negative_margin"] if self.false_negative_margin is not None else []
        return out + [n for n in ("query_negatives", "passage_negatives") if getattr(self, n)]

    def _check_dataset_input(self) -> None:
        where = f"task '{self.name}' ({self.path})"
        if self.streaming:
            raise ValueError(
                f"{where}: streaming: true is not supported: the trainer draws each step's "
                "batch by index (seeded shuffle, a share per rank, exact resume), which an "
                "iterable cannot give. Dataset inputs are memory-mapped Arrow and already lazy "
                "(no row is held in memory; a hub dataset is downloaded once into the datasets "
                "cache): remove streaming"
            )
        if (self.columns or self.split) and self.path.endswith((".jsonl", ".json", ".tsv")):
            raise ValueError(
                f"{where}: columns and split apply to dataset inputs (a save_to_disk folder, "
                ".parquet, .arrow or hf://owner/name), not to a JSONL file"
            )
        dhnm = self.dynamic_negatives
        if self.path.startswith("hf://") and dhnm.rule != "none" and dhnm.pool_path is None:
            raise ValueError(
                f"{where}: dynamic negatives need a mined pool, and `conan-embed mine` reads "
                f"local files: `conan-embed data export {self.path} OUT.jsonl --kind "
                f"{self.kind}`, `conan-embed mine OUT.jsonl MINED.jsonl`, then set "
                "dynamic_negatives.pool_path to MINED.pool.json (or train on MINED.jsonl)"
            )


class TeacherFilterConfig(StrictModel):
    """Weak stage: drop pairs the teacher embedder scores below ``threshold`` (paper: 0.4)."""

    model: str
    threshold: float = 0.4
    batch_size: int = 64


class CBBConfig(StrictModel):
    """Cross-GPU batch balance (``training.cbb``): every task in every step.

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
    grad_balance: Literal["none", "norm", "loss_rate"] = "none"
    """``norm`` rescales each task's gradient to ``w_t * M`` (``M`` the mean of the tasks'
    gradient norms) before the optimizer step, so the weights set each task's share of the
    step whatever its loss scale; ``loss_rate`` to ``w_t * rho_t * M``, where ``rho_t`` is the
    task's loss against its start relative to the other tasks', so a task that has shed its
    loss gets less (:mod:`conan_embedding.training.grad_balance`); virtual devices only."""
    grad_balance_alpha: float = Field(1.0, ge=0, le=1)
    """How far ``grad_balance`` goes: each task's norm becomes ``||g_t|| ** (1 - alpha)
    * target ** alpha`` (1: fully balanced, 0: the plain sum)."""
    grad_balance_rate_floor: float = Field(0.0, ge=0, le=1)
    """``loss_rate`` only: a task's rate counts as at least this, so a task that has shed
    nearly all its loss keeps some share of the step (0: no floor)."""

    @model_validator(mode="after")
    def _floor_needs_loss_rate(self) -> CBBConfig:
        if self.grad_balance_rate_floor > 0 and self.grad_balance != "loss_rate":
            raise ValueError(
                f"cbb.grad_balance_rate_floor ({self.grad_balance_rate_floor}) bounds the "
                f"loss_rate balance; cbb.grad_balance is {self.grad_balance!r}"
            )
        return self


class HeldoutConfig(StrictModel):
    """Rows of the training files kept out of training to measure a validation loss on."""

    fraction: float | None = Field(None, gt=0, lt=1)
    """Share of each task's rows (after ``max_rows``) held out; or give ``rows``."""
    rows: int | None = Field(None, gt=0)
    """Rows held out per task (at most all but one batch of it)."""
    tasks: list[str] = Field(default_factory=list)
    """The training tasks to hold rows out of (empty: every retrieval, pairs and STS task;
    classification tasks have no held-out loss)."""
    batch_size: int | None = Field(None, gt=0)
    """Rows per held-out loss batch (default: the task's ``batch_size``); in-batch negatives
    come from the same batch, so keep it equal across runs you compare."""

    @model_validator(mode="after")
    def _one_size(self) -> HeldoutConfig:
        if (self.fraction is None) == (self.rows is None):
            raise ValueError("validation.heldout: give exactly one of fraction or rows")
        return self


class EarlyStoppingConfig(StrictModel):
    patience: int = Field(gt=0)
    """Validations in a row without an improvement of more than ``min_delta`` that stop the run."""
    min_delta: float = Field(0.0, ge=0)


class ValidationConfig(StrictModel):
    """Validation during training (docs/training.md, "Validation during training").

    Every ``every`` steps (and at the last step) the model is scored on ``tasks`` (local
    evaluation tasks, by name; the evaluation layer passes the trainer its function) and/or on
    a ``heldout`` slice of the training files (the training loss on rows never trained on).
    ``metric`` picks the number that ranks validations: a task name (its mteb main score),
    ``loss`` (the held-out loss, task-weighted) or ``loss/<task>``.
    """

    every: int = Field(gt=0)
    tasks: list[str] = Field(default_factory=list)
    max_pairs: int | None = Field(200, gt=0)
    """STS tasks: score a seeded sample of this many pairs (speed; None = the whole set)."""
    max_corpus: int | None = Field(2000, gt=0)
    """Retrieval tasks: cap the corpus (relevant documents always kept; None = whole)."""
    data_dir: str | None = None
    """Where the tasks' local data lives (default: the evaluation's own data folder)."""
    batch_size: int = Field(64, gt=0)
    heldout: HeldoutConfig | None = None
    metric: str | None = None
    """Default: the first task's name, else ``loss``."""
    mode: Literal["max", "min"] | None = None
    """Default: ``min`` for ``loss`` metrics, ``max`` for task scores."""
    keep_best: bool = True
    """Save the best validation's model as ``<output_dir>/best`` (atomically, safetensors)."""
    early_stopping: EarlyStoppingConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> ValidationConfig:
        if not self.tasks and self.heldout is None:
            raise ValueError("validation: give tasks, heldout, or both")
        if self.metric is None:
            self.metric = self.tasks[0] if self.tasks else "loss"
        is_loss = self.metric == "loss" or self.metric.startswith("loss/")
        if is_loss and self.heldout is None:
            raise ValueError(f"validation.metric '{self.metric}' needs validation.heldout")
        if not is_loss and self.metric not in self.tasks:
            raise ValueError(
                f"validation.metric '{self.metric}' is neither 'loss', 'loss/<task>' nor one "
                f"of validation.tasks {self.tasks}"
            )
        if self.mode is None:
            self.mode = "min" if is_loss else "max"
        return self

    @property
    def key(self) -> str:
        """The metric as the log names it (``val/<metric>``)."""
        return f"val/{self.metric}"


class TrainConfig(CheckpointFields, StrictModel):
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
    checkpoint_every: int | None = Field(50, gt=0)
    log_every: int = Field(10, gt=0)
    loss_plot: bool = True
    """Draw ``loss.png`` from ``train_log.jsonl`` when the run ends (matplotlib: about half a
    second to a second on a small CPU). Off: the log alone, which holds the same figures
    (``conan_embedding.training.logs.plot_losses`` draws it later)."""
    data_dir: str | None = None
    """Relative task paths resolve against this folder (else the current directory)."""
    validation: ValidationConfig | None = None
    """Validation during training: curve in the log, best model kept, early stopping."""
    eval_prompts: dict[str, str] = Field(default_factory=dict)
    """How the trained model is evaluated: an mteb task name or type (``STS``, ``Retrieval``,
    ``BitextMining``) -> the model prompt for its queries (both sides of a symmetric task):
    a task with an ``instruction`` (its prompt is named after it) or a ``model.prompts`` key.
    ``conan-embed recipe run`` passes it as ``evaluate(prompt_map=...)``, so an arm trained
    with instructions is scored with them."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        if self.stage == "weak" and any(t.kind not in ("pairs", "retrieval") for t in self.tasks):
            raise ValueError("the weak stage trains on 'pairs' or 'retrieval' tasks only")
        if self.teacher_filter is not None and self.stage != "weak":
            raise ValueError("teacher_filter applies to the weak stage only")
        if self.cbb is not None:
            for task in self.tasks:
                if task.mini_batch_size is not None:
                    raise ValueError(
                        f"task '{task.name}': mini_batch_size (GradCache) is the plain "
                        "trainer's; under CBB (the 'cbb' section) set cbb.grad_cache instead"
                    )
        if self.validation is not None and self.validation.heldout is not None:
            self._check_heldout(self.validation)
        known = {t.name for t in self.tasks if t.instruction} | set(self.model.prompts)
        unknown = {k: v for k, v in self.eval_prompts.items() if v not in known}
        if unknown:
            raise ValueError(
                f"eval_prompts {unknown}: no such prompt; the trained model's prompts are "
                f"{sorted(known)} (tasks with an instruction, and model.prompts)"
            )
        return self

    def _check_heldout(self, validation: ValidationConfig) -> None:
        kinds = {t.name: t.kind for t in self.tasks}
        heldout = validation.heldout
        assert heldout is not None
        for name in heldout.tasks:
            if name not in kinds:
                raise ValueError(f"validation.heldout.tasks: no training task '{name}'")
            if kinds[name] == "classification":
                raise ValueError(
                    f"validation.heldout.tasks: '{name}' is a classification task, which has "
                    "no held-out loss (retrieval, pairs and sts tasks have)"
                )
        held = self.heldout_tasks()
        if not held:
            raise ValueError(
                "validation.heldout: no retrieval, pairs or sts task to hold rows out of"
            )
        metric = validation.metric or ""
        if metric.startswith("loss/") and metric[5:] not in held:
            raise ValueError(f"validation.metric '{metric}': no held-out task '{metric[5:]}'")

    def heldout_tasks(self) -> list[str]:
        """The tasks ``validation.heldout`` holds rows out of (empty without it)."""
        if self.validation is None or self.validation.heldout is None:
            return []
        chosen = self.validation.heldout.tasks
        return [
            t.name
            for t in self.tasks
            if (t.name in chosen if chosen else t.kind != "classification")
        ]


def load_config(path: str | os.PathLike[str], overrides: dict | None = None) -> TrainConfig:
    """Read and validate a training YAML (a path, or a packaged recipe name such as
    ``minilm-v1`` or ``v1/full``); errors name the file and the offending key. Relative task
    paths resolve against ``data_dir`` (else the current directory)."""
    config = load_yaml(path, TrainConfig, overrides)
    base = Path(config.data_dir) if config.data_dir else Path.cwd()
    for task in config.tasks:
        if not task.path.startswith("hf://") and not Path(task.path).is_absolute():
            task.path = str((base / task.path).resolve())
    return config
