"""How much of a CBB step's gradient each task contributes (issue #27's Tatoeba question).

Why: every arm that puts all tasks in one step (CBB) scores about 1.2 lower on Tatoeba than
the arms with one task per step, whatever its cross-lingual data (`minus-clr` without any);
one explanation is that in the summed step ``sum_t w_t grad L_t`` the cross-lingual task's
gradient is small beside the others' or points against them. This measures it: for a few
steps of a CBB recipe arm, each task's weighted gradient ``w_t grad L_t`` on its own (the
step's own rows, negatives and dropout seeds, so the tasks' gradients sum to the step's), its
norm, its share of the summed gradient (``<g_t, g> / |g|^2``, the shares add up to 1), its
cosine with the sum and with every other task.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python scripts/grad_share.py --arm full \\
        --work-dir runs/recipe --model runs/models/me5-small --steps 8 \\
        --out bench/results/diagnostics/grad-share-full-base.json

``--model`` may be a trained arm's model (``runs/recipe/arms/full-s42/model``) to see the
shares at the end of training. Rows are drawn from step 1 as in training (the same seed), and
static negatives are used (``dynamic_negatives.rule: none``) so that measuring changes no
state. No optimizer step is taken: every step's gradients are those of the given weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch


def _flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten() for p in params]
    ).double()


def measure(arm: str, work_dir: Path, model: str, steps: int, seed: int) -> dict[str, Any]:
    from conan_embedding.config import load_config
    from conan_embedding.experiments.recipe_v1.arms import resolve_arm
    from conan_embedding.training.cbb import CBBTrainer

    name, path = resolve_arm(arm)
    with tempfile.TemporaryDirectory() as tmp:
        values: dict[str, Any] = {
            "seed": seed,
            "output_dir": tmp,
            "data_dir": str((work_dir / "data").resolve()),
            "model.name": model,
        }
        config = load_config(path, values)
        if config.cbb is None:
            raise SystemExit(f"{path}: not a CBB arm (no 'cbb' section)")
        for task in config.tasks:
            task.dynamic_negatives.rule = "none"
        trainer = CBBTrainer(config)
        params = [p for p in trainer.forward_model.parameters() if p.requires_grad]
        names = [t.name for t in config.tasks]
        weights = {n: trainer.tasks[n].weight for n in names}
        step_weights = {n: trainer.task_weight(trainer.tasks[n]) for n in names}  # w_t, with beta
        per_step: list[dict[str, Any]] = []
        for step in range(1, steps + 1):
            streams = {n: s.state_dict() for n, s in trainer.streams.items()}
            grads: dict[str, torch.Tensor] = {}
            losses: dict[str, float] = {}
            for only in names:
                for n in names:  # the others still run (the step runs every task), weighted 0
                    trainer.tasks[n].weight = weights[n] if n == only else 0.0
                    trainer.streams[n].load_state_dict(streams[n])
                for p in params:
                    p.grad = None
                record = trainer.step(step)
                grads[only] = _flat_grad(params)
                losses[only] = record[f"loss/{only}"]
            total = sum(grads.values())
            total_sq = float(total @ total)
            row: dict[str, Any] = {"step": step, "loss": losses, "tasks": {}}
            for n in names:
                g = grads[n]
                row["tasks"][n] = {
                    "weight": step_weights[n],
                    "norm": float(g.norm()),
                    "share": float(g @ total) / total_sq,
                    "cos_with_sum": float(g @ total) / (float(g.norm()) * total_sq**0.5 + 1e-30),
                    "cos_with": {
                        m: float(g @ grads[m]) / (float(g.norm() * grads[m].norm()) + 1e-30)
                        for m in names
                        if m != n
                    },
                }
            per_step.append(row)
            print(
                f"step {step}: "
                + ", ".join(
                    f"{n} |g| {row['tasks'][n]['norm']:.3g} share {row['tasks'][n]['share']:.2f}"
                    for n in names
                ),
                flush=True,
            )
        for n in names:
            trainer.tasks[n].weight = weights[n]

    def mean(key: str, n: str) -> float:
        return sum(r["tasks"][n][key] for r in per_step) / len(per_step)

    summary = {
        n: {k: round(mean(k, n), 4) for k in ("norm", "share", "cos_with_sum")} for n in names
    }
    return {
        "arm": name,
        "model": model,
        "steps": steps,
        "seed": seed,
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "mean_over_steps": summary,
        "per_step": per_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", default="full")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/recipe"))
    parser.add_argument("--model", default="runs/models/me5-small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not (args.work_dir / "data").is_dir():
        raise SystemExit(f"{args.work_dir / 'data'} is missing: run `conan-embed recipe prepare`")
    result = measure(args.arm, args.work_dir, args.model, args.steps, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".json.partial")
    partial.write_text(json.dumps(result, indent=1) + "\n")
    partial.replace(args.out)
    print(json.dumps(result["mean_over_steps"], indent=1))


if __name__ == "__main__":
    main()
