"""Reranking tasks: MAP of a per-query candidate list, computed by mteb's ``AbsTaskRetrieval``
with ``top_ranked`` (as ``T2Reranking``)."""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from mteb.tasks.reranking.zho.cmteb_reranking import T2Reranking

from conan_embedding.data.splits import reranking_holdout_indices
from conan_embedding.evaluation.tasks._base import (
    DataFormatError,
    LocalDataTask,
    read_jsonl,
    required_field,
    task_metadata,
)


class LocalBGEHeldoutReranking(LocalDataTask, T2Reranking):
    """Rerank ``pos`` + 10 ``neg`` per query of held-out bge_finetune_data rows; MAP as mteb.

    The file is training data (built from CNSD STS-B *train*); the score means something only
    if the model was not trained on these held-out rows (see :func:`reranking_holdout_indices`).
    """

    metadata = task_metadata(
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
        records = list(read_jsonl(path))
        doc_ids: dict[str, str] = {}
        relevant: dict[str, dict[str, int]] = {}
        top_ranked: dict[str, list[str]] = {}
        query_ids, query_texts = [], []

        def doc_id(text: str) -> str:
            return doc_ids.setdefault(text, f"d{len(doc_ids)}")

        for index in reranking_holdout_indices(len(records)):
            line, record = records[index]
            query = required_field(path, line, record, "query")
            positives = required_field(path, line, record, "pos")
            negatives = required_field(path, line, record, "neg")
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
