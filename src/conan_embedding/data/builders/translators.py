"""Translators for cross-lingual retrieval data: look translations up in aligned text, or ask an LLM.

Why: Conan-v2 builds its CLR set by translating retrieval queries with an LLM. An LLM is the
general tool, but a human-aligned parallel corpus (Tatoeba, a translated benchmark's aligned
rows) gives exact translations for the sentences it covers, costs nothing and works offline,
so both sit behind one interface: ``translate(texts, source, target) -> [text or None]``
where ``None`` means "cannot translate this one" and the builder counts and skips it.

How:
- :class:`ParallelCorpusTranslator` indexes aligned sentence pairs by the normalised source
  sentence (:func:`~.dedup.normalize_text`) in both directions. Pairs that touch an
  evaluation sentence are dropped when the corpus is loaded (``cmn.txt`` holds 442 Tatoeba
  test sentences), so a translation can never smuggle a test sentence into training data.
  A sentence with several translations gets the first one in corpus order.
- :class:`LLMTranslator` sends one chat request per text through a
  :class:`~.backends.ChatBackend` with an editable prompt and keeps the first line of the
  answer, stripped of quotes.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from conan_embedding.data.builders.backends import ChatBackend
from conan_embedding.data.leakage import EvalIndex, normalize_text

LANGUAGE_NAMES = {
    "en": "English", "zh": "Chinese", "es": "Spanish", "fr": "French", "ja": "Japanese",
    "de": "German", "ru": "Russian", "pt": "Portuguese", "it": "Italian", "ko": "Korean",
    "ar": "Arabic", "nl": "Dutch", "pl": "Polish", "tr": "Turkish", "vi": "Vietnamese",
    "th": "Thai", "id": "Indonesian", "hi": "Hindi", "sv": "Swedish", "da": "Danish",
    "fi": "Finnish", "no": "Norwegian", "cs": "Czech", "hu": "Hungarian", "el": "Greek",
    "he": "Hebrew", "fa": "Persian", "uk": "Ukrainian", "ro": "Romanian", "bn": "Bengali",
}  # fmt: skip


@runtime_checkable
class Translator(Protocol):
    name: str

    def translate(self, texts: Sequence[str], source: str, target: str) -> list[str | None]:
        """One translation per text, ``None`` where this translator has none."""


class ParallelCorpusError(ValueError):
    """A malformed parallel-corpus line; the message names file and line."""


@dataclass(frozen=True)
class AlignedPair:
    lang_a: str
    text_a: str
    lang_b: str
    text_b: str


class CorpusSpec(BaseModel):
    """One aligned source. Formats:

    - ``tsv``: one pair per line, columns ``columns[0]`` (lang ``langs[0]``) and
      ``columns[1]`` (``langs[1]``); e.g. manythings/Tatoeba ``cmn.txt``.
    - ``aligned_lines``: two files, line i of one translates line i of the other.
    - ``aligned_csv``: two CSV files whose rows align; every column in ``columns`` of row i
      of the first file translates the same column of the second (translated STS sets).
    - ``hsk_json``: the hsk-sentences JSON array (``chinese`` / ``translation.en``), gzip ok.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["tsv", "aligned_lines", "aligned_csv", "hsk_json"]
    paths: list[str]
    langs: tuple[str, str]
    columns: list[int] = [0, 1]


def _open(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def read_tsv_pairs(
    path: Path, langs: tuple[str, str], columns: Sequence[int] = (0, 1)
) -> Iterator[AlignedPair]:
    need = max(columns) + 1
    with _open(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < need:
                raise ParallelCorpusError(
                    f"{path}:{line_no}: expected at least {need} tab-separated columns, got {len(parts)}"
                )
            a, b = parts[columns[0]].strip(), parts[columns[1]].strip()
            if a and b:
                yield AlignedPair(langs[0], a, langs[1], b)


def read_aligned_lines(path_a: Path, path_b: Path, langs: tuple[str, str]) -> Iterator[AlignedPair]:
    with _open(path_a) as fa, _open(path_b) as fb:
        lines_a, lines_b = fa.read().splitlines(), fb.read().splitlines()
    if len(lines_a) != len(lines_b):
        raise ParallelCorpusError(
            f"{path_a} has {len(lines_a)} lines but {path_b} has {len(lines_b)}: not aligned"
        )
    for a, b in zip(lines_a, lines_b, strict=True):
        if a.strip() and b.strip():
            yield AlignedPair(langs[0], a.strip(), langs[1], b.strip())


def read_aligned_csv(
    path_a: Path, path_b: Path, langs: tuple[str, str], columns: Sequence[int]
) -> Iterator[AlignedPair]:
    with _open(path_a) as fa, _open(path_b) as fb:
        rows_a, rows_b = list(csv.reader(fa)), list(csv.reader(fb))
    if len(rows_a) != len(rows_b):
        raise ParallelCorpusError(
            f"{path_a} has {len(rows_a)} rows but {path_b} has {len(rows_b)}: not aligned"
        )
    for row_no, (row_a, row_b) in enumerate(zip(rows_a, rows_b, strict=True), start=1):
        for col in columns:
            if col >= len(row_a) or col >= len(row_b):
                raise ParallelCorpusError(
                    f"{path_a}:{row_no}: column {col} missing in one of the files"
                )
            a, b = row_a[col].strip(), row_b[col].strip()
            if a and b:
                yield AlignedPair(langs[0], a, langs[1], b)


def read_hsk_json(path: Path, langs: tuple[str, str] = ("zh", "en")) -> Iterator[AlignedPair]:
    with _open(path) as handle:
        rows = json.load(handle)
    if not isinstance(rows, list):
        raise ParallelCorpusError(f"{path}: expected a JSON array of sentence records")
    for i, row in enumerate(rows):
        try:
            zh, en = row["chinese"], row["translation"]["en"]
        except (KeyError, TypeError):
            raise ParallelCorpusError(
                f"{path}: record {i}: field 'chinese' or 'translation.en' missing"
            ) from None
        if zh.strip() and en.strip():
            yield AlignedPair(langs[0], zh.strip(), langs[1], en.strip())


def read_corpus(
    spec: CorpusSpec, base_dir: str | os.PathLike[str] | None = None
) -> Iterator[AlignedPair]:
    """The aligned pairs of one corpus; relative paths are resolved against ``base_dir``."""
    paths = [
        Path(base_dir) / p if base_dir and not Path(p).is_absolute() else Path(p)
        for p in spec.paths
    ]
    expected = 2 if spec.format in ("aligned_lines", "aligned_csv") else 1
    if len(paths) != expected:
        raise ValueError(f"corpus format {spec.format} takes {expected} path(s), got {len(paths)}")
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"parallel corpus file {path} not found")
    if spec.format == "tsv":
        return read_tsv_pairs(paths[0], spec.langs, spec.columns)
    if spec.format == "aligned_lines":
        return read_aligned_lines(paths[0], paths[1], spec.langs)
    if spec.format == "aligned_csv":
        return read_aligned_csv(paths[0], paths[1], spec.langs, spec.columns)
    return read_hsk_json(paths[0], spec.langs)


@dataclass
class CorpusLoadStats:
    pairs_read: int = 0
    pairs_dropped_eval: int = 0
    by_direction: dict[str, int] = field(default_factory=dict)


class ParallelCorpusTranslator:
    """Exact look-up of translations in aligned text (normalised match, both directions)."""

    name = "parallel-corpus"

    def __init__(self, pairs: Iterable[AlignedPair] = (), exclude: EvalIndex | None = None):
        self._table: dict[tuple[str, str], dict[str, str]] = {}
        self.stats = CorpusLoadStats()
        self.add(pairs, exclude)

    @classmethod
    def from_specs(
        cls,
        specs: Sequence[CorpusSpec],
        base_dir: str | os.PathLike[str] | None = None,
        exclude: EvalIndex | None = None,
    ) -> ParallelCorpusTranslator:
        translator = cls()
        for spec in specs:
            translator.add(read_corpus(spec, base_dir), exclude)
        return translator

    def add(self, pairs: Iterable[AlignedPair], exclude: EvalIndex | None = None) -> None:
        for pair in pairs:
            self.stats.pairs_read += 1
            if exclude is not None and (pair.text_a in exclude or pair.text_b in exclude):
                self.stats.pairs_dropped_eval += 1
                continue
            for src, src_text, tgt, tgt_text in (
                (pair.lang_a, pair.text_a, pair.lang_b, pair.text_b),
                (pair.lang_b, pair.text_b, pair.lang_a, pair.text_a),
            ):
                table = self._table.setdefault((src, tgt), {})
                key = normalize_text(src_text)
                if key not in table:  # first translation in corpus order wins
                    table[key] = tgt_text
                    direction = f"{src}->{tgt}"
                    self.stats.by_direction[direction] = (
                        self.stats.by_direction.get(direction, 0) + 1
                    )

    def directions(self) -> list[tuple[str, str]]:
        return sorted(self._table)

    def translate(self, texts: Sequence[str], source: str, target: str) -> list[str | None]:
        table = self._table.get((source, target), {})
        return [table.get(normalize_text(text)) for text in texts]


DEFAULT_TRANSLATION_PROMPT = (
    "Translate the following {source_name} search query into {target_name}. "
    "Keep its meaning and its style as a query. Reply with the translation only.\n\n{text}"
)


class LLMTranslator:
    """Translation through a chat back-end (OpenAI-compatible endpoint or local HF model)."""

    def __init__(self, backend: ChatBackend, prompt: str = DEFAULT_TRANSLATION_PROMPT):
        for placeholder in ("{text}", "{target_name}"):
            if placeholder not in prompt:
                raise ValueError(f"translation prompt must contain {placeholder}")
        self.backend = backend
        self.prompt = prompt
        self.name = f"llm:{backend.name}"

    def conversation(self, text: str, source: str, target: str) -> list[dict[str, str]]:
        content = self.prompt.format(
            text=text,
            source=source,
            target=target,
            source_name=LANGUAGE_NAMES.get(source, source),
            target_name=LANGUAGE_NAMES.get(target, target),
        )
        return [{"role": "user", "content": content}]

    def translate(self, texts: Sequence[str], source: str, target: str) -> list[str | None]:
        answers = self.backend.complete([self.conversation(t, source, target) for t in texts])
        return [clean_translation(a) for a in answers]


def clean_translation(answer: str) -> str | None:
    """The first non-empty line of an LLM answer without wrapping quotes; None if empty."""
    for line in answer.strip().splitlines():
        line = line.strip().strip("\"“”「」'").strip()
        if line:
            return line
    return None
