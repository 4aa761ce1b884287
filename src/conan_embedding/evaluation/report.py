"""Read mteb-layout result folders back and present them: a markdown table, a bar chart, deltas.

Why: a number is only useful beside the number it should be compared with. The table puts each
model's main score next to the published MTEB score of the same task (when our local test set
*is* the MTEB one) and marks the tasks that are our own splits, so nobody compares a
``WaimaiLocal`` accuracy with the leaderboard's Waimai. ``compare`` answers the question a
training run asks: which tasks moved, and by how much.

How: every ``<model>/<revision>/<Task>.json`` under a folder is loaded with
:meth:`mteb.TaskResult.from_disk` (so any mteb results folder works, including the public
results repository's layout); its main score is ``TaskResult.get_score()`` (the mean of the
main score over subsets, as mteb aggregates). ``run_info.json`` written by
:mod:`conan_embedding.evaluation.run`, when present, supplies the display name and whether the
corpus was capped. Scores are shown in points (x100), like the leaderboard.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import mteb

from conan_embedding._io import atomic_path, write_text_atomic
from conan_embedding.evaluation.run import RUN_INFO_FILE
from conan_embedding.evaluation.tasks import TASKS

_NOT_RESULTS = {"model_meta.json", RUN_INFO_FILE}


@dataclass
class ModelScores:
    """Main scores of one model (one revision folder), as fractions."""

    name: str
    revision: str
    folder: Path
    scores: dict[str, float] = field(default_factory=dict)
    capped: set[str] = field(default_factory=set)
    mteb_versions: set[str] = field(default_factory=set)
    metrics: dict[str, str] = field(default_factory=dict)  # task -> main metric (run_info.json)


def load_model_scores(folder: str | os.PathLike[str]) -> ModelScores:
    """The scores in one revision folder (``<model>/<revision>/``)."""
    folder = Path(folder)
    info_path = folder / RUN_INFO_FILE
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    result = ModelScores(
        name=info.get("model_name", folder.parent.name.replace("__", "/")),
        revision=str(info.get("revision", folder.name)),
        folder=folder,
    )
    for path in sorted(folder.glob("*.json")):
        if path.name in _NOT_RESULTS:
            continue
        try:
            task_result = mteb.TaskResult.from_disk(path)
        except Exception as error:  # a foreign JSON in the folder: say which file
            raise ValueError(f"{path}: not an mteb TaskResult: {error}") from error
        result.scores[task_result.task_name] = float(task_result.get_score())
        if task_result.mteb_version:
            result.mteb_versions.add(task_result.mteb_version)
    for task, task_info in info.get("tasks", {}).items():
        if task in result.scores and task_info.get("corpus_capped"):
            result.capped.add(task)
        if task in result.scores and task_info.get("main_metric"):
            result.metrics[task] = str(task_info["main_metric"])
    return result


def find_model_folders(root: str | os.PathLike[str]) -> list[Path]:
    """Every folder under ``root`` (or ``root`` itself) that holds task result JSON files."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"results folder {root} does not exist")
    folders = {
        path.parent
        for path in root.rglob("*.json")
        if path.name not in _NOT_RESULTS and not path.name.startswith(".")
    }
    return sorted(folders)


def load_all(root: str | os.PathLike[str]) -> list[ModelScores]:
    return [load_model_scores(folder) for folder in find_model_folders(root)]


def _points(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _ordered_tasks(models: list[ModelScores]) -> list[str]:
    present = {task for model in models for task in model.scores}
    known = [task for task in TASKS if task in present]
    return known + sorted(present - set(known))


def summary_table(models: list[ModelScores], *, with_published: bool = True) -> str:
    """A markdown table, tasks x models, in points; published MTEB scores beside ours.

    ``†`` marks tasks that are our own split (not comparable with the leaderboard) and ``*``
    a score computed on a capped corpus.
    """
    tasks = _ordered_tasks(models)
    header = ["task", "metric"]
    for model in models:
        header.append(model.name)
        if with_published:
            header.append(f"{model.name} (published)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in tasks:
        info = TASKS.get(task)
        marker = "" if info is None or info.comparable else " †"
        metric = (
            info.task_class.metadata.main_score
            if info
            else next((m.metrics[task] for m in models if task in m.metrics), "")
        )
        row = [f"{task}{marker}", metric]
        for model in models:
            score = model.scores.get(task)
            row.append(_points(score) + (" *" if task in model.capped else ""))
            if with_published:
                published = info.published.get(_published_key(model.name)) if info else None
                row.append(_points(published))
        lines.append("| " + " | ".join(row) + " |")
    versions = sorted({v for model in models for v in model.mteb_versions})
    lines.append("")
    lines.append(
        f"Scores x100, computed with mteb {', '.join(versions) or '?'}. † own split or no MTEB "
        "counterpart: not comparable with the leaderboard. * corpus capped (`--max-corpus`)."
    )
    return "\n".join(lines) + "\n"


def _published_key(model_name: str) -> str:
    lowered = model_name.lower()
    if "minilm-l6" in lowered:
        return "all-MiniLM-L6-v2"
    if "multilingual-e5-small" in lowered or "me5" in lowered:
        return "multilingual-e5-small"
    return model_name


def bar_chart(models: list[ModelScores], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """A grouped bar chart (PNG) of every model's main scores per task, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = _ordered_tasks(models)
    if not tasks:
        raise ValueError("no task results to plot")
    width = 0.8 / max(len(models), 1)
    positions = np.arange(len(tasks))
    figure, axis = plt.subplots(figsize=(max(8.0, 0.8 * len(tasks) + 2) + 2.5, 4.8))
    # tab10 repeats its colours after ten models; tab20 keeps up to twenty apart
    colours = plt.get_cmap("tab10" if len(models) <= 10 else "tab20").colors
    for index, model in enumerate(models):
        values = [100 * model.scores.get(task, np.nan) for task in tasks]
        axis.bar(
            positions + index * width - 0.4 + width / 2,
            values,
            width,
            label=model.name,
            color=colours[index % len(colours)],
        )
    labels = [
        task if (TASKS.get(task) is None or TASKS[task].comparable) else f"{task} †"
        for task in tasks
    ]
    axis.set_xticks(positions, labels, rotation=40, ha="right", fontsize=8)
    axis.set_ylabel("main score (x100)")
    axis.set_ylim(0, 100)
    axis.set_title(title or "main score per task (mteb protocol, local data)")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not over
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            figure.savefig(tmp, dpi=110)
    finally:
        plt.close(figure)
    return path


@dataclass(frozen=True)
class Delta:
    task: str
    before: float | None
    after: float | None

    @property
    def change(self) -> float | None:
        if self.before is None or self.after is None:
            return None
        return self.after - self.before


def _single_model(root: str | os.PathLike[str]) -> ModelScores:
    folders = find_model_folders(root)
    if len(folders) != 1:
        raise ValueError(
            f"{root} holds results of {len(folders)} model folders; point at one <model>/<revision> folder"
        )
    return load_model_scores(folders[0])


def compare(
    before: str | os.PathLike[str], after: str | os.PathLike[str]
) -> tuple[ModelScores, ModelScores, list[Delta]]:
    """Per-task main scores of two result folders and ``after - before``."""
    first, second = _single_model(before), _single_model(after)
    tasks = _ordered_tasks([first, second])
    deltas = [Delta(task, first.scores.get(task), second.scores.get(task)) for task in tasks]
    return first, second, deltas


def compare_table(first: ModelScores, second: ModelScores, deltas: list[Delta]) -> str:
    """Markdown: task, A, B, B - A (points); tasks present on one side only show a blank delta."""
    lines = [
        f"| task | {first.name} ({first.revision}) | {second.name} ({second.revision}) | delta |",
        "|---|---|---|---|",
    ]
    for delta in deltas:
        change = "" if delta.change is None else f"{100 * delta.change:+.2f}"
        lines.append(
            f"| {delta.task} | {_points(delta.before)} | {_points(delta.after)} | {change} |"
        )
    changes = [d.change for d in deltas if d.change is not None]
    if changes:
        lines.append(
            f"| mean over {len(changes)} shared tasks | | | {100 * sum(changes) / len(changes):+.2f} |"
        )
    return "\n".join(lines) + "\n"


def write_summary(root: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``summary.md`` and ``summary.png`` for every model under ``root``."""
    models = load_all(root)
    root = Path(root)
    table = write_text_atomic(root / "summary.md", summary_table(models))
    chart = bar_chart(models, root / "summary.png")
    return table, chart
