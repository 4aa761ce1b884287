"""Conan-v2: tokenizer, LLM pretraining, SFT, the CPU demo and the decoder-conversion ablation
(:mod:`conan_embedding.training.causal_lm`, :mod:`conan_embedding.training.soft_mask_weak`,
:mod:`conan_embedding.experiments.decoder_v2`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from conan_embedding.cli import app, cli_errors, given, load_settings
from conan_embedding.config import StageConfig

M = TypeVar("M", bound=StageConfig)


@app.command("train-tokenizer")
@cli_errors
def train_tokenizer_command(
    inputs: list[str] = typer.Argument(
        ..., help="Text files: .txt (a document a line) or .jsonl ('text')."
    ),
    out: str = typer.Option(..., help="Folder for the tokenizer (transformers layout)."),
    vocab_size: int = typer.Option(
        32000, help="Vocabulary size, bytes and special tokens included."
    ),
) -> None:
    """Train a byte-level BPE tokenizer on your corpus."""
    from conan_embedding.data.records import read_documents
    from conan_embedding.modeling.llm import save_tokenizer, train_tokenizer

    texts = [doc for path in inputs for doc in read_documents(path)]
    tokenizer = train_tokenizer(texts, vocab_size)
    typer.echo(f"tokenizer with {len(tokenizer)} tokens saved to {save_tokenizer(tokenizer, out)}")


# the options ``pretrain`` and ``sft`` share
OutputDir = Annotated[str | None, typer.Option(help="Override output_dir.")]
Steps = Annotated[int | None, typer.Option(help="Override optim.max_steps.")]
Resume = Annotated[bool, typer.Option(help="Continue from the newest checkpoint.")]
Device = Annotated[str | None, typer.Option(help="auto | cpu | cuda (engine.device).")]
MixedPrecision = Annotated[str | None, typer.Option(help="no | bf16 | fp16.")]


def _run_stage(
    config: str,
    settings: type[M],
    run: Callable[..., dict],
    output_dir: str | None,
    steps: int | None,
    resume: bool,
    device: str | None,
    mixed_precision: str | None,
) -> tuple[M, dict]:
    """``config`` loaded as ``settings`` with the shared options as overrides, then
    ``run(cfg, resume=resume)``; returns the settings and the run's summary.

    ``--steps`` is set on the validated config, after an older file's flat ``steps:`` has
    been moved to ``optim.max_steps`` (set in the file, the flat key would win over it)."""
    overrides = {
        "output_dir": output_dir,
        "engine.device": device,
        "engine.mixed_precision": mixed_precision,
    }
    cfg = load_settings(config, settings, overrides)
    if steps is not None:
        optim = cfg.optim.model_validate({**cfg.optim.model_dump(), "max_steps": steps})
        cfg = cfg.model_copy(update={"optim": optim})
    return cfg, run(cfg, resume=resume)


@app.command("pretrain")
@cli_errors
def pretrain_command(
    config: str = typer.Argument(
        ..., help="YAML of PretrainConfig, e.g. configs/v2-pretrain-tiny.yaml."
    ),
    output_dir: OutputDir = None,
    steps: Steps = None,
    resume: Resume = True,
    device: Device = None,
    mixed_precision: MixedPrecision = None,
) -> None:
    """Causal-LM pretraining with per-source mixing weights, packing and a perplexity curve."""
    from conan_embedding.config import PretrainConfig
    from conan_embedding.training.causal_lm import run_pretraining

    cfg, summary = _run_stage(
        config, PretrainConfig, run_pretraining, output_dir, steps, resume, device, mixed_precision
    )
    typer.echo(
        f"perplexity {summary['first_val_ppl']:.1f} -> {summary['final_val_ppl']:.1f}; model in {cfg.output_dir}/model"
    )


@app.command("sft")
@cli_errors
def sft_command(
    config: str = typer.Argument(..., help="YAML of SFTConfig, e.g. configs/v2-sft-tiny.yaml."),
    output_dir: OutputDir = None,
    steps: Steps = None,
    resume: Resume = True,
    device: Device = None,
    mixed_precision: MixedPrecision = None,
) -> None:
    """Supervised fine-tuning on (instruction, input, output) rows, loss on the output only."""
    from conan_embedding.config import SFTConfig
    from conan_embedding.training.causal_lm import run_sft

    cfg, summary = _run_stage(
        config, SFTConfig, run_sft, output_dir, steps, resume, device, mixed_precision
    )
    typer.echo(
        f"held-out output perplexity {summary['first_val_ppl']:.1f} -> {summary['final_val_ppl']:.1f}; model in {cfg.output_dir}/model"
    )


@app.command("v2-demo")
@cli_errors
def v2_demo_command(
    config: str | None = typer.Option(
        None, help="YAML of V2DemoConfig (default configs/v2-demo.yaml settings)."
    ),
    output_dir: str | None = typer.Option(None, help="Override output_dir."),
    quick: bool = typer.Option(False, help="A few steps per stage (the CI form)."),
) -> None:
    """Tokenizer + tiny LLM on the zh/en data -> SFT -> soft-mask embedder, with the ablation."""
    from pathlib import Path

    from conan_embedding.experiments.v2_demo import V2DemoConfig, run_v2_demo

    overrides = {"output_dir": output_dir, "quick": quick or None}
    cfg = (
        load_settings(config, V2DemoConfig, overrides)
        if config
        else V2DemoConfig(**given(overrides))
    )
    report = run_v2_demo(cfg)
    typer.echo((Path(cfg.output_dir) / "ablation.md").read_text(encoding="utf-8"))
    typer.echo(f"total {report['total_seconds']:.0f} s; report in {cfg.output_dir}/ablation.json")


@app.command("v2-ablation")
@cli_errors
def v2_ablation_command(
    config: str = typer.Option(
        "configs/v2-gemma-ablation.yaml", help="YAML of ConversionAblationConfig."
    ),
    output_dir: str | None = typer.Option(None, help="Override output_dir."),
    runs: str | None = typer.Option(
        None, help="Comma-separated runs for this process (<arm>-s<seed>, reference)."
    ),
) -> None:
    """Convert a pretrained decoder to an embedder under each mask schedule / LoRA arm."""
    from pathlib import Path

    from conan_embedding.experiments.decoder_v2 import (
        ConversionAblationConfig,
        run_conversion_ablation,
    )

    overrides = {
        "output_dir": output_dir,
        "runs": [r.strip() for r in runs.split(",") if r.strip()] if runs else None,
    }
    cfg = load_settings(config, ConversionAblationConfig, overrides)
    run_conversion_ablation(cfg, log=lambda line: typer.echo(line, err=True))
    typer.echo((Path(cfg.output_dir) / "ablation.md").read_text(encoding="utf-8"))
