"""Encode a file of texts (txt, jsonl, parquet) into vectors (``.npy`` or parquet), resumably.

Why: corpora for mining and retrieval are large; a run that dies at 90 % must not start over,
and a half-written output must never look finished.

How: rows are read in order and cut into chunks of ``chunk_rows``. Each chunk is tokenised,
encoded by :class:`~conan_embedding.encoding.engine.EmbeddingEngine` in token batches, and
appended to ``<output>.partial/vectors.f32``, a
:class:`~conan_embedding.encoding.cache.VectorFile` (flushed and fsynced per chunk; a partly
written row is cut off on reopen). ``state.json`` there records the input's size and mtime and
every setting that changes the vectors; a rerun with the same state skips the rows already on
disk, a rerun with different settings is refused. When every row is there they are assembled
into the output (temp file, then rename) and the partial folder goes.

Inputs: ``.txt`` (one text per line; every line is a row, so row ``i`` is line ``i + 1``),
``.jsonl`` (one object per non-blank line, text under ``field``), ``.parquet`` (column ``field``).
A bad row raises :class:`~conan_embedding.data.records.RecordError` naming file, line and field.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conan_embedding._io import atomic_path
from conan_embedding.data.records import RecordError, iter_json_objects
from conan_embedding.encoding.cache import VectorFile
from conan_embedding.encoding.engine import EmbeddingEngine
from conan_embedding.encoding.texts import chunked
from conan_embedding.progress import progress as progress_bar

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
OUTPUT_SUFFIXES = (".npy", ".parquet")


@dataclass(frozen=True)
class EncodeResult:
    output: Path
    rows: int
    dimensions: int
    chunks_total: int
    chunks_resumed: int
    seconds: float

    @property
    def texts_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


def _input_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise ValueError(f"{path}: unsupported input type {suffix!r}; use one of {INPUT_SUFFIXES}")
    return suffix


def count_rows(path: str | os.PathLike[str], field: str = "text") -> int:
    path = Path(path)
    kind = _input_kind(path)
    if kind == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if field not in parquet.schema_arrow.names:
            raise RecordError(
                path, 0, field, f"no such column (columns: {parquet.schema_arrow.names})"
            )
        return parquet.metadata.num_rows
    with open(path, encoding="utf-8") as handle:
        if kind == ".txt":
            return sum(1 for _ in handle)
        return sum(1 for line in handle if line.strip())


def iter_texts(path: str | os.PathLike[str], field: str = "text") -> Iterator[str]:
    """The texts of a file, in order; a bad row raises :class:`RecordError` (file:line: field)."""
    path = Path(path)
    kind = _input_kind(path)
    if kind == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if field not in parquet.schema_arrow.names:
            raise RecordError(
                path, 0, field, f"no such column (columns: {parquet.schema_arrow.names})"
            )
        row = 0
        for batch in parquet.iter_batches(columns=[field], batch_size=8192):
            for value in batch.column(0).to_pylist():
                row += 1
                if not isinstance(value, str):
                    raise RecordError(
                        path, row, field, f"expected a string, got {type(value).__name__}"
                    )
                yield value
        return
    if kind == ".txt":
        with open(path, encoding="utf-8") as handle:
            yield from (line.rstrip("\r\n") for line in handle)
        return
    for line_no, raw in iter_json_objects(path):
        if field not in raw:
            raise RecordError(path, line_no, field, "missing")
        if not isinstance(raw[field], str):
            raise RecordError(
                path, line_no, field, f"expected a string, got {type(raw[field]).__name__}"
            )
        yield raw[field]


def _assemble(store: VectorFile, output: Path, rows: int, width: int) -> None:
    """Copy the vector file into ``output`` (temp file, then rename)."""
    with atomic_path(output, suffix=".tmp") as tmp:
        if output.suffix.lower() == ".npy" and rows == 0:
            with open(tmp, "wb") as handle:
                np.save(handle, np.zeros((0, width), dtype=np.float32), allow_pickle=False)
        elif output.suffix.lower() == ".npy":
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, width))
            for start, block in store.blocks():
                out[start : start + len(block)] = block
            out.flush()
            del out
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([("row", pa.int64()), ("embedding", pa.list_(pa.float32(), width))])
            with pq.ParquetWriter(tmp, schema) as writer:
                for start, block in store.blocks():
                    flat = pa.array(block.reshape(-1), type=pa.float32())
                    table = pa.table(
                        {
                            "row": pa.array(np.arange(start, start + len(block), dtype=np.int64)),
                            "embedding": pa.FixedSizeListArray.from_arrays(flat, width),
                        },
                        schema=schema,
                    )
                    writer.write_table(table)


def _run_state(engine: EmbeddingEngine, source: Path, settings: dict[str, Any]) -> dict[str, Any]:
    stat = source.stat()
    return {
        "input": str(source.resolve()),
        "input_size": stat.st_size,
        "input_mtime_ns": stat.st_mtime_ns,
        "model": engine.name,
        "backend": engine.backend,
        "width": engine.width,
        **settings,
    }


def encode_file(
    engine: EmbeddingEngine,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    field: str = "text",
    prompt_name: str | None = None,
    dimensions: int | None = None,
    chunk_rows: int = 4096,
    truncate: bool = True,
    restart: bool = False,
    progress: bool = True,
) -> EncodeResult:
    """Encode ``input_path`` into ``output_path``; an interrupted run resumes where it stopped."""
    source, output = Path(input_path), Path(output_path)
    _input_kind(source)
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"{output}: unsupported output type; use one of {OUTPUT_SUFFIXES}")
    if chunk_rows <= 0:
        raise ValueError("chunk_rows must be positive")
    engine.check_dimensions(dimensions)
    prompt = engine.resolve_prompt(prompt_name)
    started = time.perf_counter()
    rows = count_rows(source, field)
    width = dimensions or engine.width
    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.with_name(output.name + ".partial")
    state = _run_state(
        engine,
        source,
        {
            "field": field,
            "prompt": prompt,
            "dimensions": width,
            "chunk_rows": chunk_rows,
            "truncate": truncate,
            "rows": rows,
        },
    )
    state_file = work / "state.json"
    if restart:
        shutil.rmtree(work, ignore_errors=True)
    if state_file.is_file():
        previous = json.loads(state_file.read_text(encoding="utf-8"))
        if previous != state:
            changed = sorted(k for k in state if previous.get(k) != state[k])
            raise ValueError(
                f"{work} holds a partial run with different settings ({', '.join(changed)}); "
                "pass restart=True (--restart) to discard it"
            )
    else:
        work.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state, indent=2), encoding="utf-8")

    n_chunks = (rows + chunk_rows - 1) // chunk_rows
    store = VectorFile(work / "vectors", key=json.dumps(state, sort_keys=True), width=width)
    done_rows = store.rows
    resumed = done_rows // chunk_rows
    bar = progress_bar(
        total=rows,
        initial=done_rows,
        unit="text",
        desc=f"encode {source.name}",
        disable=not progress,
    )
    try:
        for index, texts in enumerate(chunked(iter_texts(source, field), chunk_rows)):
            if (index + 1) * chunk_rows <= done_rows:
                continue
            texts = texts[max(0, done_rows - index * chunk_rows) :]
            tokens = engine.tokenize(texts, prompt, truncate=truncate)
            store.append(engine.embed_ids(tokens.ids, tokens.prompt_length, dimensions=dimensions))
            bar.update(len(texts))
    finally:
        bar.close()
    _assemble(store, output, rows, width)
    shutil.rmtree(work, ignore_errors=True)
    return EncodeResult(output, rows, width, n_chunks, resumed, time.perf_counter() - started)
