"""The main job: prepare real data, fine-tune with the Conan-v1 recipe, report before/after.

``conan-embed demo`` runs the whole v1 supervised path on a CPU in minutes: it converts the
public training files of ``../shared/data`` into our JSONL schemas, evaluates the base model
on the STSBenchmark test set, trains with the embedded recipe (``recipes/minilm-v1.yaml``:
CoSENT on STS-B train, InfoNCE with hard negatives on SciFact train, classification as
retrieval on Banking77, Matryoshka dims), evaluates again and prints both scores.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conan_embedding.config import load_config
from conan_embedding.reporting.card import readme_for


@dataclass
class DemoResult:
    """Scores of the base and the fine-tuned model per task, where the model went, train time."""

    before: dict[str, float]
    after: dict[str, float]
    model_dir: Path
    seconds: float


DEFAULT_RECIPE = "minilm-v1"


def run_demo(
    output_dir: str | os.PathLike[str] = "runs/demo",
    config_path: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    max_steps: int | None = None,
    eval_tasks: tuple[str, ...] = ("STSBenchmark",),
    show_progress: bool = True,
) -> DemoResult:
    """Prepare the data, score the base model, fine-tune with the recipe, score it again."""
    from conan_embedding.data.prepare import prepare
    from conan_embedding.evaluation.run import evaluate
    from conan_embedding.training.trainer import Trainer

    # mteb flags the v1 STSBenchmark as superseded: v1 is the split the leaderboard reports
    warnings.filterwarnings("ignore", message=".*superseded.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("mteb").setLevel(logging.ERROR)
    out = Path(output_dir)
    prepared = out / "data"
    prepare(prepared, data_dir=data_dir)
    overrides: dict[str, Any] = {"output_dir": str(out / "train"), "data_dir": str(prepared)}
    if max_steps is not None:
        overrides["optim.max_steps"] = max_steps
    config = load_config(config_path or DEFAULT_RECIPE, overrides)
    trainer = Trainer(config, readme=readme_for(config))
    before = evaluate(
        trainer.model,
        list(eval_tasks),
        data_dir=data_dir,
        output_dir=out / "eval-before",
        show_progress=show_progress,
        model_name="base",
    )
    result = trainer.train(show_progress=show_progress)
    after = evaluate(
        result.model_dir,
        list(eval_tasks),
        data_dir=data_dir,
        output_dir=out / "eval-after",
        show_progress=show_progress,
        model_name="conan-v1-finetuned",
    )
    return DemoResult(before, after, result.model_dir, result.seconds)
