"""Convert the public training files of ``../shared/data`` into our JSONL schemas.

Only training material is read: STS-B en/zh train, CNSD STS-B train, ATEC, LCQMC/BQ dev,
Banking77 and CSL train, CMRC2018 *trial*, SciFact *train* queries, bge_finetune_data (minus
the 300 rows held out for the reranking task) and the en-zh parallel corpus. Test files are
never opened for training, and every row that touches a sentence of a set we report (the
``test`` group of :mod:`conan_embedding.data.leakage`: every task's test rows, the reranking
hold-out's queries and positives included) is dropped, with counts in ``prepare_report.json``:
the parallel corpus holds 442 Tatoeba test sentences, bge_finetune_data holds CNSD STS-B test
sentences, and CNSD STS-B train holds the pairs the held-out reranking rows were built from.
LCQMC / BQ dev and ATEC are trained on here on purpose (no task we report scores them).

Each source's quirks (BOMs, CRLF, tab-separated ``.csv``, unbalanced quotes) are handled by
its reader below; a malformed row raises an error naming file, line and field.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conan_embedding._io import write_json_atomic
from conan_embedding.data.leakage import REPORTED_GROUPS, EvalIndex, build_eval_index, touches
from conan_embedding.data.records import (
    ClassificationRecord,
    PairRecord,
    Record,
    RecordError,
    RetrievalRecord,
    STSRecord,
    iter_records,
    write_records,
)
from conan_embedding.data.sources import resolve_data_dir
from conan_embedding.data.splits import reranking_holdout_indices


def _open(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _tsv(path: Path, n_columns: int) -> Iterator[tuple[int, list[str]]]:
    with _open(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < n_columns:
                raise RecordError(
                    path,
                    line_no,
                    f"column {len(parts) + 1}",
                    f"expected {n_columns} tab-separated columns",
                )
            yield line_no, [p.replace("\ufeff", "") for p in parts]


def _csv(path: Path, header: bool) -> Iterator[tuple[int, list[str]]]:
    with _open(path) as handle:
        reader = csv.reader(handle)
        for row in reader:
            if header:
                header = False
                continue
            if row:
                yield reader.line_num, row


def _score(path: Path, line_no: int, value: str, field: str = "score") -> float:
    try:
        return float(value)
    except ValueError:
        raise RecordError(path, line_no, field, f"not a number: {value!r}") from None


def sts_csv(path: Path) -> Iterator[Record]:
    """stsb-multi-mt ``sentence1,sentence2,score`` (no header)."""
    for line_no, row in _csv(path, header=False):
        yield STSRecord(sentence1=row[0], sentence2=row[1], score=_score(path, line_no, row[2]))


def sts_tab(path: Path, s1: int, s2: int, score: int) -> Iterator[Record]:
    for line_no, parts in _tsv(path, max(s1, s2, score) + 1):
        yield STSRecord(
            sentence1=parts[s1], sentence2=parts[s2], score=_score(path, line_no, parts[score])
        )


def bq_csv(path: Path) -> Iterator[Record]:
    for line_no, row in _csv(path, header=True):
        yield STSRecord(
            sentence1=row[0], sentence2=row[1], score=_score(path, line_no, row[2], "label")
        )


def positive_pairs(rows: Iterator[Record]) -> Iterator[Record]:
    """Label-1 rows of a 0/1 paraphrase set as weak pairs (the baseline's MNRL input)."""
    for row in rows:
        if row.score >= 1:
            yield PairRecord(query=row.sentence1, pos=row.sentence2)


def banking77(path: Path) -> Iterator[Record]:
    for _, row in _csv(path, header=True):
        yield ClassificationRecord(text=row[0], label=row[1])


def csl(path: Path) -> Iterator[Record]:
    for _, parts in _tsv(path, 3):
        yield ClassificationRecord(text=parts[1], label=parts[2])


def cmrc_retrieval(path: Path, negatives: int = 7, seed: int = 0) -> Iterator[Record]:
    """question -> its paragraph; negatives are other paragraphs (random, seeded)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    contexts = [p["context"] for article in data["data"] for p in article["paragraphs"]]
    rng = np.random.default_rng(seed)
    for ci, article_paragraph in enumerate(
        p for article in data["data"] for p in article["paragraphs"]
    ):
        for qa in article_paragraph["qas"]:
            if not qa["question"].strip():  # the trial file has a few empty questions
                continue
            others = [
                contexts[j]
                for j in rng.choice(len(contexts), negatives + 1, replace=False)
                if j != ci
            ]
            yield RetrievalRecord(query=qa["question"], pos=[contexts[ci]], neg=others[:negatives])


def scifact_train(folder: Path, negatives: int = 7, seed: int = 0) -> Iterator[Record]:
    """Train queries (qrels/train.tsv only) -> cited abstracts; random abstracts as negatives."""
    with _open(folder / "corpus.jsonl.gz") as handle:
        corpus = {}
        for line in handle:
            if line.strip():
                doc = json.loads(line)
                corpus[str(doc["_id"])] = (doc["title"] + " " + doc["text"]).strip()
    queries = {}
    with _open(folder / "queries.jsonl") as handle:
        for line in handle:
            if line.strip():
                q = json.loads(line)  # never read q["metadata"]: it holds the answers
                queries[str(q["_id"])] = q["text"]
    relevant: dict[str, list[str]] = {}
    for line_no, parts in _tsv(folder / "qrels" / "train.tsv", 3):
        if line_no == 1:
            continue
        relevant.setdefault(parts[0], []).append(parts[1])
    ids = sorted(corpus)
    rng = np.random.default_rng(seed)
    for qid, docs in relevant.items():
        pool = [ids[j] for j in rng.choice(len(ids), negatives + len(docs), replace=False)]
        neg = [corpus[d] for d in pool if d not in docs][:negatives]
        yield RetrievalRecord(
            query=queries[qid], pos=[corpus[d] for d in docs if d in corpus], neg=neg
        )


def parallel_pairs(path: Path) -> Iterator[Record]:
    """cmn.txt: english <tab> chinese <tab> attribution."""
    for _, parts in _tsv(path, 2):
        yield PairRecord(query=parts[0], pos=parts[1])


def bge_retrieval(path: Path) -> Iterator[Record]:
    """bge_finetune_data minus the rows the evaluator holds out for reranking.

    The file repeats some queries on several rows, so every row whose query is a held-out
    query goes, not only the held-out rows themselves.
    """
    records = list(iter_records(path, "retrieval"))
    held_out = {records[i].query for i in reranking_holdout_indices(len(records))}
    yield from (r for r in records if r.query not in held_out)


@dataclass(frozen=True)
class Source:
    output: str
    kind: str
    reader: Callable[[Path], Iterator[Record]]
    relative: str


# What ``conan-embed data prepare`` writes, the one table: output stem -> its kind, the
# reader that turns its public file into records, and that file (relative to the data folder).
# The model card quotes it (:func:`prepared_source`) to say where a task's file came from.
SOURCES: tuple[Source, ...] = (
    Source("stsb-en-train", "sts", sts_csv, "sts/stsb-en-train.csv"),
    Source("stsb-zh-train", "sts", sts_csv, "sts/stsb-zh-train.csv"),
    Source("cnsd-stsb-train", "sts", lambda p: sts_tab(p, 0, 1, 2), "sts/cnsd-stsb.train.data"),
    Source("atec-train", "sts", lambda p: sts_tab(p, 1, 2, 3), "sts/atec_nlp_sim_train.csv"),
    Source(
        "atec-pairs",
        "pairs",
        lambda p: positive_pairs(sts_tab(p, 1, 2, 3)),
        "sts/atec_nlp_sim_train.csv",
    ),
    Source("lcqmc-dev", "sts", lambda p: sts_tab(p, 0, 1, 2), "sts/lcqmc-dev.txt"),
    Source(
        "lcqmc-pairs", "pairs", lambda p: positive_pairs(sts_tab(p, 0, 1, 2)), "sts/lcqmc-dev.txt"
    ),
    Source("bq-dev", "sts", bq_csv, "sts/bq-dev.csv"),
    Source("bq-pairs", "pairs", lambda p: positive_pairs(bq_csv(p)), "sts/bq-dev.csv"),
    Source("banking77-train", "classification", banking77, "classification/banking77-train.csv"),
    Source("csl-train", "classification", csl, "classification/csl-cls_ctg-train.tsv"),
    Source("cmrc2018-trial", "retrieval", cmrc_retrieval, "retrieval/cmrc2018_trial.json"),
    Source("scifact-train", "retrieval", scifact_train, "retrieval/scifact"),
    Source("bge-finetune", "retrieval", bge_retrieval, "retrieval/bge_finetune_data.jsonl"),
    Source("parallel-en-zh", "pairs", parallel_pairs, "parallel/cmn.txt"),
)
_BY_OUTPUT = {source.output: source for source in SOURCES}


def prepared_source(path: str | os.PathLike[str]) -> str | None:
    """The public data file a ``conan-embed data prepare`` output was made from (e.g.
    ``sts/cnsd-stsb.train.data`` for ``.../cnsd-stsb-train.jsonl``); None for other files."""
    name = Path(path).name
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else Path(path).stem
    source = _BY_OUTPUT.get(stem)
    return source.relative if source else None


def _texts(record: Record) -> list[str]:
    if isinstance(record, STSRecord):
        return [record.sentence1, record.sentence2]
    if isinstance(record, ClassificationRecord):
        return [record.text]
    if isinstance(record, PairRecord):
        return [record.query, record.pos]
    return [record.query, *record.pos]


def _clean(records: Iterator[Record], index: EvalIndex | None) -> tuple[list[Record], int]:
    kept, dropped = [], 0
    for record in records:
        if index is not None and touches(index, _texts(record)):
            dropped += 1
            continue
        if isinstance(record, RetrievalRecord) and index is not None:
            record = record.model_copy(update={"neg": [n for n in record.neg if n not in index]})
        kept.append(record)
    return kept, dropped


def prepare(
    out_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    only: list[str] | None = None,
    dedup: bool = True,
) -> dict[str, dict[str, int | str]]:
    """Write one ``<name>.jsonl`` per source into ``out_dir``; returns the per-file report."""
    root = resolve_data_dir(data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(only or ()) - {s.output for s in SOURCES}
    if unknown:
        raise ValueError(f"unknown sources {sorted(unknown)}; known: {[s.output for s in SOURCES]}")
    index = build_eval_index(root, groups=REPORTED_GROUPS) if dedup else None
    report: dict[str, dict[str, int | str]] = {}
    for source in SOURCES:
        if only and source.output not in only:
            continue
        path = root / source.relative
        if not path.exists():
            report[source.output] = {"status": f"skipped: {path} not found"}
            continue
        kept, dropped = _clean(source.reader(path), index)
        written = write_records(out / f"{source.output}.jsonl", kept)
        report[source.output] = {
            "kind": source.kind,
            "rows": written,
            "dropped_eval_overlap": dropped,
        }
    write_json_atomic(out / "prepare_report.json", report)
    return report
