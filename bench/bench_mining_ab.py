"""A/B of mining speed between two source trees, interleaved with sentence-transformers.

One command::

    python bench/bench_mining_ab.py --old /work/main --new . [--queries 1000] [--corpus 15000]
                                    [--rounds 3]

Each round runs, in fresh processes and in this order, ST's ``mine_hard_negatives``, the
``--old`` tree's ``ours-onnx`` worker and the ``--new`` tree's (each tree's own
``bench/bench_mining.py --worker`` with ``PYTHONPATH=<tree>/src``), on the same inputs and a cold
embedding cache; ONNX exports are made once beforehand and not timed. It prints wall time and
CPU time (user + sys of the worker process, less sensitive than wall time to other jobs on a
shared machine) per run, the median ratios against ST, and the overlap of each tree's negatives
with ST's. Writes ``bench/results/mining_ab.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from bench_mining import RESULTS, load_inputs, overlap


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--corpus", type=int, default=15000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench-mining-ab"))
    parser.add_argument("--data-dir", type=Path, default=Path("/work/shared/data"))
    args = parser.parse_args()
    folder = args.work_dir
    folder.mkdir(parents=True, exist_ok=True)
    pairs, corpus = load_inputs(args.data_dir, args.queries, args.corpus)
    inputs = folder / "inputs.json"
    inputs.write_text(json.dumps({"pairs": pairs, "corpus": corpus}), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    trees = {"st": args.new.resolve(), "old": args.old.resolve(), "new": args.new.resolve()}
    for name in ("old", "new"):  # the one-time ONNX export of each tree, untimed
        code = (
            f"import sys; sys.path.insert(0, {str(trees[name] / 'bench')!r}); "
            f"from bench_mining import export_onnx_graph; "
            f"export_onnx_graph({str(folder / f'onnx-{name}')!r})"
        )
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                       env={**env, "PYTHONPATH": str(trees[name] / "src")})  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for rnd in range(args.rounds):
        for name, tree in trees.items():
            cache = folder / (f"onnx-{name}" if name != "st" else "st-cache")
            for stale in cache.glob("emb-*"):
                stale.unlink()
            out = folder / f"{name}-{rnd}.json"
            load, cpu = os.getloadavg()[0], cpu_seconds()
            command = [sys.executable, str(tree / "bench" / "bench_mining.py"), "--worker",
                       "st" if name == "st" else "ours-onnx", str(inputs), str(out), str(cache)]  # fmt: skip
            subprocess.run(command, check=True, capture_output=True,
                           env={**env, "PYTHONPATH": str(tree / "src")})  # fmt: skip
            result = json.loads(out.read_text(encoding="utf-8"))
            result.update(load=load, cpu_seconds=cpu_seconds() - cpu)
            runs[name].append(result)
            print(f"round {rnd} {name:<4} {result['seconds']:7.1f} s wall "
                  f"{result['cpu_seconds']:7.1f} s cpu  load {load:.1f}", flush=True)  # fmt: skip
    summary: dict = {"queries": len(pairs), "corpus": len(corpus), "rounds": args.rounds}
    st_wall = statistics.median(r["seconds"] for r in runs["st"])
    st_cpu = statistics.median(r["cpu_seconds"] for r in runs["st"])
    for name in trees:
        wall = statistics.median(r["seconds"] for r in runs[name])
        cpu = statistics.median(r["cpu_seconds"] for r in runs[name])
        row = {"median_wall_seconds": wall, "median_cpu_seconds": cpu,
               "wall": [r["seconds"] for r in runs[name]],
               "cpu": [r["cpu_seconds"] for r in runs[name]],
               "loadavg": [r["load"] for r in runs[name]]}  # fmt: skip
        if name != "st":
            row["overlap_with_st"], row["overlap_queries"] = overlap(
                runs[name][0]["negatives"], runs["st"][0]["negatives"]
            )
            row["wall_speedup_vs_st"], row["cpu_speedup_vs_st"] = st_wall / wall, st_cpu / cpu
            print(f"{name}: {row['wall_speedup_vs_st']:.2f}x wall, {row['cpu_speedup_vs_st']:.2f}x "
                  f"cpu vs ST (medians), overlap {row['overlap_with_st']:.3f}")  # fmt: skip
        summary[name] = row
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mining_ab.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
