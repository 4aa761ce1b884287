"""``demo`` and the ``recipe`` group: the Conan recipe end to end and its ablation
(:mod:`conan_embedding.experiments.recipe_v1`, :mod:`conan_embedding.experiments.demo`)."""

from __future__ import annotations

import typer

from conan_embedding.cli import app, cli_errors, echo_error, int_list, is_known_error

recipe_app = typer.Typer(
    help="The Conan recipe end to end: prepare, run one arm, the ablation, the results page.",
    no_args_is_help=True,
)


@app.command()
@cli_errors
def demo(
    output_dir: str = typer.Option("runs/demo", help="Where data, checkpoints and the model go."),
    config: str | None = typer.Option(None, help="Training YAML (default: the embedded recipe)."),
    data_dir: str | None = typer.Option(None, help="The public data folder (../shared/data)."),
    max_steps: int | None = typer.Option(None, help="Override the recipe's step count."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """The main job: Conan-v1 fine-tune of all-MiniLM-L6-v2, STSBenchmark before/after.

    Prepares the real training data, evaluates the base model, trains with the packaged
    recipe (minilm-v1) and evaluates again.
    """
    from conan_embedding.experiments.demo import run_demo

    result = run_demo(output_dir, config, data_dir, max_steps, show_progress=progress)
    for task, before in result.before.items():
        after = result.after[task]
        typer.echo(
            f"{task} test Spearman: before {100 * before:.2f}  after {100 * after:.2f}  "
            f"({100 * (after - before):+.2f})"
        )
    typer.echo(f"trained in {result.seconds / 60:.1f} min; model saved to {result.model_dir}")


@recipe_app.command("prepare")
@cli_errors
def recipe_prepare(
    work_dir: str = typer.Option("runs/recipe", help="Data goes to WORK_DIR/data."),
    data_dir: str | None = typer.Option(None, help="The public data folder (../shared/data)."),
    model_dir: str | None = typer.Option(None, help="Base model (default runs/models/me5-small)."),
) -> None:
    """Prepare the data, mine the CLR and bge pools, import me5-small (skips what exists)."""
    from conan_embedding.experiments.recipe_v1.inputs import prepare_recipe_inputs

    inputs = prepare_recipe_inputs(work_dir, data_dir, model_dir)
    typer.echo(f"recipe inputs in {inputs.data_dir}; base model {inputs.model_dir}")


@recipe_app.command("validate")
@cli_errors
def recipe_validate(
    arms: list[str] | None = typer.Argument(
        None, help="Arms of the packaged v1 recipe or YAML paths (default: every packaged arm)."
    ),
) -> None:
    """Read and validate recipe arms (base + overrides resolved); no data or model needed."""
    from conan_embedding.config import load_config
    from conan_embedding.experiments.recipe_v1.arms import recipe_arms, resolve_arm

    failed = 0
    for arm in arms or recipe_arms():
        try:
            name, path = resolve_arm(arm)
            config = load_config(path)
        except Exception as err:  # every arm is checked; each failure is one error line
            if not is_known_error(err):
                raise
            echo_error(err)
            failed += 1
            continue
        typer.echo(f"{name}: ok ({len(config.tasks)} tasks, {config.optim.max_steps} steps)")
    if failed:
        raise typer.Exit(2)


@recipe_app.command("run")
@cli_errors
def recipe_run(
    arm: str = typer.Argument(
        ..., help="An arm of the packaged v1 recipe (full, baseline, ...) or a YAML."
    ),
    seed: int = typer.Option(42),
    steps: int | None = typer.Option(None, help="Override optim.max_steps (smoke runs)."),
    threads: int | None = typer.Option(None, help="torch threads."),
    work_dir: str = typer.Option("runs/recipe"),
    model_dir: str | None = typer.Option(None, help="Base model (default runs/models/me5-small)."),
    tasks: str | None = typer.Option(None, help="Comma-separated eval tasks (default: the 8)."),
    force: bool = typer.Option(False, "--force", help="Re-run even if the result JSON exists."),
    tag: str | None = typer.Option(
        None, help="Name the run ARM-TAG (e.g. --steps 620 --tag 620), kept beside ARM."
    ),
    mixed_precision: str = typer.Option(
        "no", help="no | bf16 | fp16: train and evaluate under autocast (bf16: 1.5x on the CPU)."
    ),
) -> None:
    """Train one arm with one seed, evaluate it, write bench/results/recipe/ARM-sSEED.json."""
    from conan_embedding.experiments.recipe_v1.arms import EVAL_TASKS
    from conan_embedding.experiments.recipe_v1.run import EvalSettings, run_arm

    record = run_arm(arm, seed, work_dir, steps, threads,
                     tasks.split(",") if tasks else EVAL_TASKS, force, model_dir=model_dir,
                     tag=tag, settings=EvalSettings(mixed_precision=mixed_precision))  # fmt: skip
    for task, score in record["scores"].items():
        typer.echo(f"{task:34s} {score:6.2f}")
    typer.echo(f"train {record['train_seconds']:.0f} s, eval {record['eval_seconds']:.0f} s")


@recipe_app.command("ablation")
@cli_errors
def recipe_ablation(
    arms: str | None = typer.Option(None, help="Comma-separated arms (default: all seven)."),
    seeds: str = typer.Option("42", help="Comma-separated seeds, e.g. 42,43."),
    steps: int | None = typer.Option(None, help="Override optim.max_steps (smoke runs)."),
    threads: int | None = typer.Option(None, help="torch threads."),
    work_dir: str = typer.Option("runs/recipe"),
    data_dir: str | None = typer.Option(None, help="The public data folder (../shared/data)."),
    force: bool = typer.Option(False, "--force", help="Re-run arms whose JSON exists."),
    tag: str | None = typer.Option(None, help="Name every run ARM-TAG (see `recipe run`)."),
    mixed_precision: str = typer.Option("no", help="no | bf16 | fp16 (see `recipe run`)."),
) -> None:
    """Prepare, evaluate the base, run each arm x seed, then write docs/results.md."""
    from conan_embedding.experiments.recipe_v1.arms import ABLATION_ARMS
    from conan_embedding.experiments.recipe_v1.run import run_ablation

    chosen = [a for a in arms.split(",") if a] if arms else list(ABLATION_ARMS)
    page = run_ablation(chosen, int_list(seeds), work_dir, steps, threads, data_dir=data_dir,
                        force=force, tag=tag, mixed_precision=mixed_precision)  # fmt: skip
    typer.echo(f"results page {page}")


@recipe_app.command("dims")
@cli_errors
def recipe_dims(
    result: str = typer.Argument(..., help="A finished result: base, full-s42, minus-mrl-s42..."),
    dims: str = typer.Option("128,256", help="Comma-separated embedding widths."),
    threads: int | None = typer.Option(None, help="torch threads."),
    work_dir: str = typer.Option("runs/recipe"),
    tasks: str | None = typer.Option(None, help="Comma-separated eval tasks (default: 5 cheap)."),
) -> None:
    """Re-evaluate a finished arm with its embeddings truncated (what Matryoshka training buys)."""
    from conan_embedding.experiments.recipe_v1.arms import DIM_TASKS
    from conan_embedding.experiments.recipe_v1.run import evaluate_dims

    record = evaluate_dims(result, int_list(dims), work_dir, threads,
                           tasks.split(",") if tasks else DIM_TASKS)  # fmt: skip
    for dim, scores in record["scores_by_dim"].items():
        typer.echo(f"dim {dim}: " + ", ".join(f"{t} {v:.2f}" for t, v in scores.items()))


@recipe_app.command("report")
@cli_errors
def recipe_report(
    results_dir: str = typer.Option("bench/results/recipe"),
    out: str = typer.Option("docs/results.md"),
) -> None:
    """Regenerate docs/results.md and docs/results.png from the arm JSONs (first adding the
    hard-negative statistics to JSONs written without them, where the train logs remain)."""
    from conan_embedding.experiments.recipe_v1.report import backfill_negative_stats, write_results

    backfill_negative_stats(results_dir)
    page = write_results(results_dir, out)
    typer.echo(f"results page {page}")
