"""THE evaluation-sentence index: what no training file may contain, normalised one way.

Why: built data leaks easily. The parallel corpus ``cmn.txt`` contains 442 of the 1,000
Tatoeba cmn-eng English test sentences, ``bge_finetune_data.jsonl`` contains CNSD STS-B test
sentences *and* the 300 rows the ``BGEHeldoutRerankingLocal`` task scores, and the Waimai /
OnlineShopping / ATEC pools are where the test rows are sampled from. A model trained on such
rows reports inflated scores. Two lists with different coverage used to exist (one in
``data/builders/dedup.py``, a narrower one in ``training/pretrain.py``), and the narrower one
missed the reranking hold-out; this module is now the only one, and every builder (``data
prepare``, CLR, generated pairs, the teacher filter, the v2 corpus and v2 stage 4) uses it.

How: every sentence of every evaluation file (:data:`EVAL_SETS`) is normalised as
``lower(collapse_whitespace(NFKC(text)))`` with byte-order marks removed
(:func:`normalize_text`) and kept in one set, remembering which evaluation set it came from.
Each set is in one group:

- ``test``: rows a task of :mod:`conan_embedding.evaluation.tasks` scores (``EvalSet.tasks``
  names it), hold-outs we cut ourselves included: the reranking queries and their positives
  (:func:`reranking_holdout_texts`), the whole Waimai / OnlineShopping corpora our own split
  draws its test rows from, CSL dev (scored by ``CSLClusteringLocal``) and CMRC 2018 dev.
- ``dev``: validation files no task scores (STS-B en/zh dev, CNSD valid, LCQMC / BQ dev).
  ``data prepare`` trains on LCQMC / BQ dev on purpose; every other builder keeps them out.
- ``pool``: corpora a C-MTEB test set we do not score was sampled from (ATEC).

A training pair is dropped when its query or any positive is in the set (negatives that touch
it are removed one by one), and the hits are counted per evaluation set so a build report says
what was removed and why.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from conan_embedding.data.records import RecordError, RetrievalRecord, iter_json_objects
from conan_embedding.data.sources import resolve_data_dir
from conan_embedding.data.splits import reranking_holdout_indices

logger = logging.getLogger(__name__)

EvalGroup = Literal["test", "dev", "pool"]
ALL_GROUPS: tuple[EvalGroup, ...] = ("test", "dev", "pool")
REPORTED_GROUPS: tuple[EvalGroup, ...] = ("test",)  # what ``data prepare`` must keep out

BGE_FINETUNE = "retrieval/bge_finetune_data.jsonl"


def normalize_text(text: str) -> str:
    """The comparison key: NFKC, byte-order marks removed, whitespace collapsed, lower-cased."""
    text = unicodedata.normalize("NFKC", text).replace("\ufeff", "")
    return " ".join(text.split()).lower()


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig strips the leading BOM several of these files carry.
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 -- caller closes


def _tab_columns(
    columns: Sequence[int], skip_header: bool = False
) -> Callable[[Path], Iterator[str]]:
    def read(path: Path) -> Iterator[str]:
        with _open_text(path) as handle:
            for line_no, line in enumerate(handle, start=1):
                if skip_header and line_no == 1:
                    continue
                parts = line.rstrip("\r\n").split("\t")
                for col in columns:
                    if col < len(parts):
                        yield parts[col]

    return read


def _csv_columns(
    columns: Sequence[int], skip_header: bool = False
) -> Callable[[Path], Iterator[str]]:
    def read(path: Path) -> Iterator[str]:
        with _open_text(path) as handle:
            for row_no, row in enumerate(csv.reader(handle), start=1):
                if skip_header and row_no == 1:
                    continue
                for col in columns:
                    if col < len(row):
                        yield row[col]

    return read


def _stsbenchmark_rows(*splits: str) -> Callable[[Path], Iterator[str]]:
    def read(path: Path) -> Iterator[str]:
        # Unbalanced quotes inside sentences: plain tab splitting, never CSV quoting.
        with _open_text(path) as handle:
            header = handle.readline().rstrip("\r\n").split("\t")
            try:
                split_col, s1, s2 = (
                    header.index("split"),
                    header.index("sentence1"),
                    header.index("sentence2"),
                )
            except ValueError:
                raise RecordError(
                    path, 1, "<header>", f"expected split/sentence1/sentence2, got {header}"
                ) from None
            for line in handle:
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) > s2 and parts[split_col] in splits:
                    yield parts[s1]
                    yield parts[s2]

    return read


def _lines(path: Path) -> Iterator[str]:
    with _open_text(path) as handle:
        for line in handle:
            yield line.rstrip("\r\n")


def _cmrc_texts(path: Path) -> Iterator[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        for article in data["data"]:
            for paragraph in article["paragraphs"]:
                yield paragraph["context"]
                for qa in paragraph["qas"]:
                    yield qa["question"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise RecordError(path, 1, "data", f"not SQuAD-style JSON ({err!r})") from None


def _scifact_test_queries(path: Path) -> Iterator[str]:
    # ``path`` is queries.jsonl; only the queries judged in qrels/test.tsv are test queries.
    test_ids = set()
    with _open_text(path.parent / "qrels" / "test.tsv") as handle:
        for line_no, line in enumerate(handle, start=1):
            parts = line.strip().split("\t")
            if line_no > 1 and parts and parts[0]:
                test_ids.add(parts[0])
    for line_no, row in iter_json_objects(path):
        if "_id" not in row or not isinstance(row.get("text"), str):
            raise RecordError(path, line_no, "_id/text", "missing")
        if str(row["_id"]) in test_ids:
            yield row["text"]


def reranking_holdout_rows(path: Path) -> list[tuple[int, dict]]:
    """``(line, row)`` of the ``bge_finetune_data.jsonl`` rows ``BGEHeldoutRerankingLocal`` scores.

    The row numbers are :func:`~conan_embedding.data.splits.reranking_holdout_indices` of the
    file's non-blank rows, the same rule the evaluator applies.
    """
    rows = list(iter_json_objects(path))
    return [rows[i] for i in reranking_holdout_indices(len(rows))]


def reranking_holdout_texts(path: Path) -> Iterator[str]:
    """The held-out rows' queries and positives.

    Negatives are not held out: they are random sentences of the same 5k-sentence pool (2,178
    distinct ones in the 300 rows), which touch 2,619 of the 2,701 rows, and they carry no label
    of the held-out query. The positives are: each row is a CNSD STS-B train pair scored 3-5, so
    keeping them out also removes that pair from STS training, not only the retrieval row.
    """
    for line_no, row in reranking_holdout_rows(path):
        query, positives = row.get("query"), row.get("pos")
        if not isinstance(query, str):
            raise RecordError(path, line_no, "query", "expected a string")
        if not isinstance(positives, list) or not all(isinstance(p, str) for p in positives):
            raise RecordError(path, line_no, "pos", "expected a list of strings")
        yield query
        yield from positives


@dataclass(frozen=True)
class EvalSet:
    """One evaluation file: name, path under the data folder, group, reader, tasks scoring it."""

    name: str
    relative_path: str
    group: EvalGroup
    read: Callable[[Path], Iterator[str]]
    tasks: tuple[str, ...] = ()  # the evaluation/tasks/ tasks that score these rows


# Every evaluation file in ../shared/data (see its README) and every hold-out we cut ourselves.
# tests/test_leakage.py checks that each task of evaluation/tasks/ is named here.
EVAL_SETS: tuple[EvalSet, ...] = (
    EvalSet(
        "stsb-en-test",
        "sts/stsb-en-test.csv",
        "test",
        _csv_columns((0, 1)),
        ("STSBenchmarkCrossLingualLocal",),
    ),
    EvalSet("stsb-en-dev", "sts/stsb-en-dev.csv", "dev", _csv_columns((0, 1))),
    EvalSet(
        "stsb-zh-test",
        "sts/stsb-zh-test.csv",
        "test",
        _csv_columns((0, 1)),
        ("STSBenchmarkMultilingualSTS", "STSBenchmarkCrossLingualLocal"),
    ),
    EvalSet("stsb-zh-dev", "sts/stsb-zh-dev.csv", "dev", _csv_columns((0, 1))),
    # dev with test, as before the one index: STS-B dev is where sentence-transformers' STS
    # recipes (and validation during training) select, so `data prepare` keeps it out of STS-B
    # train too; splitting it into the dev group changed the demo's training rows (5,075 -> 5,289)
    EvalSet(
        "stsbenchmark-dev-test",
        "sts/stsbenchmark.tsv.gz",
        "test",
        _stsbenchmark_rows("dev", "test"),
        ("STSBenchmark",),
    ),
    EvalSet("cnsd-stsb-test", "sts/cnsd-stsb.test.data", "test", _tab_columns((0, 1)), ("STSB",)),
    EvalSet("cnsd-stsb-valid", "sts/cnsd-stsb.valid.data", "dev", _tab_columns((0, 1))),
    EvalSet("lcqmc-test", "sts/lcqmc-test.txt", "test", _tab_columns((0, 1)), ("LCQMC",)),
    EvalSet("lcqmc-dev", "sts/lcqmc-dev.txt", "dev", _tab_columns((0, 1))),
    EvalSet("bq-test", "sts/bq-test.csv", "test", _csv_columns((0, 1), skip_header=True), ("BQ",)),
    EvalSet("bq-dev", "sts/bq-dev.csv", "dev", _csv_columns((0, 1), skip_header=True)),
    EvalSet("atec-pool", "sts/atec_nlp_sim_train.csv", "pool", _tab_columns((1, 2))),
    EvalSet(
        "banking77-test",
        "classification/banking77-test.csv",
        "test",
        _csv_columns((0,), skip_header=True),
        ("Banking77Classification",),
    ),
    EvalSet(
        "csl-test",
        "classification/csl-cls_ctg-test.tsv",
        "test",
        _tab_columns((1,)),
        ("CSLClassificationLocal", "CSLClusteringLocal"),
    ),
    # CSLClusteringLocal clusters test + dev titles, so dev is a reported set here
    EvalSet(
        "csl-dev",
        "classification/csl-cls_ctg-dev.tsv",
        "test",
        _tab_columns((1,)),
        ("CSLClusteringLocal",),
    ),
    # our seeded split draws its test rows from the whole corpus: all of it is kept out
    EvalSet(
        "waimai-pool",
        "classification/waimai_10k.csv",
        "test",
        _csv_columns((1,), skip_header=True),
        ("WaimaiLocal",),
    ),
    EvalSet(
        "online-shopping-pool",
        "classification/online_shopping_10_cats.csv.gz",
        "test",
        _csv_columns((2,), skip_header=True),
        ("OnlineShoppingLocal",),
    ),
    EvalSet(
        "cmrc2018-dev",
        "retrieval/cmrc2018_dev.json",
        "test",
        _cmrc_texts,
        ("CMRC2018RetrievalLocal",),
    ),
    EvalSet(
        "scifact-test-queries",
        "retrieval/scifact/queries.jsonl",
        "test",
        _scifact_test_queries,
        ("SciFact",),
    ),
    EvalSet(
        "bge-reranking-holdout",
        BGE_FINETUNE,
        "test",
        reranking_holdout_texts,
        ("BGEHeldoutRerankingLocal",),
    ),
    EvalSet("tatoeba-cmn-eng.cmn", "bitext/tatoeba.cmn-eng.cmn", "test", _lines, ("Tatoeba",)),
    EvalSet("tatoeba-cmn-eng.eng", "bitext/tatoeba.cmn-eng.eng", "test", _lines, ("Tatoeba",)),
)


@dataclass
class EvalIndex:
    """Normalised evaluation sentences and the evaluation sets each one belongs to."""

    owners: dict[str, tuple[str, ...]] = field(default_factory=dict)
    loaded: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def add(self, set_name: str, texts: Iterable[str]) -> int:
        count = 0
        for text in texts:
            key = normalize_text(text)
            if not key:
                continue
            previous = self.owners.get(key, ())
            if set_name not in previous:
                self.owners[key] = (*previous, set_name)
            count += 1
        self.loaded[set_name] = self.loaded.get(set_name, 0) + count
        return count

    def hits(self, text: str) -> tuple[str, ...]:
        """The evaluation sets that contain ``text`` (empty when it is clean)."""
        return self.owners.get(normalize_text(text), ())

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and bool(self.hits(text))

    def __len__(self) -> int:
        return len(self.owners)

    def clean(self, *texts: str) -> bool:
        """True when none of ``texts`` is an evaluation sentence."""
        return not any(self.hits(text) for text in texts)


def build_eval_index(
    data_dir: str | os.PathLike[str] | None = None,
    groups: Iterable[EvalGroup] = ALL_GROUPS,
    eval_sets: Sequence[EvalSet] = EVAL_SETS,
) -> EvalIndex:
    """Read every evaluation file of the given groups; files absent here are listed in ``missing``."""
    root = resolve_data_dir(data_dir)
    wanted = set(groups)
    unknown = wanted - set(ALL_GROUPS)
    if unknown:
        raise ValueError(f"unknown evaluation groups {sorted(unknown)}; expected {ALL_GROUPS}")
    index = EvalIndex()
    for eval_set in eval_sets:
        if eval_set.group not in wanted:
            continue
        path = root / eval_set.relative_path
        if not path.exists():
            if eval_set.relative_path not in index.missing:
                index.missing.append(eval_set.relative_path)
            logger.warning("evaluation file %s is missing: not deduplicated against", path)
            continue
        index.add(eval_set.name, eval_set.read(path))
    return index


@dataclass
class DedupReport:
    """What deduplication removed: whole records, single negatives, and hits per evaluation set."""

    records_in: int = 0
    records_dropped: int = 0
    negatives_dropped: int = 0
    positives_dropped: int = 0
    hits_by_eval_set: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "records_in": self.records_in,
            "records_dropped": self.records_dropped,
            "positives_dropped": self.positives_dropped,
            "negatives_dropped": self.negatives_dropped,
            "hits_by_eval_set": dict(sorted(self.hits_by_eval_set.items())),
        }


def _clean_texts(texts: Iterable[str], index: EvalIndex, report: DedupReport) -> list[str]:
    """``texts`` less the evaluation sentences, whose sets are counted in ``report``."""
    kept = []
    for text in texts:
        hits = index.hits(text)
        if hits:
            report.hits_by_eval_set.update(hits)
        else:
            kept.append(text)
    return kept


def dedup_retrieval(
    records: Iterable[RetrievalRecord],
    index: EvalIndex,
    report: DedupReport | None = None,
    extra_texts: Callable[[RetrievalRecord], Iterable[str]] | None = None,
) -> Iterator[RetrievalRecord]:
    """Yield the records that do not touch ``index``.

    A record is dropped when its query, one of ``extra_texts(record)`` (e.g. the original
    query a translation came from) or all of its positives are evaluation sentences;
    touching positives and negatives are removed from a record that survives.
    """
    report = report if report is not None else DedupReport()
    for record in records:
        report.records_in += 1
        anchors = [record.query, *(extra_texts(record) if extra_texts else ())]
        anchor_hits = [name for text in anchors for name in index.hits(text)]
        if anchor_hits:
            report.records_dropped += 1
            report.hits_by_eval_set.update(anchor_hits)
            continue
        positives = _clean_texts(record.pos, index, report)
        report.positives_dropped += len(record.pos) - len(positives)
        if not positives:
            report.records_dropped += 1
            continue
        negatives = _clean_texts(record.neg, index, report)
        report.negatives_dropped += len(record.neg) - len(negatives)
        if len(positives) == len(record.pos) and len(negatives) == len(record.neg):
            yield record
        else:
            yield record.model_copy(update={"pos": positives, "neg": negatives})


def touches(index: EvalIndex, texts: Iterable[str]) -> tuple[str, ...]:
    """The evaluation sets any of ``texts`` belongs to (for pair and STS rows)."""
    return tuple(name for text in texts for name in index.hits(text))
