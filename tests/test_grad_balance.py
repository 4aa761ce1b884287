"""Per-task gradient balance (``cbb.grad_balance: norm | loss_rate``): the balanced gradient
is ``M * sum_t w_t g_t / ||g_t||`` of the tasks' own gradients (times ``rho_t``, the task's
relative loss rate, with ``loss_rate``), on a toy module and in a CBB step on virtual devices;
real devices are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conan_embedding.config import TrainConfig
from conan_embedding.toy import build_tiny_bert, toy_cbb_config
from conan_embedding.training.cbb import CBBTrainer, check_cbb_supported
from conan_embedding.training.grad_balance import LossRate, TaskGradientBalance


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


def test_loss_rate_divides_the_smoothed_loss_by_the_mean_of_the_first_losses():
    rate = LossRate(warmup=3, smoothing=0.5)
    assert rate.rate("a") == 1.0  # before any loss
    assert rate.update("a", 2.0) == pytest.approx(1.0)  # L(0) 2, EMA 2
    assert rate.update("a", 4.0) == pytest.approx(3.0 / 3.0)  # L(0) 3, EMA 3
    assert rate.update("a", 6.0) == pytest.approx(4.5 / 4.0)  # L(0) 4, EMA 4.5
    assert rate.update("a", 0.5) == pytest.approx(2.5 / 4.0)  # L(0) stays 4 after warmup
    assert rate.update("a", float("nan")) == pytest.approx(2.5 / 4.0)  # a skipped step
    assert rate.update("b", 0.0) == 1.0  # a loss that starts at zero has no rate
    restored = LossRate(warmup=3, smoothing=0.5)
    restored.load_state_dict(json.loads(json.dumps(rate.state_dict())))
    assert restored.update("a", 1.0) == pytest.approx(rate.update("a", 1.0))
    with pytest.raises(ValueError, match="smoothing"):
        LossRate(smoothing=1.0)


@pytest.mark.parametrize(("alpha", "floor"), [(1.0, 0.0), (0.5, 0.0), (1.0, 1.0), (0.5, 1.0)])
def test_loss_rate_balance_gives_each_task_its_weight_times_its_relative_rate(alpha, floor):
    """With warmup 1 and no smoothing ``r_t = L_t / L_t(0)``; each part's target norm is
    ``w_t * rho_t * M`` with ``rho_t = c_t / mean(c)`` over the tasks with a gradient, where
    ``c_t = max(r_t, floor)``: a floor of 1 lifts the task at rate 0.5, not the one at 4."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(5, 3), torch.randn(8, 5)
    weights = [1.0, 0.8, 0.0]
    own = _own_gradients(model, x, weights)
    norms = [float(g.norm()) for g in own]
    losses = [float(loss.detach()) for loss in _losses(model, x)]
    initial = [2.0 * losses[0], 0.25 * losses[1], 1.0]  # task 0 has shed half, task 1 grown
    rates = [losses[t] / initial[t] for t in range(3)]
    counted = [max(rate, floor) for rate in rates]
    mean_rate, mean_norm = (counted[0] + counted[1]) / 2, (norms[0] + norms[1]) / 2
    expected = sum(
        own[t] * (weights[t] * counted[t] / mean_rate * mean_norm / norms[t]) ** alpha
        for t in (0, 1)
    )

    loss_rate = LossRate(warmup=1, smoothing=0.0)
    loss_rate.load_state_dict(
        {
            "initial": {f"t{t}": initial[t] for t in range(3)},
            "seen": {f"t{t}": 1 for t in range(3)},
            "smoothed": {f"t{t}": initial[t] for t in range(3)},
        }
    )
    balance = TaskGradientBalance(
        model.parameters(), alpha=alpha, loss_rate=loss_rate, rate_floor=floor
    )
    balance.start()
    for index, weight in enumerate(weights):
        (weight * _losses(model, x)[index]).backward()
        balance.add(f"t{index}", weight, loss=losses[index])
    balance.finish()

    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert balance.rates == pytest.approx({f"t{t}": rates[t] for t in range(3)})
    # the task with 8x the other's rate gets 8x its weighted share at alpha 1
    assert rates[1] / rates[0] == pytest.approx(8.0)
    with pytest.raises(ValueError, match="loss value"):
        balance.start()
        balance.add("t0", 1.0)


def test_a_rate_floor_needs_the_loss_rate_balance(tmp_path):
    with pytest.raises(ValueError, match="needs a loss rate"):
        TaskGradientBalance(torch.nn.Linear(2, 2).parameters(), rate_floor=0.3)
    config = toy_cbb_config(tmp_path, tmp_path / "model", grad_balance="norm")
    config["cbb"]["grad_balance_rate_floor"] = 0.3
    with pytest.raises(ValueError, match="grad_balance_rate_floor"):
        TrainConfig.model_validate(config)
    config["cbb"]["grad_balance"] = "loss_rate"
    assert TrainConfig.model_validate(config).cbb.grad_balance_rate_floor == 0.3


def test_loss_rate_cbb_steps_log_rates_and_the_checkpoint_keeps_the_starting_losses(tmp_path, bert):
    trainer = _trainer(tmp_path, bert, "loss_rate")
    trainer.model.train()
    first = trainer.step(0)
    assert first["loss_rate/ret"] == pytest.approx(1.0)  # L(0) is the first loss itself
    assert first["loss_rate/sts"] == pytest.approx(1.0)
    trainer.forward_model.zero_grad(set_to_none=True)
    second = trainer.step(1)
    state = trainer.state_dict()
    starting = state["loss_rate"]["initial"]
    assert starting["ret"] == pytest.approx((first["loss/ret"] + second["loss/ret"]) / 2)
    assert starting["sts"] == pytest.approx((first["loss/sts"] + second["loss/sts"]) / 2)

    resumed = _trainer(tmp_path / "resumed", bert, "loss_rate")
    resumed.load_state_dict(state)
    assert resumed._gradient_balance().loss_rate.state_dict() == state["loss_rate"]


class _Killed(Exception):
    pass


def test_a_killed_loss_rate_run_resumes_on_the_uninterrupted_rates(tmp_path, bert, monkeypatch):
    """The starting losses travel in the checkpoint: steps after a resume see the same rates
    (and so the same gradients and losses) as a run that was never stopped."""
    from conan_embedding.training.engine import Engine

    def run(folder: Path, resume: bool = False) -> dict[int, dict]:
        raw = toy_cbb_config(folder, bert, steps=4, grad_balance="loss_rate")
        CBBTrainer(TrainConfig.model_validate(raw)).train(resume=resume, show_progress=False)
        rows = [json.loads(line) for line in (folder / "run" / "train_log.jsonl").open()]
        return {row["step"]: row for row in rows if "step" in row}

    straight = run(tmp_path / "straight")
    save = Engine.save_checkpoint

    def save_then_die(self, step, program):
        path = save(self, step, program)
        if step == 2:
            raise _Killed
        return path

    monkeypatch.setattr(Engine, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        run(tmp_path / "killed")
    monkeypatch.setattr(Engine, "save_checkpoint", save)
    resumed = run(tmp_path / "killed", resume=True)
    assert straight[4]["loss_rate/ret"] != pytest.approx(1.0, abs=1e-3)  # the rate has moved
    for step in (3, 4):
        for key in ("loss_rate/ret", "loss_rate/sts", "loss"):
            assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-5), (step, key)
