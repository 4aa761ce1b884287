"""Clustering tasks: mteb's MiniBatchKMeans V-measure (``AbsTaskClustering``, as ``CLSClusteringFastS2S``)."""

from __future__ import annotations

from typing import Any

from datasets import Dataset, DatasetDict
from mteb.tasks.clustering.zho.cmteb_clustering import CLSClusteringFastS2S

from conan_embedding.evaluation.tasks._base import LocalDataTask, task_metadata
from conan_embedding.evaluation.tasks.classification import csl_titles


class LocalCSLClustering(LocalDataTask, CLSClusteringFastS2S):
    """CSL titles clustered by discipline with mteb's CLSClusteringS2S.v2 protocol.

    The 2,000 titles of the CSL dev and test files (C-MTEB uses its own 2,048-title sample).
    """

    metadata = task_metadata(CLSClusteringFastS2S, name="CSLClusteringLocal")
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
