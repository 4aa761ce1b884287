"""The plain trainer's set-up on two gloo processes: work that is split over ranks."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_distributed import free_port, join_as_rank
from tests.test_trainer import TEACHER_PAIRS, weak_pairs_config


def _teacher_rank(rank: int, world: int, port: int, config: dict, out: str) -> None:
    join_as_rank(rank, world, port)
    import torch.distributed as dist
    from sentence_transformers import SentenceTransformer

    from conan_embedding.config import TrainConfig
    from conan_embedding.training.trainer import Trainer

    encoded: list[int] = []
    real = SentenceTransformer.encode

    def counting(self, sentences, *args, **kwargs):
        encoded.append(len(sentences))
        return real(self, sentences, *args, **kwargs)

    SentenceTransformer.encode = counting
    try:
        trainer = Trainer(TrainConfig.model_validate(config))
        assert trainer.engine.world_size == world
        kept = [r.pos for r in trainer.records["pairs"]]
        report = {"encoded": encoded, "kept": kept, "filter": trainer.filter_report}
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
        trainer.engine.release()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_teacher_filter_splits_the_pairs_over_ranks(tmp_path, tiny_bert):
    """Each of 2 ranks encodes its half (5 queries, 5 positives), not all 10; both keep the
    same 5 pairs as one process does."""
    import torch.multiprocessing as mp

    config = weak_pairs_config(
        tmp_path,
        tiny_bert,
        TEACHER_PAIRS,
        teacher_filter={"model": str(tiny_bert), "threshold": 0.999},
    )
    mp.spawn(_teacher_rank, args=(2, free_port(), config, str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["encoded"] == [5, 5]
        assert report["kept"] == ["cat sat on mat"] * 5
        assert report["filter"] == {"task": "pairs", "kept": 5, "total": 10}
