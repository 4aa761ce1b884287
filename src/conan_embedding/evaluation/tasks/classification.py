"""Classification tasks: mteb's logistic-regression probe on the embeddings (``AbsTaskClassification``).

Banking77 is MTEB's own split. Waimai and OnlineShopping are our own seeded 8,000 / 1,000
splits of the corpora C-MTEB samples from, and CSL titles -> discipline has no MTEB task, so
those three are named ``...Local`` and not comparable with published numbers.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from mteb.tasks.classification.eng.banking77_classification import Banking77Classification
from mteb.tasks.classification.zho.cmteb_classification import OnlineShopping, Waimai

from conan_embedding.data.splits import SPLIT_SEED
from conan_embedding.evaluation.tasks._base import (
    LocalDataTask,
    non_empty,
    read_delimited,
    task_metadata,
)


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
            texts.append(non_empty(path, line, "text", row["text"]))
            labels.append(non_empty(path, line, "category", row["category"]))
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


def labelled_reviews(path: Path, fields: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The ``review`` and ``label`` columns of a headed review CSV, empty reviews skipped (one
    review of the OnlineShopping corpus is empty)."""
    texts, labels = [], []
    for _line, row in read_delimited(
        path, fields=fields, delimiter=",", quoting=csv.QUOTE_MINIMAL, header=True
    ):
        if row["review"].strip():
            texts.append(row["review"])
            labels.append(row["label"])
    return texts, labels


class LocalWaimai(LocalDataTask, Waimai):
    """Waimai reviews, our own seeded 8,000 / 1,000 split; mteb's probe (32 per label)."""

    metadata = task_metadata(Waimai, name="WaimaiLocal")
    data_files = ("classification/waimai_10k.csv",)
    comparable_to_mteb = False
    note = "own seeded split of the corpus C-MTEB samples from"

    def build_dataset(self) -> dict[str, Any]:
        texts, labels = labelled_reviews(self.path(self.data_files[0]), ("label", "review"))
        return seeded_split(texts, labels, n_train=8000, n_test=1000)


class LocalOnlineShopping(LocalDataTask, OnlineShopping):
    """OnlineShopping reviews (sentiment), our own seeded 8,000 / 1,000 split."""

    metadata = task_metadata(OnlineShopping, name="OnlineShoppingLocal")
    data_files = ("classification/online_shopping_10_cats.csv.gz",)
    comparable_to_mteb = False
    note = "own seeded split of the corpus C-MTEB samples from"

    def build_dataset(self) -> dict[str, Any]:
        path = self.path(self.data_files[0])
        texts, labels = labelled_reviews(path, ("cat", "label", "review"))
        return seeded_split(texts, labels, n_train=8000, n_test=1000)


def csl_titles(path: Path) -> tuple[list[str], list[str]]:
    titles, categories = [], []
    for line, row in read_delimited(path, fields=("prompt", "title", "category")):
        titles.append(non_empty(path, line, "title", row["title"]))
        categories.append(non_empty(path, line, "category", row["category"]))
    return titles, categories


class LocalCSLClassification(LocalDataTask, Waimai):
    """CSL title -> one of 13 disciplines; train/test files as shipped, mteb's C-MTEB probe."""

    metadata = task_metadata(
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
