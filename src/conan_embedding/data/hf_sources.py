"""Hugging Face ``datasets`` inputs as training records (issue #26 item 6).

A task's ``path`` may be, besides a JSONL file (``data/records.py``):

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (a
  ``DatasetDict`` needs ``split`` unless it holds one split);
- a ``.arrow`` file (``Dataset.from_file``: the Arrow stream ``datasets`` writes) or a
  ``.parquet`` file;
- a hub name ``hf://owner/name[:config][:split]``, loaded with ``datasets.load_dataset``.

Rows are mapped to the schemas of ``data/records.py`` by column: a column named like the
field by default, or ``columns: {field: column}`` (e.g. ``{query: question, pos: answer}``).
Where a schema wants a list of strings (retrieval ``pos``/``neg``) a column holding one string
is read as a one-item list; a null in an optional field (``neg``, ``id``, ``meta``) is the field
left out. Columns no field reads are not read (``select_columns``), so unlike a JSONL key they
are not an error: a hub dataset's extra columns (``title``, ``source`` ...) are common and
harmless. A bad row raises :class:`DatasetRowError` (a :class:`RecordError`) naming the dataset,
the 0-based row index (``ds[17]`` gives that row) and the column:
``data/ds: row 17: column 'pos': expected a list of strings, got int``.

Why memory-mapped Arrow and not ``streaming``: the trainer draws every step's global batch
by index (a seeded shuffle per epoch, each rank its share, exact resume at step N), so it needs
``len()`` and random access, which an iterable cannot give. An Arrow table memory-mapped from
disk gives both and is already lazy: opening reads no row, the OS pages in what a batch reads,
and :class:`DatasetRecords` validates a row when it is read, like :class:`RecordDataset`.
Save-to-disk folders and ``.arrow`` files are mapped as they are; a ``.parquet`` file is
compressed by row group (a random row would decode its whole group), so ``datasets`` converts it
once into its Arrow cache (``HF_DATASETS_CACHE``) and maps that; a hub dataset is downloaded
once into the same cache. ``streaming=True`` (:func:`iter_dataset_records`) is for one-pass
readers (``conan-embed data export --streaming``: a hub dataset to JSONL without the Arrow
copy); a task's ``streaming: true`` is refused by the config with this reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from conan_embedding.data.records import (
    RecordDataset,
    RecordError,
    TaskKind,
    _record_type,
)

if TYPE_CHECKING:
    import datasets

HUB_PREFIX = "hf://"
DATASET_SUFFIXES = (".parquet", ".arrow")

# what each field of each kind holds, for errors that name the type found
_STR, _LIST, _NUMBER, _LABEL, _DICT = "str", "list", "number", "label", "dict"
FIELD_TYPES: dict[str, dict[str, str]] = {
    "retrieval": {"query": _STR, "pos": _LIST, "neg": _LIST},
    "sts": {"sentence1": _STR, "sentence2": _STR, "score": _NUMBER},
    "classification": {"text": _STR, "label": _LABEL},
    "pairs": {"query": _STR, "pos": _STR},
}
OPTIONAL_FIELDS = {"neg", "id", "meta"}
COMMON_TYPES = {"id": _STR, "meta": _DICT}


class DatasetRowError(RecordError):
    """A malformed dataset row: ``dataset: row N: column 'c': problem`` (N is 0-based)."""

    def __init__(self, path: str, row: int, column: str, problem: str, field: str | None = None):
        self.path, self.line, self.field, self.problem = str(path), row, field or column, problem
        self.row, self.column = row, column
        mapped = f" (field '{field}')" if field and field != column else ""
        ValueError.__init__(self, f"{path}: row {row}: column '{column}'{mapped}: {problem}")


def is_hub_name(path: str | os.PathLike[str]) -> bool:
    return str(path).startswith(HUB_PREFIX)


def is_dataset_source(path: str | os.PathLike[str]) -> bool:
    """A hub name, a ``.parquet``/``.arrow`` file or a folder (``save_to_disk``)."""
    text = str(path)
    return is_hub_name(text) or text.endswith(DATASET_SUFFIXES) or Path(text).is_dir()


def schema_fields(kind: str) -> list[str]:
    """The fields a row of ``kind`` may have (its own, then ``id`` and ``meta``)."""
    return [*FIELD_TYPES[kind], *COMMON_TYPES]


def check_columns(kind: str, columns: Mapping[str, str]) -> None:
    """``columns`` maps fields of ``kind`` to column names; raises ValueError otherwise."""
    unknown = sorted(set(columns) - set(schema_fields(kind)))
    if unknown:
        raise ValueError(
            f"columns: {unknown} are not fields of a {kind} row; expected some of "
            f"{schema_fields(kind)} (each mapped to a column name)"
        )


def parse_hub_name(name: str) -> tuple[str, str | None, str | None]:
    """``hf://owner/name[:config][:split]`` -> (``owner/name``, config, split)."""
    parts = name[len(HUB_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts[1:]):
        raise ValueError(f"{name}: expected hf://owner/name[:config][:split]")
    return parts[0], *(parts[1:] + [None, None])[:2]  # type: ignore[return-value]


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(f, "").lower() in ("1", "true", "yes", "on") for f in flags)


def _load_hub(name: str, split: str | None, streaming: bool) -> Any:
    import datasets

    repo, config, named_split = parse_hub_name(name)
    if split is not None and named_split is not None and split != named_split:
        raise ValueError(f"{name}: names split '{named_split}' but the task sets split '{split}'")
    split = split or named_split
    try:
        return datasets.load_dataset(repo, config, split=split, streaming=streaming)
    except Exception as err:
        if not _offline():
            raise ValueError(f"{name}: datasets.load_dataset('{repo}') failed: {err}") from err
        args = ", ".join(repr(a) for a in (repo, config) if a is not None)
        split_arg = f", split={split!r}" if split else ""
        raise ValueError(
            f"{name}: the Hugging Face hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is "
            f"set) and dataset '{repo}'"
            + (f" (config '{config}')" if config else "")
            + " is not in the local datasets cache. Fetch it where the hub is reachable: "
            f'`python -c "import datasets; datasets.load_dataset({args}{split_arg})'
            f".save_to_disk('data/{repo.replace('/', '--')}')\"`, copy that folder here and "
            "set the task's path to it (or run once online without HF_HUB_OFFLINE so the "
            "cache holds it)."
        ) from None


def _pick_split(source: str, loaded: Any, split: str | None) -> Any:
    import datasets

    if isinstance(loaded, datasets.DatasetDict | datasets.IterableDatasetDict):
        names = list(loaded)
        if split is None:
            if len(names) != 1:
                raise ValueError(f"{source}: holds the splits {names}: set the task's split")
            split = names[0]
        if split not in loaded:
            raise ValueError(f"{source}: no split '{split}'; it holds {names}")
        return loaded[split]
    if split is not None and not is_hub_name(source):
        raise ValueError(f"{source}: is a single Dataset (no splits): remove split '{split}'")
    return loaded


def load_dataset_source(
    path: str | os.PathLike[str], split: str | None = None, *, streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """The ``datasets`` table behind ``path`` (see the module docstring), one split of it."""
    import datasets

    source = str(path)
    if is_hub_name(source):
        return _pick_split(source, _load_hub(source, split, streaming), split)
    if not Path(source).exists():
        raise FileNotFoundError(f"{source}: no such dataset file or folder")
    if source.endswith(".parquet"):
        loaded: Any = datasets.Dataset.from_parquet(source)
    elif source.endswith(".arrow"):
        loaded = _open_arrow(source)
    else:
        try:
            loaded = datasets.load_from_disk(source)
        except FileNotFoundError as err:
            raise ValueError(
                f"{source}: a folder that is not a datasets save_to_disk folder ({err}); "
                "a task's path is a JSONL file, a .parquet/.arrow file, a save_to_disk folder "
                "or hf://owner/name"
            ) from None
    dataset = _pick_split(source, loaded, split)
    return dataset.to_iterable_dataset() if streaming else dataset


def _open_arrow(source: str) -> datasets.Dataset:
    """An Arrow stream (what ``datasets`` writes) or an Arrow IPC file, memory-mapped."""
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_file(source)
    except (pa.ArrowInvalid, OSError):
        from datasets.table import InMemoryTable

        with pa.memory_map(source) as mapped:  # zero-copy: the buffers stay mapped
            table = pa.ipc.open_file(mapped).read_all()
        return datasets.Dataset(InMemoryTable(table))


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _type_problem(value: Any, expected: str) -> str | None:
    if expected == _STR and not isinstance(value, str):
        return f"expected a string, got {_type_name(value)}"
    if expected == _LIST:
        if not isinstance(value, list):
            return f"expected a list of strings, got {_type_name(value)}"
        for i, item in enumerate(value):
            if not isinstance(item, str):
                return f"expected a list of strings, item {i} is {_type_name(item)}"
    if expected == _NUMBER and (isinstance(value, bool) or not isinstance(value, int | float)):
        return f"expected a number, got {_type_name(value)}"
    if expected == _LABEL and (isinstance(value, bool) or not isinstance(value, str | int)):
        return f"expected a string or an integer label, got {_type_name(value)}"
    if expected == _DICT and not isinstance(value, dict):
        return f"expected an object (a struct column), got {_type_name(value)}"
    return None


class RowReader:
    """Turns a dataset row (a dict of columns) into a validated record of one kind."""

    def __init__(
        self,
        source: str,
        kind: TaskKind,
        column_names: Sequence[str],
        columns: Mapping[str, str] | None = None,
        label_names: Sequence[str] | None = None,
    ):
        self.source, self.kind = source, kind
        self.model = _record_type(kind)
        columns = dict(columns or {})
        check_columns(kind, columns)
        missing = [c for c in columns.values() if c not in column_names]
        if missing:
            raise ValueError(
                f"{source}: columns maps to {missing}, not columns of the dataset; "
                f"it has {list(column_names)}"
            )
        self.types = {**FIELD_TYPES[kind], **COMMON_TYPES}
        # field -> column, for the fields the dataset has
        self.mapping = {
            f: columns.get(f, f) for f in self.types if columns.get(f, f) in column_names
        }
        absent = [
            f for f in FIELD_TYPES[kind] if f not in self.mapping and f not in OPTIONAL_FIELDS
        ]
        if absent:
            raise ValueError(
                f"{source}: a {kind} row needs the field(s) {absent} but the dataset has no such "
                f"column; its columns are {list(column_names)}: map them with the task's "
                f"`columns: {{{absent[0]}: COLUMN}}`"
            )
        self.label_names = list(label_names) if label_names else None

    @property
    def source_columns(self) -> list[str]:
        return list(dict.fromkeys(self.mapping.values()))

    def error(self, index: int, field: str, problem: str) -> DatasetRowError:
        return DatasetRowError(self.source, index, self.mapping.get(field, field), problem, field)

    def record(self, row: Mapping[str, Any], index: int) -> Any:
        raw: dict[str, Any] = {}
        for field, column in self.mapping.items():
            value = row[column]
            if value is None and field in OPTIONAL_FIELDS:
                continue
            expected = self.types[field]
            if expected == _LIST and isinstance(value, str):
                value = [value]  # one string where the schema wants a list
            elif field == "id" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            elif field == "label" and self.label_names and isinstance(value, int):
                # a ClassLabel column: its name (an out-of-range int stays a label of its own)
                value = self.label_names[value] if 0 <= value < len(self.label_names) else value
            problem = _type_problem(value, expected)
            if problem is not None:
                raise self.error(index, field, problem)
            raw[field] = value
        try:
            return self.model.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "<row>"
            rest = ".".join(str(p) for p in first["loc"][1:])
            problem = first["msg"] + (f" (at {rest})" if rest else "")
            raise self.error(index, field, problem) from None


def _reader_for(
    source: str, kind: TaskKind, dataset: Any, columns: Mapping[str, str] | None
) -> RowReader:
    import datasets

    features = dataset.features or {}
    names = list(features) if features else list(dataset.column_names or [])
    label_col = (columns or {}).get("label", "label")
    feature = features.get(label_col) if features else None
    labels = feature.names if isinstance(feature, datasets.ClassLabel) else None
    return RowReader(source, kind, names, columns, labels)


class DatasetRecords(RecordDataset):
    """A :class:`RecordDataset` over a memory-mapped ``datasets.Dataset``: lazy, indexable,
    sliceable and shardable exactly like the JSONL one (the trainer's ``select``, ``shard``,
    ``validate`` and ``line_of`` work unchanged); ``line_of`` is the 0-based row index."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        source: str,
        kind: TaskKind,
        *,
        reader: RowReader | None = None,
        columns: Mapping[str, str] | None = None,
        rows: np.ndarray | None = None,
    ):
        self.path, self.kind = source, kind
        self.model = _record_type(kind)
        self.reader = reader or _reader_for(source, kind, dataset, columns)
        if reader is None:  # read only the columns a field maps to
            dataset = dataset.select_columns(self.reader.source_columns)
        self.dataset = dataset
        self.rows = rows

    def __len__(self) -> int:
        return len(self.dataset) if self.rows is None else len(self.rows)

    def record(self, row: int) -> Any:
        return self.reader.record(self.dataset[int(row)], int(row))

    def select(self, positions: Sequence[int] | np.ndarray) -> DatasetRecords:
        positions = np.asarray(positions, dtype=np.int64)
        base = np.arange(len(self.dataset)) if self.rows is None else self.rows
        return DatasetRecords(
            self.dataset, self.path, self.kind, reader=self.reader, rows=base[positions]
        )

    def line_of(self, i: int) -> int:
        return self._row(i)


def open_dataset_records(
    path: str | os.PathLike[str],
    kind: TaskKind,
    *,
    columns: Mapping[str, str] | None = None,
    split: str | None = None,
) -> DatasetRecords:
    """A lazy :class:`DatasetRecords` over a dataset input (rows validated when read)."""
    dataset = load_dataset_source(path, split)
    return DatasetRecords(dataset, str(path), kind, columns=columns)  # type: ignore[arg-type]


def iter_dataset_records(
    path: str | os.PathLike[str],
    kind: TaskKind,
    *,
    columns: Mapping[str, str] | None = None,
    split: str | None = None,
    streaming: bool = False,
) -> Iterator[Any]:
    """Every row of a dataset input in order, validated; ``streaming`` reads a hub dataset
    as it downloads (``load_dataset(streaming=True)``), holding no Arrow copy."""
    if not streaming:
        yield from open_dataset_records(path, kind, columns=columns, split=split)
        return
    dataset = load_dataset_source(path, split, streaming=True)
    reader = _reader_for(str(path), kind, dataset, columns)
    for index, row in enumerate(dataset):
        yield reader.record(row, index)


def export_jsonl(
    path: str | os.PathLike[str],
    kind: TaskKind,
    output: str | os.PathLike[str],
    *,
    columns: Mapping[str, str] | None = None,
    split: str | None = None,
    streaming: bool = False,
    limit: int | None = None,
) -> int:
    """Write a dataset input as our JSONL (validated rows, ``columns`` applied); returns the
    count. What to do for a tool that reads JSONL only (``conan-embed mine`` on a hub name)."""
    from itertools import islice

    from conan_embedding.data.records import write_records

    rows: Iterable[Any] = iter_dataset_records(
        path, kind, columns=columns, split=split, streaming=streaming
    )
    return write_records(output, islice(rows, limit) if limit is not None else rows)


def export_hint(path: str, kind: str = "retrieval") -> str:
    """The command that turns ``path`` into a JSONL file, for error messages."""
    return f"`conan-embed data export {path} OUT.jsonl --kind {kind} [--column FIELD=COLUMN]`"
