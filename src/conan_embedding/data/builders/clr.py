"""Cross-lingual retrieval (CLR) data: translate the queries, keep the documents.

Why (Conan-v2, sec. "cross-lingual retrieval data"): an embedder trained only on
monolingual pairs places a question and its answer close together only when both are in
the same language. Translating just the query of a retrieval pair into another language,
while the documents stay in theirs, gives pairs whose only shared signal is meaning across
languages. The paper translates MS MARCO queries into 26 languages with Qwen2.5-7B,
weighting target languages like MTEB's language mix (en 25 %, zh 12 %, es 8 %, fr 6 %,
ja 6 %, de 5 %, ...), and Chinese<->English from a Chinese retrieval set.

How: for every input record, draw ``translations_per_query`` distinct target languages
(never the query's own) with probability proportional to their weight (seeded), translate
the queries in batches per language pair with any :class:`~.translators.Translator`, and
emit ``{"query": translated, "pos": original positives, "neg": original negatives}`` with
the provenance in ``meta.clr``. Queries the translator cannot translate are counted and
skipped. Finally every record touching an evaluation sentence (the translated query, the
original query or a positive) is dropped (:mod:`conan_embedding.data.leakage`) and the result
is written atomically with :func:`~conan_embedding.data.records.write_records`.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from conan_embedding._io import write_json_atomic
from conan_embedding.data.builders.backends import BackendConfig, make_backend
from conan_embedding.data.builders.translators import (
    DEFAULT_TRANSLATION_PROMPT,
    CorpusSpec,
    LLMTranslator,
    ParallelCorpusTranslator,
    Translator,
)
from conan_embedding.data.leakage import (
    ALL_GROUPS,
    DedupReport,
    EvalGroup,
    EvalIndex,
    build_eval_index,
    dedup_retrieval,
)
from conan_embedding.data.records import RetrievalRecord, iter_records, write_records
from conan_embedding.data.sources import resolve_data_dir
from conan_embedding.progress import progress

# Target-language weights. "conan-v2" holds the shares the v2 paper states for its 26-language
# MS MARCO translation; the paper's other 20 languages (38 % of the mix) are not in the sources
# available to this project, so they are absent rather than guessed (see docs/data.md).
LANGUAGE_WEIGHT_PRESETS: dict[str, dict[str, float]] = {
    "conan-v2": {"en": 0.25, "zh": 0.12, "es": 0.08, "fr": 0.06, "ja": 0.06, "de": 0.05},
    "en-zh": {"en": 1.0, "zh": 1.0},
}

DATA_PREFIX = "data:"


def resolve_path(path: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``data:sts/x.csv`` is a file of the shared data folder; anything else is a normal path."""
    if path.startswith(DATA_PREFIX):
        return resolve_data_dir(data_dir) / path[len(DATA_PREFIX) :]
    return Path(path)


class RetrievalInput(BaseModel):
    """A retrieval set whose queries get translated. Formats:

    - ``retrieval_jsonl``: our retrieval records (``data/records.py``).
    - ``sts_csv``: an STS CSV ``sentence1,sentence2,score``; pairs scoring >= ``min_score``
      become ``query=sentence1, pos=[sentence2]``.
    - ``cmrc_json``: SQuAD-style JSON; each question retrieves its own passage.
    """

    model_config = ConfigDict(extra="forbid")

    path: str
    format: Literal["retrieval_jsonl", "sts_csv", "cmrc_json"] = "retrieval_jsonl"
    lang: str
    min_score: float = 4.0
    limit: int | None = Field(default=None, ge=1)


def read_retrieval_input(
    spec: RetrievalInput, data_dir: str | os.PathLike[str] | None = None
) -> list[RetrievalRecord]:
    path = resolve_path(spec.path, data_dir)
    if not path.exists():
        raise FileNotFoundError(f"retrieval input {path} not found")
    if spec.format == "retrieval_jsonl":
        records: Iterable[RetrievalRecord] = iter_records(path, "retrieval")  # type: ignore[assignment]
    elif spec.format == "sts_csv":
        records = _sts_csv_as_retrieval(path, spec.min_score)
    else:
        records = _cmrc_as_retrieval(path)
    out = []
    for record in records:
        out.append(record)
        if spec.limit is not None and len(out) >= spec.limit:
            break
    return out


def _sts_csv_as_retrieval(path: Path, min_score: float) -> Iterator[RetrievalRecord]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for row_no, row in enumerate(csv.reader(handle), start=1):
            if len(row) < 3:
                raise ValueError(
                    f"{path}:{row_no}: field 'score': expected 3 columns, got {len(row)}"
                )
            try:
                score = float(row[2])
            except ValueError:
                raise ValueError(
                    f"{path}:{row_no}: field 'score': not a number: {row[2]!r}"
                ) from None
            if score >= min_score and row[0].strip() and row[1].strip():
                yield RetrievalRecord(
                    query=row[0].strip(), pos=[row[1].strip()], id=f"{path.stem}:{row_no}"
                )


def _cmrc_as_retrieval(path: Path) -> Iterator[RetrievalRecord]:
    data = json.loads(path.read_text(encoding="utf-8"))
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                yield RetrievalRecord(
                    query=qa["question"], pos=[paragraph["context"]], id=str(qa["id"])
                )


def sample_target_languages(
    n_records: int,
    source_lang: str,
    weights: dict[str, float],
    per_query: int,
    rng: np.random.Generator,
) -> list[list[str]]:
    """For each record, ``per_query`` distinct target languages drawn by weight, never the source."""
    candidates = [lang for lang, w in weights.items() if lang != source_lang and w > 0]
    if not candidates:
        raise ValueError(
            f"no target language with positive weight other than the source {source_lang!r}"
        )
    k = min(per_query, len(candidates))
    p = np.array([weights[lang] for lang in candidates], dtype=float)
    p = p / p.sum()
    return [list(rng.choice(candidates, size=k, replace=False, p=p)) for _ in range(n_records)]


@dataclass
class CLRStats:
    records_in: int = 0
    requested: Counter = field(default_factory=Counter)  # "en->zh" -> queries sent
    translated: Counter = field(default_factory=Counter)
    untranslatable: Counter = field(default_factory=Counter)
    unsupported_targets: list[str] = field(default_factory=list)
    dedup: DedupReport = field(default_factory=DedupReport)
    written: int = 0

    def as_dict(self) -> dict:
        return {
            "records_in": self.records_in,
            "requested": dict(self.requested),
            "translated": dict(self.translated),
            "untranslatable": dict(self.untranslatable),
            "unsupported_targets": self.unsupported_targets,
            "dedup": self.dedup.as_dict(),
            "written": self.written,
        }


def build_clr(
    records: Sequence[RetrievalRecord],
    translator: Translator,
    source_lang: str,
    weights: dict[str, float],
    *,
    translations_per_query: int = 1,
    seed: int = 0,
    eval_index: EvalIndex | None = None,
    stats: CLRStats | None = None,
    batch_size: int = 256,
    show_progress: bool = True,
) -> list[RetrievalRecord]:
    """Translate the queries of ``records`` (all in ``source_lang``) into weighted targets."""
    stats = stats if stats is not None else CLRStats()
    stats.records_in += len(records)
    if translations_per_query < 1:
        raise ValueError("translations_per_query must be >= 1")
    weights = dict(weights)
    supported = getattr(translator, "directions", None)
    if callable(supported):
        known = {tgt for src, tgt in supported() if src == source_lang}
        for lang in sorted(set(weights) - known - {source_lang}):
            stats.unsupported_targets.append(f"{source_lang}->{lang}")
            weights.pop(lang)
    rng = np.random.default_rng(seed)
    targets = sample_target_languages(
        len(records), source_lang, weights, translations_per_query, rng
    )

    by_target: dict[str, list[int]] = defaultdict(list)
    for i, langs in enumerate(targets):
        for lang in langs:
            by_target[lang].append(i)

    built: list[tuple[int, str, RetrievalRecord]] = []
    for target in sorted(by_target):
        direction = f"{source_lang}->{target}"
        indices = by_target[target]
        stats.requested[direction] += len(indices)
        starts = range(0, len(indices), batch_size)
        for start in progress(starts, desc=f"translate {direction}", disable=not show_progress):
            chunk = indices[start : start + batch_size]
            outputs = translator.translate([records[i].query for i in chunk], source_lang, target)
            for i, translated in zip(chunk, outputs, strict=True):
                if not translated or not translated.strip():
                    stats.untranslatable[direction] += 1
                    continue
                stats.translated[direction] += 1
                built.append(
                    (
                        i,
                        target,
                        _clr_record(
                            records[i], translated.strip(), source_lang, target, translator.name
                        ),
                    )
                )
    built.sort(key=lambda item: (item[0], item[1]))  # input order, independent of batching
    out = [record for _, _, record in built]
    if eval_index is not None:
        out = list(dedup_retrieval(out, eval_index, stats.dedup, extra_texts=_original_query))
    stats.written += len(out)
    return out


def _original_query(record: RetrievalRecord) -> list[str]:
    return [record.meta["clr"]["original_query"]] if record.meta and "clr" in record.meta else []


def _clr_record(
    record: RetrievalRecord, query: str, doc_lang: str, query_lang: str, translator: str
) -> RetrievalRecord:
    meta = dict(record.meta or {})
    meta["clr"] = {
        "query_lang": query_lang,
        "doc_lang": doc_lang,
        "original_query": record.query,
        "translator": translator,
    }
    record_id = f"{record.id}:{query_lang}" if record.id else None
    return RetrievalRecord(
        query=query, pos=list(record.pos), neg=list(record.neg), id=record_id, meta=meta
    )


class TranslatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["parallel", "llm"] = "parallel"
    corpora: list[CorpusSpec] = Field(default_factory=list)
    backend: BackendConfig | None = None
    prompt: str = DEFAULT_TRANSLATION_PROMPT

    @model_validator(mode="after")
    def _check(self) -> TranslatorConfig:
        if self.kind == "parallel" and not self.corpora:
            raise ValueError("a parallel translator needs at least one entry in 'corpora'")
        if self.kind == "llm" and self.backend is None:
            raise ValueError("an llm translator needs a 'backend'")
        return self


class CLRConfig(BaseModel):
    """The YAML of ``conan-embed data clr`` (see configs/clr-en-zh.yaml)."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[RetrievalInput] = Field(min_length=1)
    preset: str | None = None
    weights: dict[str, float] | None = None
    translations_per_query: int = Field(default=1, ge=1)
    translator: TranslatorConfig
    output: str
    report: str | None = None
    dedup: bool = True
    eval_groups: list[EvalGroup] = Field(default_factory=lambda: list(ALL_GROUPS))
    seed: int = 0

    @model_validator(mode="after")
    def _check_weights(self) -> CLRConfig:
        if (self.preset is None) == (self.weights is None):
            raise ValueError("give exactly one of 'preset' or 'weights'")
        if self.preset is not None and self.preset not in LANGUAGE_WEIGHT_PRESETS:
            raise ValueError(
                f"unknown preset {self.preset!r}; known: {sorted(LANGUAGE_WEIGHT_PRESETS)}"
            )
        return self

    def language_weights(self) -> dict[str, float]:
        return dict(LANGUAGE_WEIGHT_PRESETS[self.preset] if self.preset else self.weights or {})


def load_clr_config(path: str | os.PathLike[str]) -> CLRConfig:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    try:
        return CLRConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ValueError(f"{path}: field '{where}': {first['msg']}") from None


def run_clr(
    config: CLRConfig,
    data_dir: str | os.PathLike[str] | None = None,
    output: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Build the CLR set a config describes, write it and its JSON report; returns the report."""
    eval_index = build_eval_index(data_dir, config.eval_groups) if config.dedup else None
    if config.translator.kind == "parallel":
        corpora = [
            spec.model_copy(update={"paths": [str(resolve_path(p, data_dir)) for p in spec.paths]})
            for spec in config.translator.corpora
        ]
        translator: Translator = ParallelCorpusTranslator.from_specs(corpora, exclude=eval_index)
    else:
        assert config.translator.backend is not None
        translator = LLMTranslator(
            make_backend(config.translator.backend, show_progress), config.translator.prompt
        )

    stats = CLRStats()
    records: list[RetrievalRecord] = []
    for offset, spec in enumerate(config.inputs):
        rows = read_retrieval_input(spec, data_dir)
        records += build_clr(
            rows,
            translator,
            spec.lang,
            config.language_weights(),
            translations_per_query=config.translations_per_query,
            seed=config.seed + offset,
            eval_index=eval_index,
            stats=stats,
            show_progress=show_progress,
        )
    out_path = Path(output or config.output)
    write_records(out_path, records)
    report = {
        "output": str(out_path),
        "translator": translator.name,
        "weights": config.language_weights(),
        **stats.as_dict(),
    }
    if isinstance(translator, ParallelCorpusTranslator):
        report["parallel_corpus"] = {
            "pairs_read": translator.stats.pairs_read,
            "pairs_dropped_as_eval": translator.stats.pairs_dropped_eval,
            "entries_by_direction": translator.stats.by_direction,
        }
    if eval_index is not None:
        report["eval_sentences"] = len(eval_index)
        report["eval_files_missing"] = eval_index.missing
    report_path = Path(config.report) if config.report else out_path.with_suffix(".report.json")
    write_json_atomic(report_path, report)
    report["report"] = str(report_path)
    return report
