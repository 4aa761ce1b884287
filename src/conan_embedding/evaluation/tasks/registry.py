"""The task catalogue: name -> task class, suites, and the published scores we compare against.

Everything outside this package finds a task here: :data:`TASKS` and :data:`SUITES` for
listing, :func:`expand_task_names` for what a user typed, :func:`build_task` for an instance.
A new task is one :class:`TaskInfo` line in :data:`TASKS` (suites are derived from it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from conan_embedding.evaluation.tasks._base import LocalDataTask
from conan_embedding.evaluation.tasks.bitext import LocalTatoeba
from conan_embedding.evaluation.tasks.classification import (
    LocalBanking77,
    LocalCSLClassification,
    LocalOnlineShopping,
    LocalWaimai,
)
from conan_embedding.evaluation.tasks.clustering import LocalCSLClustering
from conan_embedding.evaluation.tasks.reranking import LocalBGEHeldoutReranking
from conan_embedding.evaluation.tasks.retrieval import LocalCMRC2018Retrieval, LocalSciFact
from conan_embedding.evaluation.tasks.sts import (
    LocalBQ,
    LocalLCQMC,
    LocalSTSB,
    LocalSTSBenchmark,
    LocalSTSBenchmarkCrossLingual,
    LocalSTSBenchmarkZh,
)


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
