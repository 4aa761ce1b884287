"""Build a :class:`~.schema.CardInfo` from what a run knows: its config, its data files, and
the folders it read (an LLM's stage history) or wrote (the saved model's modules).

The card is only as true as these adapters: each fact comes from the config or a file, and
what is unknown stays None (the card then says ``?``), never a guess. A task's loss is in the
words of its kind (``training/task_kinds.py``, ``TaskKindSpec.describe``) and of its loss
(``losses/registry.py``, ``LossSpec.words``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from conan_embedding.data.prepare import prepared_source
from conan_embedding.modeling.lora import target_description
from conan_embedding.reporting.card.schema import CardInfo, CBBCard, SoftMaskCard, TaskCard
from conan_embedding.training.task_kinds import task_kind


# --------------------------------------------------------------------------- from a config
def _loss_name(task: Any, stage: str, temperature: float, cbb: bool, beta: float) -> str:
    """The loss a task trains with, in words (what ``training.trainer`` / CBB compute)."""
    return task_kind(task.kind).describe(task, temperature, cbb, beta)


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
    if not task_kind(task.kind).mined_negatives:
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
    """``cbb.task_ranks`` sorted, or the default: kinds that share devices (retrieval) on
    ``0..W-2``, the rest on ``W-1`` (as ``training.cbb.RankLayout``)."""
    cbb = config.cbb
    if cbb.task_ranks:
        return {name: sorted(ranks) for name, ranks in cbb.task_ranks.items()}
    world = cbb.world_size
    if world == 1:
        return {t.name: [0] for t in config.tasks}
    return {
        t.name: list(range(world - 1)) if task_kind(t.kind).shares_devices else [world - 1]
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
            instruction=t.instruction,
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
            "query_max_length": mc.query_max_length,
            "passage_max_length": mc.passage_max_length,
            "prompts": {
                **mc.prompts,
                **{t.name: mc.instruction_prompt(t.instruction) for t in tasks if t.instruction},
            },
            "instruction_template": mc.instruction_template,
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
            f"on {target_description(config.lora)} (merged into the saved weights)"
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
        steps=config.optim.max_steps,
        seed=config.seed,
        temperature=config.temperature,
        task_schedule="one task",
        optim={
            "lr": config.optim.lr,
            "warmup_ratio": config.optim.warmup_ratio,
            "weight_decay": config.optim.weight_decay,
            "max_steps": config.optim.max_steps,
            "grad_clip": config.optim.grad_clip,
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
            schedule=config.schedule, variant=config.variant, steps=config.optim.max_steps
        ),
        notes=notes,
        config_yaml=yaml.safe_dump(
            config.model_dump(mode="json", exclude_defaults=True),
            sort_keys=False,
            allow_unicode=True,
        ),
    )


# --------------------------------------------------------------------------- from a folder
def _read_json(path: Path) -> Any:
    """The parsed JSON file, or None when it is missing or not JSON (a card never fails on it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def folder_facts(model_dir: Path) -> dict[str, Any]:
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
