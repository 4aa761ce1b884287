"""``mine``: offline hard-negative pools (:mod:`conan_embedding.mining.offline`)."""

from __future__ import annotations

import typer

from conan_embedding.cli import DEVICE_HELP, app, backend_help, cli_errors


@app.command("mine")
@cli_errors
def mine_command(
    records: str = typer.Argument(..., help="Retrieval JSONL (query, pos[, neg])."),
    out: str = typer.Argument(..., help="Output retrieval JSONL; the pool goes beside it."),
    model: str = typer.Option("all-MiniLM-L6-v2", help="Model folder or name to mine with."),
    corpus: str | None = typer.Option(
        None, help=".txt or .jsonl[.gz] corpus (default: positives + negatives)."
    ),
    pool: str | None = typer.Option(
        None, help="Pool manifest path (default: OUT stem + .pool.json; ids + scores beside it)."
    ),
    range_min: int = typer.Option(10, help="First kept rank among filtered candidates."),
    range_max: int = typer.Option(200, help="Rank after the last kept candidate."),
    negatives: int = typer.Option(7, help="Negatives written to each record's `neg`."),
    relative_margin: float = typer.Option(
        0.05, help="Drop candidates above pos - |pos|*margin (<0: off)."
    ),
    max_score: float | None = typer.Option(None, help="Drop candidates scoring above this cap."),
    query_prompt: str | None = typer.Option(None, help="Text put before queries (e.g. 'query: ')."),
    passage_prompt: str | None = typer.Option(None, help="Text put before corpus texts."),
    index: str = typer.Option("auto", help="auto | exact | ivf | hnsw | ivfpq."),
    exact_max: int = typer.Option(200_000, help="auto: exact search up to this corpus size."),
    backend: str = typer.Option(
        "torch",
        help=backend_help("Encoder: ", " (int8: fastest; slightly different vectors)."),
    ),
    batch_size: int = typer.Option(32),
    chunk_size: int = typer.Option(4096, help="Texts per encoded (and resumable) chunk."),
    cache_dir: str | None = typer.Option(
        None, help="Embedding cache folder (kept; default: a work folder removed on success)."
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Mine a ranked hard-negative pool per query, with false-negative filters; a killed run
    started again resumes at the chunk it was encoding.

    Several processes share the encoding (rank 0 then searches and writes):
    `torchrun --standalone --nproc_per_node N -m conan_embedding.cli mine RECORDS OUT ...`.
    """
    import os

    from conan_embedding.mining.offline import MiningConfig, mine_file

    config = MiningConfig(
        range_min=range_min, range_max=range_max, num_negatives=negatives,
        relative_margin=relative_margin if relative_margin >= 0 else None, max_score=max_score,
        query_prompt=query_prompt, passage_prompt=passage_prompt, index=index,
        exact_max=exact_max, backend=backend, batch_size=batch_size, chunk_size=chunk_size,
        device=device,
    )  # fmt: skip
    stats = mine_file(records, out, model, corpus_path=corpus, pool_path=pool, config=config,
                      cache_dir=cache_dir)  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:  # the other ranks only encoded their share
        return
    typer.echo(
        f"{stats.queries} queries, corpus {stats.corpus_size}, mean pool {stats.mean_pool_size:.1f}, "
        f"{stats.short_pools} short pools, skipped {stats.skipped} -> {out}"
    )
