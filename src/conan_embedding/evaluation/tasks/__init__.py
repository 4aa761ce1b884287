"""MTEB / C-MTEB tasks that read their test sets from the local data folder.

Why: the published scores we compare against were computed by the ``mteb`` package, and its
metric code (Spearman of cosine for STS, the undersampled logistic-regression probe for
classification, MiniBatchKMeans V-measure for clustering, nDCG@10 / MAP for retrieval and
reranking, nearest-neighbour F1 for bitext mining) changes in small ways between versions.
Reimplementing any of it would be a second, unverified copy. Each task here is therefore a
subclass of mteb's *own* task class whose only change is ``load_data``: the rows come
from ``../shared/data`` (no hub access) in the structure mteb's evaluator expects. The
protocol parameters (``samples_per_label``, ``n_experiments``, the seed, ``k_values``,
subsampling) are inherited from mteb, pinned at ``mteb==2.26.24``.

How:

- One module per task type, as mteb lays out its own tasks: :mod:`.sts`,
  :mod:`.classification`, :mod:`.clustering`, :mod:`.retrieval`, :mod:`.reranking`,
  :mod:`.bitext`. The contract they share, :class:`LocalDataTask`, and the file readers are in
  :mod:`._base`, whose docstring says how to add a task or a task type; the name -> task
  catalogue is :mod:`.registry`. This ``__init__`` only re-exports, so
  ``from conan_embedding.evaluation.tasks import TASKS`` is the import to use.
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

from conan_embedding.evaluation.tasks._base import (
    DataFormatError,
    LocalDataTask,
    file_revision,
    read_delimited,
)
from conan_embedding.evaluation.tasks.bitext import LocalTatoeba
from conan_embedding.evaluation.tasks.classification import (
    LocalBanking77,
    LocalCSLClassification,
    LocalOnlineShopping,
    LocalWaimai,
    csl_titles,
    label_ids,
    seeded_split,
)
from conan_embedding.evaluation.tasks.clustering import LocalCSLClustering
from conan_embedding.evaluation.tasks.registry import (
    CROSS_LINGUAL,
    MINI_CMTEB,
    MINI_MTEB,
    SUITES,
    TASKS,
    TaskInfo,
    build_task,
    expand_task_names,
)
from conan_embedding.evaluation.tasks.reranking import LocalBGEHeldoutReranking
from conan_embedding.evaluation.tasks.retrieval import (
    LocalCMRC2018Retrieval,
    LocalSciFact,
    cap_corpus,
)
from conan_embedding.evaluation.tasks.sts import (
    LocalBQ,
    LocalLCQMC,
    LocalSTSB,
    LocalSTSBenchmark,
    LocalSTSBenchmarkCrossLingual,
    LocalSTSBenchmarkZh,
    sts_rows,
)

__all__ = [
    "CROSS_LINGUAL",
    "MINI_CMTEB",
    "MINI_MTEB",
    "SUITES",
    "TASKS",
    "DataFormatError",
    "LocalBGEHeldoutReranking",
    "LocalBQ",
    "LocalBanking77",
    "LocalCMRC2018Retrieval",
    "LocalCSLClassification",
    "LocalCSLClustering",
    "LocalDataTask",
    "LocalLCQMC",
    "LocalOnlineShopping",
    "LocalSTSB",
    "LocalSTSBenchmark",
    "LocalSTSBenchmarkCrossLingual",
    "LocalSTSBenchmarkZh",
    "LocalSciFact",
    "LocalTatoeba",
    "LocalWaimai",
    "TaskInfo",
    "build_task",
    "cap_corpus",
    "csl_titles",
    "expand_task_names",
    "file_revision",
    "label_ids",
    "read_delimited",
    "seeded_split",
    "sts_rows",
]
