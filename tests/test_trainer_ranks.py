"""The plain trainer's set-up on two gloo processes: work that is split over ranks."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

from conan_embedding.data.records import write_records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _teacher_config(folder: Path, model: Path) -> dict:
    pairs = [{"query": "cat sat on mat", "pos": "cat sat on mat"}] * 5 + [
        {"query": "cat sat on mat", "pos": "bank loan fee money"}
    ] * 5
    write_records(folder / "pairs.jsonl", pairs)
    return {
        "stage": "weak",
        "output_dir": str(folder / "run"),
        "model": {"name": str(model)},
        "optim": {"max_steps": 2},
        "teacher_filter": {"model": str(model), "threshold": 0.999},
        "tasks": [
            {"name": "pairs", "kind": "pairs", "path": str(folder / "pairs.jsonl"), "batch_size": 4}
        ],
    }


def _teacher_rank(rank: int, world: int, port: int, config: dict, out: str) -> None:
    os.environ.update(
        {
            "HF_HUB_OFFLINE": "1",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
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

    config = _teacher_config(tmp_path, tiny_bert)
    mp.spawn(_teacher_rank, args=(2, _free_port(), config, str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["encoded"] == [5, 5]
        assert report["kept"] == ["cat sat on mat"] * 5
        assert report["filter"] == {"task": "pairs", "kept": 5, "total": 10}
