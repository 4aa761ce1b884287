"""Which tasks a run evaluates: our local tasks, any mteb task, or a whole mteb benchmark.

Why: ``conan-embed eval`` should take any MTEB task or benchmark by name, as mteb does, while
the local tasks (:mod:`conan_embedding.evaluation.tasks`) keep working with no network. A name
is therefore looked up here once, before the model is loaded and before anything is written,
so a typo or a dataset that cannot be fetched fails in a second with a message, not half way
through a run with a traceback.

How:

- :func:`select_tasks` turns task names (a list or one comma-separated string) and an
  optional benchmark name into :class:`SelectedTask` items, in order, without duplicates.
  A name is, in this order: one of our suites (``mini-mteb`` ...), one of our local tasks
  (case-insensitive; ``LCQMC`` is the local file, not mteb's download), an mteb task
  (``mteb.get_task``; case-insensitive when unambiguous). Anything else is an
  :class:`UnknownTaskError` listing the close matches (``difflib``) among local and mteb names.
- A benchmark (``mteb.get_benchmark``, aliases included) expands to mteb's own task objects,
  with the languages / subsets / splits the benchmark selects. They run on mteb's data even
  where a local task has the same name: a benchmark is mteb's definition. A task named in
  ``tasks`` wins over a benchmark task of the same name (result files are named by task).
  An unknown benchmark is an :class:`UnknownBenchmarkError` listing close benchmark names.
- :func:`check_datasets_available`: mteb tasks download their data with ``datasets``. When
  this process is offline (``HF_HUB_OFFLINE=1``, or the Hub's host does not answer), every
  mteb task whose dataset is not in the local cache is listed in one
  :class:`DatasetUnavailableError` with its dataset path and revision and the command that
  caches it. Online, nothing is checked: mteb downloads what it needs.
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

from conan_embedding.evaluation.tasks import SUITES, TASKS, build_task

if TYPE_CHECKING:
    from mteb import AbsTask

logger = logging.getLogger(__name__)

OFFLINE_ENV = "HF_HUB_OFFLINE"
_TRUE = {"1", "true", "yes", "on"}


class UnknownTaskError(ValueError):
    """A task name that is neither ours nor mteb's (the message lists close matches)."""


class UnknownBenchmarkError(ValueError):
    """A benchmark name mteb does not know (the message lists close matches)."""


class DatasetUnavailableError(FileNotFoundError):
    """mteb tasks whose data is not cached on an offline machine (the message says how to fetch)."""


@dataclass(frozen=True)
class SelectedTask:
    """One task of a run: ``local`` (our files, built per run) or ``mteb`` (mteb's own task)."""

    name: str
    source: Literal["local", "mteb"]
    mteb_task: AbsTask | None = None

    def build(
        self,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        max_corpus: int | None = None,
        max_pairs: int | None = None,
    ) -> AbsTask:
        """The task instance to hand to ``mteb.evaluate`` (caps apply to local tasks only)."""
        if self.mteb_task is not None:
            return self.mteb_task
        return build_task(self.name, data_dir=data_dir, max_corpus=max_corpus, max_pairs=max_pairs)

    @property
    def dataset(self) -> dict[str, str]:
        """``{"path", "revision"}`` of an mteb task (empty for a local one)."""
        if self.mteb_task is None:
            return {}
        return {k: str(v) for k, v in self.mteb_task.metadata.dataset.items()}


# --------------------------------------------------------------------------- names
def mteb_task_names() -> list[str]:
    """Every task name mteb knows (its registry of task classes; nothing is instantiated)."""
    from mteb.get_tasks import TASK_LIST

    return [cls.metadata.name for cls in TASK_LIST]


def mteb_benchmark_names() -> list[str]:
    """Every benchmark name and alias mteb knows."""
    import mteb

    names: list[str] = []
    for bench in mteb.get_benchmarks():
        names.append(bench.name)
        names.extend(bench.aliases or [])
    return names


def _close(name: str, candidates: Iterable[str], n: int) -> list[str]:
    """Close matches of ``name`` in ``candidates``, compared case-insensitively."""
    by_lower: dict[str, str] = {}
    for candidate in candidates:
        by_lower.setdefault(candidate.lower(), candidate)
    found = difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.6)
    return [by_lower[match] for match in found]


def _is_text_task(task: AbsTask) -> bool:
    return set(task.metadata.modalities or ["text"]) <= {"text"}


def _mteb_task(name: str, mteb_names: list[str]) -> AbsTask | None:
    import mteb

    if name not in mteb_names:
        folded = [n for n in mteb_names if n.lower() == name.lower()]
        if len(folded) != 1:
            return None
        name = folded[0]
    return mteb.get_task(name)


def _unknown_message(unknown: list[str], mteb_names: list[str]) -> str:
    local_names = [*TASKS, *SUITES]
    listed = ", ".join(repr(n) for n in unknown)
    lines = [f"unknown task {listed}: neither a local task or suite nor an mteb task."]
    for name in unknown:
        local = _close(name, local_names, 3)
        remote = _close(name, mteb_names, 5)
        lines.append(
            f"  {name!r}: close local names: {', '.join(local) or '(none)'}; "
            f"close mteb tasks: {', '.join(remote) or '(none)'}"
        )
    lines.append("Local tasks and suites: conan-embed eval --list; mteb tasks: mteb.get_tasks().")
    return "\n".join(lines)


def _split(names: str | Sequence[str] | None) -> list[str]:
    if names is None:
        return []
    parts = names.split(",") if isinstance(names, str) else list(names)
    return [part.strip() for part in parts if part.strip()]


def expand_benchmark(name: str) -> list[AbsTask]:
    """mteb's tasks of benchmark ``name`` (metadata only: no data is loaded)."""
    import mteb

    try:
        bench = mteb.get_benchmark(name)
    except KeyError:
        names = mteb_benchmark_names()
        key = "".join(name.split()).lower()  # "mteb(cmn,v1)" is "MTEB(cmn, v1)"
        folded = [n for n in names if "".join(n.split()).lower() == key]
        if len(folded) != 1:
            close = _close(name, names, 8)
            raise UnknownBenchmarkError(
                f"unknown mteb benchmark {name!r}; close benchmark names: "
                f"{', '.join(repr(c) for c in close) or '(none)'}. "
                'All of them: python -c "import mteb; print([b.name for b in mteb.get_benchmarks()])"'
            ) from None
        bench = mteb.get_benchmark(folded[0])
    return list(bench.tasks)


def select_tasks(
    tasks: str | Sequence[str] | None, benchmark: str | None = None
) -> list[SelectedTask]:
    """The tasks of a run, in order: ``tasks`` (local first, then mteb) then ``benchmark``'s."""
    lookup = {name.lower(): name for name in TASKS}
    selected: list[SelectedTask] = []
    seen: set[str] = set()
    unknown: list[str] = []
    mteb_names: list[str] | None = None

    def add(item: SelectedTask) -> None:
        if item.name in seen:
            logger.info("task %s is already selected; its second mention is skipped", item.name)
            return
        if item.mteb_task is not None and not _is_text_task(item.mteb_task):
            raise ValueError(
                f"mteb task {item.name!r} is not a text task (modalities "
                f"{item.mteb_task.metadata.modalities}); conan-embed evaluates text embedding models"
            )
        seen.add(item.name)
        selected.append(item)

    for name in _split(tasks):
        key = name.lower()
        if key in SUITES:
            for task_name in SUITES[key]:
                add(SelectedTask(task_name, "local"))
        elif key in lookup:
            add(SelectedTask(lookup[key], "local"))
        else:
            if mteb_names is None:
                mteb_names = mteb_task_names()
            task = _mteb_task(name, mteb_names)
            if task is None:
                unknown.append(name)
            else:
                add(SelectedTask(task.metadata.name, "mteb", task))
    if unknown:
        raise UnknownTaskError(_unknown_message(unknown, mteb_names or mteb_task_names()))
    if benchmark:
        for task in expand_benchmark(benchmark):
            add(SelectedTask(task.metadata.name, "mteb", task))
    if not selected:
        raise ValueError("no task selected: give task names, a suite or a benchmark")
    return selected


# --------------------------------------------------------------------------- offline
def _hub_host() -> str:
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return urlparse(endpoint).hostname or "huggingface.co"


def offline_reason(*, probe: bool = True) -> str | None:
    """Why this process cannot download from the Hub (``None``: it can, as far as we know).

    ``HF_HUB_OFFLINE`` set to a true value, or (``probe``) a TCP connection to the Hub's host
    (``HF_ENDPOINT``, default huggingface.co) that fails within 3 seconds.
    """
    if os.environ.get(OFFLINE_ENV, "").strip().lower() in _TRUE:
        return f"{OFFLINE_ENV}=1 is set"
    if not probe:
        return None
    host = _hub_host()
    try:
        with socket.create_connection((host, 443), timeout=3):
            return None
    except OSError as error:
        return f"{host} cannot be reached ({error.__class__.__name__}: {error})"


def _datasets_cache() -> Path:
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "datasets"
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE)


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def dataset_cached(path: str, revision: str | None = None) -> bool:
    """Whether ``datasets`` can load ``path`` without the network.

    Offline, ``datasets`` (5.x) reads its own Arrow cache
    (``HF_DATASETS_CACHE/<namespace>___<snake_name>/...``, what a previous ``load_dataset``
    wrote); without ``HF_HUB_OFFLINE`` but with no network it can also use the Hub cache
    snapshot of that exact ``revision``.
    """
    from datasets.naming import camelcase_to_snakecase

    parts = path.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = _datasets_cache() / "___".join(parts)
    if any(p.is_dir() for p in root.glob("*/*/*")):
        return True
    if os.environ.get(OFFLINE_ENV, "").strip().lower() in _TRUE or not revision:
        return False
    snapshot = _hub_cache() / f"datasets--{path.replace('/', '--')}" / "snapshots" / revision
    return snapshot.is_dir()


def _datasets_of(task: AbsTask) -> list[dict[str, str]]:
    if task.is_aggregate:
        subtasks: list[AbsTask] = list(getattr(task.metadata, "tasks", []))
        return [d for sub in subtasks for d in _datasets_of(sub)]
    return [{k: str(v) for k, v in task.metadata.dataset.items()}]


def missing_datasets(selected: Sequence[SelectedTask]) -> list[tuple[str, dict[str, str]]]:
    """``(task, dataset)`` for every mteb task's dataset that is not in the local cache."""
    missing: list[tuple[str, dict[str, str]]] = []
    for item in selected:
        if item.mteb_task is None or item.mteb_task.data_loaded:  # nothing to download
            continue
        for dataset in _datasets_of(item.mteb_task):
            if not dataset_cached(dataset["path"], dataset.get("revision")):
                missing.append((item.name, dataset))
    return missing


def fetch_command(task_names: Sequence[str]) -> str:
    """A command that downloads and caches these mteb tasks' data (run it online)."""
    names = ", ".join(repr(n) for n in dict.fromkeys(task_names))
    return (
        f'{OFFLINE_ENV}=0 python -c "import mteb; '
        f'[mteb.get_task(n).load_data() for n in [{names}]]"'
    )


def unavailable_message(missing: Sequence[tuple[str, dict[str, str]]], reason: str) -> str:
    """The error text for datasets that cannot be fetched: task, dataset, revision, the fix."""
    tasks = list(dict.fromkeys(task for task, _ in missing))
    lines = [
        f"{len(tasks)} mteb task(s) need data that is not in the local Hugging Face cache, "
        f"and this process is offline ({reason}):"
    ]
    for task, dataset in missing:
        lines.append(
            f"  {task}: dataset {dataset['path']} revision {dataset.get('revision', '(latest)')}"
        )
    lines.append(
        "Fetch them once with network access (same HF_HOME / HF_DATASETS_CACHE), then rerun:\n"
        f"  {fetch_command(tasks)}\n"
        "or run this eval online (unset HF_HUB_OFFLINE): mteb downloads and caches them. "
        "Local tasks (conan-embed eval --list) need no network."
    )
    return "\n".join(lines)


def check_datasets_available(selected: Sequence[SelectedTask]) -> None:
    """Raise :class:`DatasetUnavailableError` if an mteb task's data cannot be had offline.

    Nothing is checked when every task is local, or when the process is online.
    """
    if not any(item.mteb_task is not None for item in selected):
        return
    missing = missing_datasets(selected)
    if not missing:
        return
    reason = offline_reason()
    if reason is None:
        return
    raise DatasetUnavailableError(unavailable_message(missing, reason))


def load_mteb_data(item: SelectedTask) -> None:
    """Load an mteb task's data now, turning "cannot reach the Hub" into the clear error."""
    task = item.mteb_task
    if task is None or task.data_loaded:
        return
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        task.load_data()
    except (ConnectionError, LocalEntryNotFoundError) as error:
        reason = offline_reason(probe=False) or f"{error.__class__.__name__}: {error}"
        datasets = [(item.name, d) for d in _datasets_of(task)]
        raise DatasetUnavailableError(unavailable_message(datasets, reason)) from error
