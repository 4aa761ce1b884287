"""The JSONL training schemas, one per task kind, and a reader that names file:line:field.

Every training file is JSON lines; each line is one record of a single kind:

- ``retrieval``       ``{"query": str, "pos": [str, ...], "neg": [str, ...]}`` (``neg`` may be empty)
- ``sts``             ``{"sentence1": str, "sentence2": str, "score": float}``
- ``classification``  ``{"text": str, "label": str | int}``
- ``pairs``           ``{"query": str, "pos": str}`` (weakly supervised pairs)

Optional keys allowed everywhere: ``id`` (str) and ``meta`` (object). Any other key is an
error, so a typo such as ``"negs"`` is caught instead of silently training without negatives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from conan_embedding.atomic import atomic_open

TaskKind = Literal["retrieval", "sts", "classification", "pairs"]
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
    """Read a whole JSONL file of one kind; raises :class:`RecordError` on the first bad row."""
    return list(iter_records(path, kind))


def iter_records(path: str | os.PathLike[str], kind: TaskKind) -> Iterator[Record]:
    if kind not in RECORD_TYPES:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(RECORD_TYPES)}")
    model = RECORD_TYPES[kind]
    for line_no, raw in iter_json_objects(path):
        yield validated(model, raw, path, line_no)


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
