"""The inference-backend registry (issue #25: "a new serving backend touches 2 files").

A backend defined here, in the test, runs through the engine, the mining encoder, the mining
config and the CLI help without an edit anywhere else; one written as a new module file is
found by the package's own discovery; listing backends loads no runtime.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conan_embedding.encoding import backends
from conan_embedding.encoding.backends import (
    InferenceBackend,
    TransformerThenHead,
    backend_names,
    get_backend,
    register_backend,
    unregister_backend,
)
from conan_embedding.encoding.engine import EmbeddingEngine
from conan_embedding.modeling.embedder import build_embedder

BUILT_IN = ["torch", "torch-bf16", "onnx", "onnx-int8"]
TEXTS = ["the cat sat on the mat", "a river bank", "tea", "the moon over the park at night"] * 3


@pytest.fixture(scope="module")
def dense_model(tiny_bert: Path):
    """A model with a Dense projection (40-d over a 32-d transformer): a backend that lost the
    head would give the wrong width."""
    return build_embedder(str(tiny_bert), pooling="mean", dense_dim=40, seed=5)


class Float64Backend(InferenceBackend):
    """The model's own modules on a float64 copy: runs the torch modules, a precision of its own."""

    name = "test-float64"
    runs_torch_modules = True

    def precision(self, device: torch.device) -> str | None:
        return "fp64"

    def load(self, model, *, model_path, export_dir, device, threads):
        double = copy.deepcopy(model).double()

        def run(features: dict[str, Any]) -> torch.Tensor:
            return double(features)["sentence_embedding"]

        return run


class TransformerOnlyBackend(InferenceBackend):
    """Replaces only module 0 (as ONNX does) and needs an export folder; records its calls."""

    name = "test-transformer-only"
    needs_export = True
    concurrent_cpu_batches = True
    loads: list[dict[str, Any]] = []

    def load(self, model, *, model_path, export_dir, device, threads):
        type(self).loads.append({"export_dir": export_dir, "threads": threads})
        if model_path is None and export_dir is None:
            raise ValueError("test-transformer-only needs model_path or onnx_dir")
        transformer = model[0]
        return TransformerThenHead(lambda f: transformer(dict(f))["token_embeddings"], model)


@pytest.fixture
def registered() -> Iterator[None]:
    for cls in (Float64Backend, TransformerOnlyBackend):
        register_backend(cls)
    TransformerOnlyBackend.loads.clear()
    try:
        yield
    finally:
        for cls in (Float64Backend, TransformerOnlyBackend):
            unregister_backend(cls.name)


def test_the_registry_lists_the_built_in_backends_in_order():
    assert backend_names() == BUILT_IN
    assert [get_backend(n).runs_torch_modules for n in BUILT_IN] == [True, True, False, False]
    assert [get_backend(n).needs_export for n in BUILT_IN] == [False, False, True, True]
    assert [get_backend(n).precision(torch.device("cpu")) for n in BUILT_IN] == [
        None,
        "bf16",
        None,
        "int8",
    ]
    assert get_backend("onnx").extra == "onnx"


def test_an_unknown_backend_names_the_known_ones(dense_model, tmp_path):
    from conan_embedding.encoding.texts import TextEncoder
    from conan_embedding.mining.offline import MiningConfig

    message = "unknown backend 'tensorrt'; expected one of " + str(BUILT_IN)
    with pytest.raises(ValueError) as err:
        get_backend("tensorrt")
    assert str(err.value) == message
    with pytest.raises(ValueError, match=r"unknown backend 'tensorrt'; expected one of \["):
        EmbeddingEngine(dense_model, backend="tensorrt", device="cpu")
    with pytest.raises(ValueError, match=r"unknown backend 'tensorrt'; expected one of \["):
        TextEncoder(dense_model, backend="tensorrt", cache_dir=tmp_path, device="cpu")
    with pytest.raises(ValueError, match=r"backend\n.*unknown backend 'tensorrt'.*'onnx-int8'"):
        MiningConfig(backend="tensorrt")
    assert MiningConfig(backend="onnx-int8").backend == "onnx-int8"


def test_a_backend_defined_in_a_test_runs_through_the_engine(dense_model, registered):
    """Registering is all a new backend needs: the engine, its precision and the registry's
    listing pick it up, and it makes the torch backend's vectors."""
    assert backend_names()[: len(BUILT_IN)] == BUILT_IN
    assert set(backend_names()[len(BUILT_IN) :]) == {
        Float64Backend.name,
        TransformerOnlyBackend.name,
    }
    expected = EmbeddingEngine(dense_model, device="cpu", threads=1).embed(TEXTS, batch_size=5)
    assert expected.shape == (len(TEXTS), 40)

    engine = EmbeddingEngine(dense_model, backend="test-float64", device="cpu", threads=1)
    assert engine.backend == "test-float64" and engine.precision == "fp64"
    got = engine.embed(TEXTS, batch_size=5)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)

    with pytest.raises(ValueError, match="needs model_path or onnx_dir"):
        EmbeddingEngine(dense_model, backend="test-transformer-only", device="cpu")
    only = EmbeddingEngine(
        dense_model, backend="test-transformer-only", onnx_dir="/nowhere", device="cpu", threads=2
    )
    assert only.concurrent and TransformerOnlyBackend.loads[-1]["threads"] == 1
    np.testing.assert_allclose(only.embed(TEXTS, batch_size=5), expected, atol=1e-6)


def test_the_mining_side_asks_the_backend(dense_model, registered, tmp_path):
    """TextEncoder gives an export folder only to a backend that needs one, and keys its cache
    by the backend's precision; MiningConfig and the CLI help accept the new name."""
    from conan_embedding.cli import backend_help
    from conan_embedding.encoding.texts import TextEncoder
    from conan_embedding.mining.offline import MiningConfig

    TextEncoder(dense_model, backend="test-transformer-only", cache_dir=tmp_path, device="cpu")
    assert TransformerOnlyBackend.loads[-1]["export_dir"] == tmp_path / "onnx"
    f32 = TextEncoder(dense_model, backend="torch", cache_dir=tmp_path, device="cpu")
    f64 = TextEncoder(dense_model, backend="test-float64", cache_dir=tmp_path, device="cpu")
    assert f32.key("k", None) != f64.key("k", None)
    np.testing.assert_allclose(f64.encode(TEXTS), f32.encode(TEXTS), atol=1e-5)

    assert MiningConfig(backend="test-float64").backend == "test-float64"
    assert "test-float64" in backend_help()
    assert backend_help(exported=True) == "onnx | onnx-int8 | test-transformer-only"


def test_a_new_module_in_the_package_is_discovered(tmp_path, monkeypatch):
    """A new backend is one file in ``encoding/backends/``: the package imports it itself."""
    (tmp_path / "dropin.py").write_text(
        textwrap.dedent(
            """
            from conan_embedding.encoding.backends import InferenceBackend, register_backend

            @register_backend
            class DropIn(InferenceBackend):
                name = "test-drop-in"

                def load(self, model, *, model_path, export_dir, device, threads):
                    raise RuntimeError("this test only registers the backend")
            """
        )
    )
    monkeypatch.setattr(backends, "__path__", [*backends.__path__, str(tmp_path)])
    monkeypatch.setattr(backends, "_discovered", False)
    try:
        assert "test-drop-in" in backend_names()
        assert type(get_backend("test-drop-in")).__module__ == f"{backends.__name__}.dropin"
    finally:
        unregister_backend("test-drop-in")
        sys.modules.pop(f"{backends.__name__}.dropin", None)


def test_registration_rules():
    class Nameless(InferenceBackend):
        def load(self, model, **kwargs):
            raise RuntimeError("this test only registers the backend")

    with pytest.raises(TypeError, match="needs a class attribute `name`"):
        register_backend(Nameless)

    class Impostor(Nameless):
        name = "onnx"

    with pytest.raises(ValueError, match="'onnx' is already registered by .*OnnxBackend"):
        register_backend(Impostor)
    assert type(get_backend("onnx")).__name__ == "OnnxBackend"
    with pytest.raises(ValueError, match="has no export step"):
        get_backend("torch").export("some-model")


def test_a_missing_runtime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an uninstalled module does
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'conan-embedding\[onnx\]'"):
        get_backend("onnx-int8").require("onnxruntime")


def test_listing_backends_loads_no_runtime():
    """The CLI builds its --backend help from the registry at import: that must stay cheap."""
    code = (
        "import sys; from conan_embedding.encoding.backends import backend_names; "
        "import conan_embedding.cli; print(backend_names()); "
        "print(sorted(m for m in ('torch', 'numpy', 'onnxruntime', 'sentence_transformers') "
        "if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(backends.__file__).parents[3])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.splitlines()
    assert out == [str(BUILT_IN), "[]"]


def test_cli_export_goes_through_the_backend(dense_model, tmp_path):
    from conan_embedding.cli import app
    from conan_embedding.modeling.embedder import save_embedder

    runner = CliRunner()
    refused = runner.invoke(app, ["export", "some-model", "--backend", "torch"])
    assert refused.exit_code == 2 and "'torch' runs the saved model and has no export step" in (
        refused.output
    )
    unknown = runner.invoke(app, ["export", "some-model", "--backend", "tensorrt"])
    assert unknown.exit_code == 2 and "expected one of" in unknown.output

    pytest.importorskip("onnxruntime", reason="onnxruntime is in the `onnx` extra")
    from conan_embedding.encoding.backends.onnx import FP32_FILE, INT8_FILE

    model_dir = save_embedder(dense_model, tmp_path / "model")
    done = runner.invoke(app, ["export", str(model_dir), "--backend", "onnx"])
    assert done.exit_code == 0, done.output
    assert "onnx export in" in done.output
    assert (model_dir / "onnx" / FP32_FILE).is_file() and (model_dir / "onnx" / INT8_FILE).is_file()
