"""`conan-embed encode`: file formats, row order, errors naming file:line:field, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conan_embedding.data.records import RecordError
from conan_embedding.encoding.engine import EmbeddingEngine
from conan_embedding.modeling.embedder import build_embedder, save_embedder
from conan_embedding.serving.encode import encode_file

WORDS = ["cat", "dog", "bank", "river", "tea", "moon", "car", "park", "fish", "tree", "the", "on"]


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, 15))) for _ in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_bert: Path, tmp_path_factory) -> EmbeddingEngine:
    model = build_embedder(
        tiny_bert, dense_dim=24, matryoshka_dims=[8], prompts={"query": "what is "}, seed=2
    )
    path = save_embedder(model, tmp_path_factory.mktemp("enc") / "enc-model")
    return EmbeddingEngine.from_path(path, threads=1, batch_size=8)


def test_txt_jsonl_parquet_give_the_models_vectors_in_row_order(engine, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _texts(70)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    with open(tmp_path / "in.jsonl", "w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": i, "body": text}) + "\n" + ("\n" if i == 3 else ""))
    pq.write_table(pa.table({"body": texts}), tmp_path / "in.parquet")
    expected = engine.model.encode(texts, prompt_name="query")

    npy = encode_file(
        engine,
        tmp_path / "in.txt",
        tmp_path / "a.npy",
        prompt_name="query",
        chunk_rows=16,
        progress=False,
    )
    got = np.load(npy.output)
    assert got.shape == (70, 24) and npy.chunks_total == 5
    assert np.min((got * expected).sum(1)) >= 0.9999

    encode_file(
        engine,
        tmp_path / "in.jsonl",
        tmp_path / "b.npy",
        field="body",
        prompt_name="query",
        progress=False,
    )
    assert np.allclose(np.load(tmp_path / "b.npy"), got, atol=1e-5)

    encode_file(
        engine,
        tmp_path / "in.parquet",
        tmp_path / "c.parquet",
        field="body",
        prompt_name="query",
        dimensions=8,
        progress=False,
    )
    table = pq.read_table(tmp_path / "c.parquet")
    assert table.column("row").to_pylist() == list(range(70))
    short = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    assert short.shape == (70, 8)
    head = got[:, :8] / np.linalg.norm(got[:, :8], axis=1, keepdims=True)
    assert np.allclose(short, head, atol=1e-5)
    assert not (tmp_path / "c.parquet.partial").exists()


def test_interrupted_run_resumes_without_redoing_chunks(engine, tmp_path: Path, monkeypatch):
    texts = _texts(50, seed=1)
    source = tmp_path / "big.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    reference = encode_file(engine, source, tmp_path / "ref.npy", chunk_rows=10, progress=False)

    calls = {"n": 0}
    real = EmbeddingEngine.embed_ids

    def crash_on_third_chunk(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the machine dies mid-run
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddingEngine, "embed_ids", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        encode_file(engine, source, tmp_path / "out.npy", chunk_rows=10, progress=False)
    assert not (tmp_path / "out.npy").exists()  # nothing that looks finished
    width = np.load(reference.output).shape[1]  # two chunks of 10 rows were made durable
    assert (tmp_path / "out.npy.partial" / "vectors.f32").stat().st_size == 20 * width * 4

    calls["n"] = 100  # no more crashes; count the chunks the rerun computes
    result = encode_file(engine, source, tmp_path / "out.npy", chunk_rows=10, progress=False)
    assert result.chunks_resumed == 2 and calls["n"] == 103
    assert np.allclose(np.load(tmp_path / "out.npy"), np.load(reference.output), atol=1e-6)

    # A partial run with other settings is refused rather than mixed in.
    (tmp_path / "other.npy.partial").mkdir()
    state = json.loads(json.dumps({"chunk_rows": 7}))
    (tmp_path / "other.npy.partial" / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="different settings"):
        encode_file(engine, source, tmp_path / "other.npy", chunk_rows=10, progress=False)
    encode_file(engine, source, tmp_path / "other.npy", chunk_rows=10, restart=True, progress=False)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        (
            "bad.jsonl",
            '{"text": "dog"}\n{"text": 3}\n',
            r"bad.jsonl:2: field 'text': expected a string",
        ),
        (
            "bad2.jsonl",
            '{"text": "dog"}\n\n{"body": "x"}\n',
            r"bad2.jsonl:3: field 'text': missing",
        ),
        ("bad3.jsonl", '{"text": "dog"\n', r"bad3.jsonl:1: field '<json>'"),
    ],
)
def test_bad_rows_name_file_line_and_field(engine, tmp_path: Path, name, content, match):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(RecordError, match=match):
        encode_file(engine, tmp_path / name, tmp_path / "x.npy", progress=False)
    with pytest.raises(ValueError, match="unsupported output"):
        encode_file(engine, tmp_path / name, tmp_path / "x.csv", progress=False)


def test_parquet_missing_column_and_null_rows(engine, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["dog", None]}), tmp_path / "n.parquet")
    with pytest.raises(RecordError, match=r"n.parquet:2: field 'text'"):
        encode_file(engine, tmp_path / "n.parquet", tmp_path / "n.npy", progress=False)
    with pytest.raises(RecordError, match="no such column"):
        encode_file(
            engine, tmp_path / "n.parquet", tmp_path / "n.npy", field="body", progress=False
        )


def test_cli_encode_and_export_onnx(engine, tmp_path: Path):
    pytest.importorskip("onnxruntime")
    from typer.testing import CliRunner

    from conan_embedding.cli import app

    model_dir = str(engine.model_path)
    texts = _texts(20, seed=4)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    runner = CliRunner()
    done = runner.invoke(
        app,
        ["encode", model_dir, str(tmp_path / "in.txt"), str(tmp_path / "t.npy"), "--threads", "1"],
    )
    assert done.exit_code == 0, done.output
    assert "20 rows x 24" in done.output
    exported = runner.invoke(app, ["export-onnx", model_dir, "--out", str(tmp_path / "onnx")])
    assert exported.exit_code == 0, exported.output
    args = [
        "encode",
        model_dir,
        str(tmp_path / "in.txt"),
        str(tmp_path / "o.npy"),
        "--backend",
        "onnx",
    ]
    done = runner.invoke(app, [*args, "--onnx-dir", str(tmp_path / "onnx"), "--threads", "1"])
    assert done.exit_code == 0, done.output
    assert np.min((np.load(tmp_path / "o.npy") * np.load(tmp_path / "t.npy")).sum(1)) >= 0.9999
