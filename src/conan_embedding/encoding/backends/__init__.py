"""Inference backends: how the engine runs a model, each one a module of this package.

Why: the engine (:class:`~conan_embedding.encoding.engine.EmbeddingEngine`), the mining
encoder (:class:`~conan_embedding.encoding.texts.TextEncoder`), ``MiningConfig.backend`` and
the CLI's ``--backend`` help all ask this registry instead of comparing backend names, so a
new backend (OpenVINO, TensorRT, ...) is **one new file** ``encoding/backends/<x>.py`` that
subclasses :class:`InferenceBackend` and decorates it with :func:`register_backend` (plus its
tests, and a ``pyproject.toml`` extra for its runtime, which is packaging). This package finds
its modules itself (:func:`pkgutil.iter_modules`), so nothing else needs an edit.

How a backend plugs in: the engine tokenises and pads a batch, then calls the callable that
:meth:`InferenceBackend.load` returned, which maps the padded features (``input_ids``,
``attention_mask``, maybe ``token_type_ids`` and ``prompt_length``; torch tensors) to the
sentence embeddings ``[rows, width]``. A backend that replaces only the transformer (module 0)
wraps its runner in :class:`TransformerThenHead`, which runs the model's remaining saved
modules (Pooling, Dense, Normalize, ...) after it: never rebuild them (Conan-v1's served model
lost its Dense projection that way).

Rules for a backend module, so that listing backends (CLI help, config validation) stays cheap:
import its runtime (torch, onnxruntime, openvino, ...) inside methods, never at module level;
:meth:`InferenceBackend.require` imports it with an error that names the pip extra.

Example, a whole backend module::

    @register_backend
    class OpenVinoBackend(InferenceBackend):
        name = "openvino"
        needs_export = True
        extra = "openvino"

        def export(self, model_path, out_dir=None, *, model=None, **options): ...

        def load(self, model, *, model_path, export_dir, device, threads):
            ov = self.require("openvino")
            folder = ...  # an up-to-date export, made by self.export when missing
            return TransformerThenHead(OpenVinoTransformer(ov, folder, threads), model)

Built in: ``torch`` and ``torch-bf16`` (:mod:`.torch_modules`), ``onnx`` and ``onnx-int8``
(:mod:`.onnx`).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

__all__ = [
    "InferenceBackend",
    "Runner",
    "TransformerThenHead",
    "backend_names",
    "get_backend",
    "register_backend",
    "unregister_backend",
]

Runner = Callable[[dict[str, Any]], "torch.Tensor"]
"""What :meth:`InferenceBackend.load` returns: padded features in, sentence embeddings out."""


class InferenceBackend(ABC):
    """One way to run a sentence-transformers model; subclasses set the class attributes and
    implement :meth:`load` (and :meth:`export` when ``needs_export``)."""

    name: ClassVar[str]
    """The name callers pass (``backend="..."``, ``--backend ...``)."""
    runs_torch_modules: ClassVar[bool] = False
    """It runs the model's own torch modules, so the engine moves the model to the device and
    the padded features with it; otherwise features stay on the CPU for the runner."""
    concurrent_cpu_batches: ClassVar[bool] = False
    """On the CPU with several threads, the engine runs that many batches at once, each on one
    thread (the runner must release the GIL, as ONNX Runtime does) instead of one batch on all
    threads; :meth:`load` is then called with ``threads=1``."""
    needs_export: ClassVar[bool] = False
    """It runs an exported artifact: the engine needs the model folder or an export folder
    (``onnx_dir``), and the mining encoder gives an in-memory model a cache folder for it."""
    extra: ClassVar[str | None] = None
    """The pip extra with its runtime (``pip install 'conan-embedding[<extra>]'``)."""
    list_order: ClassVar[int] = 100
    """Where its name comes in listings (help, errors): lower first, ties by name."""

    def precision(self, device: torch.device) -> str | None:
        """What its vectors are made in when not float32 (``int8``, ``bf16``, ``fp16``), else
        None. Embedding caches key by it, so such vectors never stand in for float32 ones."""
        return None

    def export(
        self,
        model_path: str | os.PathLike[str] | None,
        out_dir: str | os.PathLike[str] | None = None,
        *,
        model: SentenceTransformer | None = None,
        **options: Any,
    ) -> Path:
        """Write the artifact it runs for the model at ``model_path`` (or the in-memory
        ``model``) into ``out_dir``; returns the folder (``conan-embed export``)."""
        raise ValueError(f"backend {self.name!r} runs the saved model and has no export step")

    @abstractmethod
    def load(
        self,
        model: SentenceTransformer,
        *,
        model_path: str | os.PathLike[str] | None,
        export_dir: str | os.PathLike[str] | None,
        device: torch.device,
        threads: int,
    ) -> Runner:
        """The callable the engine turns padded features into sentence embeddings with.

        ``model`` is the loaded model (in eval mode, already on ``device`` when
        ``runs_torch_modules``); ``model_path`` its folder when it came from one;
        ``export_dir`` the caller's export folder (``onnx_dir``), if any; ``threads`` the
        intra-op threads a batch may use. The engine calls the runner under
        ``torch.inference_mode()``.
        """

    def require(self, module: str) -> ModuleType:
        """Import ``module`` (its runtime), or fail naming the pip extra that installs it."""
        try:
            return importlib.import_module(module)
        except ImportError as err:
            hint = f"conan-embedding[{self.extra}]" if self.extra else module.split(".")[0]
            raise ModuleNotFoundError(
                f"backend {self.name!r} needs {module}: pip install '{hint}'", name=module
            ) from err

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class TransformerThenHead:
    """A runner for a backend that runs only the transformer (module 0): ``transformer`` maps
    the features to ``token_embeddings``, then the model's remaining modules run as saved
    (``list(model)[1:]``: Pooling, Dense, Normalize, ...), as ``SentenceTransformer.forward``
    would run them."""

    def __init__(self, transformer: Callable[[dict[str, Any]], torch.Tensor], model: Any):
        self.transformer = transformer
        self.head = list(model)[1:]

    def __call__(self, features: dict[str, Any]) -> torch.Tensor:
        features["token_embeddings"] = self.transformer(features)
        for module in self.head:
            features = module(features)
        return features["sentence_embedding"]


_REGISTRY: dict[str, InferenceBackend] = {}
_discovered = False
B = TypeVar("B", bound=type[InferenceBackend])


def register_backend(cls: B) -> B:
    """Class decorator: register an instance of ``cls`` under ``cls.name``.

    A name is registered once; registering the same class again (a reloaded module) replaces
    it, another class under a taken name is an error.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name` (a non-empty str)")
    known = _REGISTRY.get(name)
    if known is not None and (
        type(known).__module__,
        type(known).__qualname__,
    ) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"backend {name!r} is already registered by {type(known).__module__}."
            f"{type(known).__qualname__}"
        )
    _REGISTRY[name] = cls()
    return cls


def unregister_backend(name: str) -> None:
    """Remove ``name`` from the registry (tests that register a backend of their own)."""
    _REGISTRY.pop(name, None)


def _discover() -> None:
    """Import every public module of this package once (each registers its backends)."""
    global _discovered
    if _discovered:
        return
    _discovered = True  # before the imports: a module that queries the registry must not recurse
    try:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
    except BaseException:
        _discovered = False  # a broken module fails every query, not just the first
        raise


def backend_names() -> list[str]:
    """The registered backends' names, in listing order (``torch`` first)."""
    _discover()
    return sorted(_REGISTRY, key=lambda name: (_REGISTRY[name].list_order, name))


def get_backend(name: str) -> InferenceBackend:
    """The backend registered as ``name``; a ValueError naming the known ones otherwise."""
    _discover()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {backend_names()}")
    return _REGISTRY[name]
