"""Encode throughput and quality: our engine (torch, ONNX fp32, ONNX int8) vs sentence-transformers.

One command:

    HF_HUB_OFFLINE=1 python bench/bench_encode.py [--n 2000] [--rounds 3] [--st-onnx-python PY]

The peer a user would pick is ``SentenceTransformer.encode`` (torch) on the same model and
texts; its ONNX / int8 backend needs ``sentence-transformers[onnx]``, which downgrades
sentence-transformers to 5.x and transformers to 4.x, so it runs in a separate venv
(``--st-onnx-python``, e.g. ``/tmp/stonnx/bin/python`` made with ``--system-site-packages``)
and is skipped when that is not given.

The CPU is shared, so contenders run as paired, interleaved rounds (every round runs each
contender once, in a shuffled order, on the same texts): ratios are taken within a round and
their median is reported, and the load average is recorded beside every round.
Quality: cosine of each contender's vectors to sentence-transformers torch, and the
STSBenchmark test Spearman (cosine, x100) of each; int8's cost is the difference in points.
Writes ``bench/results/encode.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from conan_embedding._io import write_json_atomic
from conan_embedding.provenance import machine, versions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"

# Runs inside the sentence-transformers[onnx] venv: ST 5.x with optimum's ONNX export.
ST_ONNX_PEER = r"""
import json, os, sys, time
import numpy as np
from sentence_transformers import SentenceTransformer
from sentence_transformers import export_dynamic_quantized_onnx_model
command, model_dir = sys.argv[1], sys.argv[2]
INT8 = "onnx/model_qint8_avx512_vnni.onnx"
if command == "setup":
    model = SentenceTransformer(model_dir, backend="onnx", device="cpu")
    model.save(model_dir)
    export_dynamic_quantized_onnx_model(model, "avx512_vnni", model_dir)
    print(json.dumps({"ok": True}))
    sys.exit(0)
mode, texts_file, out = sys.argv[3], sys.argv[4], sys.argv[5]
kwargs = {"file_name": INT8} if mode == "int8" else {"file_name": "onnx/model.onnx"}
model = SentenceTransformer(model_dir, backend="onnx", device="cpu", model_kwargs=kwargs)
texts = json.load(open(texts_file, encoding="utf-8"))
model.encode(texts[:64], batch_size=32)
start = time.perf_counter()
vectors = model.encode(texts, batch_size=32)
seconds = time.perf_counter() - start
if command == "embed":
    np.save(out, vectors.astype(np.float32))
print(json.dumps({"seconds": seconds, "n": len(texts), "loadavg": os.getloadavg()}))
"""


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle))


def load_sentences(data_dir: Path, n: int) -> list[str]:
    seen: dict[str, None] = {}
    for split in ("train", "dev", "test"):
        for row in _read_csv(data_dir / "sts" / f"stsb-en-{split}.csv"):
            seen.setdefault(row[0], None)
            seen.setdefault(row[1], None)
    return list(seen)[:n]


def stsb_test(data_dir: Path) -> tuple[list[str], list[str], np.ndarray]:
    rows = _read_csv(data_dir / "sts" / "stsb-en-test.csv")
    return [r[0] for r in rows], [r[1] for r in rows], np.array([float(r[2]) for r in rows])


def spearman_points(a: np.ndarray, b: np.ndarray, gold: np.ndarray) -> float:
    from scipy.stats import spearmanr

    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(spearmanr((a * b).sum(1), gold).statistic * 100)


def machine_info() -> dict:
    """The machine, as :mod:`conan_embedding.provenance` reports it, plus the library versions."""

    return {
        **machine(detail=True),
        **versions(("torch", "transformers", "sentence-transformers", "onnxruntime")),
    }


class StOnnxPeer:
    """sentence-transformers' own ONNX / int8 backend, run in its venv as a subprocess."""

    def __init__(self, python: str, model_path: str, workdir: Path):
        self.python, self.dir = python, workdir / "st-onnx-model"
        shutil.copytree(model_path, self.dir)
        self._call("setup", str(self.dir))

    def _call(self, *args: str) -> dict:
        out = subprocess.run(
            [self.python, "-c", ST_ONNX_PEER, *args], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"sentence-transformers ONNX peer failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def time(self, mode: str, texts_file: Path) -> float:
        result = self._call("time", str(self.dir), mode, str(texts_file), "-")
        return result["n"] / result["seconds"]

    def embed(self, mode: str, texts: list[str], workdir: Path) -> np.ndarray:
        file, out = workdir / "embed.json", workdir / "embed.npy"
        file.write_text(json.dumps(texts), encoding="utf-8")
        self._call("embed", str(self.dir), mode, str(file), str(out))
        return np.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--n", type=int, default=1000, help="STS-B sentences to encode")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--st-onnx-python", default=None, help="python of a sentence-transformers[onnx] venv"
    )
    parser.add_argument(
        "--with-conan-torch", action="store_true", help="also time our torch backend (= ST torch)"
    )
    parser.add_argument("--out", default=str(RESULTS / "encode.json"))
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from conan_embedding.data.sources import resolve_data_dir
    from conan_embedding.encoding.backends.onnx import export_onnx
    from conan_embedding.encoding.engine import EmbeddingEngine
    from conan_embedding.modeling.embedder import resolve_model_path

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    data_dir = resolve_data_dir()
    texts = load_sentences(data_dir, args.n)
    model_path = resolve_model_path(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    texts_file = workdir / "texts.json"
    texts_file.write_text(json.dumps(texts), encoding="utf-8")

    st_model = SentenceTransformer(model_path, device="cpu")
    onnx_dir = export_onnx(model_path, workdir / "conan-onnx")
    backends = [("conan_onnx", "onnx"), ("conan_int8", "onnx-int8")]
    if args.with_conan_torch:
        backends.insert(0, ("conan_torch", "torch"))
    engines = {
        name: EmbeddingEngine.from_path(
            model_path,
            backend=backend,
            onnx_dir=onnx_dir,
            threads=threads,
            batch_size=args.batch_size,
        )
        for name, backend in backends
    }
    contenders = {
        "st_torch": lambda t: st_model.encode(t, batch_size=args.batch_size),
        **{name: (lambda t, e=engine: e.embed(t)) for name, engine in engines.items()},
    }
    peer = None
    if args.st_onnx_python:
        peer = StOnnxPeer(args.st_onnx_python, model_path, workdir)
    for encode in contenders.values():
        encode(texts[:64])  # warm-up: first-call allocation is not throughput

    rounds, timed_vectors = [], {}
    rng = random.Random(0)
    names = list(contenders) + (["st_onnx", "st_int8"] if peer else [])
    for index in range(args.rounds):
        order = names[:]
        rng.shuffle(order)
        record = {
            "round": index,
            "order": order,
            "loadavg_before": os.getloadavg(),
            "texts_per_s": {},
        }
        for name in order:
            if name in contenders:
                start = time.perf_counter()
                timed_vectors[name] = contenders[name](texts)
                record["texts_per_s"][name] = len(texts) / (time.perf_counter() - start)
            else:
                record["texts_per_s"][name] = peer.time(name.removeprefix("st_"), texts_file)
            print(f"round {index} {name}: {record['texts_per_s'][name]:.1f} texts/s", flush=True)
        record["loadavg_after"] = os.getloadavg()
        rounds.append(record)

    def median_ratio(name: str, peer_name: str) -> float:
        return statistics.median(
            r["texts_per_s"][name] / r["texts_per_s"][peer_name] for r in rounds
        )

    # Quality: cosine to ST torch on the timed texts; STSBenchmark test Spearman of every
    # contender whose vectors differ from ST torch's (our torch / ONNX fp32 backends match it at
    # cosine >= 0.9999, so conan_onnx stands for the fp32 baseline: ST torch at 2 cores under
    # this load would take most of the run to encode the 2,758 test sentences again).
    s1, s2, gold = stsb_test(data_dir)
    reference = timed_vectors["st_torch"]
    quality = {}
    for name in names:
        if name in contenders:
            vectors = timed_vectors[name]
            pairs = None if name in ("st_torch", "conan_torch") else contenders[name](s1 + s2)
        else:
            both = peer.embed(name.removeprefix("st_"), texts + s1 + s2, workdir)
            vectors, pairs = both[: len(texts)], both[len(texts) :]
        cosine = (vectors * reference).sum(1) / (
            np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
        )
        quality[name] = {
            "cosine_to_st_torch_min": float(cosine.min()),
            "cosine_to_st_torch_mean": float(cosine.mean()),
            "stsb_test_spearman": None
            if pairs is None
            else spearman_points(pairs[: len(s1)], pairs[len(s1) :], gold),
        }
    for name in ("st_torch", "conan_torch"):
        if name in quality:
            quality[name]["stsb_test_spearman"] = quality["conan_onnx"]["stsb_test_spearman"]
            quality[name]["spearman_note"] = "same vectors as conan_onnx (cosine >= 0.9999)"
    base = quality["st_torch"]["stsb_test_spearman"]
    for entry in quality.values():
        entry["spearman_delta_points"] = entry["stsb_test_spearman"] - base

    medians = {name: statistics.median(r["texts_per_s"][name] for r in rounds) for name in names}
    ratios = {f"{name}_vs_st_torch": median_ratio(name, "st_torch") for name in names}
    if peer:
        ratios["conan_onnx_vs_st_onnx"] = median_ratio("conan_onnx", "st_onnx")
        ratios["conan_int8_vs_st_int8"] = median_ratio("conan_int8", "st_int8")
    done = {
        "encode_1.5x_st_torch_same_vectors": ratios["conan_onnx_vs_st_torch"] >= 1.5
        and quality["conan_onnx"]["cosine_to_st_torch_min"] >= 0.9999,
        "int8_cost_at_most_0.3_points": quality["conan_int8"]["spearman_delta_points"] >= -0.3,
    }
    if peer:
        done["int8_at_least_st_int8"] = ratios["conan_int8_vs_st_int8"] >= 1.0
    result = {
        "benchmark": "encode",
        "model": args.model,
        "texts": len(texts),
        "batch_size": args.batch_size,
        "threads": threads,
        "machine": machine_info(),
        "st_onnx_peer": bool(peer),
        "note": "CPU shared with other engineers' jobs; see loadavg per round",
        "rounds": rounds,
        "median_texts_per_s": medians,
        "median_paired_ratios": ratios,
        "quality": quality,
        "done_criteria": done,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\n{len(texts)} STS-B sentences, {args.model}, {threads} threads, {args.rounds} paired rounds"
    )
    for name in names:
        q = quality[name]
        print(
            f"{name:12s} {medians[name]:8.1f} texts/s  x{ratios[f'{name}_vs_st_torch']:.2f} vs ST torch  "
            f"cos>={q['cosine_to_st_torch_min']:.5f}  STSB {q['stsb_test_spearman']:.2f} "
            f"({q['spearman_delta_points']:+.2f})"
        )
    for key, value in ratios.items():
        if "_vs_st_torch" not in key:
            print(f"{key}: x{value:.2f}")
    print("done criteria:", done)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
