"""The model card (``README.md``) a training run writes into every saved model folder.

Why: sentence-transformers' generic card can only say "a sentence-transformers model"; it does
not know what Conan did to it. Someone who finds a checkpoint months later needs the base
model, the data each task read and how much of it, the stage, the losses, and how every Conan
mechanism was set: cross-GPU batch balance (CBB) with its device layout, dynamic hard negative
mining (DHNM) with its rule, Matryoshka dims, the v2 soft mask schedule, cross-lingual
retrieval (CLR) data, and the evaluation table when one was run. That is what this card holds.

How: the trainer fills a :class:`CardInfo` from its :class:`~conan_embedding.config.TrainConfig`
with :func:`card_info_from_config` (plus the rows each task used) and hands
:func:`card_writer` to :func:`~conan_embedding.modeling.embedder.save_embedder` as its
``readme``; inside the temp model folder, :func:`write_model_card` reads what the saved folder
itself says (modules, width, prompts) and renders markdown with Hugging Face front matter.
The card is reporting, not modeling: it knows configs, data sources and losses, so it sits in
the reporting layer and the embedder never imports it (docs/architecture.md). The card holds only facts from those inputs; a section whose
mechanism was off says so in one line. The full config is embedded as YAML, so the card is
also the recipe to retrain the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from conan_embedding._io import write_text_atomic
from conan_embedding.data.sources import prepared_source
from conan_embedding.modeling.embedder import looks_like_local_path
from conan_embedding.provenance import versions

CARD_FILE = "README.md"


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
    """pooling, dense_dim, normalize, max_seq_length, prompts, freeze_word_embeddings."""
    matryoshka_dims: list[int] = Field(default_factory=list)
    matryoshka_weights: list[float] | None = None
    tasks: list[TaskCard]
    cbb: CBBCard | None = None
    teacher_filter: dict[str, Any] | None = None
    soft_mask: SoftMaskCard | None = None
    notes: list[str] = Field(default_factory=list)
    """Further facts of the run, one bullet each under Training (e.g. LoRA settings)."""
    config_yaml: str | None = None
    """The training config, to retrain the model."""

    def writer(
        self, evaluation: Mapping[str, Any] | None = None, title: str | None = None
    ) -> Callable[[Path], Path]:
        """:func:`card_writer` for this card (what ``save_embedder(card=...)`` still calls)."""
        return card_writer(self, evaluation, title)


# --------------------------------------------------------------------------- from a config
def _loss_name(task: Any, stage: str, temperature: float, cbb: bool, beta: float) -> str:
    """The loss a task trains with, in words (what ``training.trainer`` / CBB compute)."""
    tau = f"τ = {temperature:g}"
    if task.kind == "sts":
        return f"CoSENT ({tau})" + (f", weight β = {beta:g}" if cbb else "")
    if task.kind == "classification":
        extra = f", {task.negatives} other-label texts" if task.negatives else ""
        return f"classification as retrieval (InfoNCE, {tau}{extra})"
    parts = [f"InfoNCE ({tau}"]
    if task.kind == "retrieval" and task.negatives:
        plural = "s" if task.negatives != 1 else ""
        parts.append(f", {task.negatives} hard negative{plural}" + (" per device" if cbb else ""))
    if task.in_batch_negatives:
        parts.append(", in-batch negatives")
    return "".join(parts) + ")"


def _data_source(path: str) -> str | None:
    return prepared_source(path)


def _clr_report(path: str) -> dict[str, Any] | None:
    """The report ``conan-embed data clr`` writes beside its output, when there is one."""
    report = Path(path).with_suffix(".report.json")
    if not report.is_file():
        return None
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or "translator" not in data:
        return None
    keep = ("translator", "weights", "translated", "untranslatable", "dropped_eval")
    return {k: data[k] for k in keep if k in data}


def _dhnm(task: Any) -> dict[str, Any] | None:
    if task.kind != "retrieval":
        return None
    d = task.dynamic_negatives
    if d.rule == "none":
        return None
    out: dict[str, Any] = {"rule": d.rule, "check_every": d.check_every}
    if d.rule == "v1":
        out.update(decay=d.v1_decay, abs_cap=d.v1_abs_cap, current=d.v1_current)
    else:
        out.update(never_hard=d.v2_never_hard, decay=d.v2_decay, abs_cap=d.v2_abs_cap)
    out["pool_offset"] = d.pool_offset
    if d.pool_path:
        out["pool"] = d.pool_path
    if d.remine_every:
        out["remine_every"] = d.remine_every
    return out


def _cbb_devices(config: Any) -> dict[str, list[int]]:
    """``cbb.task_ranks`` sorted, or the default: retrieval on ``0..W-2``, the rest on ``W-1``."""
    cbb = config.cbb
    if cbb.task_ranks:
        return {name: sorted(ranks) for name, ranks in cbb.task_ranks.items()}
    world = cbb.world_size
    if world == 1:
        return {t.name: [0] for t in config.tasks}
    return {
        t.name: list(range(world - 1)) if t.kind == "retrieval" else [world - 1]
        for t in config.tasks
    }


def task_rows_in_files(config: Any) -> dict[str, int]:
    """Rows each task's file holds (non-blank lines), capped at its ``max_rows``: the rows a
    run used when no teacher filter dropped any. For callers that do not have the trainer's
    own counts; missing files are left out."""
    rows: dict[str, int] = {}
    for task in config.tasks:
        path = Path(task.path)
        if not path.is_file():
            continue
        with open(path, encoding="utf-8-sig") as handle:
            count = sum(1 for line in handle if line.strip())
        rows[task.name] = min(count, task.max_rows) if task.max_rows else count
    return rows


def card_info_from_config(
    config: Any,
    task_rows: Mapping[str, int] | None = None,
    *,
    title: str | None = None,
    stages: list[str] | None = None,
    soft_mask: SoftMaskCard | None = None,
    clr: Mapping[str, dict[str, Any]] | None = None,
) -> CardInfo:
    """A :class:`CardInfo` from a :class:`~conan_embedding.config.TrainConfig`.

    ``task_rows`` maps task name -> rows the run used. ``clr`` marks tasks whose data is
    cross-lingual retrieval (name -> facts to show); files written by ``conan-embed data clr``
    are found on their own through the ``.report.json`` beside them.
    """
    rows = dict(task_rows or {})
    unknown = sorted(set(rows) - {t.name for t in config.tasks})
    if unknown:
        raise ValueError(f"task_rows names tasks not in the config: {unknown}")
    clr = dict(clr or {})
    cbb = config.cbb
    beta = cbb.beta if cbb is not None else 0.0
    tasks = [
        TaskCard(
            name=t.name,
            kind=t.kind,
            data=t.path,
            source=_data_source(t.path),
            rows=rows.get(t.name),
            max_rows=t.max_rows,
            batch_size=t.batch_size,
            weight=t.weight,
            negatives=t.negatives,
            in_batch_negatives=t.in_batch_negatives,
            loss=_loss_name(t, config.stage, config.temperature, cbb is not None, beta),
            dhnm=_dhnm(t),
            clr=clr.get(t.name) or (_clr_report(t.path) if t.kind == "retrieval" else None),
        )
        for t in config.tasks
    ]
    mc = config.model
    return CardInfo(
        title=title,
        base_model=mc.name,
        stage=config.stage,
        stages=list(stages or []),
        steps=config.optim.max_steps,
        seed=config.seed,
        temperature=config.temperature,
        task_schedule="all_tasks (CBB)" if cbb is not None else config.task_schedule,
        optim=config.optim.model_dump(),
        model={
            "pooling": mc.pooling,
            "dense_dim": mc.dense_dim,
            "normalize": mc.normalize,
            "max_seq_length": mc.max_seq_length,
            "prompts": dict(mc.prompts),
            "query_prompt": mc.query_prompt,
            "passage_prompt": mc.passage_prompt,
            "freeze_word_embeddings": mc.freeze_word_embeddings,
        },
        matryoshka_dims=sorted(mc.matryoshka_dims),
        matryoshka_weights=mc.matryoshka_weights,
        tasks=tasks,
        cbb=None
        if cbb is None
        else CBBCard(
            world_size=cbb.world_size,
            task_devices=_cbb_devices(config),
            beta=cbb.beta,
            grad_cache=cbb.grad_cache,
            layout_given=bool(cbb.task_ranks),
        ),
        teacher_filter=config.teacher_filter.model_dump() if config.teacher_filter else None,
        soft_mask=soft_mask,
        config_yaml=yaml.safe_dump(
            config.model_dump(mode="json", exclude_defaults=True),
            sort_keys=False,
            allow_unicode=True,
        ),
    )


def llm_stages(path: str | os.PathLike[str], depth: int = 4) -> list[str]:
    """The stages that made the causal LM in ``path``, oldest first, as its folder records
    them: ``conan_llm.json`` (pretrain/sft, whose ``base_model`` is followed back) or
    ``conan_import.json`` (a GGUF import). Empty when the folder records nothing, so a card
    never claims stages it cannot show."""
    folder = Path(path)
    meta = _read_json(folder / "conan_llm.json")
    if isinstance(meta, dict) and meta.get("stage"):
        base = meta.get("base_model")
        earlier = llm_stages(base, depth - 1) if base and depth > 1 else []
        return [*earlier, str(meta["stage"])]
    imported = _read_json(folder / "conan_import.json")
    if isinstance(imported, dict):
        return [f"import ({imported.get('source') or 'GGUF'})"]
    return []


def card_info_from_weak_stage(
    config: Any,
    rows: int | None = None,
    *,
    title: str | None = None,
    stages: list[str] | None = None,
    losses: list[float] | None = None,
) -> CardInfo:
    """A :class:`CardInfo` for Conan-v2's LLM weak stage (``training.llm_embedding``'s
    ``WeakStageConfig``): in-batch InfoNCE on (instruction + input, output) pairs while the
    soft mask opens the causal attention. ``rows`` are the pairs the run used; ``losses``
    the per-step losses (the card gives the first and the mean of the last 10)."""
    notes = []
    if losses:
        last = losses[-10:]
        notes.append(
            f"Loss {losses[0]:.4g} at step 1, {sum(last) / len(last):.4g} mean of the last "
            f"{len(last)} steps (of {len(losses)})"
        )
    if config.lora is not None:
        notes.append(
            f"LoRA r {config.lora.r}, alpha {config.lora.alpha}, dropout {config.lora.dropout}, "
            f"on {', '.join(config.lora.target_modules)} (merged into the saved weights)"
        )
    if getattr(config, "freeze_embeddings", False):
        notes.append("Input embedding matrix frozen (kept as loaded)")
    if config.teacher:
        notes.append(
            f"Teacher filter: pairs scored below {config.teacher_threshold} by "
            f"`{config.teacher}` dropped"
        )
    task = TaskCard(
        name="weak-pairs",
        kind="pairs",
        data=config.data,
        rows=rows,
        max_rows=config.max_rows,
        batch_size=config.batch_size,
        loss=f"InfoNCE (τ = {config.temperature:g}, in-batch negatives)",
    )
    return CardInfo(
        title=title,
        base_model=config.llm,
        stage="weak (LLM, soft mask)",
        stages=list(stages if stages is not None else ["pretrain", "sft"]),
        steps=config.steps,
        seed=config.seed,
        temperature=config.temperature,
        task_schedule="one task",
        optim={
            "lr": config.lr,
            "warmup_ratio": config.warmup_ratio,
            "weight_decay": config.weight_decay,
            "max_steps": config.steps,
            "grad_clip": 1.0,  # train_weak_stage clips at 1.0
        },
        model={
            "pooling": config.pooling,
            "normalize": True,
            "max_seq_length": config.max_len,
            "prompts": {},
        },
        matryoshka_dims=sorted(config.matryoshka_dims),
        tasks=[task],
        soft_mask=SoftMaskCard(
            schedule=config.schedule, variant=config.variant, steps=config.steps
        ),
        notes=notes,
        config_yaml=yaml.safe_dump(
            config.model_dump(mode="json", exclude_defaults=True),
            sort_keys=False,
            allow_unicode=True,
        ),
    )


# --------------------------------------------------------------------------- rendering
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _folder_facts(model_dir: Path) -> dict[str, Any]:
    """What the saved folder says about itself: modules, output width, prompts."""
    facts: dict[str, Any] = {"modules": [], "width": None, "prompts": {}}
    modules = _read_json(model_dir / "modules.json") or []
    for entry in modules:
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
        config = _read_json(model_dir / entry.get("path", "") / "config.json") or {}
        if kind == "Pooling":
            mode = next(
                (
                    k[len("pooling_mode_") :]
                    for k, v in config.items()
                    if k.startswith("pooling_mode_") and v is True
                ),
                None,
            )
            mode = config.get("pooling_mode") or mode
            kind += f" ({mode})" if mode else ""
            # sentence-transformers 5.x writes embedding_dimension, older ones word_embedding_dimension
            width = config.get("embedding_dimension") or config.get("word_embedding_dimension")
            facts["width"] = width or facts["width"]
        elif kind == "Dense":
            kind += f" ({config.get('in_features')} -> {config.get('out_features')})"
            facts["width"] = config.get("out_features") or facts["width"]
        facts["modules"].append(kind)
    st_config = _read_json(model_dir / "config_sentence_transformers.json") or {}
    facts["prompts"] = {k: v for k, v in (st_config.get("prompts") or {}).items() if v}
    meta = _read_json(model_dir / "conan_embedding.json") or {}
    facts["matryoshka_dims"] = meta.get("matryoshka_dims") or []
    return facts


def _looks_like_hub_id(name: str) -> bool:
    return not looks_like_local_path(name) and not Path(name).exists()


def _versions() -> dict[str, str]:
    return versions()


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def _settings(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items())


def _format_score(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_model_card(
    info: CardInfo,
    evaluation: Mapping[str, Any] | None = None,
    model_dir: str | os.PathLike[str] | None = None,
) -> str:
    """The card's markdown. ``evaluation`` maps task -> score (or -> {metric: score});
    ``model_dir`` adds what the saved folder says (modules, width, prompts)."""
    facts = _folder_facts(Path(model_dir)) if model_dir is not None else {}
    dims = info.matryoshka_dims or facts.get("matryoshka_dims") or []
    prompts = facts.get("prompts") or info.model.get("prompts") or {}
    title = info.title or (Path(model_dir).name if model_dir is not None else "Conan embedding")

    front: dict[str, Any] = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": [
            "sentence-transformers",
            "sentence-similarity",
            "feature-extraction",
            "conan-embedding",
        ],
    }
    if _looks_like_hub_id(info.base_model):
        front["base_model"] = info.base_model
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]

    width = facts.get("width")
    vectors = " ".join(
        word
        for word in (
            f"{width}-dimensional" if width else "",
            "normalised" if info.model.get("normalize") else "",
            "vectors",
        )
        if word
    )
    lines.append(
        f"A text embedding model trained with conan-embedding from "
        f"`{info.base_model}`: {info.stage} stage, {info.steps} steps on "
        f"{len(info.tasks)} task{'s' if len(info.tasks) != 1 else ''}, {vectors}"
        + (
            f" that can be cut to {', '.join(map(str, dims))} dimensions (Matryoshka)"
            if dims
            else ""
        )
        + "."
    )
    lines.append("")

    lines += [
        "## Usage",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
    ]
    lines.append('model = SentenceTransformer("path/to/this/folder")')
    query_prompt = info.model.get("query_prompt")
    passage_prompt = info.model.get("passage_prompt")
    if query_prompt:
        lines.append(f'queries = model.encode(["..."], prompt_name="{query_prompt}")')
        if passage_prompt:
            lines.append(f'passages = model.encode(["..."], prompt_name="{passage_prompt}")')
        else:
            lines.append('passages = model.encode(["..."])')
    else:
        lines.append('embeddings = model.encode(["...", "..."])')
    if dims:
        lines.append(f'small = SentenceTransformer("path/to/this/folder", truncate_dim={dims[0]})')
    lines += ["```", ""]

    lines += ["## Model", ""]
    model_rows: list[list[Any]] = [["base model", f"`{info.base_model}`"]]
    if facts.get("modules"):
        model_rows.append(["modules", " → ".join(facts["modules"])])
    if width:
        model_rows.append(["output dimension", width])
    model_rows.append(["max sequence length (training)", info.model.get("max_seq_length")])
    if prompts:
        model_rows.append(["prompts", ", ".join(f"{k}: `{v}`" for k, v in prompts.items())])
    if query_prompt or passage_prompt:
        model_rows.append(
            ["prompt used in training", f"queries {query_prompt}, passages {passage_prompt}"]
        )
    if info.model.get("freeze_word_embeddings"):
        model_rows.append(["word embeddings", "frozen during training"])
    lines += _table(["", ""], model_rows) + [""]

    lines += ["## Training", ""]
    history = [*info.stages, info.stage]
    if info.stages:
        lines.append(f"- Stages: {' → '.join(history)} (this run: **{info.stage}**)")
    else:
        lines.append(f"- Stage: **{info.stage}**")
    o = info.optim
    lines.append(
        f"- {info.steps} steps, AdamW lr {o.get('lr')}, warmup {o.get('warmup_ratio')} then linear "
        f"decay, weight decay {o.get('weight_decay')}, "
        + (f"gradient clip {o['grad_clip']}" if o.get("grad_clip") else "no gradient clipping")
    )
    lines.append(
        f"- Temperature τ = {info.temperature:g}; task schedule `{info.task_schedule}`; seed {info.seed}"
    )
    if info.teacher_filter:
        tf = info.teacher_filter
        lines.append(
            f"- Teacher filter: pairs scored below {tf.get('threshold')} by `{tf.get('model')}` dropped"
        )
    lines += [f"- {note}" for note in info.notes]
    lines.append("")

    lines += ["### Data and losses", ""]
    task_rows = [
        [
            t.name,
            t.kind,
            f"`{Path(t.data).name}`" + (f" from public `{t.source}`" if t.source else ""),
            "?"
            if t.rows is None
            else f"{t.rows:,}" + (f" (cap {t.max_rows:,})" if t.max_rows else ""),
            t.batch_size,
            f"{t.weight:g}",
            t.loss,
        ]
        for t in info.tasks
    ]
    lines += _table(["task", "kind", "data", "rows used", "batch", "weight", "loss"], task_rows)
    lines.append("")

    lines += ["### Conan mechanisms", ""]
    if info.cbb is not None:
        c = info.cbb
        layout = "; ".join(f"{name} → devices {devs}" for name, devs in c.task_devices.items())
        lines.append(
            f"- **Cross-GPU batch balance (CBB)**: every task in every step on {c.world_size} "
            f"devices ({'layout from the config' if c.layout_given else 'default layout'}: "
            f"{layout}); L = InfoNCE + β·CoSENT with β = {c.beta:g}; retrieval devices share "
            f"queries and each holds its own hard negatives; GradCache {'on' if c.grad_cache else 'off'}."
        )
    else:
        lines.append(
            f"- **Cross-GPU batch balance (CBB)**: not used (one task per step, `{info.task_schedule}`)."
        )
    dhnm = [t for t in info.tasks if t.dhnm]
    if dhnm:
        for t in dhnm:
            settings = dict(t.dhnm or {})
            rule = settings.pop("rule")
            lines.append(
                f"- **Dynamic hard negative mining (DHNM)** on `{t.name}`: rule {rule}; {_settings(settings)}."
            )
    else:
        static = [t.name for t in info.tasks if t.kind == "retrieval" and t.negatives]
        lines.append(
            "- **Dynamic hard negative mining (DHNM)**: not used"
            + (f" (static negatives on {', '.join(static)})." if static else ".")
        )
    if dims:
        weights = (
            f", weights {info.matryoshka_weights}" if info.matryoshka_weights else ", equal weights"
        )
        lines.append(
            f"- **Matryoshka (MRL)**: loss summed over dims {dims} and the full width{weights}."
        )
    else:
        lines.append("- **Matryoshka (MRL)**: not used.")
    if info.soft_mask is not None:
        s = info.soft_mask
        lines.append(
            f"- **Soft mask** (causal → bidirectional): schedule `{s.schedule}`, variant `{s.variant}`, over {s.steps} steps."
        )
    clr_tasks = [t for t in info.tasks if t.clr is not None]
    if clr_tasks:
        for t in clr_tasks:
            lines.append(
                f"- **Cross-lingual retrieval (CLR) data** in `{t.name}`: {_settings(t.clr or {}) or 'yes'}."
            )
    else:
        lines.append("- **Cross-lingual retrieval (CLR) data**: no task's data is marked as CLR.")
    lines.append("")

    if evaluation:
        lines += ["## Evaluation", ""]
        nested = any(isinstance(v, Mapping) for v in evaluation.values())
        if nested:
            metrics = sorted({m for v in evaluation.values() if isinstance(v, Mapping) for m in v})
            rows = [
                [
                    task,
                    *[
                        _format_score(v.get(m)) if isinstance(v, Mapping) and m in v else ""
                        for m in metrics
                    ],
                ]
                for task, v in evaluation.items()
            ]
            lines += _table(["task", *metrics], rows)
        else:
            lines += _table(
                ["task", "score"], [[t, _format_score(v)] for t, v in evaluation.items()]
            )
        lines += [
            "",
            "Scores as the evaluation returned them (`conan-embed eval`, mteb main scores).",
            "",
        ]

    lines += ["## Framework versions", ""]
    lines += [f"- {name}: {value}" for name, value in _versions().items()]
    lines.append("")
    if info.config_yaml:
        lines += [
            "## Training config",
            "",
            "<details><summary>The run's config as YAML (settings left at their defaults are "
            "omitted)</summary>",
            "",
            "```yaml",
            info.config_yaml.rstrip(),
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


def write_model_card(
    model_dir: str | os.PathLike[str],
    info: CardInfo,
    evaluation: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model_dir/README.md`` (replacing sentence-transformers' generic card) and
    ``model_dir/conan_card.json`` (the same facts, for tools); returns the README path."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder to write a card into")
    path = folder / CARD_FILE
    write_text_atomic(path, render_model_card(info, evaluation, folder))
    payload = {"card": info.model_dump(mode="json"), "evaluation": dict(evaluation or {})}
    write_text_atomic(folder / "conan_card.json", json.dumps(payload, indent=2, ensure_ascii=False))
    return path


def card_writer(
    info: CardInfo, evaluation: Mapping[str, Any] | None = None, title: str | None = None
) -> Callable[[Path], Path]:
    """A ``readme`` for :func:`~conan_embedding.modeling.embedder.save_embedder`: called with
    the saved (temp) model folder, it writes the card there, so the card reads what the folder
    says and lands with the model in one atomic rename. An untitled card takes ``title``, or
    the name of the folder the model is saved as (which save_embedder passes)."""

    def write(folder: Path, name: str | None = None) -> Path:
        named = info if info.title else info.model_copy(update={"title": title or name})
        return write_model_card(folder, named, evaluation)

    return write
