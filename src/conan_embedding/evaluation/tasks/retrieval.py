"""Retrieval tasks: nDCG@10 over a corpus, computed by mteb's ``AbsTaskRetrieval`` (as ``SciFact``).

SciFact is MTEB's test set in the BEIR layout; CMRC 2018 dev questions retrieving their own
paragraph has no MTEB task. Both can be run on a capped corpus (:func:`cap_corpus`), whose
score is then not comparable with the full-corpus number.
"""

from __future__ import annotations

import json
import random
from typing import Any

from datasets import Dataset
from mteb.tasks.retrieval.eng.sci_fact_retrieval import SciFact

from conan_embedding.data.splits import SPLIT_SEED
from conan_embedding.evaluation.tasks._base import (
    DataFormatError,
    LocalDataTask,
    as_float,
    read_delimited,
    read_jsonl,
    required_field,
    task_metadata,
)


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
            score = int(as_float(qrels_path, line, "score", row["score"]))
            relevant.setdefault(row["query-id"], {})[row["corpus-id"]] = score
        corpus_path = self.path(self.data_files[1])
        docs: dict[str, tuple[str, str]] = {}
        for line, record in read_jsonl(corpus_path):
            docs[str(required_field(corpus_path, line, record, "_id"))] = (
                required_field(corpus_path, line, record, "title"),
                required_field(corpus_path, line, record, "text"),
            )
        query_path = self.path(self.data_files[2])
        queries = {
            str(required_field(query_path, line, r, "_id")): required_field(
                query_path, line, r, "text"
            )
            for line, r in read_jsonl(query_path)
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

    metadata = task_metadata(
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
