"""STS tasks: Spearman of cosine similarity against gold scores, computed by mteb's ``AbsTaskSTS``.

The local files are MTEB's own test sets (STS Benchmark, C-MTEB STSB / LCQMC / BQ, the
stsb-multi-mt Chinese translation), kept under mteb's names, plus one cross-lingual pairing
of the English and Chinese STS-B files with no MTEB counterpart. LCQMC and BQ carry 0/1
labels and are scored as STS, as C-MTEB does.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from datasets import Dataset
from mteb.tasks.sts.eng.sts_benchmark_sts import STSBenchmarkSTS
from mteb.tasks.sts.multilingual.sts_benchmark_multilingual_sts import (
    STSBenchmarkMultilingualSTS,
)
from mteb.tasks.sts.zho.cmtebsts import BQ, LCQMC, STSB

from conan_embedding.evaluation.tasks._base import (
    DataFormatError,
    LocalDataTask,
    as_float,
    non_empty,
    read_delimited,
    task_metadata,
)


def sts_rows(path: Path, *, fields: tuple[str, ...], **reader_args: Any) -> Dataset:
    """An STS file as ``sentence1, sentence2, score`` (the score column may be named ``label``)."""
    s1, s2, score = [], [], []
    score_field = "score" if "score" in fields else "label"
    for line, row in read_delimited(path, fields=fields, **reader_args):
        if row.get("split", "test") != "test":
            continue
        s1.append(non_empty(path, line, "sentence1", row["sentence1"]))
        s2.append(non_empty(path, line, "sentence2", row["sentence2"]))
        score.append(as_float(path, line, score_field, row[score_field]))
    return Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": score})


class LocalSTSBenchmark(LocalDataTask, STSBenchmarkSTS):
    """MTEB STSBenchmark test: the ``test`` rows of the original TSV (MTEB's exact characters)."""

    data_files = ("sts/stsbenchmark.tsv.gz",)

    def build_dataset(self) -> dict[str, Any]:
        fields = ("split", "genre", "dataset", "year", "sid", "score", "sentence1", "sentence2")
        rows = sts_rows(self.path(self.data_files[0]), fields=fields, header=True)
        return {"test": rows}


class LocalSTSB(LocalDataTask, STSB):
    """C-MTEB STSB test (CNSD translation of STS-B, integer scores 0-5)."""

    metadata = task_metadata(STSB, eval_splits=["test"])
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

    metadata = task_metadata(BQ, eval_splits=["test"])
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

    metadata = task_metadata(
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

    metadata = task_metadata(
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
