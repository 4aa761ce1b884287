"""The contract every local-data task follows, and the file readers the task types share.

Why: each task is a subclass of mteb's *own* task class whose only change is ``load_data``
(the rows come from the local data folder, not the hub), so the metric and protocol code stay
mteb's (see the package docstring). What the subclasses have in common, reading the files,
recording which bytes were read and capping long STS splits, lives here once.

Adding a task to an existing type: a class in that type's module (``sts.py``,
``classification.py``, ``clustering.py``, ``retrieval.py``, ``reranking.py``, ``bitext.py``)
and a :data:`~conan_embedding.evaluation.tasks.registry.TASKS` entry in ``registry.py``.

Adding a task type (an mteb task family not used yet, e.g. pair classification):

1. A module named after the type, holding its tasks and the helpers only that type needs.
2. Each task class lists :class:`LocalDataTask` *first* and the mteb task second,
   ``class LocalX(LocalDataTask, MtebX)``, so that our ``__init__`` and :meth:`load_data` come
   first in the method resolution order.
3. It sets ``data_files`` (paths relative to the data folder; the first names the dataset in
   the result JSON), and, when it is not mteb's test set, a name ending in ``Local`` through
   :func:`task_metadata`, ``comparable_to_mteb = False`` and a ``note`` saying why.
4. It implements :meth:`LocalDataTask.build_dataset`, returning the nested structure the mteb
   base class of that type evaluates (``subset -> split -> data``; look at the mteb class's
   ``load_data`` / ``dataset_transform`` for the columns), and raises :class:`DataFormatError`
   for a bad row, naming file, line and field (the readers below already do).
5. A ``registry.TASKS`` entry, the class re-exported from the package ``__init__``, then the
   rest of CONTRIBUTING.md's "new evaluation row" (leakage index, docs/evaluation.md).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mteb.abstasks import AbsTask

from conan_embedding.data.sources import resolve_data_dir
from conan_embedding.data.splits import SPLIT_SEED


class DataFormatError(ValueError):
    """A malformed row in a local evaluation file: ``file:line: field: problem``."""


# --------------------------------------------------------------------------- file readers


def open_text(path: Path, encoding: str = "utf-8") -> io.TextIOBase:
    """``path`` opened for reading text, gunzipped when it ends in ``.gz``; the caller closes it."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")  # noqa: SIM115 -- caller closes


def _strip_bom(text: str) -> str:
    return text.lstrip("\ufeff")


def read_delimited(
    path: Path,
    *,
    fields: tuple[str, ...],
    delimiter: str = "\t",
    quoting: int = csv.QUOTE_NONE,
    header: bool = False,
    encoding: str = "utf-8-sig",
) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, row)`` pairs of a tab/comma file; a wrong column count is an error.

    ``QUOTE_NONE`` is the default because several files (STS Benchmark, CSL) contain unbalanced
    ``"`` that normal CSV quoting would merge across rows.
    """
    with open_text(path, encoding) as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        if header:
            next(reader, None)
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(fields):
                raise DataFormatError(
                    f"{path}:{line}: expected {len(fields)} fields {fields}, found {len(row)}"
                )
            yield (
                line,
                {
                    name: _strip_bom(value).strip("\r")
                    for name, value in zip(fields, row, strict=True)
                },
            )


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` pairs of a JSON-lines file (optionally gzipped); blank lines skipped."""
    with open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{number}: invalid JSON: {error.msg}") from None


def required_field(path: Path, line: int, record: dict[str, Any], name: str) -> Any:
    """``record[name]``, or a :class:`DataFormatError` naming the file and line."""
    if name not in record:
        raise DataFormatError(f"{path}:{line}: {name}: missing")
    return record[name]


def as_float(path: Path, line: int, field: str, value: str) -> float:
    """``value`` as a number, or a :class:`DataFormatError` naming file, line and field."""
    try:
        return float(value)
    except ValueError:
        raise DataFormatError(f"{path}:{line}: {field}: not a number: {value!r}") from None


def non_empty(path: Path, line: int, field: str, value: str) -> str:
    """``value`` unchanged, or a :class:`DataFormatError` when it is blank."""
    if not value.strip():
        raise DataFormatError(f"{path}:{line}: {field}: empty text")
    return value


def file_revision(path: Path) -> str:
    """First 12 hex digits of the file's SHA-256, recorded as the dataset revision."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# --------------------------------------------------------------------------- base mixin


class LocalDataTask(ABC):
    """Mixin for an mteb task: ``load_data`` reads local files instead of the hub.

    Subclasses set ``data_files`` (paths relative to the data folder; the first one names the
    dataset in the result JSON) and implement :meth:`build_dataset`. Everything else, the
    metric, the evaluation protocol and its parameters, is the mteb class's.

    Attributes:
        data_files: The files the task reads, relative to the data folder.
        comparable_to_mteb: False when the rows are not MTEB's test set, so the score must not
            be set beside a published one.
        note: Why a task is not comparable, shown in the result tables.

    Args:
        data_dir: The data folder; None resolves it as
            :func:`~conan_embedding.data.sources.resolve_data_dir` does.
        max_corpus: Retrieval only: at most this many documents (see ``retrieval.cap_corpus``).
        max_pairs: STS only: a seeded sample of at most this many pairs per split.
        **kwargs: Passed on to the mteb task class.

    Raises:
        ValueError: ``max_pairs`` is not positive.
        FileNotFoundError: the first data file is missing (its hash is the dataset revision).
    """

    data_files: tuple[str, ...] = ()
    comparable_to_mteb: bool = True
    note: str = ""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        max_corpus: int | None = None,
        max_pairs: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.data_dir = resolve_data_dir(data_dir)
        self.max_corpus = max_corpus
        if max_pairs is not None and max_pairs <= 0:
            raise ValueError(f"max_pairs must be positive, got {max_pairs}")
        self.max_pairs = max_pairs
        self.pairs_capped = False  # set when max_pairs sampled an STS split
        self.corpus_sizes: dict[str, int] = {}
        self.corpus_capped = False  # set by retrieval tasks when max_corpus dropped documents
        first = self.data_dir / self.data_files[0]
        self.metadata = self.metadata.model_copy(  # type: ignore[attr-defined]
            update={
                "dataset": {"path": f"local:{self.data_files[0]}", "revision": file_revision(first)}
            }
        )

    def path(self, relative: str) -> Path:
        """The absolute path of a data file.

        Raises:
            FileNotFoundError: the file is not in the data folder.
        """
        path = self.data_dir / relative
        if not path.exists():
            raise FileNotFoundError(f"{path} not found in the data folder {self.data_dir}")
        return path

    @abstractmethod
    def build_dataset(self) -> dict[str, Any]:
        """The rows in the structure the mteb base class evaluates (subset -> split -> data).

        Returns:
            What mteb's ``load_data`` would have stored in ``self.dataset`` for this task type.

        Raises:
            DataFormatError: a row is malformed.
        """

    def load_data(self, num_proc: int | None = None, *, timer: Any = None, **kwargs: Any) -> None:
        """mteb's entry point: :meth:`build_dataset` once, then the ``max_pairs`` cap.

        Do not override it (as mteb says of its own ``load_data``); implement
        :meth:`build_dataset` instead. The arguments are mteb's and unused here.
        """
        if self.data_loaded:  # type: ignore[attr-defined]
            return
        dataset = self.build_dataset()
        if self.max_pairs is not None and self.metadata.type == "STS":  # type: ignore[attr-defined]
            dataset = self._cap_pairs(dataset)
        self.dataset = dataset
        self.data_loaded = True

    def _cap_pairs(self, node: Any) -> Any:
        """Every split longer than ``max_pairs`` replaced by a seeded sample of its pairs (kept in
        file order). Spearman on a sample is an estimate of the full score, not MTEB's number."""
        if isinstance(node, dict):
            return {key: self._cap_pairs(value) for key, value in node.items()}
        assert self.max_pairs is not None
        if len(node) <= self.max_pairs:
            return node
        self.pairs_capped = True
        keep = sorted(random.Random(SPLIT_SEED).sample(range(len(node)), self.max_pairs))
        return node.select(keep)


def task_metadata(base: type[AbsTask], **updates: Any) -> Any:
    """mteb's metadata of ``base`` with ``updates`` (a ``Local`` name, other splits or languages)."""
    return base.metadata.model_copy(update=updates)
