"""Serving: the OpenAI-compatible ``serve`` and the resumable ``encode``
(:mod:`conan_embedding.serving`, :mod:`conan_embedding.encoding.engine`)."""

from __future__ import annotations

import typer

from conan_embedding.cli import DEVICE_HELP, app, backend_help, cli_errors, export_dir_help


@app.command("serve")
@cli_errors
def serve_command(
    model: str = typer.Argument(..., help="A sentence-transformers folder (or a PyPI model name)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port."),
    backend: str = typer.Option("torch", help=backend_help()),
    onnx_dir: str | None = typer.Option(None, help=export_dir_help()),
    name: str | None = typer.Option(None, help="Model id clients send (default: folder name)."),
    api_key: str | None = typer.Option(
        None, envvar="CONAN_API_KEY", help="Require this bearer key."
    ),
    max_inputs: int = typer.Option(512, help="Inputs per request (more: 400)."),
    max_body_mb: float = typer.Option(8.0, help="Request body limit in MiB (more: 413)."),
    max_batch: int = typer.Option(256, help="Rows joined into one micro-batch."),
    max_wait_ms: float = typer.Option(2.0, help="How long a lone request waits for company."),
    batch_size: int = typer.Option(32, help="Rows per forward pass."),
    truncate: bool = typer.Option(False, help="Cut over-long inputs instead of answering 400."),
    query_prompt: str | None = typer.Option(None, help="Prompt for input_type=query."),
    passage_prompt: str | None = typer.Option(None, help="Prompt for input_type=passage."),
    threads: int | None = typer.Option(None, help="CPU threads (default: all)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """OpenAI-compatible embedding server: POST /v1/embeddings, GET /v1/models, GET /health."""
    from conan_embedding.encoding.engine import EmbeddingEngine
    from conan_embedding.serving.server import ServerSettings, serve

    engine = EmbeddingEngine.from_path(
        model,
        backend=backend,
        onnx_dir=onnx_dir,
        batch_size=batch_size,
        threads=threads,
        device=device,
        **({"name": name} if name else {}),
    )
    prompts = {
        k: v for k, v in (("query", query_prompt), ("passage", passage_prompt)) if v is not None
    }
    settings = ServerSettings(
        api_key=api_key,
        max_inputs_per_request=max_inputs,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_batch_inputs=max_batch,
        max_wait_ms=max_wait_ms,
        truncate=truncate,
        prompts=prompts,
    )
    serve(engine, settings, host=host, port=port)


@app.command("encode")
@cli_errors
def encode_command(
    model: str = typer.Argument(..., help="A sentence-transformers folder (or a PyPI model name)."),
    input_path: str = typer.Argument(..., help="Texts: .txt (a line each), .jsonl or .parquet."),
    output_path: str = typer.Argument(..., help="Vectors: .npy or .parquet."),
    field: str = typer.Option("text", help="The text field (jsonl) or column (parquet)."),
    prompt_name: str | None = typer.Option(None, help="One of the model's prompts, e.g. query."),
    dimensions: int | None = typer.Option(None, help="Matryoshka size (truncate + re-normalise)."),
    backend: str = typer.Option("torch", help=backend_help()),
    onnx_dir: str | None = typer.Option(None, help=export_dir_help()),
    batch_size: int = typer.Option(32, help="Rows per forward pass."),
    chunk_rows: int = typer.Option(4096, help="Rows per resumable chunk."),
    restart: bool = typer.Option(False, help="Discard a partial run instead of resuming it."),
    threads: int | None = typer.Option(None, help="CPU threads (default: all)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Encode a file of texts, length-sorted, resumable; prints rows and throughput."""
    from conan_embedding.encoding.engine import EmbeddingEngine
    from conan_embedding.serving.encode import encode_file

    engine = EmbeddingEngine.from_path(
        model, backend=backend, onnx_dir=onnx_dir, batch_size=batch_size, threads=threads,
        device=device,
    )  # fmt: skip
    result = encode_file(
        engine,
        input_path,
        output_path,
        field=field,
        prompt_name=prompt_name,
        dimensions=dimensions,
        chunk_rows=chunk_rows,
        restart=restart,
    )
    typer.echo(
        f"{result.rows} rows x {result.dimensions} -> {result.output} "
        f"({result.texts_per_second:.0f} texts/s, {result.chunks_resumed} chunks resumed)"
    )
