"""Per-task gradient balance (``cbb.grad_balance: norm``): the balanced gradient is
``M * sum_t w_t g_t / ||g_t||`` of the tasks' own gradients, on a toy module and in a CBB step
on virtual devices; real devices are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conan_embedding.config import TrainConfig
from conan_embedding.toy import build_tiny_bert, toy_cbb_config
from conan_embedding.training.cbb import CBBTrainer, check_cbb_supported
from conan_embedding.training.grad_balance import TaskGradientBalance


def _losses(model: torch.nn.Linear, x: torch.Tensor) -> list[torch.Tensor]:
    """Three losses of very different gradient sizes."""
    out = model(x)
    return [100.0 * out.pow(2).mean(), out[:, 0].sum() * 0.01, out.abs().mean()]


def _own_gradients(model: torch.nn.Linear, x: torch.Tensor, weights: list[float]):
    grads = []
    for weight, loss in zip(weights, _losses(model, x), strict=True):
        parts = torch.autograd.grad(weight * loss, list(model.parameters()), retain_graph=True)
        grads.append(torch.cat([p.flatten() for p in parts]))
    return grads


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_balance_gives_each_task_its_weight_times_the_mean_norm(alpha):
    """alpha 1: every part has norm w_t * M; 0.5: the geometric mean of that and its own
    norm; 0: the plain sum."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(5, 3), torch.randn(8, 5)
    weights = [1.0, 0.8, 0.0]  # a zero-weight task adds nothing and is left out of M
    own = _own_gradients(model, x, weights)
    norms = [float(g.norm()) for g in own]
    mean = (norms[0] + norms[1]) / 2
    expected = sum(own[t] * (weights[t] * mean / norms[t]) ** alpha for t in (0, 1))
    if alpha == 0.0:
        torch.testing.assert_close(expected, own[0] + own[1])

    carried = [torch.full_like(p, 0.5) for p in model.parameters()]
    for p, c in zip(model.parameters(), carried, strict=True):
        p.grad = c.clone()
    balance = TaskGradientBalance(model.parameters(), alpha=alpha)
    balance.start()
    for index, weight in enumerate(weights):
        (weight * _losses(model, x)[index]).backward()
        assert balance.add(f"t{index}", weight) == pytest.approx(norms[index], rel=1e-6)
    logged = balance.finish()

    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(got, expected + 0.5, rtol=1e-5, atol=1e-6)
    assert logged == pytest.approx({"t0": norms[0], "t1": norms[1], "t2": 0.0}, rel=1e-6)
    assert norms[0] / norms[1] > 100  # fully balanced, the big task no longer drowns the small
    with pytest.raises(ValueError, match="added twice"):
        balance.start()
        balance.add("a", 1.0)
        balance.add("a", 1.0)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("bert-balance"), dropout=0.0)


def _trainer(tmp_path: Path, bert: Path, balance: str) -> CBBTrainer:
    raw = toy_cbb_config(tmp_path / balance, bert, steps=1, grad_balance=balance, grad_cache=True)
    return CBBTrainer(TrainConfig.model_validate(raw))


def _flat_grad(trainer: CBBTrainer) -> torch.Tensor:
    params = [p for p in trainer.forward_model.parameters() if p.requires_grad]
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
    )


def test_cbb_step_with_balance_equals_the_formula_on_each_tasks_own_gradient(tmp_path, bert):
    """Each task's own gradient comes from the plain CBB step with the other tasks weighted 0
    (the same rows, negatives and seeds); the balanced step must be their normalised sum."""
    plain = _trainer(tmp_path, bert, "none")
    plain.model.train()
    streams = {n: s.state_dict() for n, s in plain.streams.items()}
    weights = {n: t.weight for n, t in plain.tasks.items()}
    own: dict[str, torch.Tensor] = {}
    for only in weights:
        for name, task in plain.tasks.items():
            task.weight = weights[name] if name == only else 0.0
            plain.streams[name].load_state_dict(streams[name])
        plain.forward_model.zero_grad(set_to_none=True)
        plain.step(0)
        own[only] = _flat_grad(plain).clone()
    for name, task in plain.tasks.items():
        task.weight = weights[name]
    step_weight = {n: plain.task_weight(t) for n, t in plain.tasks.items()}
    norms = {n: float(g.norm()) for n, g in own.items()}
    assert all(n > 0 for n in norms.values())
    mean = sum(norms.values()) / len(norms)
    expected = mean * sum(step_weight[n] * own[n] / norms[n] for n in own)

    balanced = _trainer(tmp_path, bert, "norm")
    balanced.model.train()
    record = balanced.step(0)
    torch.testing.assert_close(_flat_grad(balanced), expected, rtol=1e-4, atol=1e-6)
    for name, norm in norms.items():
        assert record[f"grad_norm/{name}"] == pytest.approx(norm, rel=1e-4)
    # the losses are those of the unbalanced step: balance touches gradients only
    plain.streams["ret"].load_state_dict(streams["ret"])
    plain.streams["sts"].load_state_dict(streams["sts"])
    plain.forward_model.zero_grad(set_to_none=True)
    assert plain.step(0)["loss"] == pytest.approx(record["loss"], rel=1e-6)


def test_balanced_cbb_run_trains_and_logs_every_tasks_norm(tmp_path, bert):
    trainer = _trainer(tmp_path, bert, "norm")
    result = trainer.train(show_progress=False)
    rows = [json.loads(line) for line in (result.output_dir / "train_log.jsonl").open()]
    norms = [[row[f"grad_norm/{t}"] for t in ("ret", "sts")] for row in rows if "step" in row]
    assert len(norms) == 1 and all(math.isfinite(n) and n > 0 for n in norms[0])


def test_balance_alpha_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="alpha"):
        TaskGradientBalance(torch.nn.Linear(2, 2).parameters(), alpha=1.5)


def test_balance_is_refused_on_real_devices():
    with pytest.raises(ValueError, match="virtual devices only"):
        check_cbb_supported("MULTI_CPU", None, [1, 1], False, grad_balance="norm")
    check_cbb_supported("NO", None, [2, 1], True, grad_balance="norm")
    check_cbb_supported("MULTI_CPU", None, [1, 1], False, grad_balance="none")
