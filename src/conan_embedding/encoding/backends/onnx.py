"""Export the transformer to ONNX (fp32, fused) and int8 (dynamic quantisation) for CPU serving.

Why: on a CPU most of an embedder's time is the transformer's matrix products. ONNX Runtime
runs the same graph with fused attention / layer-norm / GELU kernels (same vectors, cosine
>= 0.9999), and dynamic int8 quantisation stores weights as int8 with one scale per tensor
(``w ~= scale * q``, activations quantised per batch at run time), which uses the CPU's
integer dot-product units (VNNI) at a small quality cost that ``bench/bench_encode.py`` measures.

How: only module 0 of the sentence-transformers model (the transformer) is exported, through
the model's own forward, with dynamic batch and sequence axes. Pooling, the Dense projection and
normalisation stay the saved modules and run after it
(:class:`~conan_embedding.encoding.backends.TransformerThenHead`), so an exported model can
never lose its projection. The route is ``torch.onnx.export`` +
``onnxruntime`` (its transformer optimizer and ``quantize_dynamic``): ``optimum`` and
``sentence-transformers[onnx]`` would downgrade transformers and sentence-transformers here.

Files, in ``<model>/onnx/`` or a cache folder: ``model.onnx`` (fp32, fused), ``model_int8.onnx``
and ``conan_onnx.json`` (source fingerprint, inputs, and the measured export error). A model that
exists only in memory (mined with straight after training, say) is exported into
``<onnx_dir>/model-<weights fingerprint>/``, so changed weights never reuse a stale graph.

Backends: ``onnx`` (the fused fp32 graph: the same vectors as torch) and ``onnx-int8`` (the
quantised graph: faster, slightly different vectors), :class:`OnnxBackend` below. Torch,
numpy and onnxruntime are imported where they are used, so listing the backends stays cheap
(:mod:`conan_embedding.encoding.backends`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from conan_embedding.encoding.backends import (
    InferenceBackend,
    Runner,
    TransformerThenHead,
    register_backend,
)

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

MANIFEST = "conan_onnx.json"
FP32_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
OPSET = 17
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet", "distilbert"}


def source_fingerprint(model_path: str | os.PathLike[str]) -> str:
    """A hash of the model folder's file names, sizes and mtimes: a stale export is re-made."""
    root = Path(model_path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and "onnx" not in p.parts):
        stat = file.stat()
        digest.update(f"{file.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def default_cache_dir(model_path: str | os.PathLike[str]) -> Path:
    base = Path(os.environ.get("CONAN_CACHE_DIR", Path.home() / ".cache" / "conan_embedding"))
    return base / "onnx" / f"{Path(model_path).name}-{source_fingerprint(model_path)}"


def _transformer_graph(transformer: torch.nn.Module, input_names: list[str]) -> torch.nn.Module:
    """Module 0 through its own sentence-transformers forward: ids in, token embeddings out."""
    import torch

    class _TransformerGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer, self.input_names = transformer, input_names

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.transformer(dict(zip(self.input_names, inputs, strict=True)))[
                "token_embeddings"
            ]

    return _TransformerGraph()


def _input_names(model: SentenceTransformer) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in model.tokenizer.model_input_names:
        names.append("token_type_ids")
    return names


def _probe_features(model: SentenceTransformer, names: list[str], seed: int = 0) -> dict:
    """Two rows of different lengths, so the traced graph sees padding and a real mask."""
    import numpy as np
    import torch

    from conan_embedding.encoding.tokens import special_token_frame

    generator = np.random.default_rng(seed)
    vocab = len(model.tokenizer)
    special = set(model.tokenizer.all_special_ids)
    pool = np.array([i for i in range(min(vocab, 2000)) if i not in special] or [0])
    before, after = special_token_frame(model.tokenizer)
    rows = [before + generator.choice(pool, n).tolist() + after for n in (13, 6)]
    longest = max(map(len, rows))
    pad = model.tokenizer.pad_token_id or 0
    ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows], dtype=torch.long)
    features = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {name: features[name] for name in names}


def _export_fp32(model: SentenceTransformer, path: Path) -> list[str]:
    import torch

    names = _input_names(model)
    graph = _transformer_graph(model[0], names).eval()
    probe = _probe_features(model, names)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["token_embeddings"] = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        # The TorchScript exporter needs no onnxscript and handles HF attention masks well.
        torch.onnx.export(
            graph,
            tuple(probe[n] for n in names),
            str(path),
            input_names=names,
            output_names=["token_embeddings"],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return names


def _fuse_transformer_ops(model: SentenceTransformer, path: Path) -> bool:
    """Fuse attention / layer norm / GELU with onnxruntime's transformer optimizer (BERT-likes)."""
    config = getattr(model[0].auto_model, "config", None)
    if config is None or getattr(config, "model_type", None) not in _BERT_LIKE:
        return False
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        optimized = optimize_model(
            str(path),
            model_type="bert",
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
            opt_level=0,
        )
        optimized.save_model_to_file(str(path))
    except Exception as err:  # an unfusable graph still runs unfused: warn, keep the plain one
        warnings.warn(f"ONNX fusion skipped ({err}); the unfused graph is kept", stacklevel=2)
        return False
    return True


def export_transformer_graph(model: SentenceTransformer, path: str | os.PathLike[str]) -> list[str]:
    """Write module 0 of ``model`` as a fused fp32 ONNX graph at ``path``; returns its inputs.

    The graph maps the tokenizer's ids and masks to ``token_embeddings``; it is written to a
    temp file beside ``path`` and renamed, so a crash never leaves a graph a later run trusts.
    """
    from conan_embedding._io import atomic_path

    with atomic_path(path, suffix=".tmp") as tmp:
        names = _export_fp32(model, tmp)
        _fuse_transformer_ops(model, tmp)
    return names


def quantize_int8(source: Path, target: Path, per_channel: bool = False) -> None:
    """Dynamic int8 quantisation of the MatMul weights of ``source`` into ``target``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(target),
        # Only the matrix products: quantising the embedding table (Gather) costs most of the
        # quality and little of the time.
        op_types_to_quantize=["MatMul"],
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        reduce_range=False,
        # Weights only: attention's activation x activation products stay fp32 (quantising
        # both sides of Q.K^T per batch is where dynamic int8 loses quality).
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
    )


def _max_abs_error(model: SentenceTransformer, path: Path, names: list[str]) -> float:
    """Largest |onnx - torch| over the real (unmasked) tokens of a probe of new shapes."""
    import torch

    runner = OnnxTransformer.from_file(path, threads=1)
    probe = _probe_features(model, names, seed=1)
    with torch.inference_mode():
        expected = model[0](dict(probe))["token_embeddings"]
    got = runner(probe)
    mask = probe["attention_mask"].bool()
    return float((got - expected).abs()[mask].max())


def _memory_fingerprint(model: SentenceTransformer) -> str:
    from conan_embedding.encoding.cache import model_fingerprint

    return model_fingerprint(model)[:16]


def export_onnx(
    model_path: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    int8: bool = True,
    per_channel: bool = False,
    model: SentenceTransformer | None = None,
) -> Path:
    """Export ``model_path`` into ``out_dir`` (default ``<model>/onnx``); returns the folder.

    Files are written in a temp folder and moved in when complete, so a crash never leaves a
    half-written graph behind that a later run would trust.
    """
    from conan_embedding.modeling.embedder import load_embedder, resolve_model_path

    if model_path is None:
        if model is None or out_dir is None:
            raise ValueError("export_onnx without a model folder needs `model` and `out_dir`")
        source, fingerprint = None, _memory_fingerprint(model)
    else:
        source = Path(resolve_model_path(model_path))
        if not source.is_dir():
            raise FileNotFoundError(f"model folder {source} does not exist")
        fingerprint = source_fingerprint(source)
    out = Path(out_dir) if out_dir is not None else source / "onnx"  # type: ignore[operator]
    model = model if model is not None else load_embedder(source)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".export."))
    try:
        names = _export_fp32(model, tmp / FP32_FILE)
        if int8:  # quantise the unfused graph: the runtime then fuses around the int8 MatMuls
            quantize_int8(tmp / FP32_FILE, tmp / INT8_FILE, per_channel)
        fused = _fuse_transformer_ops(model, tmp / FP32_FILE)
        manifest: dict[str, Any] = {
            "source": str(source) if source is not None else "<in memory>",
            "source_fingerprint": fingerprint,
            "inputs": names,
            "output": "token_embeddings",
            "opset": OPSET,
            "fused": fused,
            "fp32_max_abs_error": _max_abs_error(model, tmp / FP32_FILE, names),
            "int8": {"file": INT8_FILE, "per_channel": per_channel} if int8 else None,
        }
        for name in (FP32_FILE, INT8_FILE):
            if (tmp / name).exists():
                os.replace(tmp / name, out / name)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        os.replace(tmp / MANIFEST, out / MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    file = Path(folder) / MANIFEST
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None


def ensure_onnx_export(
    model_path: str | os.PathLike[str] | None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    int8: bool = False,
    model: SentenceTransformer | None = None,
) -> Path:
    """A folder with an up-to-date export: ``out_dir``, ``<model>/onnx``, or a fresh cache export."""
    from conan_embedding.modeling.embedder import resolve_model_path

    wanted = INT8_FILE if int8 else FP32_FILE

    def usable(folder: Path) -> bool:
        manifest = read_manifest(folder)
        if manifest is None or not (folder / wanted).is_file():
            return False
        return model_path is None or manifest["source_fingerprint"] == source_fingerprint(
            resolve_model_path(model_path)
        )

    if model_path is None and model is not None and out_dir is not None:
        # an in-memory model: one folder per weights fingerprint inside out_dir
        folder = Path(out_dir) / f"model-{_memory_fingerprint(model)}"
        if read_manifest(folder) is not None and (folder / wanted).is_file():
            return folder
        return export_onnx(None, folder, int8=True, model=model)
    candidates = [Path(out_dir)] if out_dir is not None else []
    if model_path is not None:
        candidates.append(Path(resolve_model_path(model_path)) / "onnx")
        candidates.append(default_cache_dir(resolve_model_path(model_path)))
    for folder in candidates:
        if usable(folder):
            return folder
    if model_path is None:
        raise FileNotFoundError(f"no usable ONNX export with {wanted} in {out_dir}")
    target = Path(out_dir) if out_dir is not None else candidates[-1]
    return export_onnx(model_path, target, int8=True, model=model)


class OnnxTransformer:
    """Runs an exported transformer graph: features (torch) in, token embeddings (torch) out."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        int8: bool = False,
        threads: int | None = None,
        device: torch.device | None = None,
    ):
        self.folder = Path(folder)
        path = self.folder / (INT8_FILE if int8 else FP32_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; run `conan-embed export-onnx` first")
        self.session = _session(path, threads, device)
        self.input_names = [i.name for i in self.session.get_inputs()]

    @classmethod
    def from_file(cls, path: Path, threads: int | None = None) -> OnnxTransformer:
        runner = cls.__new__(cls)
        runner.folder = path.parent
        runner.session = _session(path, threads)
        runner.input_names = [i.name for i in runner.session.get_inputs()]
        return runner

    def __call__(self, features: dict[str, Any]) -> torch.Tensor:
        import numpy as np
        import torch

        feeds = {
            name: np.ascontiguousarray(features[name].numpy(), dtype=np.int64)
            for name in self.input_names
        }
        (hidden,) = self.session.run(["token_embeddings"], feeds)
        return torch.from_numpy(hidden)


def _session(path: Path, threads: int | None, device: torch.device | None = None):
    """A CPU session, or CUDA's execution provider when ``device`` is a GPU and ORT has it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or 0  # 0 = onnxruntime picks (all physical cores)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # No busy-waiting between ops: on a shared CPU (containers, other jobs) spinning threads
    # steal the cores the work needs; measured 1.6-1.7x faster at 2 threads under load ~12.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list[Any] = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            warnings.warn(
                "onnxruntime has no CUDA provider here; the ONNX graph runs on the CPU",
                stacklevel=3,
            )
        else:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    return ort.InferenceSession(str(path), options, providers=providers)


@register_backend
class OnnxBackend(InferenceBackend):
    """The exported transformer in ONNX Runtime (fused fp32 graph), then the saved head.

    On the CPU with several threads the engine runs that many batches at once on
    single-threaded sessions (ORT releases the GIL) instead of one batch on ``threads``
    intra-op threads, which wait for each other after every small matrix product and stall
    whenever another process takes a core.
    """

    name = "onnx"
    needs_export = True
    concurrent_cpu_batches = True
    extra = "onnx"
    list_order = 10
    int8: ClassVar[bool] = False
    """Runs the int8 (dynamic-quantised) graph instead of the fp32 one."""

    def export(
        self,
        model_path: str | os.PathLike[str] | None,
        out_dir: str | os.PathLike[str] | None = None,
        *,
        model: SentenceTransformer | None = None,
        int8: bool = True,
        per_channel: bool = False,
        **options: Any,
    ) -> Path:
        """:func:`export_onnx`: the fused fp32 graph and (``int8``) the quantised one."""
        if options:
            raise TypeError(f"backend {self.name!r}: unknown export options {sorted(options)}")
        self.require("onnx")
        self.require("onnxruntime")
        return export_onnx(model_path, out_dir, int8=int8, per_channel=per_channel, model=model)

    def load(
        self,
        model: SentenceTransformer,
        *,
        model_path: str | os.PathLike[str] | None,
        export_dir: str | os.PathLike[str] | None,
        device: torch.device,
        threads: int,
    ) -> Runner:
        if model_path is None and export_dir is None:
            raise ValueError("an ONNX backend needs the model folder (model_path) or onnx_dir")
        self.require("onnxruntime")
        folder = ensure_onnx_export(model_path, out_dir=export_dir, int8=self.int8, model=model)
        transformer = OnnxTransformer(folder, int8=self.int8, threads=threads, device=device)
        return TransformerThenHead(transformer, model)

    def precision(self, device: torch.device) -> str | None:
        return "int8" if self.int8 else None


@register_backend
class OnnxInt8Backend(OnnxBackend):
    """The int8 graph (MatMul weights quantised): faster on a CPU, slightly different vectors."""

    name = "onnx-int8"
    int8 = True
