"""Server throughput and latency under a bounded loopback load: conan-embed serve vs infinity-emb.

One command:

    HF_HUB_OFFLINE=1 python bench/bench_server.py [--n 1024] [--clients 4] [--batch 32]
        [--rounds 3] [--infinity /tmp/infvenv/bin/infinity_emb]

Each server runs in its own process on 127.0.0.1. ``--clients`` closed-loop clients each send
requests of ``--batch`` STS-B sentences (OpenAI ``/embeddings`` body) until ``--n`` sentences
are embedded; throughput is sentences / wall time, latency is per request (p50, p99).

The peer is infinity-emb (``michaelfeil/infinity``), run from its own venv because it pins
sentence-transformers 3.x and transformers 4.x; it is skipped (and the JSON says so) when
``--infinity`` is not given. The CPU is shared with other jobs: servers are all up at once
(idle ones cost nothing), rounds are paired and interleaved in a shuffled order, ratios are
taken within a round, and the load average is recorded beside every run.
Writes ``bench/results/server.json``.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from conan_embedding._io import write_json_atomic

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_sentences(n: int) -> list[str]:
    from conan_embedding.data.sources import resolve_data_dir

    texts: dict[str, None] = {}
    with open(
        resolve_data_dir() / "sts" / "stsb-en-train.csv", encoding="utf-8", newline=""
    ) as handle:
        for row in csv.reader(handle):
            texts.setdefault(row[0], None)
            texts.setdefault(row[1], None)
    return list(texts)[:n]


class ServerProcess:
    def __init__(
        self, name: str, command: list[str], url: str, route: str, model: str, ready_path: str
    ):
        self.name, self.url, self.route, self.model = name, url, route, model
        # The log stays open for the server's lifetime (its stdout), so no context manager here.
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} exited: {Path(self.log.name).read_text()[-3000:]}")
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not become ready")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def run_load(server: ServerProcess, texts: list[str], clients: int, batch: int) -> dict:
    """``clients`` closed-loop clients share the requests; returns throughput and latencies."""
    requests = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    lock, latencies, errors = threading.Lock(), [], []
    cursor = iter(range(len(requests)))

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while True:
                with lock:
                    index = next(cursor, None)
                if index is None:
                    return
                start = time.perf_counter()
                response = http.post(
                    server.url + server.route,
                    json={"model": server.model, "input": requests[index]},
                )
                elapsed = time.perf_counter() - start
                with lock:
                    if response.status_code != 200 or len(response.json()["data"]) != len(
                        requests[index]
                    ):
                        errors.append(response.status_code)
                    latencies.append(elapsed)

    load_before = os.getloadavg()
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {
        "sentences_per_s": len(texts) / wall,
        "p50_ms": float(np.percentile(latencies, 50) * 1000),
        "p99_ms": float(np.percentile(latencies, 99) * 1000),
        "requests": len(requests),
        "errors": len(errors),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="torch,onnx", help="our backends to serve")
    parser.add_argument("--infinity", default=None, help="infinity_emb executable (its own venv)")
    parser.add_argument("--out", default=str(RESULTS / "server.json"))
    args = parser.parse_args()

    from conan_embedding.encoding.backends.onnx import export_onnx
    from conan_embedding.modeling.embedder import resolve_model_path

    model_path = resolve_model_path(args.model)
    texts = load_sentences(args.n)
    workdir = Path(tempfile.mkdtemp(prefix="bench-server-"))
    onnx_dir = export_onnx(model_path, workdir / "onnx")
    servers: dict[str, ServerProcess] = {}
    try:
        for backend in args.backends.split(","):
            port = free_port()
            command = [
                sys.executable,
                "-m",
                "conan_embedding.cli",
                "serve",
                model_path,
                "--port",
                str(port),
                "--backend",
                backend,
                "--onnx-dir",
                str(onnx_dir),
                "--name",
                "minilm",
            ]
            servers[f"conan_{backend}"] = ServerProcess(
                f"conan_{backend}",
                command,
                f"http://127.0.0.1:{port}",
                "/v1/embeddings",
                "minilm",
                "/health",
            )
        if args.infinity:
            port = free_port()
            command = [
                args.infinity,
                "v2",
                "--model-id",
                model_path,
                "--served-model-name",
                "minilm",
                "--port",
                str(port),
                "--engine",
                "torch",
                "--device",
                "cpu",
                "--batch-size",
                str(args.batch),
                "--no-bettertransformer",
            ]
            servers["infinity"] = ServerProcess(
                "infinity", command, f"http://127.0.0.1:{port}", "/embeddings", "minilm", "/health"
            )
        for server in servers.values():  # warm-up
            run_load(server, texts[: args.batch * 2], 1, args.batch)

        rounds, rng = [], random.Random(0)
        for index in range(args.rounds):
            order = list(servers)
            rng.shuffle(order)
            record = {"round": index, "order": order, "results": {}}
            for name in order:
                record["results"][name] = run_load(servers[name], texts, args.clients, args.batch)
                r = record["results"][name]
                print(
                    f"round {index} {name}: {r['sentences_per_s']:.1f}/s p50 {r['p50_ms']:.0f} ms "
                    f"p99 {r['p99_ms']:.0f} ms errors {r['errors']} load {r['loadavg_before'][0]:.1f}",
                    flush=True,
                )
            rounds.append(record)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    names = list(servers)
    summary = {
        name: {
            key: statistics.median(r["results"][name][key] for r in rounds)
            for key in ("sentences_per_s", "p50_ms", "p99_ms")
        }
        for name in names
    }
    ratios = {}
    if "infinity" in servers:
        for name in names:
            if name != "infinity":
                ratios[f"{name}_vs_infinity_throughput"] = statistics.median(
                    r["results"][name]["sentences_per_s"]
                    / r["results"]["infinity"]["sentences_per_s"]
                    for r in rounds
                )
                ratios[f"{name}_vs_infinity_p99"] = statistics.median(
                    r["results"][name]["p99_ms"] / r["results"]["infinity"]["p99_ms"]
                    for r in rounds
                )
    result = {
        "benchmark": "server",
        "model": args.model,
        "sentences": len(texts),
        "clients": args.clients,
        "batch": args.batch,
        "infinity_peer": "infinity" in servers,
        "note": "CPU shared with other engineers' jobs; load average recorded per run",
        "cores": os.cpu_count(),
        "rounds": rounds,
        "median": summary,
        "median_paired_ratios": ratios,
    }
    out = Path(args.out)
    write_json_atomic(out, result)
    print(
        f"\n{len(texts)} sentences, {args.clients} clients x {args.batch}, {args.rounds} paired rounds"
    )
    for name in names:
        s = summary[name]
        print(
            f"{name:14s} {s['sentences_per_s']:7.1f}/s  p50 {s['p50_ms']:6.0f} ms  p99 {s['p99_ms']:6.0f} ms"
        )
    for key, value in ratios.items():
        print(f"{key}: x{value:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
