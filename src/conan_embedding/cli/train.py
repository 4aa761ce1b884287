"""``train`` and its alias ``train-cbb``: one command for every embedding-stage config.

``train`` dispatches on the config: a ``cbb:`` section trains with cross-GPU batch balance
(:class:`~conan_embedding.training.cbb.CBBTrainer`: virtual devices in one process,
one device per process under torchrun / accelerate launch), none the plain
:class:`~conan_embedding.training.trainer.Trainer`. ``train-cbb`` is the same command that
also refuses a config without ``cbb:``, as it always did. ``python -m
conan_embedding.training.distributed CONFIG`` is ``train-cbb`` under its old name. Both render
the model card here and hand it to the trainer (``readme=``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from conan_embedding.cli import app, cli_errors, given, report_training

if TYPE_CHECKING:
    from conan_embedding.training.cbb import CBBTrainer
    from conan_embedding.training.trainer import Trainer


def run_training(
    config: str,
    *,
    resume: bool = False,
    output_dir: str | None = None,
    max_steps: int | None = None,
    device: str | None = None,
    mixed_precision: str | None = None,
    progress: bool = True,
    require_cbb: bool = False,
) -> None:
    """Load ``config`` with the options as overrides, train it with the trainer its ``cbb:``
    section asks for, and report the outcome (rank 0)."""
    from conan_embedding.config import load_config
    from conan_embedding.reporting.card import readme_for

    overrides = {
        "output_dir": output_dir,
        "optim.max_steps": max_steps,
        "engine.device": device,
        "engine.mixed_precision": mixed_precision,
    }
    cfg = load_config(config, given(overrides))
    readme = readme_for(cfg)
    validate = None
    if cfg.validation is not None:  # the evaluation layer scores validation.tasks
        from conan_embedding.evaluation.validation import task_validator

        validate = task_validator(cfg.validation)
    if cfg.cbb is not None:
        from conan_embedding.training.cbb import CBBTrainer

        trainer: Trainer | CBBTrainer = CBBTrainer(cfg, readme=readme, validate=validate)
    elif require_cbb:
        raise ValueError(f"{config}: no 'cbb' section (see configs/cbb-demo.yaml)")
    else:
        from conan_embedding.training.trainer import Trainer

        trainer = Trainer(cfg, readme=readme, validate=validate)
    report_training(trainer.train(resume=resume, show_progress=progress))


@app.command()
@cli_errors
def train(
    config: str = typer.Argument(
        ..., help="YAML training config, or a packaged recipe name (minilm-v1)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint."),
    output_dir: str | None = typer.Option(None, help="Override the config's output_dir."),
    max_steps: int | None = typer.Option(None, help="Override optim.max_steps."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda (engine.device)."),
    mixed_precision: str | None = typer.Option(None, help="no | bf16 | fp16."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train one stage (weak or supervised) from a YAML config.

    A config with a `cbb:` section trains with cross-GPU batch balance (what `train-cbb`
    does): virtual devices in one process, one device per process under torchrun.

    Several processes: `torchrun --nproc_per_node N -m conan_embedding.cli train CONFIG`
    (or `accelerate launch --config_file configs/accelerate/<ddp|fsdp|deepspeed-zero2>.yaml`).
    """
    run_training(config, resume=resume, output_dir=output_dir, max_steps=max_steps,
                 device=device, mixed_precision=mixed_precision, progress=progress)  # fmt: skip


@app.command("train-cbb")
@cli_errors
def train_cbb(
    config: str = typer.Argument(..., help="YAML with a 'cbb' section (configs/cbb-*.yaml)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint."),
    output_dir: str | None = typer.Option(None, help="Override the config's output_dir."),
    max_steps: int | None = typer.Option(None, help="Override optim.max_steps."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda (engine.device)."),
    mixed_precision: str | None = typer.Option(None, help="no | bf16 | fp16."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train with CBB: virtual devices in one process (under torchrun: one device per process)."""
    run_training(config, resume=resume, output_dir=output_dir, max_steps=max_steps,
                 device=device, mixed_precision=mixed_precision, progress=progress,
                 require_cbb=True)  # fmt: skip
