"""The JSONL training schemas, one per task kind, and a reader that names file:line:field.

Every training file is JSON lines; each line is one record of a single kind:

- ``retrieval``       ``{"query": str, "pos": [str, ...], "neg": [str, ...]}`` (``neg`` may be empty)
- ``sts``             ``{"sentence1": str, "sentence2": str, "score": float}``
- ``classification``  ``{"text": str, "label": str | int}``
- ``pairs``           ``{"query": str, "pos": str}`` (weakly supervised pairs)

The Conan-v2 LM stages read two more: SFT rows ``{"instruction": str, "input": str,
"output": str}`` (:func:`read_sft_records`) and pretraining documents, a ``.txt`` with one
document a line or a ``.jsonl`` of ``{"text": str}`` (:func:`read_documents`).

Optional keys allowed everywhere: ``id`` (str) and ``meta`` (object). Any other key is an
error, so a typo such as ``"negs"`` is caught instead of silently training without negatives.

Two ways to read a file:

- :func:`read_records` validates every row up front and returns a list (small files, and
  callers that must fail before doing anything expensive);
- :func:`open_records` returns a :class:`RecordDataset`: a lazy sequence over a byte-offset
  index (:class:`LineIndex`) of the file. Opening costs one newline scan of the file in 16 MiB
  blocks (numpy, no JSON parsing), 12 bytes of memory per row (int64 start, int32 length) and
  nothing per record; ``dataset[i]`` reads line ``i`` with ``os.pread`` and validates it then,
  raising the same :class:`RecordError` (``file:line: field: problem``) on a bad row.
  ``shard(rank, world)`` is a rank's strided share; the dataset is map-style, so a torch
  ``DataLoader`` with workers and prefetch reads and tokenises it (:func:`records_loader`).

Why an offset index and not HF ``datasets`` (Arrow, memory-mapped): ``load_dataset("json")``
first converts the whole file into an Arrow cache (a full parse of every row, minutes and a
second copy on disk for 10M rows, before the first step), and its rows no longer know their
file line, so a bad row could not be reported as ``file:line: field``. The offset index starts
in seconds, keeps the JSONL as the only copy, and validates exactly the rows that are read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from conan_embedding._io import atomic_open
from conan_embedding.config.train import TaskKind

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

ModelT = TypeVar("ModelT", bound=BaseModel)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str | None = None
    meta: dict[str, Any] | None = None


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty string")
    return value


class RetrievalRecord(_Record):
    query: str
    pos: list[str] = Field(min_length=1)
    neg: list[str] = Field(default_factory=list)

    _check_query = field_validator("query")(_non_empty)


class STSRecord(_Record):
    sentence1: str
    sentence2: str
    score: float


class ClassificationRecord(_Record):
    text: str
    label: str

    @field_validator("label", mode="before")
    @classmethod
    def _label_to_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class PairRecord(_Record):
    query: str
    pos: str


Record = RetrievalRecord | STSRecord | ClassificationRecord | PairRecord

RECORD_TYPES: dict[str, type[_Record]] = {
    "retrieval": RetrievalRecord,
    "sts": STSRecord,
    "classification": ClassificationRecord,
    "pairs": PairRecord,
}


class RecordError(ValueError):
    """A malformed training row; the message reads ``file:line: field: problem``."""

    def __init__(self, path: str | os.PathLike[str], line: int, field: str, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        super().__init__(f"{path}:{line}: field '{field}': {problem}")


def read_records(path: str | os.PathLike[str], kind: TaskKind) -> list[Record]:
    """Read a whole JSONL file of one kind; raises :class:`RecordError` on the first bad row.

    For files too large to hold as objects, :func:`open_records` gives the same rows lazily.
    """
    return list(iter_records(path, kind))


def _record_type(kind: str) -> type[_Record]:
    if kind not in RECORD_TYPES:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(RECORD_TYPES)}")
    return RECORD_TYPES[kind]


def iter_records(path: str | os.PathLike[str], kind: TaskKind) -> Iterator[Record]:
    """Every row of a records file in order, validated; a dataset input (a ``save_to_disk``
    folder, ``.parquet``/``.arrow``, ``hf://``; ``data/hf_sources.py``) is read by its columns."""
    from conan_embedding.data import hf_sources

    if hf_sources.is_dataset_source(path):
        yield from hf_sources.iter_dataset_records(path, kind)
        return
    model = _record_type(kind)
    for line_no, raw in iter_json_objects(path):
        yield validated(model, raw, path, line_no)


class LineIndex:
    """Byte offset and length of every non-blank line of a file, found with one numpy scan.

    ``starts[i]``/``lengths[i]`` locate row ``i`` (its newline excluded); ``line_of(i)`` is its
    1-based line number in the file (blank lines are skipped, as every reader here skips them).
    """

    BLOCK = 1 << 24

    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        offset = 0
        with open(path, "rb") as handle:
            head = handle.read(3)
            bom = 3 if head == b"\xef\xbb\xbf" else 0
            handle.seek(0)
            line_start = bom
            while block := handle.read(self.BLOCK):
                newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + offset
                if len(newlines):
                    starts.append(np.concatenate(([line_start], newlines[:-1] + 1)))
                    ends.append(newlines)
                    line_start = int(newlines[-1]) + 1
                offset += len(block)
        if line_start < offset:  # a last line without a newline
            starts.append(np.array([line_start]))
            ends.append(np.array([offset]))
        start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        end = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        length = end - start
        blank = length == 0
        maybe_blank = np.flatnonzero(~blank & (length <= 16))
        if len(maybe_blank):
            with open(path, "rb") as handle:
                for i in maybe_blank:
                    handle.seek(int(start[i]))
                    blank[i] = not handle.read(int(length[i])).strip()
        rows = np.flatnonzero(~blank)
        self.starts = start[rows].astype(np.int64)
        self.lengths = length[rows].astype(np.int32)
        # line numbers are kept only when blank lines make them differ from row + 1
        self._lines = None if len(rows) == len(start) else (rows + 1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def line_of(self, row: int) -> int:
        return int(self._lines[row]) if self._lines is not None else row + 1

    def read(self, fd: int, row: int) -> bytes:
        return os.pread(fd, int(self.lengths[row]), int(self.starts[row]))


class JsonLines:
    """Random access to the JSON value on each non-blank line of a file, by row.

    One file descriptor per process (reopened after a fork, so DataLoader workers and
    ``multiprocessing`` children read safely); a bad line raises :class:`RecordError`.
    """

    def __init__(self, path: str | os.PathLike[str], index: LineIndex | None = None):
        self.path = str(path)
        self.index = index if index is not None else LineIndex(path)
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.index)

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def value(self, row: int) -> Any:
        raw = self.index.read(self._descriptor(), row)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            problem = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
            line_no = self.index.line_of(row)
            raise RecordError(self.path, line_no, "<json>", f"invalid JSON ({problem})") from None

    def object(self, row: int) -> dict[str, Any]:
        value = self.value(row)
        if not isinstance(value, dict):
            raise RecordError(self.path, self.index.line_of(row), "<row>", "expected a JSON object")
        return value

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)  # type: ignore[arg-type]


class RecordDataset(Sequence[Any]):
    """A lazy, indexable, shardable view of a JSONL records file (see the module docstring).

    ``len()``, ``dataset[i]`` (validated on access), slicing (another view), iteration (in
    order) and ``shard(rank, world)`` work without holding any record in memory. The file is
    opened once per process (DataLoader workers reopen it after a fork).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        kind: TaskKind,
        *,
        index: LineIndex | None = None,
        rows: np.ndarray | None = None,
    ):
        self.path, self.kind = str(path), kind
        self.model = _record_type(kind)
        self.lines = JsonLines(path, index)
        self.index = self.lines.index
        self.rows = rows  # None: every row of the index, in order

    def __len__(self) -> int:
        return len(self.index) if self.rows is None else len(self.rows)

    def _row(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} records")
        i = i % n
        return i if self.rows is None else int(self.rows[i])

    def record(self, row: int) -> Any:
        """Row ``row`` of the *file's* index (not of this view), parsed and validated."""
        raw = self.lines.object(row)
        return validated(self.model, raw, self.path, self.index.line_of(row))

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> RecordDataset: ...
    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return self.select(np.arange(len(self))[i])
        return self.record(self._row(int(i)))

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self.record(i if self.rows is None else int(self.rows[i]))

    def select(self, positions: Sequence[int] | np.ndarray) -> RecordDataset:
        """A view of the rows at ``positions`` of this view (indices into ``self``)."""
        positions = np.asarray(positions, dtype=np.int64)
        base = np.arange(len(self.index)) if self.rows is None else self.rows
        return RecordDataset(self.path, self.kind, index=self.index, rows=base[positions])

    def shard(self, rank: int, world: int, *, even: bool = False) -> RecordDataset:
        """Rows ``rank, rank + world, ...``; ``even`` drops the tail so every rank gets the
        same count (collectives then never wait for a rank that has run out)."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        stop = len(self) - len(self) % world if even else len(self)
        return self.select(np.arange(rank, stop, world))

    def line_of(self, i: int) -> int:
        """The file line of item ``i`` of this view."""
        return self.index.line_of(self._row(i))

    def validate(self) -> int:
        """Parse and validate every row of the view; returns the count or raises RecordError."""
        count = 0
        for _ in self:
            count += 1
        return count


def open_records(
    path: str | os.PathLike[str],
    kind: TaskKind,
    *,
    columns: dict[str, str] | None = None,
    split: str | None = None,
) -> RecordDataset:
    """A lazy :class:`RecordDataset` over a JSONL file (rows validated when read).

    A dataset input (a ``save_to_disk`` folder, a ``.parquet``/``.arrow`` file or
    ``hf://owner/name[:config][:split]``) gives the same lazy view over memory-mapped Arrow,
    ``columns`` mapping schema fields to its columns (``data/hf_sources.py``)."""
    from conan_embedding.data import hf_sources

    if hf_sources.is_dataset_source(path):
        return hf_sources.open_dataset_records(path, kind, columns=columns, split=split)
    if columns or split:
        raise ValueError(
            f"{path}: columns and split apply to dataset inputs (a save_to_disk folder, "
            ".parquet, .arrow or hf://owner/name), not to a JSONL file"
        )
    return RecordDataset(path, kind)


def records_loader(
    dataset: RecordDataset,
    batch_size: int,
    collate: Callable[[list[Any]], Any] | None = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    prefetch_factor: int | None = 2,
    drop_last: bool = False,
) -> DataLoader:
    """A torch ``DataLoader`` over the records: ``collate`` (e.g. a tokenizer call) runs in the
    workers, ``prefetch_factor`` batches ahead per worker. Without ``collate`` a batch is a list
    of records."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=collate or list,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        drop_last=drop_last,
    )


def iter_json_objects(
    path: str | os.PathLike[str], handle: Iterable[str] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSONL file.

    Every JSONL reader of the package goes through here, so every one reports a bad line the
    same way: :class:`RecordError` with field ``<json>`` (not JSON) or ``<row>`` (not an
    object). ``handle`` is an already open text stream (a gzip file, say); by default ``path``
    is opened as UTF-8, a byte-order mark tolerated.
    """
    if handle is None:
        with open(path, encoding="utf-8-sig") as opened:
            yield from iter_json_objects(path, opened)
        return
    for line_no, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(path, line_no, "<json>", f"invalid JSON ({err.msg})") from None
        if not isinstance(raw, dict):
            raise RecordError(path, line_no, "<row>", "expected a JSON object")
        yield line_no, raw


def validated(
    model: type[ModelT], raw: dict[str, Any], path: str | os.PathLike[str], line_no: int
) -> ModelT:
    """``model.model_validate(raw)``, with pydantic's first error as ``file:line: field``."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "<row>"
        raise RecordError(path, line_no, field, first["msg"]) from None


def text_field(raw: dict[str, Any], field: str, path: str | os.PathLike[str], line_no: int) -> str:
    """``raw[field]`` when it is a non-empty string, else :class:`RecordError` naming it."""
    value = raw.get(field)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(path, line_no, field, "must be a non-empty string")
    return value


def write_records(path: str | os.PathLike[str], records: Iterable[BaseModel | dict]) -> int:
    """Write records as JSONL atomically (temp file + rename); returns the row count."""
    count = 0
    with atomic_open(path) as handle:
        for record in records:
            row = record.model_dump(exclude_none=True) if isinstance(record, BaseModel) else record
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


# ---------------------------------------------------------------- the LM stages' files


class SFTRecord(_Record):
    """One SFT row; the model sees ``instruction \\n input \\n output``, the loss covers
    ``output``. Its (``instruction + input``, ``output``) is also a weak-stage pair."""

    instruction: str
    input: str = ""
    output: str = Field(min_length=1)


def read_sft_records(path: str | os.PathLike[str]) -> list[SFTRecord]:
    """Every row of an SFT file, validated; a bad row raises ``file:line: field: problem``."""
    return [validated(SFTRecord, raw, path, n) for n, raw in iter_json_objects(path)]


def read_documents(path: str | os.PathLike[str]) -> list[str]:
    """Documents of a source file; a bad ``.jsonl`` row raises ``file:line: field 'text'``."""
    path = Path(path)
    if path.suffix == ".jsonl":
        documents = [text_field(row, "text", path, n) for n, row in iter_json_objects(path)]
    else:
        with open(path, encoding="utf-8-sig") as handle:
            documents = [line.rstrip("\n") for line in handle if line.strip()]
    if not documents:
        raise ValueError(f"{path}: no documents")
    return documents
