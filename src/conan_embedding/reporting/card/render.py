"""The card's markdown (Hugging Face front matter, usage, model, training, Conan mechanisms,
evaluation, versions, config), and writing it with ``conan_card.json`` into a model folder.

The text depends only on a :class:`~.schema.CardInfo`, the scores, what the saved folder says
about itself (:func:`~.adapters.folder_facts`) and the installed package versions it lists,
so a card can be regenerated and compared. A mechanism that was off gets one line saying so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from conan_embedding._io import write_text_atomic
from conan_embedding.modeling.embedder import looks_like_local_path
from conan_embedding.provenance import versions
from conan_embedding.reporting.card.adapters import card_info_from_config, folder_facts
from conan_embedding.reporting.card.schema import CardInfo, ValidationCard
from conan_embedding.training.task_kinds import task_kind

if TYPE_CHECKING:
    from conan_embedding.config import TrainConfig
    from conan_embedding.training.trainer import ReadmeFor

CARD_FILE = "README.md"


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


def _validation_lines(v: ValidationCard, rows: int = 12) -> list[str]:
    """The validation curve as a short table (at most ``rows`` steps, evenly spaced, the
    best and the last always shown) and the best step."""
    lines = ["## Validation during training", ""]
    best = (
        f"best `{v.metric}` {_format_score(v.best_value)} at step {v.best_step}"
        if v.best_step is not None
        else "no finite value"
    )
    lines.append(f"Every validation's `{v.metric}` ({v.mode} is better); {best}.")
    if v.stopped:
        lines.append(f"The run stopped early: {v.stopped}.")
    lines.append("")
    shown = list(range(len(v.curve)))
    if len(shown) > rows:
        picked = {round(i * (len(shown) - 1) / (rows - 1)) for i in range(rows)}
        picked |= {i for i, (step, _) in enumerate(v.curve) if step == v.best_step}
        shown = sorted(picked)
    table = [
        [step, _format_score(value) + (" (best)" if step == v.best_step else "")]
        for step, value in (v.curve[i] for i in shown)
    ]
    lines += _table(["step", v.metric], table) + [""]
    return lines


def render_model_card(
    info: CardInfo,
    evaluation: Mapping[str, Any] | None = None,
    model_dir: str | os.PathLike[str] | None = None,
) -> str:
    """The card's markdown. ``evaluation`` maps task -> score (or -> {metric: score});
    ``model_dir`` adds what the saved folder says (modules, width, prompts)."""
    facts = folder_facts(Path(model_dir)) if model_dir is not None else {}
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
    instructed = [t for t in info.tasks if t.instruction]
    if instructed:
        name = instructed[0].name
        lines.append(f'instructed = model.encode(["..."], prompt_name="{name}")  # its instruction')
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
    for side in ("query", "passage"):
        if info.model.get(f"{side}_max_length") is not None:
            model_rows.append([f"max {side} length (tokens)", info.model[f"{side}_max_length"]])
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
    if instructed:
        template = info.model.get("instruction_template") or "{instruction}"
        lines += [
            "### Instructions",
            "",
            f"Applied with the template `{template!r}` to queries (both texts of sts and "
            "classification tasks); each is the model prompt named after its task "
            '(`model.encode(texts, prompt_name="<task>")`, `conan-embed eval --prompt '
            "TASK=<task>`, the server's `prompt_name`).",
            "",
        ]
        lines += [f"- `{t.name}` ({t.kind}): {t.instruction}" for t in instructed]
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
        static = [t.name for t in info.tasks if task_kind(t.kind).mined_negatives and t.negatives]
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

    if info.validation is not None:
        lines += _validation_lines(info.validation)

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


def readme_for(config: TrainConfig) -> ReadmeFor:
    """What a trainer takes as ``readme=``: given the rows each task used (and the run's
    validation summary, when it validated), the card writer of a model trained with
    ``config`` (the CLI, the demo and the experiments all pass it)."""

    def readme(
        rows: dict[str, int], validation: Mapping[str, Any] | None = None
    ) -> Callable[[Path], Path]:
        info = card_info_from_config(config, rows)
        if validation is not None:
            info = info.model_copy(update={"validation": ValidationCard(**validation)})
        return card_writer(info)

    return readme
