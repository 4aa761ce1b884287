"""The scores of ``validation.tasks`` during training: the function the trainer takes.

Why here: training must not import evaluation (docs/architecture.md), so the layer above
builds the function and hands it to :class:`~conan_embedding.training.trainer.Trainer` as
``validate`` (``cli/train.py`` does). It scores the model in memory with :func:`evaluate`,
the same code path as ``conan-embed eval``, on a small suite: STS tasks on a seeded sample of
``max_pairs`` pairs, retrieval corpora capped at ``max_corpus``, no embedding cache (the
weights change between calls), nothing written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from conan_embedding.config import ValidationConfig
from conan_embedding.evaluation.selection import select_tasks

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from conan_embedding.training.validation import Validate


def task_validator(config: ValidationConfig) -> Validate | None:
    """``model -> {task name: mteb main score}`` for ``config.tasks`` (None when it names
    none). Names are checked now, before training starts."""
    if not config.tasks:
        return None
    # an unknown name fails before the first step; a task's numbers are logged under the
    # name the config gives it (val/<name>), whatever case mteb's registry spells it in
    given = {}
    for name in config.tasks:
        selected = select_tasks([name], None)
        if len(selected) == 1:
            given[selected[0].name] = name

    def validate(model: SentenceTransformer) -> dict[str, float]:
        from conan_embedding.evaluation.run import evaluate

        scores = evaluate(
            model,
            list(config.tasks),
            data_dir=config.data_dir,
            max_corpus=config.max_corpus,
            max_pairs=config.max_pairs,
            cache_dir=False,
            batch_size=config.batch_size,
            show_progress=False,
            model_name="validation",
            device=str(model.device),
        )
        return {given.get(name, name): value for name, value in scores.items()}

    return validate
