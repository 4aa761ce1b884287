"""Mining and DHNM figures: ours vs sentence-transformers' ``mine_hard_negatives``, same run.

One command::

    python bench/bench_mining.py [--queries 1000] [--corpus 10000] [--repeats 2] [--steps 16]

What it measures, on the same inputs and interleaved (the CPU may be shared):

1. Offline mining wall time and peak RSS (each run in its own process, model load excluded
   from the time, included in the RSS) of
   ``sentence_transformers.util.mine_hard_negatives`` (FAISS, ranks 10-50, 7 negatives,
   relative margin 0.05, ``sampling_strategy="top"``) and of ``conan_embedding.mining.offline``
   with the same model, window and margin (cold embedding cache), plus a warm-cache re-run;
   the overlap of the chosen negatives (|ours ∩ theirs| / 7 per query, averaged) with ST's in
   float32. Kinds: ``st`` (float32, ST's default), ``st-bf16`` (the peer's own bf16 option:
   the model cast to bfloat16), ``ours-torch``, ``ours-torch-bf16`` (bf16 autocast),
   ``ours-onnx``, ``ours-onnx-int8``; ``--kinds`` picks some (``st`` always runs).
2. Training step time with DHNM off (static negatives) vs v2 vs v1 (re-scoring through the
   model every ``check_every`` steps) vs v1 on the scores the loss last computed
   (``v1_current="observed"``), with the real trainer on the mined data.

Data: queries/positives are STS-B train pairs scored >= 4 (``sts/stsb-en-train.csv``); the
corpus is the English side of ``parallel/cmn.txt`` plus the STS-B train sentences.
Writes ``bench/results/mining.json`` and prints ratios against sentence-transformers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conan_embedding._io import write_json_atomic

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KINDS = ("st", "st-bf16", "ours-torch", "ours-torch-bf16", "ours-onnx", "ours-onnx-int8")
WINDOW = {"range_min": 10, "range_max": 50, "num_negatives": 7, "relative_margin": 0.05}
RESULTS = Path(__file__).resolve().parent / "results"


def load_inputs(data_dir: Path, queries: int, corpus_size: int):
    with open(data_dir / "sts" / "stsb-en-train.csv", encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.reader(handle) if len(r) == 3]
    pairs = list(dict.fromkeys((a, b) for a, b, s in rows if float(s) >= 4.0))
    seen, kept = set(), []
    for a, b in pairs:  # one positive per query, like a typical retrieval training file
        if a not in seen:
            seen.add(a)
            kept.append((a, b))
    with open(data_dir / "parallel" / "cmn.txt", encoding="utf-8-sig") as handle:
        english = [line.split("\t")[0] for line in handle if "\t" in line]
    sts_sentences = [t for a, b, _ in rows for t in (a, b)]
    corpus = list(dict.fromkeys(sts_sentences + english))[:corpus_size]
    return kept[:queries], corpus


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: reset by exec, unlike ``ru_maxrss``,
    which a child started by ``subprocess`` inherits from its parent)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(kind: str, inputs: Path, out: Path, cache_dir: str) -> None:
    """One mining run in a fresh process; writes time, peak RSS and the chosen negatives."""
    import torch

    from conan_embedding.modeling.embedder import load_embedder, resolve_model_path

    data = json.loads(inputs.read_text(encoding="utf-8"))
    pairs, corpus = data["pairs"], data["corpus"]
    model = load_embedder(resolve_model_path("all-MiniLM-L6-v2"))
    if kind == "st-bf16":
        model = model.to(torch.bfloat16)
    rss_after_load = peak_rss_mb()
    started = time.perf_counter()
    if kind.startswith("st"):
        from datasets import Dataset
        from sentence_transformers.util import mine_hard_negatives

        dataset = Dataset.from_dict({"q": [a for a, _ in pairs], "p": [b for _, b in pairs]})
        result = mine_hard_negatives(
            dataset,
            model,
            corpus=corpus,
            range_min=WINDOW["range_min"],
            range_max=WINDOW["range_max"],
            num_negatives=WINDOW["num_negatives"],
            relative_margin=WINDOW["relative_margin"],
            sampling_strategy="top",
            output_format="n-tuple",
            use_faiss=True,
            batch_size=32,
            verbose=False,
        )
        n = WINDOW["num_negatives"]
        negatives = {row["q"]: [row[f"negative_{i}"] for i in range(1, n + 1)] for row in result}
    else:
        from conan_embedding.data.records import RetrievalRecord
        from conan_embedding.mining.offline import MiningConfig, mine

        backend = kind.removeprefix("ours-")
        config = MiningConfig(**WINDOW, backend=backend, batch_size=64)
        records = [RetrievalRecord(query=a, pos=[b]) for a, b in pairs]
        mined, _, _ = mine(records, model, corpus, config, cache_dir=cache_dir, show_progress=False)
        negatives = {r.query: r.neg for r in mined}
    seconds = time.perf_counter() - started
    out.write_text(
        json.dumps(
            {
                "kind": kind,
                "seconds": seconds,
                "peak_rss_mb": peak_rss_mb(),
                "rss_after_model_load_mb": rss_after_load,
                "threads": torch.get_num_threads(),
                "loadavg_after": os.getloadavg(),
                "negatives": negatives,
            }
        ),
        encoding="utf-8",
    )


def export_onnx_graph(cache_dir: str) -> None:
    """The one-time ONNX export and int8 quantisation of the model (reused by every later run,
    so not timed there)."""
    from conan_embedding.encoding.texts import TextEncoder
    from conan_embedding.modeling.embedder import load_embedder, resolve_model_path

    model = load_embedder(resolve_model_path("all-MiniLM-L6-v2"))
    for backend in ("onnx", "onnx-int8"):
        TextEncoder(model, backend=backend, cache_dir=cache_dir, show_progress=False)


def run_worker(kind: str, inputs: Path, folder: Path, cache_dir: str, tag: str) -> dict:
    out = folder / f"{tag}.json"
    load_before = os.getloadavg()
    subprocess.run(
        [sys.executable, __file__, "--worker", kind, str(inputs), str(out), cache_dir], check=True
    )
    result = json.loads(out.read_text(encoding="utf-8"))
    result["loadavg_before"] = load_before
    print(
        f"  {tag:<16} {result['seconds']:8.1f} s  peak RSS {result['peak_rss_mb']:7.0f} MB  "
        f"load {load_before[0]:.1f}",
        flush=True,
    )
    return result


def overlap(ours: dict[str, list[str]], theirs: dict[str, list[str]]) -> tuple[float, int]:
    shared = [q for q in theirs if q in ours and len(ours[q]) == len(theirs[q])]
    if not shared:
        return 0.0, 0
    values = [len(set(ours[q]) & set(theirs[q])) / len(theirs[q]) for q in shared]
    return statistics.mean(values), len(shared)


def bench_mining(args, folder: Path) -> dict:
    pairs, corpus = load_inputs(args.data_dir, args.queries, args.corpus)
    inputs = folder / "inputs.json"
    inputs.write_text(json.dumps({"pairs": pairs, "corpus": corpus}), encoding="utf-8")
    print(f"mining: {len(pairs)} queries, corpus {len(corpus)} texts, window {WINDOW}", flush=True)
    # The ONNX export is made once per model and reused (like the embedding cache would be
    # not): do it before timing, and time it on its own.
    onnx_cache = str(folder / "onnx-export")
    kinds = ("st", *[kind for kind in args.kinds if kind != "st"])
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise SystemExit(f"unknown --kinds {unknown}; choose among {','.join(KINDS)}")
    started = time.perf_counter()
    if any(kind.startswith("ours-onnx") for kind in kinds):
        export_onnx_graph(onnx_cache)
    export_seconds = time.perf_counter() - started
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for rep in range(args.repeats):
        for kind in kinds:
            cache = (
                onnx_cache if kind.startswith("ours-onnx") else str(folder / f"cache-{kind}-{rep}")
            )
            # a cold embedding cache each time: drop the embeddings, keep the ONNX graph
            for stale in Path(onnx_cache).glob("emb-*"):
                stale.unlink()
            runs[kind].append(run_worker(kind, inputs, folder, cache, f"{kind}-{rep}"))
    # a re-run on the first torch kind's finished cache: no encoding left to do
    warm_kind = next((kind for kind in kinds if kind.startswith("ours-torch")), None)
    warm = None
    if warm_kind is not None:
        cache = str(folder / f"cache-{warm_kind}-0")
        warm = run_worker(warm_kind, inputs, folder, cache, "warm")
    st_time = statistics.median(r["seconds"] for r in runs["st"])
    result = {
        "queries": len(pairs),
        "corpus": len(corpus),
        "window": WINDOW,
        "onnx_export_seconds": export_seconds,
        "warm_cache_seconds": warm["seconds"] if warm else None,
    }
    for kind, rows in runs.items():
        result[kind] = {
            "seconds": [r["seconds"] for r in rows],
            "median_seconds": statistics.median(r["seconds"] for r in rows),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
            "loadavg": [r["loadavg_before"] for r in rows],
        }
        if kind != "st":  # every kind against ST in float32, the vectors a user gets by default
            ov, count = overlap(rows[0]["negatives"], runs["st"][0]["negatives"])
            result[kind]["overlap_with_st"] = ov
            result[kind]["overlap_queries"] = count
            result[kind]["speedup_vs_st"] = st_time / result[kind]["median_seconds"]
    result["warm_speedup_vs_st"] = st_time / warm["seconds"] if warm else None
    if "st-bf16" in runs:  # against the peer in its own bf16 too
        st_bf16 = result["st-bf16"]["median_seconds"]
        for kind in runs:
            if kind.startswith("ours-"):
                result[kind]["speedup_vs_st_bf16"] = st_bf16 / result[kind]["median_seconds"]
    return result


def _time_provider_calls(provider) -> list[float]:
    """Wrap the negative provider's per-step hooks; the returned cell accumulates their time."""
    spent = [0.0]
    for hook in ("negatives", "observe", "on_step_end"):
        original = getattr(provider, hook, None)
        if original is None:
            continue

        def timed(*args, _original=original, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started

        setattr(provider, hook, timed)
    return spent


def bench_steps(args, folder: Path) -> dict:
    """Median training step time, static vs DHNM v2 vs v1, interleaved."""
    from conan_embedding.config import TrainConfig
    from conan_embedding.data.records import RetrievalRecord, write_records
    from conan_embedding.mining.offline import MiningConfig, mine, write_pools
    from conan_embedding.modeling.embedder import load_embedder, resolve_model_path
    from conan_embedding.training.trainer import Trainer

    model_path = resolve_model_path("all-MiniLM-L6-v2")
    pairs, corpus = load_inputs(args.data_dir, 200, 3000)
    records = [RetrievalRecord(query=a, pos=[b]) for a, b in pairs]
    mined, pools, _ = mine(
        records, load_embedder(model_path), corpus, MiningConfig(**WINDOW), show_progress=False
    )
    # static negatives need a full set per row: keep the queries whose pool had 7
    keep = [i for i, r in enumerate(mined) if len(r.neg) == WINDOW["num_negatives"]]
    train = folder / "train.jsonl"
    write_records(train, [mined[i] for i in keep])
    kept_pools = [pools[i].model_copy(update={"index": j}) for j, i in enumerate(keep)]
    write_pools(folder / "train.pool.jsonl", kept_pools)
    variants = {
        "static": {"rule": "none"},
        "v2": {"rule": "v2"},
        "v1": {"rule": "v1", "check_every": 4},
        "v1-observed": {"rule": "v1", "check_every": 4, "v1_current": "observed"},
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    provider_seconds: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.repeats):
        for name, dynamic in variants.items():
            config = TrainConfig.model_validate(
                {
                    "output_dir": str(folder / f"train-{name}-{rep}"),
                    "seed": 1,
                    "model": {"name": model_path, "max_seq_length": 64},
                    "optim": {"lr": 2e-5, "max_steps": args.steps},
                    "checkpoint_every": 10_000,
                    "tasks": [
                        {
                            "name": "ret",
                            "kind": "retrieval",
                            "path": str(train),
                            "batch_size": 4,
                            "negatives": 7,
                            "dynamic_negatives": dynamic,
                        }
                    ],
                }
            )
            stamps: list[float] = []
            trainer = Trainer(
                config, on_step=lambda _step, _rec, out=stamps: out.append(time.perf_counter())
            )
            spent = _time_provider_calls(trainer.providers["ret"])
            trainer.train(show_progress=False)
            steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            times[name].extend(steps)
            provider_seconds[name].append(spent[0] / max(1, len(stamps)))
            print(
                f"  {name:<7} rep {rep}: median step {statistics.median(steps):.3f} s "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    base = statistics.median(times["static"])
    base_mean = statistics.mean(times["static"])
    return {
        name: {
            "median_step_seconds": statistics.median(values),
            "mean_step_seconds": statistics.mean(values),
            "steps_timed": len(values),
            "overhead_vs_static": statistics.median(values) / base - 1,
            "mean_overhead_vs_static": statistics.mean(values) / base_mean - 1,
            # the mechanism's own cost: time inside the provider (observe, on_step_end, i.e.
            # the rule, the bookkeeping and v1's re-scoring) per step, over static's mean step;
            # the whole-step ratios above also move with the lengths of the negatives swapped in
            "provider_seconds_per_step": statistics.mean(provider_seconds[name]),
            "provider_share_of_static_step": statistics.mean(provider_seconds[name]) / base_mean,
        }
        for name, values in times.items()
    } | {"v1_check_every": 4, "batch_size": 4, "negatives": 7, "max_seq_length": 64}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])
        return
    from conan_embedding.data.sources import resolve_data_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--corpus", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument(
        "--kinds",
        type=lambda text: [k for k in text.split(",") if k],
        default=list(KINDS),
        help=f"comma-separated mining runs among {','.join(KINDS)} (st always runs)",
    )
    parser.add_argument("--skip-steps", action="store_true", help="only the mining part")
    parser.add_argument("--only-steps", action="store_true", help="only the DHNM step part")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    args.data_dir = resolve_data_dir(args.data_dir)
    import torch

    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_start": os.getloadavg(),
        "note": "1-min load averages recorded beside each run (other jobs slow every figure)",
    }
    with tempfile.TemporaryDirectory(prefix="bench-mining-") as tmp:
        folder = Path(tmp)
        result: dict = {"machine": machine}
        if not args.only_steps:
            result["mining"] = bench_mining(args, folder)
            save(result, "mining.json")  # before the step part, so a failure there keeps it
        if not args.skip_steps:
            print("training steps (MiniLM, batch 4, 7 negatives):", flush=True)
            result["dhnm_steps"] = bench_steps(args, folder)
            machine["loadavg_end"] = os.getloadavg()
            save({"machine": machine, "dhnm_steps": result["dhnm_steps"]}, "mining_steps.json")
    if "mining" in result:
        mining = result["mining"]
        print(f"\nST mine_hard_negatives: {mining['st']['median_seconds']:.1f} s")
        for kind in [k for k in KINDS if k in mining and k != "st"]:
            row = mining[kind]
            versus_bf16 = (
                f", {row['speedup_vs_st_bf16']:.2f}x vs ST bf16"
                if "speedup_vs_st_bf16" in row
                else ""
            )
            print(
                f"{kind}: {row['median_seconds']:.1f} s -> {row['speedup_vs_st']:.2f}x vs ST"
                f"{versus_bf16}, overlap with ST fp32 {row['overlap_with_st']:.3f}, "
                f"peak RSS {row['peak_rss_mb']:.0f} MB (ST {mining['st']['peak_rss_mb']:.0f} MB)"
            )
        if mining["warm_cache_seconds"] is not None:
            print(
                f"warm cache: {mining['warm_cache_seconds']:.1f} s "
                f"({mining['warm_speedup_vs_st']:.1f}x)"
            )
    if "dhnm_steps" in result:
        for name in ("v2", "v1", "v1-observed"):
            row = result["dhnm_steps"][name]
            print(
                f"DHNM {name}: step time {100 * row['overhead_vs_static']:+.1f}% (median), "
                f"{100 * row['mean_overhead_vs_static']:+.1f}% (mean) vs static; time in the "
                f"provider {1000 * row['provider_seconds_per_step']:.1f} ms/step = "
                f"{100 * row['provider_share_of_static_step']:.1f}% of a static step"
            )


def save(result: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / name
    write_json_atomic(out, result)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
