"""Run a model on local-data MTEB tasks and write mteb-layout results.

Why: one call that the training job, the CLI and the docs all share, so a number printed after
training is computed exactly like the number in ``docs/evaluation.md``. ``mteb.evaluate``
itself runs every task (see :mod:`conan_embedding.evaluation.tasks`); this module only wires
the model, the embedding cache and the output files around it.

How: the model (a SentenceTransformer, a folder, or a name resolved by
:func:`conan_embedding.modeling.embedder.load_embedder`) is wrapped in
:class:`~conan_embedding.evaluation.encoder.CachedEncoder`; each task is built from local files
and run by ``mteb.evaluate(..., cache=None)``; a name that is not local is mteb's own task (or
a benchmark's tasks), resolved and checked for its data by
:mod:`~conan_embedding.evaluation.selection` before the model loads. With ``output_dir``, each task's
:class:`mteb.TaskResult` is written in mteb's own results layout
``<output_dir>/<model name>/<revision>/<Task>.json`` (the revision is the first 12 hex digits of
the weight fingerprint), atomically, beside ``model_meta.json`` and ``run_info.json`` (the
corpus cap, corpus sizes, cache hits, timings and load average of the run).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mteb

from conan_embedding._io import atomic_path, write_json_atomic
from conan_embedding.evaluation.encoder import CachedEncoder
from conan_embedding.evaluation.selection import (
    SelectedTask,
    check_datasets_available,
    load_mteb_data,
    select_tasks,
)
from conan_embedding.evaluation.tasks import TASKS, LocalDataTask
from conan_embedding.progress import progress
from conan_embedding.provenance import loadavg, machine

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "CONAN_EMBED_CACHE"
RUN_INFO_FILE = "run_info.json"


def default_cache_dir() -> Path:
    """``$CONAN_EMBED_CACHE`` or ``~/.cache/conan-embedding/embeddings``."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    return Path.home() / ".cache" / "conan-embedding" / "embeddings"


def _load_model(
    model: SentenceTransformer | str | os.PathLike[str], model_name: str | None
) -> tuple[SentenceTransformer, str]:
    from sentence_transformers import SentenceTransformer

    if isinstance(model, SentenceTransformer):
        name = model_name or getattr(model.model_card_data, "base_model", None) or "model"
        return model, name
    from conan_embedding.modeling.embedder import load_embedder

    text = str(model)
    name = model_name or (Path(text).name if Path(text).exists() else text)
    return load_embedder(text), name


def _write_json_atomic(path: Path, payload: Any) -> None:
    write_json_atomic(path, payload, default=str)


def write_task_result(task_result: mteb.TaskResult, folder: Path) -> Path:
    """Write one TaskResult exactly as mteb does (``TaskResult.to_disk``), via a temp file."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{task_result.task_name}.json"
    with atomic_path(final, suffix=".tmp") as tmp:
        task_result.to_disk(tmp)
    return final


def _task_facts(item: SelectedTask, task: mteb.AbsTask) -> dict[str, Any]:
    """What ``run_info.json`` says about a task besides its score (source, caps, subsets)."""
    if not isinstance(task, LocalDataTask):
        return {
            "source": "mteb",
            "comparable_to_mteb": True,
            "note": "",
            "corpus_sizes": {},
            "corpus_capped": False,
            "pairs_capped": False,
            "hf_subsets": list(task.hf_subsets),
            "eval_splits": list(task.eval_splits),
        }
    return {
        "source": "local",
        "comparable_to_mteb": TASKS[item.name].comparable
        and not task.corpus_capped
        and not task.pairs_capped,
        "note": task.note,
        "corpus_sizes": task.corpus_sizes,
        "corpus_capped": task.corpus_capped,
        "pairs_capped": task.pairs_capped,
    }


def evaluate(
    model: SentenceTransformer | str | os.PathLike[str],
    tasks: str | list[str] | tuple[str, ...] | None,
    *,
    benchmark: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    max_corpus: int | None = None,
    max_pairs: int | None = None,
    cache_dir: str | os.PathLike[str] | bool | None = None,
    batch_size: int = 64,
    show_progress: bool = True,
    model_name: str | None = None,
    symmetric_prompt: str | None = "query",
    num_threads: int | None = None,
    device: str | None = "auto",
    prompt_map: dict[str, str] | None = None,
) -> dict[str, float]:
    """Main score of each task as mteb reports it (a fraction: 0.8203 for 82.03).

    ``tasks`` are task or suite names (``mini-mteb``, ``mini-cmteb``, ``cross-lingual``,
    ``all``, ``sts``): a local name runs on local data; any other mteb task name runs mteb's
    task on its own data (downloaded by mteb when online). ``benchmark`` adds an mteb
    benchmark's tasks (``"MTEB(cmn, v1)"``) with the subsets and splits mteb gives. Names and
    data are checked before the model loads (:mod:`conan_embedding.evaluation.selection`):
    an unknown name, or an mteb task whose data is not cached on an offline machine, fails
    before anything is written. ``max_corpus`` caps retrieval corpora (relevant documents always kept;
    recorded in ``run_info.json``); ``max_pairs`` samples STS test sets longer than that (a
    seeded sample: an estimate, marked not comparable). ``cache_dir``: ``None`` uses :func:`default_cache_dir`,
    ``False`` disables the embedding cache. ``symmetric_prompt`` is the model prompt used
    where mteb asks for none (e5's ``query: `` on both sides of STS). ``num_threads`` sets
    ``torch.set_num_threads`` for the process (on an oversubscribed CPU one thread encoded
    twice as fast as two here, as OpenMP threads spin waiting for each other). ``device``:
    where the encoder runs (``"auto"``: this rank's GPU when CUDA is available, else the CPU).
    ``max_corpus`` and ``max_pairs`` apply to local tasks only. ``prompt_map``: an mteb task
    name or type -> the model prompt of its queries (and both sides of symmetric tasks), e.g.
    ``{"STS": "nli"}`` for a model trained with an instructed task ``nli``
    (:class:`~conan_embedding.evaluation.encoder.CachedEncoder`).
    """
    selected = select_tasks(tasks, benchmark)
    check_datasets_available(selected)
    if (max_corpus or max_pairs) and any(item.source == "mteb" for item in selected):
        logger.warning("--max-corpus / max_pairs apply to local tasks only; mteb tasks run whole")
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    st_model, name = _load_model(model, model_name)
    if cache_dir is None or cache_dir is True:
        cache_root: Path | None = default_cache_dir()
    elif cache_dir is False:
        cache_root = None
    else:
        cache_root = Path(cache_dir)
    encoder = CachedEncoder(
        st_model,
        name=name,
        cache_dir=cache_root,
        symmetric_prompt=symmetric_prompt,
        show_progress=show_progress,
        device=device,
        prompt_map=prompt_map,
    )
    meta = encoder.mteb_model_meta
    folder = (
        Path(output_dir) / meta.model_name_as_path() / str(meta.revision) if output_dir else None
    )

    scores: dict[str, float] = {}
    task_info: dict[str, Any] = {}
    for item in progress(
        selected, desc=f"evaluating {name}", disable=not show_progress or len(selected) < 2
    ):
        task_name = item.name
        task = item.build(data_dir=data_dir, max_corpus=max_corpus, max_pairs=max_pairs)
        dataset = dict(task.metadata.dataset)
        encoded_before, started = encoder.encoded_texts, time.perf_counter()
        load_mteb_data(item)
        hits_before = encoder.cache.hits if encoder.cache else 0
        result = mteb.evaluate(
            encoder,
            task,
            cache=None,
            overwrite_strategy="always",
            co2_tracker=False,
            encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress},
            show_progress_bar=False,
        )
        task_result = result.task_results[0]
        scores[task_name] = float(task_result.get_score())
        task_info[task_name] = {
            "main_score": scores[task_name],
            "main_metric": task.metadata.main_score,
            **_task_facts(item, task),
            "texts_encoded": encoder.encoded_texts - encoded_before,
            "cache_hits": (encoder.cache.hits if encoder.cache else 0) - hits_before,
            "seconds": round(time.perf_counter() - started, 2),
            "dataset": dataset,
        }
        if folder is not None:
            write_task_result(task_result, folder)
        logger.info("%s %s = %.4f", name, task_name, scores[task_name])

    if folder is not None:
        _write_json_atomic(folder / "model_meta.json", meta.to_dict())
        info_path = folder / RUN_INFO_FILE
        previous = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
        _write_json_atomic(
            info_path,
            {
                "model_name": name,
                "revision": meta.revision,
                "fingerprint": encoder.fingerprint,
                "mteb_version": mteb.__version__,
                "max_corpus": max_corpus,
                "max_pairs": max_pairs,
                "symmetric_prompt": encoder.model_prompts.get(symmetric_prompt or ""),
                "prompts": encoder.model_prompts,
                "prompt_map": encoder.prompt_map,
                "machine": {**machine(), "loadavg_at_end": loadavg()},
                "tasks": {**previous.get("tasks", {}), **task_info},
            },
        )
    return scores
