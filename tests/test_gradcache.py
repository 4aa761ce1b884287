"""GradCache for every task of the plain trainer (``tasks[].mini_batch_size``): the two passes
give the gradients of the whole batch encoded with its graphs, with dropout on, in one
process and on two gloo processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tests.test_distributed import (
    _grads,
    free_port,
    join_as_rank,
    tiny_bert_without_dropout,
)

from conan_embedding.config import TrainConfig, load_config
from conan_embedding.toy import toy_train_config
from conan_embedding.training.gradcache import MiniBatchCache
from conan_embedding.training.trainer import Trainer, read_log

TOL = 1e-5


@pytest.fixture(scope="module")
def dropout_bert(tmp_path_factory) -> Path:
    """The tiny BERT with dropout 0.2 (both rates): a replay must draw the same masks."""
    return tiny_bert_without_dropout(tmp_path_factory.mktemp("bert-dropout"), dropout=0.2)


@pytest.fixture(scope="module")
def plain_bert(tmp_path_factory) -> Path:
    return tiny_bert_without_dropout(tmp_path_factory.mktemp("bert-plain"), dropout=0.0)


def _config(folder: Path, model: Path, task: str, steps: int = 3, **options: Any) -> dict:
    """The toy config with one task (``ret``, ``sts`` or ``cls``), ``options`` on the task."""
    config = toy_train_config(folder, model, steps, tasks=(task,))
    config["tasks"][0].update(options)
    return config


def _step_grads(
    config: dict, *, two_pass: bool = True, observed: list | None = None
) -> tuple[float, dict[str, torch.Tensor]]:
    trainer = Trainer(TrainConfig.model_validate(config))
    trainer.grad_cache_two_pass = two_pass
    if observed is not None:
        for provider in trainer.providers.values():
            provider.observe = lambda *args, **kwargs: observed.append(args)  # type: ignore[method-assign]
    trainer.model.train()
    with trainer.engine.autocast():
        loss = trainer.step(0)["loss"]
    grads = _grads(trainer.model)
    trainer.engine.release()
    return loss, grads


def _assert_same(a: tuple[float, dict], b: tuple[float, dict], tol: float = TOL) -> None:
    assert a[0] == pytest.approx(b[0], abs=tol)
    assert a[1].keys() == b[1].keys()
    for name, grad in a[1].items():
        torch.testing.assert_close(grad, b[1][name], atol=tol, rtol=0, msg=name)
    assert any(bool(g.abs().sum() > 0) for g in a[1].values())


CASES = {
    # hard negatives, Matryoshka dims 8 and 24 (the toy config's), in-batch negatives
    "retrieval": ("ret", {}),
    "retrieval-false-negatives": (
        "ret",
        {"false_negative_margin": 0.1, "query_negatives": True, "passage_negatives": True},
    ),
    "sts": ("sts", {}),
    "classification": ("cls", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_passes_equal_the_whole_batch_with_dropout(tmp_path, dropout_bert, case):
    """Mini-batches of 3 (ragged: a batch of 4 queries is 3 + 1, its 12 documents 4 x 3):
    GradCache's loss and gradients equal the same mini-batches encoded with their graphs at
    once (the same dropout draws), and DHNM's provider observes the same scores."""
    task, options = CASES[case]
    config = _config(tmp_path, dropout_bert, task, mini_batch_size=3, **options)
    seen: list = []
    cached = _step_grads(config, observed=seen)
    reference: list = []
    _assert_same(cached, _step_grads(config, two_pass=False, observed=reference))
    assert len(seen) == len(reference) == (1 if task == "ret" else 0)
    for got, want in zip(seen, reference, strict=True):
        torch.testing.assert_close(got[2], want[2], atol=TOL, rtol=0)  # the scores
        torch.testing.assert_close(got[3], want[3], atol=TOL, rtol=0)  # the queries


@pytest.mark.parametrize("case", ["retrieval", "sts"])
def test_one_mini_batch_is_the_plain_step_with_dropout(tmp_path, dropout_bert, case):
    """A mini-batch as large as the batch draws the plain step's dropout masks: GradCache
    (loss on cached embeddings, replayed backward) gives the plain step's gradients."""
    task, options = CASES[case]
    plain = _step_grads(_config(tmp_path, dropout_bert, task, **options))
    _assert_same(_step_grads(_config(tmp_path, dropout_bert, task, mini_batch_size=64)), plain)


@pytest.mark.parametrize("case", list(CASES))
def test_mini_batches_equal_the_plain_step_without_dropout(tmp_path, plain_bert, case):
    """Without dropout the mini-batches' numbers are the whole batch's (padding aside)."""
    task, options = CASES[case]
    plain = _step_grads(_config(tmp_path, plain_bert, task, **options))
    _assert_same(
        _step_grads(_config(tmp_path, plain_bert, task, mini_batch_size=2, **options)), plain
    )


def test_bf16_autocast_two_passes_are_as_close_as_one(tmp_path, dropout_bert):
    """Under bf16 autocast the loss is one pass's; the gradients differ by bf16 rounding only
    (one pass sums the mini-batches' weight gradients in autocast's bf16 copy of a weight,
    the replays each add theirs to the float32 ``.grad``): GradCache's are as close to the
    float32 step's as one pass's are."""
    config = _config(tmp_path, dropout_bert, "ret", mini_batch_size=3)
    _, exact = _step_grads(config)
    config["engine"] = {"mixed_precision": "bf16", "device": "cpu"}
    (loss, cached), (want_loss, want) = _step_grads(config), _step_grads(config, two_pass=False)
    assert loss == pytest.approx(want_loss, abs=TOL)

    def error(grads: dict[str, torch.Tensor]) -> float:
        return sum(float((grads[n] - g).norm()) for n, g in exact.items()) / sum(
            float(g.norm()) for g in exact.values()
        )

    assert error(cached) < 1.5 * error(want) + 1e-3 and error(cached) < 0.05


def test_a_run_with_mini_batches_logs_the_same_losses(tmp_path, plain_bert):
    """Four steps of the three toy tasks (Matryoshka, negatives, CoSENT, labels)."""
    losses = []
    for name, mini in (("plain", None), ("cached", 2)):
        config = toy_train_config(tmp_path / name, plain_bert, steps=4)
        for task in config["tasks"]:
            task["mini_batch_size"] = mini
        result = Trainer(TrainConfig.model_validate(config)).train(show_progress=False)
        losses.append([r["loss"] for r in read_log(result.output_dir / "train_log.jsonl")])
    assert len(losses[0]) == 4
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)


def test_replays_skip_the_all_reduce_but_the_last(tmp_path, dropout_bert):
    """Every replay but the last runs inside ``no_sync``; the last in the caller's context."""
    entered: list[int] = []
    cache = MiniBatchCache(2, torch.device("cpu"))
    weight = torch.nn.Parameter(torch.ones(3))
    out = cache.encode(["a", "b", "c", "d", "e"], lambda texts, count: weight * len(texts))
    assert out.shape == (9,) and not out.is_leaf  # three mini-batches: 2, 2, 1
    out.sum().backward()

    class Recorder:
        def __enter__(self) -> None:
            entered.append(len(entered))

        def __exit__(self, *exc: object) -> None:
            return None

    cache.backward(Recorder)
    assert entered == [0, 1] and cache.pending == []
    torch.testing.assert_close(weight.grad, torch.full((3,), 5.0))


def test_cbb_refuses_mini_batches(tmp_path, tiny_bert):
    from conan_embedding.toy import toy_cbb_config

    config = toy_cbb_config(tmp_path, tiny_bert)
    config["tasks"][0]["mini_batch_size"] = 4
    with pytest.raises(ValueError, match="cbb.grad_cache"):
        TrainConfig.model_validate(config)


# --------------------------------------------------------------------------- two processes
def _rank(rank: int, world: int, port: int, config_path: str, out: str) -> None:
    join_as_rank(rank, world, port)
    import torch.distributed as dist

    try:
        trainer = Trainer(load_config(config_path))
        assert trainer.engine.world_size == world
        trainer.model.train()
        record = trainer.step(0)
        tensors = _grads(trainer.model)
        tensors["__total__"] = torch.tensor([record["loss"]], dtype=torch.float64)
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/rank{rank}.safetensors")
        trainer.engine.release()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process_with_dropout(tmp_path):
    """Retrieval with gathered candidates (query_offset), false-negative control and
    Matryoshka, in mini-batches of 3: rank r's shard under its own seed, its mini-batches
    replayed under their RNG states; DDP reduces once. One process with 2 shards agrees."""
    import torch.multiprocessing as mp

    model = tiny_bert_without_dropout(tmp_path / "bert", dropout=0.2)
    config = _config(
        tmp_path, model, "ret", mini_batch_size=3, batch_size=8, false_negative_margin=0.1
    )
    config["engine"] = {"shards": 2}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    mp.spawn(_rank, args=(2, free_port(), str(path), str(tmp_path)), nprocs=2, join=True)
    total, expected = _step_grads(config)
    for rank in range(2):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        assert float(got.pop("__total__")) == pytest.approx(total, abs=TOL)
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, atol=TOL, rtol=0, msg=f"{rank}:{name}")
