"""``eval`` and ``compare`` (issue #3); the logic is in :mod:`conan_embedding.evaluation`."""

from __future__ import annotations

import typer

from conan_embedding.cli import DEVICE_HELP, app, cli_errors


@app.command("eval")
@cli_errors
def eval_command(
    model: str = typer.Argument(None, help="Model folder or name (e.g. all-MiniLM-L6-v2)."),
    tasks: str | None = typer.Option(
        None,
        help="Comma-separated task names: local tasks (--list, offline) and/or any mteb task "
        "(mteb's data, downloaded when online).",
    ),
    suite: str | None = typer.Option(
        None, help="mini-mteb | mini-cmteb | cross-lingual | sts | all."
    ),
    benchmark: str | None = typer.Option(
        None, help='An mteb benchmark, expanded to its tasks (e.g. "MTEB(cmn, v1)").'
    ),
    output_dir: str = typer.Option("results/eval", help="mteb-layout results + summary.md/.png."),
    data_dir: str | None = typer.Option(None, help="Data folder (default ../shared/data)."),
    max_corpus: int | None = typer.Option(
        None, help="Cap retrieval corpora (marked not comparable)."
    ),
    cache_dir: str | None = typer.Option(None, help="Embedding cache (default ~/.cache/...)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the cache."),
    batch_size: int = typer.Option(64),
    model_name: str | None = typer.Option(None, help="Name used in the results folder."),
    symmetric_prompt: str = typer.Option(
        "query", help="Prompt name for symmetric tasks ('' = none)."
    ),
    prompt: list[str] = typer.Option(
        [],
        "--prompt",
        help="TASK=PROMPT_NAME (repeatable): the model prompt of an mteb task's queries (both "
        "sides of a symmetric task); TASK is a task name or type (STS, Retrieval). E.g. a "
        "training task's instruction, saved as the prompt named after that task.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    threads: int | None = typer.Option(None, help="torch threads (1 is faster on a busy CPU)."),
    list_tasks: bool = typer.Option(False, "--list", help="List tasks and suites, then exit."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Evaluate a model on local-data MTEB / C-MTEB tasks, any mteb task or an mteb benchmark."""
    from conan_embedding.evaluation.tasks import SUITES, TASKS

    if list_tasks or model is None:
        for name, info in TASKS.items():
            typer.echo(
                f"{name:34s} {info.task_class.metadata.main_score:16s} {','.join(info.suites)}"
            )
        typer.echo("suites: " + ", ".join(sorted(SUITES)))
        typer.echo(
            "also: any mteb task name (--tasks) or mteb benchmark (--benchmark); "
            "their data is downloaded by mteb, so they need the network once"
        )
        return
    from conan_embedding.evaluation.report import write_summary
    from conan_embedding.evaluation.run import evaluate

    prompt_map = parse_prompt_map(prompt)
    names = ",".join(part for part in (tasks, suite) if part) or (
        None if benchmark else "mini-mteb"
    )
    scores = evaluate(model, names, benchmark=benchmark, output_dir=output_dir, data_dir=data_dir,
                      max_corpus=max_corpus,
                      cache_dir=False if no_cache else cache_dir, batch_size=batch_size,
                      show_progress=progress, model_name=model_name,
                      symmetric_prompt=symmetric_prompt or None, num_threads=threads,
                      device=device, prompt_map=prompt_map)  # fmt: skip
    for name, score in scores.items():
        typer.echo(f"{name:34s} {100 * score:6.2f}")
    table, chart = write_summary(output_dir)
    typer.echo(f"results in {output_dir}; table {table}; chart {chart}")


def parse_prompt_map(items: list[str]) -> dict[str, str]:
    """``["STS=nli", "Retrieval=msmarco"]`` -> ``{"STS": "nli", "Retrieval": "msmarco"}``."""
    out: dict[str, str] = {}
    for item in items:
        task, sep, name = item.partition("=")
        if not sep or not task.strip() or not name.strip():
            raise typer.BadParameter(f"--prompt takes TASK=PROMPT_NAME, got {item!r}")
        out[task.strip()] = name.strip()
    return out


@app.command("compare")
@cli_errors
def compare_command(
    before: str = typer.Argument(..., help="Result folder <model>/<revision> of the baseline."),
    after: str = typer.Argument(..., help="Result folder of the model to compare."),
    output: str | None = typer.Option(None, help="Also write the markdown table here."),
) -> None:
    """Per-task main scores of two result folders and their difference (after - before)."""
    from conan_embedding._io import write_text_atomic
    from conan_embedding.evaluation.report import compare, compare_table

    table = compare_table(*compare(before, after))
    typer.echo(table)
    if output:
        write_text_atomic(output, table)
