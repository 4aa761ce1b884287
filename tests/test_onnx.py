"""ONNX export and int8 quantisation: same vectors (fp32), close vectors (int8), Dense kept."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conan_embedding.encoding.engine import EmbeddingEngine
from conan_embedding.modeling.embedder import build_embedder, save_embedder

pytest.importorskip("onnxruntime", reason="onnxruntime is in the `onnx` extra")

WORDS = ["cat", "dog", "bank", "river", "tea", "moon", "car", "park", "fish", "tree", "the", "on"]


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def dense_model(tiny_bert: Path, tmp_path_factory) -> Path:
    model = build_embedder(
        tiny_bert, pooling="cls", dense_dim=40, prompts={"query": "what is "}, seed=3
    )
    return save_embedder(model, tmp_path_factory.mktemp("onnx") / "onnx-model")


def test_fp32_export_matches_torch_and_keeps_the_dense_projection(
    dense_model: Path, tmp_path: Path
):
    from conan_embedding.encoding.backends.onnx import (
        FP32_FILE,
        INT8_FILE,
        export_onnx,
        read_manifest,
    )

    folder = export_onnx(dense_model, tmp_path / "export")
    manifest = read_manifest(folder)
    assert (folder / FP32_FILE).is_file() and (folder / INT8_FILE).is_file()
    assert manifest["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest["fused"] is True and manifest["fp32_max_abs_error"] < 1e-4
    assert not list(folder.glob(".export.*"))  # no temp folder left behind

    torch_engine = EmbeddingEngine.from_path(dense_model, threads=1)
    onnx_engine = EmbeddingEngine.from_path(dense_model, backend="onnx", onnx_dir=folder, threads=1)
    texts = _texts(45)  # other batch sizes and lengths than the export probe
    expected = torch_engine.model.encode(texts, prompt_name="query")
    got = onnx_engine.embed(texts, prompt_name="query", batch_size=7)
    assert got.shape == (45, 40)  # the projected width, not the transformer's 32
    assert np.min((got * expected).sum(1)) >= 0.9999


def test_int8_is_close_and_really_quantised(dense_model: Path, tmp_path: Path):
    from conan_embedding.encoding.backends.onnx import INT8_FILE, export_onnx

    folder = export_onnx(dense_model, tmp_path / "export")
    engine = EmbeddingEngine.from_path(dense_model, backend="onnx-int8", onnx_dir=folder, threads=1)
    texts = _texts(30, seed=1)
    expected = engine.model.encode(texts)
    got = engine.embed(texts)
    cosine = (got * expected).sum(1)
    assert cosine.min() >= 0.95 and cosine.mean() >= 0.99
    assert np.abs(got - expected).max() > 1e-7  # it really is a different (quantised) graph
    import onnx

    ops = {node.op_type for node in onnx.load(str(folder / INT8_FILE)).graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops


def test_stale_export_is_redone_in_the_cache(dense_model: Path, tmp_path: Path, monkeypatch):
    from conan_embedding.encoding.backends.onnx import (
        ensure_onnx_export,
        read_manifest,
        source_fingerprint,
    )

    monkeypatch.setenv("CONAN_CACHE_DIR", str(tmp_path / "cache"))
    first = ensure_onnx_export(dense_model)
    assert first.parent == tmp_path / "cache" / "onnx"
    assert ensure_onnx_export(dense_model) == first  # reused, not re-exported
    config = dense_model / "config_sentence_transformers.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    second = ensure_onnx_export(dense_model)
    assert second != first
    assert read_manifest(second)["source_fingerprint"] == source_fingerprint(dense_model)


@pytest.mark.integration
def test_minilm_onnx_fp32_matches_sentence_transformers(
    minilm_path: str, data_dir: Path, tmp_path: Path
):
    import csv

    with open(data_dir / "sts" / "stsb-en-test.csv", encoding="utf-8", newline="") as handle:
        texts = [row[0] for row, _ in zip(csv.reader(handle), range(64), strict=False)]
    from conan_embedding.encoding.backends.onnx import export_onnx

    folder = export_onnx(minilm_path, tmp_path / "minilm-onnx", int8=False)
    engine = EmbeddingEngine.from_path(minilm_path, backend="onnx", onnx_dir=folder)
    expected = engine.model.encode(texts)
    got = engine.embed(texts)
    assert got.shape == (64, 384)
    assert np.min((got * expected).sum(1)) >= 0.9999
