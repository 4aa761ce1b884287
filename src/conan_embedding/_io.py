"""Write files all-or-nothing: a temp file in the same folder, then an atomic rename.

Every output of the pipeline (JSONL data, cached embeddings, results, reports, charts, model
folders) goes through this module, so a crash or a kill leaves the previous file or the new
one, never a truncated mix:

- :func:`atomic_open`: a handle (text or binary) whose file replaces ``path`` on success;
- :func:`write_text_atomic`, :func:`write_json_atomic`, :func:`save_npy_atomic`: one call each;
- :func:`atomic_path`: a temp *path* for writers that only take a file name
  (``matplotlib``'s ``savefig``, ``to_disk``, ``np.save``), renamed on success;
- :func:`atomic_dir`: a whole folder, filled by a callback, swapped in for ``path``.

It imports nothing of the package (the bottom layer).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "atomic_dir",
    "atomic_open",
    "atomic_path",
    "save_npy_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` (``"w"`` text in UTF-8, or ``"wb"``); renamed on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """A temp path beside ``path`` for a writer that takes a file name; renamed on success.

    The temp name keeps ``path``'s suffix (or ``suffix``) at its end, because some writers pick
    the format from it (``savefig("x.png")``) or append one when it is missing (``np.save``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent,
        prefix=f".{path.stem}.",
        suffix=suffix if suffix is not None else path.suffix,
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_open(path) as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(
    path: str | os.PathLike[str], payload: Any, indent: int | None = 2, **dumps: Any
) -> Path:
    """``json.dumps(payload, indent=2, ensure_ascii=False)`` (plus ``dumps``) + a final newline."""
    dumps.setdefault("ensure_ascii", False)
    return write_text_atomic(path, json.dumps(payload, indent=indent, **dumps) + "\n")


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """``np.save`` without pickle support, atomically."""
    with atomic_open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def atomic_dir(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Fill a temp folder beside ``path`` with ``write(tmp)``, then swap it in for ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
