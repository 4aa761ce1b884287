"""The ``data`` group: build training data (:mod:`conan_embedding.data.prepare` and
:mod:`conan_embedding.data.builders`: clr, generate, filter; export: a dataset input as
JSONL)."""

from __future__ import annotations

import typer

from conan_embedding.cli import DEVICE_HELP, cli_errors, load_settings

data_app = typer.Typer(
    help="Build training data: prepare, clr, generate, filter, export.", no_args_is_help=True
)


@data_app.command("prepare")
@cli_errors
def data_prepare(
    out: str = typer.Argument("runs/data", help="Folder for the JSONL files."),
    data_dir: str | None = typer.Option(None, help="The public data folder (../shared/data)."),
    only: list[str] = typer.Option([], help="Convert only these sources (repeatable)."),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="Drop rows touching test sets."),
) -> None:
    """Convert the public training files into the JSONL training schemas."""
    from conan_embedding.data.prepare import prepare

    report = prepare(out, data_dir=data_dir, only=only or None, dedup=dedup)
    for name, row in report.items():
        typer.echo(f"{name:18s} {row}")


@data_app.command("clr")
@cli_errors
def data_clr(
    config: str = typer.Argument(..., help="CLR YAML (see configs/clr-en-zh.yaml)."),
    output: str | None = typer.Option(None, help="Override the config's output path."),
    data_dir: str | None = typer.Option(None, help="Data folder for 'data:' paths."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Cross-lingual retrieval: translate queries into weighted languages, keep documents."""
    import json

    from conan_embedding.data.builders.clr import load_clr_config, run_clr

    report = run_clr(load_clr_config(config), data_dir, output, show_progress=progress)
    typer.echo(
        json.dumps(
            {k: report[k] for k in ("output", "written", "translated", "untranslatable", "dedup")},
            ensure_ascii=False,
        )
    )


@data_app.command("generate")
@cli_errors
def data_generate(
    passages: str = typer.Argument(..., help="Passages: .txt (one per line) or .jsonl."),
    out_dir: str = typer.Option(..., help="Writes queries.jsonl, paraphrases.jsonl, report."),
    backend: str = typer.Option("openai", help="openai (any OpenAI-compatible server) or hf."),
    model: str = typer.Option(..., help="Model name on the server, or a local HF model path."),
    base_url: str | None = typer.Option(None, help="e.g. http://localhost:8000/v1 (openai)."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Env var holding the API key."),
    concurrency: int = typer.Option(4, help="Requests in flight (openai)."),
    max_retries: int = typer.Option(5, help="Retries with exponential backoff (openai)."),
    cache: str | None = typer.Option(None, help="SQLite completion cache; reruns resume."),
    templates: str | None = typer.Option(
        None, help="YAML prompt templates (system/query/paraphrase)."
    ),
    dump_templates: str | None = typer.Option(
        None, help="Write the default templates here and exit."
    ),
    field: str = typer.Option("text", help="JSONL field holding the passage."),
    limit: int | None = typer.Option(None, help="Use the first N passages."),
    n_queries: int = typer.Option(3, help="Queries per passage (0 to skip)."),
    n_paraphrases: int = typer.Option(3, help="Graded rewrites per passage (0 to skip)."),
    language: str = typer.Option("the passage's language", help="Fills {language} in templates."),
    max_tokens: int = typer.Option(256, help="Generation length."),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="Drop evaluation sentences."),
    data_dir: str | None = typer.Option(None, help="Data folder with the evaluation sets."),
) -> None:
    """Ask an LLM for queries (retrieval pairs) and graded rewrites (STS pairs) of passages."""
    import json

    from conan_embedding.data.builders import generate as gen
    from conan_embedding.data.builders.backends import BackendConfig, make_backend
    from conan_embedding.data.leakage import build_eval_index

    if dump_templates:
        typer.echo(f"templates written to {gen.dump_templates(dump_templates)}")
        return
    cfg = BackendConfig(
        kind=backend,
        model=model,
        base_url=base_url,
        api_key_env=api_key_env,
        concurrency=concurrency,
        max_retries=max_retries,
        max_tokens=max_tokens,
        cache=cache,
    )
    report = gen.run_generate(
        passages,
        out_dir,
        make_backend(cfg),
        load_settings(templates, gen.PromptTemplates) if templates else gen.PromptTemplates(),
        field_name=field,
        limit=limit,
        n_queries=n_queries,
        n_paraphrases=n_paraphrases,
        language=language,
        eval_index=build_eval_index(data_dir) if dedup else None,
    )
    typer.echo(json.dumps(report, ensure_ascii=False))


@data_app.command("filter")
@cli_errors
def data_filter(
    input: str = typer.Argument(..., help="JSONL of pairs or retrieval records."),
    output: str = typer.Option(..., help="Kept rows (JSONL)."),
    teacher: str = typer.Option(
        ..., help="Teacher embedder: sentence-transformers folder or name."
    ),
    kind: str = typer.Option("pairs", help="pairs or retrieval."),
    threshold: float = typer.Option(
        0.4, help="Drop pairs with teacher cosine below this (paper: 0.4)."
    ),
    dropped: str | None = typer.Option(None, help="Also write the dropped rows here."),
    histogram: str | None = typer.Option(None, help="PNG histogram (default: OUTPUT.scores.png)."),
    report: str | None = typer.Option(None, help="JSON report (default: OUTPUT.filter.json)."),
    query_prompt: str = typer.Option("", help="e.g. 'query: ' for e5 teachers."),
    passage_prompt: str = typer.Option("", help="e.g. 'passage: ' for e5 teachers."),
    batch_size: int = typer.Option(64),
    max_seq_length: int | None = typer.Option(None),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="Drop evaluation sentences."),
    data_dir: str | None = typer.Option(None, help="Data folder with the evaluation sets."),
) -> None:
    """Score pairs with a teacher embedder and drop those below the threshold (and, with
    ``--dedup``, the default, every row touching an evaluation sentence)."""
    from conan_embedding.data.builders.filter import run_filter
    from conan_embedding.data.leakage import build_eval_index

    result = run_filter(
        input,
        output,
        teacher,
        kind=kind,
        threshold=threshold,
        dropped_path=dropped,
        histogram_path=histogram,
        report_path=report,
        batch_size=batch_size,
        query_prompt=query_prompt,
        passage_prompt=passage_prompt,
        max_seq_length=max_seq_length,
        device=device,
        eval_index=build_eval_index(data_dir) if dedup else None,
    )
    leaked = result.get("eval_overlap", {}).get("records_dropped")
    typer.echo(
        f"kept {result['records_kept']} / dropped {result['records_dropped']} records ({result['pairs_kept']} of {result['pairs_scored']} pairs >= {threshold})"
        + (f"; {leaked} dropped first for evaluation overlap" if leaked else "")
        + f"; histogram {result['histogram_png']}; report {result['report']}"
    )


@data_app.command("export")
@cli_errors
def data_export(
    source: str = typer.Argument(
        ..., help="save_to_disk folder, .parquet/.arrow file or hf://owner/name[:config][:split]."
    ),
    output: str = typer.Argument(..., help="JSONL to write (our schema of --kind)."),
    kind: str = typer.Option("retrieval", help="retrieval, sts, classification or pairs."),
    column: list[str] = typer.Option(
        [], help="FIELD=COLUMN, e.g. --column query=question --column pos=answer (repeatable)."
    ),
    split: str | None = typer.Option(None, help="Split of a DatasetDict or hub dataset."),
    streaming: bool = typer.Option(False, help="Read a hub dataset as it downloads."),
    limit: int | None = typer.Option(None, help="Write only the first N rows."),
) -> None:
    """Write a dataset input as validated JSONL (for `mine` and other JSONL-only tools)."""
    from conan_embedding.data.hf_sources import export_jsonl

    columns = {}
    for item in column:
        field, sep, name = item.partition("=")
        if not sep or not field or not name:
            raise typer.BadParameter(f"--column {item!r}: expected FIELD=COLUMN")
        columns[field] = name
    count = export_jsonl(
        source,
        kind,  # type: ignore[arg-type]
        output,
        columns=columns,
        split=split,
        streaming=streaming,
        limit=limit,
    )
    typer.echo(f"wrote {count} {kind} rows to {output}")
