"""The end-to-end Conan-v2 demo on a CPU: corpus -> tokenizer + LLM -> SFT -> weak-stage
variants (the mask-schedule ablation) -> optional stage 4 -> evaluation.

Why here: this is an experiment (it chains the training stages and the evaluation), so it
lives in ``experiments/`` and the training library stays free of evaluation imports. The
stages themselves are ``training.causal_lm``, ``training.soft_mask_weak`` and
``training.supervised_stage``; the demo's report is written through ``experiments.runner``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from conan_embedding._io import write_text_atomic
from conan_embedding.config import LoraSettings, SupervisedStageConfig, WeakStageConfig
from conan_embedding.data.builders.v2_corpus import build_supervised_records
from conan_embedding.experiments.runner import read_result, write_result
from conan_embedding.modeling.soft_mask import Schedule, Variant
from conan_embedding.provenance import loadavg
from conan_embedding.training.soft_mask_weak import train_weak_stage
from conan_embedding.training.supervised_stage import run_supervised_stage

__all__ = ["QUICK_OVERRIDES", "DemoVariant", "V2DemoConfig", "ablation_markdown", "run_v2_demo"]


class DemoVariant(BaseModel):
    """One row of the ablation: a mask schedule, optionally with LoRA instead of full tuning."""

    model_config = ConfigDict(extra="forbid")
    name: str
    schedule: Schedule = "linear"
    variant: Variant = "L_over_i"
    lora: LoraSettings | None = None


class V2DemoConfig(BaseModel):
    """Everything the CPU demo runs: corpus -> tokenizer + LLM -> SFT -> weak-stage variants ->
    evaluation. ``quick`` shrinks every stage to a few steps (the CI form)."""

    model_config = ConfigDict(extra="forbid")
    output_dir: str = "runs/v2-demo"
    data_dir: str | None = None
    seed: int = 0
    threads: int | None = 1
    preset: str = "tiny"
    vocab_size: int = 4000
    source_weights: dict[str, float] = Field(
        default_factory=lambda: {"parallel": 2.0, "hsk": 1.0, "web": 1.0, "qa": 2.0, "sts": 1.0}
    )
    pretrain: dict[str, Any] = Field(default_factory=dict)  # PretrainConfig fields
    sft: dict[str, Any] = Field(default_factory=dict)  # SFTConfig fields
    weak: dict[str, Any] = Field(default_factory=dict)  # WeakStageConfig fields
    variants: list[DemoVariant] = Field(
        default_factory=lambda: [
            DemoVariant(name="soft-linear", schedule="linear"),
            DemoVariant(name="hard-switch", schedule="hard"),
            DemoVariant(name="causal", schedule="causal"),
            DemoVariant(name="lora-r16-soft", schedule="linear", lora=LoraSettings(r=16)),
        ]
    )
    ablation_tasks: list[str] = Field(
        default_factory=lambda: ["STSBenchmark", "STSB", "STSBenchmarkMultilingualSTS", "Tatoeba"]
    )
    final_tasks: list[str] = Field(
        default_factory=lambda: ["mini-mteb", "mini-cmteb", "cross-lingual"]
    )
    final_variant: str = "soft-linear"
    # stage 4 on the final variant (SupervisedStageConfig fields); None skips it
    supervised: dict[str, Any] | None = None
    max_corpus: int | None = 2000
    quick: bool = False


QUICK_OVERRIDES = {
    "pretrain": {
        "steps": 6,
        "eval_every": 3,
        "batch_size": 4,
        "seq_len": 64,
        "eval_blocks": 4,
        "max_documents": 1500,
        "vocab_size": 1000,
    },
    "sft": {"steps": 4, "eval_every": 2, "batch_size": 4, "eval_rows": 16},
    "weak": {"steps": 4, "batch_size": 8, "max_rows": 256},
}


def run_v2_demo(config: V2DemoConfig) -> dict[str, Any]:
    """The whole v2 path on a CPU; writes ``ablation.json`` / ``ablation.md`` in ``output_dir``."""
    from conan_embedding.config import PretrainConfig, SFTConfig, SourceConfig
    from conan_embedding.data.builders.v2_corpus import build_shared_corpus
    from conan_embedding.evaluation.run import evaluate
    from conan_embedding.training.causal_lm import run_pretraining, run_sft

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str, start: float) -> None:
        timings[name] = round(time.perf_counter() - start, 1)

    def section(name: str) -> dict[str, Any]:
        values = dict(getattr(config, name))
        if config.quick:
            values.update(QUICK_OVERRIDES[name])
        return values

    start = time.perf_counter()
    corpus = build_shared_corpus(out / "corpus", config.data_dir)
    stage("corpus", start)

    start = time.perf_counter()
    sources = [
        SourceConfig(name=name, path=path, weight=config.source_weights.get(name, 1.0))
        for name, path in corpus["sources"].items()
    ]
    pretrain = PretrainConfig(
        output_dir=str(out / "pretrain"),
        sources=sources,
        **{
            "preset": config.preset,
            "vocab_size": config.vocab_size,
            "seed": config.seed,
            "threads": config.threads,
            **section("pretrain"),
        },
    )
    pretrain_summary = run_pretraining(pretrain)
    stage("tokenizer+pretrain", start)

    start = time.perf_counter()
    sft = SFTConfig(
        output_dir=str(out / "sft"),
        base_model=str(out / "pretrain" / "model"),
        data=corpus["sft"],
        seed=config.seed,
        threads=config.threads,
        **section("sft"),
    )
    sft_summary = run_sft(sft)
    stage("sft", start)

    rows: list[dict[str, Any]] = []
    tasks = ["STSBenchmark"] if config.quick else config.ablation_tasks
    final: dict[str, float] = {}
    final_label = [config.final_variant]

    def evaluate_once(model_dir: Path, name: str, task_names: list[str]) -> dict[str, float]:
        """mteb scores, kept beside the model so a rerun of the demo does not recompute them."""
        from conan_embedding.evaluation.tasks import expand_task_names

        names = expand_task_names(task_names)
        cache = model_dir.parent / "scores.json"
        saved = read_result(cache) or {}
        todo = [t for t in names if t not in saved]
        if todo:
            saved.update(
                evaluate(
                    model_dir,
                    todo,
                    output_dir=out / "results",
                    data_dir=config.data_dir,
                    max_corpus=config.max_corpus,
                    cache_dir=False,
                    show_progress=False,
                    model_name=name,
                )
            )
            write_result(cache, saved)
        return {t: saved[t] for t in names}

    def write_report() -> dict[str, Any]:
        import mteb

        report = {
            "config": config.model_dump(),
            "corpus": {k: v for k, v in corpus.items() if k != "sources"},
            "pretrain": pretrain_summary,
            "sft": sft_summary,
            "ablation": rows,
            "ablation_tasks": tasks,
            "final_variant": config.final_variant,
            "final_model": final_label[0],
            "final_scores": final,
            "timings_seconds": timings,
            "total_seconds": round(time.perf_counter() - began, 1),
            "mteb_version": mteb.__version__,
            "torch_threads": torch.get_num_threads(),
            "loadavg_at_end": loadavg(),
            "cpus": os.cpu_count(),
        }
        write_result(out / "ablation.json", report)
        write_text_atomic(out / "ablation.md", ablation_markdown(report))
        return report

    for variant in config.variants:
        start = time.perf_counter()
        weak = WeakStageConfig(
            output_dir=str(out / "embed" / variant.name),
            llm=str(out / "sft" / "model"),
            data=corpus["sft"],
            schedule=variant.schedule,
            variant=variant.variant,
            lora=variant.lora,
            seed=config.seed,
            threads=config.threads,
            **section("weak"),
        )
        folder = out / "embed" / variant.name
        summary = _reuse_json(
            folder / "summary.json", {"steps": weak.optim.max_steps, "schedule": weak.schedule}
        )
        if summary is None:
            summary = train_weak_stage(weak)
        scores = evaluate_once(folder / "model", f"conan-v2-{config.preset}-{variant.name}", tasks)
        stage(f"embed:{variant.name}", start)
        rows.append({"variant": variant.model_dump(), "weak": summary, "scores": scores})
        write_report()  # after every variant, so a long run leaves partial results

    final_model = out / "embed" / config.final_variant / "model"
    final_name = f"conan-v2-{config.preset}-{config.final_variant}"
    if config.supervised is not None:
        start = time.perf_counter()
        settings = dict(config.supervised)
        if config.quick:
            settings.update(max_rows=64, batch_size=4, sts_batch_size=8)
            settings["optim"] = {**settings.get("optim", {}), "max_steps": 2}
        folder = out / "embed" / f"{config.final_variant}+supervised"
        if not (folder / "model" / "modules.json").is_file():
            records = build_supervised_records(
                out / "supervised-data", config.data_dir, negatives=settings.get("negatives", 3)
            )
            settings.setdefault("threads", config.threads)  # a flat key the config moves
            stage_config = SupervisedStageConfig(
                model_dir=str(final_model),
                records=records,
                output_dir=str(folder),
                seed=config.seed,
                **settings,
            )
            run_supervised_stage(stage_config)
        scores = evaluate_once(folder / "model", f"{final_name}-supervised", tasks)
        stage("supervised", start)
        rows.append(
            {
                "variant": {"name": folder.name, "schedule": "stage 4", "lora": None},
                "weak": {"final_loss_mean_last_10": float("nan"), "seconds": timings["supervised"]},
                "scores": scores,
            }
        )
        final_model, final_name = folder / "model", f"{final_name}-supervised"
        final_label[0] = folder.name
        write_report()

    if not config.quick and config.final_tasks:
        start = time.perf_counter()
        final.update(evaluate_once(final_model, final_name, config.final_tasks))
        stage("final-eval", start)
    return write_report()


def _reuse_json(path: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """A finished stage's saved summary if it matches ``expected`` (so reruns skip it)."""
    saved = read_result(path)
    if saved is None:
        return None
    return saved if all(saved.get(k) == v for k, v in expected.items()) else None


def ablation_markdown(report: dict[str, Any]) -> str:
    """The demo's table: one row per weak-stage variant, then the final model on the suites."""
    tasks = report["ablation_tasks"]
    header = (
        "| variant | schedule | LoRA | "
        + " | ".join(tasks)
        + " | mean | weak loss (last 10) | train s |"
    )
    lines = [header, "|" + "---|" * (len(tasks) + 6)]
    for row in report["ablation"]:
        scores = [row["scores"][t] * 100 for t in tasks]
        lora = row["variant"]["lora"]
        lines.append(
            f"| {row['variant']['name']} | {row['variant']['schedule']} | "
            f"{'r=' + str(lora['r']) if lora else '-'} | "
            + " | ".join(f"{s:.2f}" for s in scores)
            + f" | {np.mean(scores):.2f} | {row['weak']['final_loss_mean_last_10']:.3f} | {row['weak']['seconds']:.0f} |"
        )
    if report["final_scores"]:
        lines += [
            "",
            f"Final model ({report.get('final_model', report['final_variant'])}) on the mini suites:",
            "",
        ]
        lines += ["| task | score |", "|---|---|"]
        lines += [
            f"| {task} | {score * 100:.2f} |" for task, score in report["final_scores"].items()
        ]
    return "\n".join(lines) + "\n"
