"""One arm of the v1 recipe ablation, the base model, truncated dimensions, the whole ablation.

Why: the papers' claim is that Conan's training (CBB, DHNM, MRL, CLR data) beats a plain
multi-task fine-tune; showing it needs the same data, steps and evaluation for every arm.

How: :func:`run_arm` trains one config with one seed (:class:`CBBTrainer` on virtual devices
when the config has a ``cbb`` section, else :class:`Trainer`), evaluates the saved model with
:func:`~conan_embedding.evaluation.run.evaluate` and writes
``bench/results/recipe/<arm>-s<seed>.json`` through the shared runner
(:mod:`conan_embedding.experiments.runner`) with the scores, the examples each task saw, the
wall times and the machine's load; :func:`evaluate_base` does the same for the untrained
model (arm ``base``), :func:`evaluate_dims` re-scores a finished arm with its embeddings cut
short, and :func:`run_ablation` runs them all and regenerates the results page.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conan_embedding.experiments import runner
from conan_embedding.experiments.recipe_v1.arms import (
    ABLATION_ARMS,
    DEFAULT_MODEL_DIR,
    DEFAULT_RESULTS_DIR,
    DEFAULT_RESULTS_PAGE,
    DEFAULT_WORK_DIR,
    DIM_TASKS,
    EVAL_MAX_SEQ_LENGTH,
    EVAL_TASKS,
    resolve_arm,
)
from conan_embedding.experiments.recipe_v1.inputs import (
    check_recipe_inputs,
    prepare_command,
    prepare_recipe_inputs,
)
from conan_embedding.experiments.recipe_v1.report import backfill_negative_stats, write_results
from conan_embedding.experiments.runner import Arm, read_result, write_result
from conan_embedding.training.checkpoint import discard_checkpoints

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from conan_embedding.config import TrainConfig

__all__ = [
    "EvalSettings",
    "evaluate_base",
    "evaluate_dims",
    "run_ablation",
    "run_arm",
]


@dataclass(frozen=True)
class EvalSettings:
    """How every arm is evaluated and where its result goes: the same for all arms."""

    results_dir: str | os.PathLike[str] = DEFAULT_RESULTS_DIR
    data_dir: str | os.PathLike[str] | None = None
    """The public data folder (``../shared/data`` when None)."""
    max_seq_length: int = EVAL_MAX_SEQ_LENGTH
    show_progress: bool = True
    mixed_precision: str = "no"
    """Autocast precision of the encode (``no`` | ``bf16`` | ``fp16``); an arm run with
    ``mixed_precision`` trains and evaluates in it, and its JSON records it."""


def _eval_model(model_dir: Path, max_seq_length: int) -> SentenceTransformer:
    from conan_embedding.modeling.embedder import load_embedder

    model = load_embedder(model_dir)
    positions = getattr(model[0].auto_model.config, "max_position_embeddings", max_seq_length)
    model.max_seq_length = min(max_seq_length, positions)
    return model


def _scorer(
    eval_tasks: Sequence[str],
    output_dir: Path,
    name: str,
    settings: EvalSettings,
    prompt_map: dict[str, str] | None = None,
) -> Any:
    """The runner's ``evaluate``: the model at the evaluation length, under the arm's autocast,
    with the arm's ``eval_prompts`` (instructions it trained with), scores in points."""

    def score(model_dir: Path) -> dict[str, Any]:
        from conan_embedding.evaluation.run import evaluate
        from conan_embedding.runtime import autocast_for

        model = _eval_model(model_dir, settings.max_seq_length)
        with autocast_for(model.device, settings.mixed_precision):
            scores = evaluate(
                model,
                list(eval_tasks),
                output_dir=output_dir,
                data_dir=settings.data_dir,
                model_name=name,
                show_progress=settings.show_progress,
                prompt_map=prompt_map or None,
            )
        return {
            "eval_max_seq_length": model.max_seq_length,
            "eval_mixed_precision": settings.mixed_precision,
            **({"eval_prompts": prompt_map} if prompt_map else {}),
            "scores": {task: round(100 * value, 4) for task, value in scores.items()},
        }

    return score


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_arm(
    arm_config_path: str | os.PathLike[str],
    seed: int = 42,
    work_dir: str | os.PathLike[str] = DEFAULT_WORK_DIR,
    steps: int | None = None,
    threads: int | None = None,
    eval_tasks: Sequence[str] = EVAL_TASKS,
    force: bool = False,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    settings: EvalSettings = EvalSettings(),
    overrides: dict[str, Any] | None = None,
    tag: str | None = None,
) -> dict[str, Any]:
    """Train one arm with one seed, evaluate it, write ``<results_dir>/<arm>-s<seed>.json``.

    ``settings.mixed_precision`` other than ``no`` trains in it too (``engine.mixed_precision``):
    bf16 is 1.5x faster per step on an AVX512-BF16 CPU; compare arms run in the same precision.

    Returns the existing JSON unchanged when it is there and ``force`` is False. ``overrides``
    are extra dotted config keys (tests shrink the model's Matryoshka dims with it). ``tag``
    renames the arm to ``<arm>-<tag>`` (result file, run folder and report row), so a variant
    such as ``--steps 620 --tag 620`` sits beside the plain arm instead of replacing it.
    """
    from conan_embedding.config import load_config

    arm, config_path = resolve_arm(str(arm_config_path))
    if tag:
        arm = f"{arm}-{tag}"
    result_path = Path(settings.results_dir) / f"{arm}-s{seed}.json"
    if not force:
        saved = read_result(result_path)
        if saved is not None:
            return saved
    _set_threads(threads)
    work = Path(work_dir)
    output_dir = work / "arms" / f"{arm}-s{seed}"
    values: dict[str, Any] = {
        "seed": seed,
        "output_dir": str(output_dir),
        "data_dir": str((work / "data").resolve()),
        "model.name": str(model_dir or DEFAULT_MODEL_DIR),
        **(overrides or {}),
    }
    if settings.mixed_precision != "no":
        values["engine.mixed_precision"] = settings.mixed_precision
    if steps is not None:
        values["optim.max_steps"] = steps
    config = load_config(config_path, values)
    check_recipe_inputs(config, work_dir)

    trained: list[Path] = []  # the saved model's folder, for its card

    def train() -> tuple[Path, dict[str, Any]]:
        from conan_embedding.training.cbb import CBBTrainer
        from conan_embedding.training.logs import examples_seen, negative_stats
        from conan_embedding.training.trainer import Trainer

        trainer = CBBTrainer(config) if config.cbb is not None else Trainer(config)
        result = trainer.train(show_progress=settings.show_progress)
        log_path = output_dir / "train_log.jsonl"
        facts = {
            "steps": result.steps,
            "final_loss": round(result.final_loss, 6),
            "trainer": type(trainer).__name__,
            "mixed_precision": trainer.engine.mixed_precision,
            "examples_seen": examples_seen(config, log_path),
            "output_dir": str(output_dir),
            "data_dir": values["data_dir"],
            "negatives": negative_stats(config, log_path),
        }
        del trainer
        # checkpoints only serve --resume, which an arm run never uses; each is ~0.6 GB for me5
        discard_checkpoints(output_dir)
        trained.append(Path(result.model_dir))
        return trained[0], facts

    name = f"{arm}-s{seed}"
    record = runner.run_arm(
        Arm(
            name=name,
            train=train,
            evaluate=_scorer(
                eval_tasks, output_dir / "eval", name, settings, dict(config.eval_prompts)
            ),
            record={"arm": arm, "seed": seed, "config": str(config_path)},
            result_path=result_path,
        ),
        force=True,  # the existing result was checked above, before any config was read
    )
    _write_arm_card(config, trained[0], name, record["scores"])
    return record


def _write_arm_card(
    config: TrainConfig, model_dir: Path, name: str, scores: dict[str, float]
) -> None:
    """The arm's model card, now with its evaluation table (scores in points)."""
    from conan_embedding.reporting.card import (
        card_info_from_config,
        task_rows_in_files,
        write_model_card,
    )

    info = card_info_from_config(config, task_rows_in_files(config), title=name)
    write_model_card(model_dir, info, scores)


def evaluate_base(
    work_dir: str | os.PathLike[str] = DEFAULT_WORK_DIR,
    threads: int | None = None,
    eval_tasks: Sequence[str] = EVAL_TASKS,
    force: bool = False,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    settings: EvalSettings = EvalSettings(),
) -> dict[str, Any]:
    """The untrained base model as arm ``base`` (``<results_dir>/base.json``)."""
    result_path = Path(settings.results_dir) / "base.json"
    if not force:
        saved = read_result(result_path)
        if saved is not None:
            return saved
    _set_threads(threads)
    check_recipe_inputs(None, work_dir, model_dir or DEFAULT_MODEL_DIR)
    score = _scorer(eval_tasks, Path(work_dir) / "arms" / "base" / "eval", "base", settings)

    def untrained(model: Path) -> dict[str, Any]:
        return {"steps": 0, "train_seconds": 0.0, "examples_seen": {}, **score(model)}

    return runner.run_arm(
        Arm(
            name="base",
            evaluate=untrained,
            model=Path(model_dir or DEFAULT_MODEL_DIR),
            record={"arm": "base", "seed": None, "config": None},
            result_path=result_path,
        ),
        force=True,
    )


def evaluate_dims(
    result_name: str,
    dims: Sequence[int],
    work_dir: str | os.PathLike[str] = DEFAULT_WORK_DIR,
    threads: int | None = None,
    eval_tasks: Sequence[str] = DIM_TASKS,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    settings: EvalSettings = EvalSettings(),
) -> dict[str, Any]:
    """Re-evaluate a finished arm with its embeddings cut to each of ``dims`` (Matryoshka).

    What MRL buys is quality at the *shorter* dimensions, which the full-width table cannot
    show; this stores ``scores_by_dim[str(dim)]`` in ``<results_dir>/<result_name>.json``
    (e.g. ``full-s42`` or ``base``), skipping dimensions already there.
    """
    from conan_embedding.evaluation.run import evaluate

    result_path = Path(settings.results_dir) / f"{result_name}.json"
    record = read_result(result_path)
    if record is None:
        raise FileNotFoundError(f"{result_path}: no such result; run the arm first")
    if model_dir is None:
        arm_dir = Path(record.get("output_dir") or Path(work_dir) / "arms" / result_name)
        model_dir = DEFAULT_MODEL_DIR if record.get("arm") == "base" else arm_dir / "model"
    if not (Path(model_dir) / "modules.json").is_file():
        from conan_embedding.modeling.embedder import missing_path_message

        made_by = (
            prepare_command(work_dir)
            if record.get("arm") == "base"
            else f"conan-embed recipe run {record.get('arm')} --seed {record.get('seed')}"
        )
        raise FileNotFoundError(missing_path_message(model_dir, "model folder", made_by))
    _set_threads(threads)
    by_dim = record.setdefault("scores_by_dim", {})
    todo = [dim for dim in dims if not set(eval_tasks) <= set(by_dim.get(str(dim), {}))]
    if not todo:
        return record
    model = _eval_model(Path(model_dir), settings.max_seq_length)
    width = model.get_sentence_embedding_dimension()
    for dim in todo:  # every width is checked before any is evaluated
        if width is not None and not 0 < dim <= width:
            raise ValueError(f"dimension {dim} is outside 1..{width} for {model_dir}")
    for dim in todo:
        model.truncate_dim = dim
        scores = evaluate(
            model,
            list(eval_tasks),
            output_dir=Path(work_dir) / "arms" / result_name / f"eval-dim{dim}",
            data_dir=settings.data_dir,
            model_name=f"{result_name}-dim{dim}",
            show_progress=settings.show_progress,
        )
        by_dim[str(dim)] = {task: round(100 * value, 4) for task, value in scores.items()}
        write_result(result_path, record)
    return record


def run_ablation(
    arms: Sequence[str] = ABLATION_ARMS,
    seeds: Sequence[int] = (42,),
    work_dir: str | os.PathLike[str] = DEFAULT_WORK_DIR,
    steps: int | None = None,
    threads: int | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    model_dir: str | os.PathLike[str] | None = None,
    results_dir: str | os.PathLike[str] = DEFAULT_RESULTS_DIR,
    out: str | os.PathLike[str] = DEFAULT_RESULTS_PAGE,
    force: bool = False,
    tag: str | None = None,
    mixed_precision: str = "no",
) -> Path:
    """Prepare, evaluate the base, run every arm x seed (skipping finished ones), write the page.

    ``tag`` names every run ``<arm>-<tag>`` (e.g. ``steps=620, tag="620"``), see :func:`run_arm`.
    """
    inputs = prepare_recipe_inputs(work_dir, data_dir, model_dir)
    settings = EvalSettings(
        results_dir=results_dir, data_dir=data_dir, mixed_precision=mixed_precision
    )
    evaluate_base(work_dir, threads, force=force, model_dir=inputs.model_dir, settings=settings)
    for arm in arms:
        for seed in seeds:
            run_arm(arm, seed, work_dir, steps, threads, force=force, tag=tag,
                    model_dir=inputs.model_dir, settings=settings)  # fmt: skip
    backfill_negative_stats(results_dir)
    return write_results(results_dir, out)
