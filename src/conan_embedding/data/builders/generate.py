"""LLM-generated training pairs: queries for passages (retrieval) and graded rewrites (STS).

Why (Conan-v1, stage 2 data): public supervised sets are small and narrow, so the paper adds
0.5M LLM-generated retrieval pairs and 0.6M LLM-generated STS pairs. A generator asked
"which questions does this passage answer?" yields (query, passage) pairs in any domain one
has passages for; asked for rewrites at graded similarity it yields STS pairs with scores
for CoSENT.

How: each passage is put into an editable prompt template (``{passage}``, ``{n}`` and an
optional ``{language}``; defaults in :data:`DEFAULT_TEMPLATES`, override with a YAML file),
sent through any :class:`~.backends.ChatBackend` (the back-end's persistent cache makes a
crashed run resumable), and the answer is parsed leniently: a JSON list of strings or of
``{"text", "score"}`` objects, inside a code fence or not, else one item per line with list
markers removed. Items equal to the passage or to an evaluation sentence are dropped.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from conan_embedding._io import write_json_atomic, write_text_atomic
from conan_embedding.data.builders.backends import ChatBackend, Conversation
from conan_embedding.data.leakage import EvalIndex, normalize_text
from conan_embedding.data.records import (
    RecordError,
    RetrievalRecord,
    STSRecord,
    iter_json_objects,
    write_records,
)

DEFAULT_SYSTEM = "You write training data for a text-embedding model. Follow the format exactly."
DEFAULT_QUERY_TEMPLATE = (
    "Here is a passage:\n\n{passage}\n\n"
    "Write {n} different search queries, in {language}, that a user could type and that this "
    "passage answers. Vary their length and wording; do not copy sentences from the passage. "
    'Reply with a JSON list of strings only, e.g. ["query one", "query two"].'
)
DEFAULT_PARAPHRASE_TEMPLATE = (
    "Here is a sentence or passage:\n\n{passage}\n\n"
    "Write {n} new sentences in {language} whose similarity to it ranges from 5 (same meaning, "
    "different words) through 3 (partly the same) to 1 (same topic, different meaning). "
    'Reply with a JSON list only, e.g. [{{"text": "...", "score": 5}}, {{"text": "...", "score": 2}}].'
)


class PromptTemplates(BaseModel):
    """The prompts; every user template needs ``{passage}`` and ``{n}``."""

    model_config = ConfigDict(extra="forbid")

    system: str | None = DEFAULT_SYSTEM
    query: str = DEFAULT_QUERY_TEMPLATE
    paraphrase: str = DEFAULT_PARAPHRASE_TEMPLATE

    @field_validator("query", "paraphrase")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        for placeholder in ("{passage}", "{n}"):
            if placeholder not in value:
                raise ValueError(f"template must contain {placeholder}")
        try:
            value.format(passage="", n=1, language="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"template has an unknown or broken placeholder ({err}); "
                "literal braces must be doubled: {{ }}"
            ) from None
        return value


DEFAULT_TEMPLATES = PromptTemplates()


def load_templates(path: str | os.PathLike[str] | None) -> PromptTemplates:
    """Templates from a YAML file with keys ``system``, ``query``, ``paraphrase`` (all optional)."""
    if path is None:
        return PromptTemplates()
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    try:
        return PromptTemplates.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ValueError(f"{path}: field '{where}': {first['msg']}") from None


def dump_templates(
    path: str | os.PathLike[str], templates: PromptTemplates = DEFAULT_TEMPLATES
) -> Path:
    """Write the templates as YAML, a starting point for editing."""
    return write_text_atomic(
        path,
        yaml.safe_dump(templates.model_dump(), allow_unicode=True, sort_keys=False, width=100),
    )


@dataclass(frozen=True)
class GeneratedItem:
    text: str
    score: float | None = None


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.)、:]|\(\d+\))\s*")
_QUOTED = re.compile(r'"((?:[^"\\\n]|\\.)+)"')
_WORD = re.compile(r"\w")


def parse_generated_items(answer: str) -> list[GeneratedItem]:
    """Items from an LLM answer: a JSON list (strings or {text, score} objects), else lines.

    Small local models often break the format: a list cut off by the token limit keeps its
    complete strings, and lines that cannot be an item (a code fence, a lone bracket, a
    preamble such as "Here are three queries:") are skipped.
    """
    fenced = _FENCE.search(answer)
    body = fenced.group(1) if fenced else answer
    start, end = body.find("["), body.rfind("]")
    if start != -1 and end > start:
        try:
            data = json.loads(body[start : end + 1])
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list):
            return [item for item in (_item_from_json(x) for x in data) if item is not None]
    if start != -1 and end < start and not body[start + 1 :].lstrip().startswith("{"):
        strings = [json.loads(f'"{m}"').strip() for m in _QUOTED.findall(body[start:])]
        if any(strings):  # a list of strings cut off mid-way: its complete strings
            return [GeneratedItem(text) for text in strings if text]
    items = []
    for line in body.splitlines():
        text = _LIST_MARKER.sub("", line).strip().strip('"“”').strip()
        if not _WORD.search(text) or text.startswith("```") or text.endswith(":"):
            continue
        items.append(GeneratedItem(text))
    return items


def _item_from_json(value: object) -> GeneratedItem | None:
    if isinstance(value, str):
        return GeneratedItem(value.strip()) if value.strip() else None
    if isinstance(value, dict):
        text = next(
            (value[k] for k in ("text", "query", "sentence") if isinstance(value.get(k), str)), ""
        )
        if not text.strip():
            return None
        score = value.get("score")
        try:
            score = None if score is None else float(score)
        except (TypeError, ValueError):
            score = None
        return GeneratedItem(text.strip(), score)
    return None


@dataclass
class GenerateStats:
    passages: int = 0
    passages_skipped_eval: int = 0
    answers_unparsable: int = 0
    queries: int = 0
    paraphrases: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "passages": self.passages,
            "passages_skipped_eval": self.passages_skipped_eval,
            "answers_unparsable": self.answers_unparsable,
            "queries": self.queries,
            "paraphrases": self.paraphrases,
            "dropped": dict(self.dropped),
        }


def _conversation(
    templates: PromptTemplates, template: str, passage: str, n: int, language: str
) -> Conversation:
    messages = [{"role": "system", "content": templates.system}] if templates.system else []
    messages.append(
        {"role": "user", "content": template.format(passage=passage, n=n, language=language)}
    )
    return messages


def generate_pairs(
    passages: Sequence[str],
    backend: ChatBackend,
    templates: PromptTemplates = DEFAULT_TEMPLATES,
    *,
    n_queries: int = 3,
    n_paraphrases: int = 3,
    language: str = "the passage's language",
    paraphrase_score: float = 5.0,
    eval_index: EvalIndex | None = None,
    stats: GenerateStats | None = None,
) -> tuple[list[RetrievalRecord], list[STSRecord]]:
    """Ask ``backend`` for queries and graded rewrites of every passage; returns both record lists."""
    stats = stats if stats is not None else GenerateStats()
    kept: list[str] = []
    for passage in _unique(passages):
        if eval_index is not None and passage in eval_index:
            stats.passages_skipped_eval += 1
            continue
        kept.append(passage)
    stats.passages += len(kept)
    retrieval: list[RetrievalRecord] = []
    sts: list[STSRecord] = []
    if n_queries > 0 and kept:
        answers = backend.complete(
            [_conversation(templates, templates.query, p, n_queries, language) for p in kept]
        )
        for passage, answer in zip(kept, answers, strict=True):
            for item in _clean_items(answer, passage, n_queries, eval_index, stats, "query"):
                retrieval.append(
                    RetrievalRecord(
                        query=item.text, pos=[passage], meta={"generated_by": backend.name}
                    )
                )
    if n_paraphrases > 0 and kept:
        answers = backend.complete(
            [
                _conversation(templates, templates.paraphrase, p, n_paraphrases, language)
                for p in kept
            ]
        )
        for passage, answer in zip(kept, answers, strict=True):
            for item in _clean_items(
                answer, passage, n_paraphrases, eval_index, stats, "paraphrase"
            ):
                score = paraphrase_score if item.score is None else min(5.0, max(0.0, item.score))
                sts.append(
                    STSRecord(
                        sentence1=passage,
                        sentence2=item.text,
                        score=score,
                        meta={"generated_by": backend.name},
                    )
                )
    stats.queries += len(retrieval)
    stats.paraphrases += len(sts)
    return retrieval, sts


def _clean_items(
    answer: str,
    passage: str,
    limit: int,
    eval_index: EvalIndex | None,
    stats: GenerateStats,
    kind: str,
) -> list[GeneratedItem]:
    items = parse_generated_items(answer)
    if not items:
        stats.answers_unparsable += 1
        return []
    seen = {normalize_text(passage)}
    out = []
    for item in items:
        key = normalize_text(item.text)
        if key in seen:
            stats.dropped[f"{kind}_duplicate_or_copy"] += 1
            continue
        if eval_index is not None and item.text in eval_index:
            stats.dropped[f"{kind}_eval_sentence"] += 1
            continue
        seen.add(key)
        out.append(item)
    if len(out) > limit:
        stats.dropped[f"{kind}_over_limit"] += len(out) - limit
    return out[:limit]


def _unique(texts: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for text in texts:
        key = normalize_text(text)
        if key and key not in seen:
            seen.add(key)
            out.append(text.strip())
    return out


def read_passages(
    path: str | os.PathLike[str], field_name: str = "text", limit: int | None = None
) -> list[str]:
    """Passages from a ``.txt`` (one per line) or ``.jsonl`` file (``field_name``: str or list)."""
    path = Path(path)
    passages: list[str] = []
    if path.suffix == ".jsonl":
        for line_no, row in iter_json_objects(path):
            value = row.get(field_name)
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, str) for v in values):
                raise RecordError(
                    path, line_no, field_name, "expected a string or a list of strings"
                )
            passages.extend(values)
            if limit is not None and len(passages) >= limit:
                break
    else:
        with open(path, encoding="utf-8-sig") as handle:
            for line in handle:
                if line.strip():
                    passages.append(line.rstrip("\r\n"))
                if limit is not None and len(passages) >= limit:
                    break
    return passages if limit is None else passages[:limit]


def run_generate(
    passages_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    backend: ChatBackend,
    templates: PromptTemplates = DEFAULT_TEMPLATES,
    *,
    field_name: str = "text",
    limit: int | None = None,
    n_queries: int = 3,
    n_paraphrases: int = 3,
    language: str = "the passage's language",
    eval_index: EvalIndex | None = None,
) -> dict:
    """Generate, write ``queries.jsonl`` (retrieval) and ``paraphrases.jsonl`` (STS) and a report."""
    out_dir = Path(out_dir)
    stats = GenerateStats()
    passages = read_passages(passages_path, field_name, limit)
    retrieval, sts = generate_pairs(
        passages, backend, templates, n_queries=n_queries, n_paraphrases=n_paraphrases,
        language=language, eval_index=eval_index, stats=stats,
    )  # fmt: skip
    report = {"backend": backend.name, "input": str(passages_path), **stats.as_dict()}
    if n_queries > 0:
        write_records(out_dir / "queries.jsonl", retrieval)
        report["queries_file"] = str(out_dir / "queries.jsonl")
    if n_paraphrases > 0:
        write_records(out_dir / "paraphrases.jsonl", sts)
        report["paraphrases_file"] = str(out_dir / "paraphrases.jsonl")
    write_json_atomic(out_dir / "generate.report.json", report)
    return report
