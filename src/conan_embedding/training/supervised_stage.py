"""Stage 4 of Conan-v2: the supervised multi-task stage of the foundation trainer, run on the
embedder stage 3 exported.

Why: the v2 path ends as v1 does, with retrieval + CLR (InfoNCE, static hard negatives) and
STS (CoSENT), every task in every step (``all_tasks``, the single-process reading of CBB); so
it is v1's :class:`~conan_embedding.training.trainer.Trainer`, given a
:class:`~conan_embedding.config.TrainConfig` made from the stage's few settings
(:class:`~conan_embedding.config.SupervisedStageConfig`) by :func:`supervised_train_config`.
"""

from __future__ import annotations

from pathlib import Path

from conan_embedding.config import (
    ModelConfig,
    SupervisedStageConfig,
    TaskConfig,
    TrainConfig,
)


def supervised_train_config(config: SupervisedStageConfig) -> TrainConfig:
    """The foundation trainer's config of stage 4: tasks ``retrieval`` and ``clr``
    (``negatives`` hard negatives each) and ``sts``, from ``config.records``."""
    records = config.records
    missing = sorted({"retrieval", "clr", "sts"} - set(records))
    if missing:
        raise ValueError(f"stage 4 needs the records {missing} (build_supervised_records)")
    tasks = [
        TaskConfig(
            name=name,
            kind="retrieval",
            path=records[name],
            batch_size=config.batch_size,
            negatives=config.negatives,
            max_rows=config.max_rows,
        )
        for name in ("retrieval", "clr")
    ]
    tasks.append(
        TaskConfig(
            name="sts",
            kind="sts",
            path=records["sts"],
            batch_size=config.sts_batch_size,
            max_rows=config.max_rows,
        )
    )
    return TrainConfig(
        stage="supervised",
        output_dir=config.output_dir,
        seed=config.seed,
        model=ModelConfig(
            name=config.model_dir,
            max_seq_length=config.max_seq_length,
            matryoshka_dims=list(config.matryoshka_dims),
            freeze_word_embeddings=config.freeze_word_embeddings,
            lora=config.lora,
            query_prompt=config.prompt,
            passage_prompt=config.prompt,
        ),
        optim=config.optim,
        engine=config.engine,
        task_schedule="all_tasks",
        tasks=tasks,
        # by default no checkpoint during the run: stage 4 is short and reruns from scratch
        checkpoint_every=config.checkpoint_every,
        keep_checkpoints=config.keep_checkpoints,
    )


def run_supervised_stage(config: SupervisedStageConfig, *, show_progress: bool = True) -> Path:
    """Stage 4 on ``config.model_dir``; returns the folder of the saved model."""
    from conan_embedding.training.trainer import Trainer

    return Trainer(supervised_train_config(config)).train(show_progress=show_progress).model_dir
