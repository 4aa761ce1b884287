"""MTEB / C-MTEB tasks that read their test sets from the local data folder.

Why: the published scores we compare against were computed by the ``mteb`` package, and its
metric code (Spearman of cosine for STS, the undersampled logistic-regression probe for
classification, MiniBatchKMeans V-measure for clustering, nDCG@10 / MAP for retrieval and
reranking, nearest-neighbour F1 for bitext mining) changes in small ways between versions.
Reimplementing any of it would be a second, unverified copy. Each task here is therefore a
subclass of mteb's *own* task class whose only change is :meth:`load_data`: the rows come
from ``../shared/data`` (no hub access) in the structure mteb's evaluator expects. The
protocol parameters (``samples_per_label``, ``n_experiments``, the seed, ``k_values``,
subsampling) are inherited from mteb, pinned at ``mteb==2.26.24``.

How:

- Tasks whose local file *is* the MTEB test set keep mteb's task name (``STSBenchmark``,
  ``STSB``, ``LCQMC``, ``BQ``, ``Banking77Classification``, ``SciFact``, ``Tatoeba``), so their
  numbers are comparable with the leaderboard.
- Tasks built from a different sample of the same corpus, or with no MTEB counterpart, get a
  name ending in ``Local`` (``WaimaiLocal``, ``OnlineShoppingLocal``, ``CSLClassificationLocal``,
  ``CSLClusteringLocal``, ``CMRC2018RetrievalLocal``, ``BGEHeldoutRerankingLocal``,
  ``STSBenchmarkCrossLingualLocal``): their own fixed seeded split, *not* comparable with the
  published numbers.
- The dataset ``path`` in the task metadata becomes ``local:<file>`` and the ``revision`` the
  first 12 hex digits of the file's SHA-256, so a result JSON says exactly which bytes it
  was computed on.
- Bad rows raise :class:`DataFormatError` naming file, line and field.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from mteb.abstasks import AbsTask
from mteb.tasks.bitext_mining.multilingual.tatoeba_bitext_mining import TatoebaBitextMining
from mteb.tasks.classification.eng.banking77_classification import Banking77Classification
from mteb.tasks.classification.zho.cmteb_classification import OnlineShopping, Waimai
from mteb.tasks.clustering.zho.cmteb_clustering import CLSClusteringFastS2S
from mteb.tasks.reranking.zho.cmteb_reranking import T2Reranking
from mteb.tasks.retrieval.eng.sci_fact_retrieval import SciFact
from mteb.tasks.sts.eng.sts_benchmark_sts import STSBenchmarkSTS
from mteb.tasks.sts.multilingual.sts_benchmark_multilingual_sts import (
    STSBenchmarkMultilingualSTS,
)
from mteb.tasks.sts.zho.cmtebsts import BQ, LCQMC, STSB

from conan_embedding.data.sources import resolve_data_dir
from conan_embedding.data.splits import SPLIT_SEED, reranking_holdout_indices


class DataFormatError(ValueError):
    """A malformed row in a local evaluation file: ``file:line: field: problem``."""


# --------------------------------------------------------------------------- file readers


def _open_text(path: Path, encoding: str = "utf-8") -> io.TextIOBase:
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
    with _open_text(path, encoding) as handle:
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


def _as_float(path: Path, line: int, field: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataFormatError(f"{path}:{line}: {field}: not a number: {value!r}") from None


def _non_empty(path: Path, line: int, field: str, value: str) -> str:
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


def sts_rows(path: Path, *, fields: tuple[str, ...], **reader_args: Any) -> Dataset:
    """An STS file as ``sentence1, sentence2, score`` (the score column may be named ``label``)."""
    s1, s2, score = [], [], []
    score_field = "score" if "score" in fields else "label"
    for line, row in read_delimited(path, fields=fields, **reader_args):
        if row.get("split", "test") != "test":
            continue
        s1.append(_non_empty(path, line, "sentence1", row["sentence1"]))
        s2.append(_non_empty(path, line, "sentence2", row["sentence2"]))
        score.append(_as_float(path, line, score_field, row[score_field]))
    return Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": score})


# --------------------------------------------------------------------------- base mixin


class LocalDataTask(ABC):
    """Mixin for an mteb task: ``load_data`` reads local files instead of the hub.

    Subclasses set ``data_files`` (paths relative to the data folder; the first one names the
    dataset in the result JSON) and implement :meth:`build_dataset`.
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
        path = self.data_dir / relative
        if not path.exists():
            raise FileNotFoundError(f"{path} not found in the data folder {self.data_dir}")
        return path

    @abstractmethod
    def build_dataset(self) -> dict[str, Any]:
        """The rows in the structure the mteb base class evaluates (subset -> split -> data)."""

    def load_data(self, num_proc: int | None = None, *, timer: Any = None, **kwargs: Any) -> None:
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


def _meta(base: type[AbsTask], **updates: Any) -> Any:
    return base.metadata.model_copy(update=updates)


# --------------------------------------------------------------------------- STS


class LocalSTSBenchmark(LocalDataTask, STSBenchmarkSTS):
    """MTEB STSBenchmark test: the ``test`` rows of the original TSV (MTEB's exact characters)."""

    data_files = ("sts/stsbenchmark.tsv.gz",)

    def build_dataset(self) -> dict[str, Any]:
        fields = ("split", "genre", "dataset", "year", "sid", "score", "sentence1", "sentence2")
        rows = sts_rows(self.path(self.data_files[0]), fields=fields, header=True)
        return {"test": rows}


class LocalSTSB(LocalDataTask, STSB):
    """C-MTEB STSB test (CNSD translation of STS-B, integer scores 0-5)."""

    metadata = _meta(STSB, eval_splits=["test"])
    data_files = ("sts/cnsd-stsb.test.data",)

    def build_dataset(self) -> dict[str, Any]:
        rows = sts_rows(self.path(self.data_files[0]), fields=("sentence1", "sentence2", "score"))
        return {"test": rows}


class LocalLCQMC(LocalDataTask, LCQMC):
    """C-MTEB LCQMC test: 0/1 labels, scored as STS (Spearman of cosine against the label)."""

    data_files = ("sts/lcqmc-test.txt",)

    def build_dataset(self) -> dict[str, Any]:
        rows = sts_rows(self.path(self.data_files[0]), fields=("sentence1", "sentence2", "label"))
        return {"test": rows}


class LocalBQ(LocalDataTask, BQ):
    """C-MTEB BQ test (comma-separated with a BOM and a header)."""

    metadata = _meta(BQ, eval_splits=["test"])
    data_files = ("sts/bq-test.csv",)

    def build_dataset(self) -> dict[str, Any]:
        rows = sts_rows(
            self.path(self.data_files[0]),
            fields=("sentence1", "sentence2", "label"),
            delimiter=",",
            quoting=csv.QUOTE_MINIMAL,
            header=True,
        )
        return {"test": rows}


class LocalSTSBenchmarkZh(LocalDataTask, STSBenchmarkMultilingualSTS):
    """MTEB STSBenchmarkMultilingualSTS ``zh`` test (DeepL translation from stsb-multi-mt)."""

    metadata = _meta(
        STSBenchmarkMultilingualSTS, eval_splits=["test"], eval_langs={"zh": ["cmn-Hans"]}
    )
    data_files = ("sts/stsb-zh-test.csv",)

    def build_dataset(self) -> dict[str, Any]:
        rows = sts_rows(
            self.path(self.data_files[0]),
            fields=("sentence1", "sentence2", "score"),
            delimiter=",",
            quoting=csv.QUOTE_MINIMAL,
        )
        return {"zh": {"test": rows}}


class LocalSTSBenchmarkCrossLingual(LocalDataTask, STSBenchmarkMultilingualSTS):
    """Cross-lingual STS-B: the English sentence 1 against the Chinese sentence 2 and vice versa.

    The two stsb-multi-mt files are row-aligned translations of the same test pairs, so the
    gold score carries over. Not an MTEB task (MTEB's STS17/STS22 use other sentences).
    """

    metadata = _meta(
        STSBenchmarkMultilingualSTS,
        name="STSBenchmarkCrossLingualLocal",
        description="STS Benchmark test with sentence 1 and sentence 2 in different languages "
        "(English original, DeepL Chinese from stsb-multi-mt).",
        eval_splits=["test"],
        eval_langs={"en-zh": ["eng-Latn", "cmn-Hans"], "zh-en": ["cmn-Hans", "eng-Latn"]},
    )
    data_files = ("sts/stsb-en-test.csv", "sts/stsb-zh-test.csv")
    comparable_to_mteb = False
    note = "no MTEB counterpart"

    def build_dataset(self) -> dict[str, Any]:
        args = {
            "fields": ("sentence1", "sentence2", "score"),
            "delimiter": ",",
            "quoting": csv.QUOTE_MINIMAL,
        }
        en = sts_rows(self.path(self.data_files[0]), **args)
        zh = sts_rows(self.path(self.data_files[1]), **args)
        if len(en) != len(zh) or en["score"] != zh["score"]:
            raise DataFormatError(
                f"{self.data_files[0]} and {self.data_files[1]} are not row-aligned"
            )
        return {
            "en-zh": {
                "test": Dataset.from_dict(
                    {
                        "sentence1": en["sentence1"],
                        "sentence2": zh["sentence2"],
                        "score": en["score"],
                    }
                )
            },
            "zh-en": {
                "test": Dataset.from_dict(
                    {
                        "sentence1": zh["sentence1"],
                        "sentence2": en["sentence2"],
                        "score": en["score"],
                    }
                )
            },
        }


# --------------------------------------------------------------------------- classification


def _classification_dataset(texts: list[str], labels: list[int]) -> Dataset:
    return Dataset.from_dict({"text": texts, "label": labels})


def label_ids(*label_lists: list[str]) -> list[list[int]]:
    """Label names to integer ids (sorted names, one mapping for all splits), as mteb expects."""
    names = sorted({name for labels in label_lists for name in labels})
    index = {name: i for i, name in enumerate(names)}
    return [[index[name] for name in labels] for labels in label_lists]


class LocalBanking77(LocalDataTask, Banking77Classification):
    """MTEB Banking77Classification: mteb's probe (8 per label, 10 experiments) on the PolyAI files."""

    data_files = ("classification/banking77-test.csv", "classification/banking77-train.csv")

    def _read(self, relative: str) -> tuple[list[str], list[str]]:
        path = self.path(relative)
        texts, labels = [], []
        for line, row in read_delimited(
            path, fields=("text", "category"), delimiter=",", quoting=csv.QUOTE_MINIMAL, header=True
        ):
            texts.append(_non_empty(path, line, "text", row["text"]))
            labels.append(_non_empty(path, line, "category", row["category"]))
        return texts, labels

    def build_dataset(self) -> dict[str, Any]:
        train_texts, train_labels = self._read(self.data_files[1])
        test_texts, test_labels = self._read(self.data_files[0])
        train_ids, test_ids = label_ids(train_labels, test_labels)
        return DatasetDict(
            {
                "train": _classification_dataset(train_texts, train_ids),
                "test": _classification_dataset(test_texts, test_ids),
            }
        )


def seeded_split(
    texts: list[str], labels: list[str], *, n_train: int, n_test: int, seed: int = SPLIT_SEED
) -> DatasetDict:
    """A fixed random train/test split of a whole corpus (C-MTEB samples 8,000 / 1,000 too)."""
    (ids,) = label_ids(labels)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    if n_train + n_test > len(order):
        raise ValueError(f"corpus has {len(order)} rows, fewer than {n_train} + {n_test}")
    test, train = order[:n_test], order[n_test : n_test + n_train]
    return DatasetDict(
        {
            "train": _classification_dataset([texts[i] for i in train], [ids[i] for i in train]),
            "test": _classification_dataset([texts[i] for i in test], [ids[i] for i in test]),
        }
    )


class LocalWaimai(LocalDataTask, Waimai):
    """Waimai reviews, our own seeded 8,000 / 1,000 split; mteb's probe (32 per label)."""

    metadata = _meta(Waimai, name="WaimaiLocal")
    data_files = ("classification/waimai_10k.csv",)
    comparable_to_mteb = False
    note = "own seeded split of the corpus C-MTEB samples from"

    def build_dataset(self) -> dict[str, Any]:
        path = self.path(self.data_files[0])
        texts, labels = [], []
        for _line, row in read_delimited(
            path, fields=("label", "review"), delimiter=",", quoting=csv.QUOTE_MINIMAL, header=True
        ):
            if row["review"].strip():
                texts.append(row["review"])
                labels.append(row["label"])
        return seeded_split(texts, labels, n_train=8000, n_test=1000)


class LocalOnlineShopping(LocalDataTask, OnlineShopping):
    """OnlineShopping reviews (sentiment), our own seeded 8,000 / 1,000 split."""

    metadata = _meta(OnlineShopping, name="OnlineShoppingLocal")
    data_files = ("classification/online_shopping_10_cats.csv.gz",)
    comparable_to_mteb = False
    note = "own seeded split of the corpus C-MTEB samples from"

    def build_dataset(self) -> dict[str, Any]:
        path = self.path(self.data_files[0])
        texts, labels = [], []
        for _line, row in read_delimited(
            path,
            fields=("cat", "label", "review"),
            delimiter=",",
            quoting=csv.QUOTE_MINIMAL,
            header=True,
        ):
            if row["review"].strip():  # one review in the corpus is empty
                texts.append(row["review"])
                labels.append(row["label"])
        return seeded_split(texts, labels, n_train=8000, n_test=1000)


def csl_titles(path: Path) -> tuple[list[str], list[str]]:
    titles, categories = [], []
    for line, row in read_delimited(path, fields=("prompt", "title", "category")):
        titles.append(_non_empty(path, line, "title", row["title"]))
        categories.append(_non_empty(path, line, "category", row["category"]))
    return titles, categories


class LocalCSLClassification(LocalDataTask, Waimai):
    """CSL title -> one of 13 disciplines; train/test files as shipped, mteb's C-MTEB probe."""

    metadata = _meta(
        Waimai,
        name="CSLClassificationLocal",
        description="Chinese scientific paper titles classified into 13 first-level disciplines (CSL cls_ctg).",
        reference="https://github.com/ydli-ai/CSL",
        dataset={"path": "local", "revision": "local"},
    )
    data_files = ("classification/csl-cls_ctg-test.tsv", "classification/csl-cls_ctg-train.tsv")
    comparable_to_mteb = False
    note = "no MTEB classification task on CSL"

    def build_dataset(self) -> dict[str, Any]:
        train_texts, train_labels = csl_titles(self.path(self.data_files[1]))
        test_texts, test_labels = csl_titles(self.path(self.data_files[0]))
        train_ids, test_ids = label_ids(train_labels, test_labels)
        return DatasetDict(
            {
                "train": _classification_dataset(train_texts, train_ids),
                "test": _classification_dataset(test_texts, test_ids),
            }
        )


# --------------------------------------------------------------------------- clustering


class LocalCSLClustering(LocalDataTask, CLSClusteringFastS2S):
    """CSL titles clustered by discipline with mteb's CLSClusteringS2S.v2 protocol.

    The 2,000 titles of the CSL dev and test files (C-MTEB uses its own 2,048-title sample).
    """

    metadata = _meta(CLSClusteringFastS2S, name="CSLClusteringLocal")
    data_files = ("classification/csl-cls_ctg-test.tsv", "classification/csl-cls_ctg-dev.tsv")
    comparable_to_mteb = False
    note = "CSL dev+test titles, not the C-MTEB sample"

    def build_dataset(self) -> dict[str, Any]:
        titles, categories = csl_titles(self.path(self.data_files[0]))
        more_titles, more_categories = csl_titles(self.path(self.data_files[1]))
        data = DatasetDict(
            {
                "test": Dataset.from_dict(
                    {"sentences": titles + more_titles, "labels": categories + more_categories}
                )
            }
        )
        # Same rule as the mteb task: at most max_document_to_embed, stratified, seeded.
        return self.stratified_subsampling(
            data, self.seed, ["test"], label="labels", n_samples=2048
        )


# --------------------------------------------------------------------------- bitext mining


class LocalTatoeba(LocalDataTask, TatoebaBitextMining):
    """MTEB Tatoeba ``cmn-eng``: sentence1 is Chinese, sentence2 English (LASER v1 files)."""

    metadata = _meta(TatoebaBitextMining, eval_langs={"cmn-eng": ["cmn-Hans", "eng-Latn"]})
    data_files = ("bitext/tatoeba.cmn-eng.cmn", "bitext/tatoeba.cmn-eng.eng")
    fast_loading = False

    def build_dataset(self) -> dict[str, Any]:
        sides = []
        for relative in self.data_files:
            path = self.path(relative)
            lines = path.read_text(encoding="utf-8").split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            for number, text in enumerate(lines, start=1):
                _non_empty(path, number, "sentence", text)
            sides.append(lines)
        if len(sides[0]) != len(sides[1]):
            raise DataFormatError(
                f"{self.data_files[0]} has {len(sides[0])} lines but {self.data_files[1]} has {len(sides[1])}"
            )
        return {
            "cmn-eng": {"test": Dataset.from_dict({"sentence1": sides[0], "sentence2": sides[1]})}
        }


# --------------------------------------------------------------------------- retrieval


def cap_corpus(
    corpus_ids: list[str],
    relevant: dict[str, dict[str, int]],
    max_corpus: int | None,
    seed: int = SPLIT_SEED,
) -> tuple[list[str], dict[str, dict[str, int]]]:
    """At most ``max_corpus`` documents: relevant ones first, then a seeded sample of the rest.

    Every kept query keeps all of its relevant documents. If the relevant documents alone exceed
    the cap (CMRC: every passage answers some question), a seeded subset of queries is kept
    whose relevant documents fit. The score is then on a smaller, easier haystack and is *not*
    comparable with the full-corpus number. Returns ``(kept document ids, kept qrels)``.
    """
    if max_corpus is None or max_corpus >= len(corpus_ids):
        return corpus_ids, relevant
    if max_corpus <= 0:
        raise ValueError(f"max_corpus must be positive, got {max_corpus}")
    query_order = list(relevant)
    random.Random(seed).shuffle(query_order)
    needed: set[str] = set()
    kept_queries: dict[str, dict[str, int]] = {}
    for query in query_order:
        docs = set(relevant[query])
        if len(needed | docs) <= max_corpus:
            needed |= docs
            kept_queries[query] = relevant[query]
    if not kept_queries:
        raise ValueError(f"max_corpus={max_corpus} is too small for any query's relevant documents")
    others = [doc for doc in corpus_ids if doc not in needed]
    random.Random(seed).shuffle(others)
    keep = needed | set(others[: max_corpus - len(needed)])
    ordered = {query: kept_queries[query] for query in relevant if query in kept_queries}
    return [doc for doc in corpus_ids if doc in keep], ordered


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{number}: invalid JSON: {error.msg}") from None


def _field(path: Path, line: int, record: dict[str, Any], name: str) -> Any:
    if name not in record:
        raise DataFormatError(f"{path}:{line}: {name}: missing")
    return record[name]


class LocalSciFact(LocalDataTask, SciFact):
    """MTEB SciFact test (BEIR layout). Query ``metadata`` holds the answers and is never read."""

    data_files = (
        "retrieval/scifact/qrels/test.tsv",
        "retrieval/scifact/corpus.jsonl.gz",
        "retrieval/scifact/queries.jsonl",
    )

    def build_dataset(self) -> dict[str, Any]:
        qrels_path = self.path(self.data_files[0])
        relevant: dict[str, dict[str, int]] = {}
        for line, row in read_delimited(
            qrels_path, fields=("query-id", "corpus-id", "score"), header=True
        ):
            score = int(_as_float(qrels_path, line, "score", row["score"]))
            relevant.setdefault(row["query-id"], {})[row["corpus-id"]] = score
        corpus_path = self.path(self.data_files[1])
        docs: dict[str, tuple[str, str]] = {}
        for line, record in _read_jsonl(corpus_path):
            docs[str(_field(corpus_path, line, record, "_id"))] = (
                _field(corpus_path, line, record, "title"),
                _field(corpus_path, line, record, "text"),
            )
        query_path = self.path(self.data_files[2])
        queries = {
            str(_field(query_path, line, r, "_id")): _field(query_path, line, r, "text")
            for line, r in _read_jsonl(query_path)
        }
        missing = [q for q in relevant if q not in queries]
        if missing:
            raise DataFormatError(f"{qrels_path}: query ids {missing[:5]} are not in {query_path}")
        kept, relevant = cap_corpus(list(docs), relevant, self.max_corpus)
        self.corpus_sizes["default"] = len(kept)
        self.corpus_capped = len(kept) < len(docs)
        query_ids = [q for q in queries if q in relevant]
        return {
            "default": {
                "test": {
                    "corpus": Dataset.from_dict(
                        {
                            "id": kept,
                            "title": [docs[d][0] for d in kept],
                            "text": [docs[d][1] for d in kept],
                        }
                    ),
                    "queries": Dataset.from_dict(
                        {"id": query_ids, "text": [queries[q] for q in query_ids]}
                    ),
                    "relevant_docs": relevant,
                    "top_ranked": None,
                }
            }
        }


class LocalCMRC2018Retrieval(LocalDataTask, SciFact):
    """CMRC 2018 dev as passage retrieval: each question's relevant document is its paragraph."""

    metadata = _meta(
        SciFact,
        name="CMRC2018RetrievalLocal",
        description="CMRC 2018 dev questions retrieving their own Wikipedia paragraph (848 passages).",
        reference="https://github.com/ymcui/cmrc2018",
        eval_langs=["cmn-Hans"],
        domains=["Encyclopaedic", "Written"],
        license="cc-by-sa-4.0",
    )
    data_files = ("retrieval/cmrc2018_dev.json",)
    comparable_to_mteb = False
    note = "no MTEB task"

    def build_dataset(self) -> dict[str, Any]:
        path = self.path(self.data_files[0])
        try:
            articles = json.loads(path.read_text(encoding="utf-8"))["data"]
        except (json.JSONDecodeError, KeyError) as error:
            raise DataFormatError(
                f"{path}: not SQuAD-style JSON with a 'data' list: {error}"
            ) from None
        doc_ids, titles, contexts, query_ids, questions = [], [], [], [], []
        relevant: dict[str, dict[str, int]] = {}
        for article_index, article in enumerate(articles):
            for paragraph in article.get("paragraphs", []):
                if "id" not in paragraph or "context" not in paragraph:
                    raise DataFormatError(
                        f"{path}: data[{article_index}]: paragraph without id/context"
                    )
                doc_ids.append(paragraph["id"])
                titles.append(article.get("title", ""))
                contexts.append(paragraph["context"])
                for qa in paragraph.get("qas", []):
                    query_ids.append(qa["id"])
                    questions.append(qa["question"])
                    relevant[qa["id"]] = {paragraph["id"]: 1}
        kept_ids, relevant = cap_corpus(doc_ids, relevant, self.max_corpus)
        kept = set(kept_ids)
        rows = [i for i, d in enumerate(doc_ids) if d in kept]
        query_rows = [i for i, q in enumerate(query_ids) if q in relevant]
        self.corpus_sizes["default"] = len(rows)
        self.corpus_capped = len(rows) < len(doc_ids)
        return {
            "default": {
                "test": {
                    "corpus": Dataset.from_dict(
                        {
                            "id": [doc_ids[i] for i in rows],
                            "title": [titles[i] for i in rows],
                            "text": [contexts[i] for i in rows],
                        }
                    ),
                    "queries": Dataset.from_dict(
                        {
                            "id": [query_ids[i] for i in query_rows],
                            "text": [questions[i] for i in query_rows],
                        }
                    ),
                    "relevant_docs": relevant,
                    "top_ranked": None,
                }
            }
        }


# --------------------------------------------------------------------------- reranking


class LocalBGEHeldoutReranking(LocalDataTask, T2Reranking):
    """Rerank ``pos`` + 10 ``neg`` per query of held-out bge_finetune_data rows; MAP as mteb.

    The file is training data (built from CNSD STS-B *train*); the score means something only
    if the model was not trained on these held-out rows (see :func:`reranking_holdout_indices`).
    """

    metadata = _meta(
        T2Reranking,
        name="BGEHeldoutRerankingLocal",
        description="Held-out rows of text2vec's bge_finetune_data.jsonl (CNSD STS-B train pairs), "
        "reranking the positive among 10 random negatives.",
        reference="https://github.com/shibing624/text2vec",
        eval_splits=["test"],
    )
    data_files = ("retrieval/bge_finetune_data.jsonl",)
    comparable_to_mteb = False
    note = "held-out training rows; valid only if they were not trained on"

    def build_dataset(self) -> dict[str, Any]:
        path = self.path(self.data_files[0])
        records = list(_read_jsonl(path))
        doc_ids: dict[str, str] = {}
        relevant: dict[str, dict[str, int]] = {}
        top_ranked: dict[str, list[str]] = {}
        query_ids, query_texts = [], []

        def doc_id(text: str) -> str:
            return doc_ids.setdefault(text, f"d{len(doc_ids)}")

        for index in reranking_holdout_indices(len(records)):
            line, record = records[index]
            query = _field(path, line, record, "query")
            positives = _field(path, line, record, "pos")
            negatives = _field(path, line, record, "neg")
            if not positives:
                raise DataFormatError(f"{path}:{line}: pos: empty")
            qid = f"q{line}"
            query_ids.append(qid)
            query_texts.append(query)
            relevant[qid] = {doc_id(text): 1 for text in positives}
            candidates = [doc_id(text) for text in [*positives, *negatives]]
            top_ranked[qid] = list(dict.fromkeys(candidates))
        corpus_ids = list(doc_ids.values())
        self.corpus_sizes["default"] = len(corpus_ids)
        return {
            "default": {
                "test": {
                    "corpus": Dataset.from_dict({"id": corpus_ids, "text": list(doc_ids)}),
                    "queries": Dataset.from_dict({"id": query_ids, "text": query_texts}),
                    "relevant_docs": relevant,
                    "top_ranked": top_ranked,
                }
            }
        }


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TaskInfo:
    """One evaluable task: its class, suites and the published scores to compare against."""

    name: str
    task_class: type[LocalDataTask]
    suites: tuple[str, ...]
    published: dict[str, float]  # model name -> published main score (fraction)

    @property
    def comparable(self) -> bool:
        return self.task_class.comparable_to_mteb


MINI_MTEB, MINI_CMTEB, CROSS_LINGUAL = "mini-mteb", "mini-cmteb", "cross-lingual"

# Published scores from the embeddings-benchmark/results snapshot listed in shared/data/README.md.
_MINILM, _ME5 = "all-MiniLM-L6-v2", "multilingual-e5-small"
TASKS: dict[str, TaskInfo] = {
    info.name: info
    for info in [
        TaskInfo("STSBenchmark", LocalSTSBenchmark, (MINI_MTEB,), {_MINILM: 0.8203, _ME5: 0.8359}),
        TaskInfo(
            "Banking77Classification", LocalBanking77, (MINI_MTEB,), {_MINILM: 0.8004, _ME5: 0.7064}
        ),
        TaskInfo("SciFact", LocalSciFact, (MINI_MTEB,), {_MINILM: 0.6451, _ME5: 0.6758}),
        TaskInfo("STSB", LocalSTSB, (MINI_CMTEB,), {_MINILM: 0.3780, _ME5: 0.7793}),
        TaskInfo("LCQMC", LocalLCQMC, (MINI_CMTEB,), {_MINILM: 0.2385, _ME5: 0.7270}),
        TaskInfo("BQ", LocalBQ, (MINI_CMTEB,), {_MINILM: 0.2384, _ME5: 0.4327}),
        TaskInfo(
            "STSBenchmarkMultilingualSTS",
            LocalSTSBenchmarkZh,
            (MINI_CMTEB,),
            {_MINILM: 0.3974, _ME5: 0.7805},
        ),
        TaskInfo("CSLClassificationLocal", LocalCSLClassification, (MINI_CMTEB,), {}),
        TaskInfo("WaimaiLocal", LocalWaimai, (MINI_CMTEB,), {}),
        TaskInfo("OnlineShoppingLocal", LocalOnlineShopping, (MINI_CMTEB,), {}),
        TaskInfo("CSLClusteringLocal", LocalCSLClustering, (MINI_CMTEB,), {}),
        TaskInfo("CMRC2018RetrievalLocal", LocalCMRC2018Retrieval, (MINI_CMTEB,), {}),
        TaskInfo("BGEHeldoutRerankingLocal", LocalBGEHeldoutReranking, (MINI_CMTEB,), {}),
        TaskInfo(
            "STSBenchmarkCrossLingualLocal", LocalSTSBenchmarkCrossLingual, (CROSS_LINGUAL,), {}
        ),
        TaskInfo("Tatoeba", LocalTatoeba, (CROSS_LINGUAL,), {_MINILM: 0.0192, _ME5: 0.9017}),
    ]
}

SUITES: dict[str, list[str]] = {
    suite: [name for name, info in TASKS.items() if suite in info.suites]
    for suite in (MINI_MTEB, MINI_CMTEB, CROSS_LINGUAL)
}
SUITES["all"] = list(TASKS)
SUITES["sts"] = [n for n, i in TASKS.items() if i.task_class.metadata.type == "STS"]


def expand_task_names(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """Task and suite names (a list, or one comma-separated string) to task names, in order."""
    if isinstance(names, str):
        names = [part for part in names.split(",")]
    lookup = {name.lower(): name for name in TASKS}
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name.lower() in SUITES:
            expanded = SUITES[name.lower()]
        elif name.lower() in lookup:
            expanded = [lookup[name.lower()]]
        else:
            raise KeyError(
                f"unknown task or suite {name!r}; tasks: {sorted(TASKS)}; suites: {sorted(SUITES)}"
            )
        out.extend(task for task in expanded if task not in out)
    return out


def build_task(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    max_corpus: int | None = None,
    max_pairs: int | None = None,
) -> LocalDataTask:
    """An mteb task instance reading local data (``max_pairs`` samples long STS test sets)."""
    return TASKS[expand_task_names([name])[0]].task_class(
        data_dir=data_dir, max_corpus=max_corpus, max_pairs=max_pairs
    )
