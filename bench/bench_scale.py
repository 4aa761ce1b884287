"""Memory and I/O at the papers' scale: streamed training records and streamed, resumable mining.

One command (the defaults are the issue's sizes; pass smaller ones for a quick run)::

    python bench/bench_scale.py [--rows 10000000] [--corpus 1000000] [--queries 100000]
                                [--chunk-size 16384] [--kill-at 0.5] [--skip-train] [--skip-mine]

All data is synthetic and made on the fly (random words from a 2,000-word vocabulary), and the
encoder is a tiny random BERT (2 layers, width 32), so the figures are about memory and I/O,
not the model. Every measured step runs in its own process; peak RSS is that process's VmHWM.

1. **training file**: ``--rows`` retrieval rows (query, 1 positive, 7 negatives) written to
   JSONL; a fresh process opens it with :func:`~conan_embedding.data.records.open_records`
   and draws the first tokenised batch from a DataLoader with 2 workers (time to first step,
   peak RSS per process). For scale, the eager ``read_records`` is timed on
   ``--eager-rows`` rows of the same file.
2. **mining**: ``--corpus`` texts and ``--queries`` retrieval rows; ``mine_file`` runs in a
   process that is SIGKILLed once ``--kill-at`` of the corpus vectors are on disk, then a second
   process resumes it. Reported: rows on disk at the kill and how many the rerun re-used, the
   resumed run's peak RSS against the size of the vectors (corpus + queries, float32), the pool
   files' size on disk, and what the same pools would take as the older text JSONL (measured
   on the first 1,000 pools and scaled).
3. **sentence-transformers at the largest size it fits in the same RAM**: ST's
   ``mine_hard_negatives`` (FAISS, same encoder, window 10-200, 7 negatives, no margin) on the
   first ``n`` texts of the same corpus and the first ``n / 10`` queries, ``n`` doubling from
   ``--st-start`` up to ``--corpus``, each in its own process; the ladder stops at the first
   size whose peak RSS exceeds ours (part 2's resumed run at the full size) or that fails.
   Reported: peak RSS and time per size, and the largest size within our peak RSS.

Writes ``bench/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 2000


def peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sentences(rng, count: int, low: int, high: int) -> list[str]:
    """``count`` random sentences of ``low..high`` words ``w0..w1999``."""
    lengths = rng.integers(low, high + 1, size=count)
    words = rng.integers(0, VOCAB, size=int(lengths.sum()))
    out, at = [], 0
    for n in lengths:
        out.append(" ".join(f"w{w}" for w in words[at : at + n]))
        at += n
    return out


def write_training_file(path: Path, rows: int, seed: int = 0) -> None:
    """Rows drawn from a pool of 50k sentences (file size like real data, made quickly)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = [json.dumps(s) for s in sentences(rng, 50_000, 6, 30)]
    with open(path, "w", encoding="utf-8") as handle:
        for start in range(0, rows, 100_000):
            count = min(100_000, rows - start)
            picks = rng.integers(0, len(pool), size=(count, 9))
            handle.writelines(
                f'{{"query": {pool[p[0]]}, "pos": [{pool[p[1]]}], '
                f'"neg": [{", ".join(pool[i] for i in p[2:])}]}}\n'
                for p in picks
            )


def build_tiny_encoder(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT (width 32) with a word-level vocabulary of the synthetic words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from conan_embedding.modeling.embedder import build_embedder, save_embedder

    raw = folder / "bert"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(VOCAB)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    names = dict(zip(("pad", "unk", "cls", "sep", "mask"), specials, strict=True))
    BertTokenizerFast(
        tokenizer_object=core, **{f"{k}_token": v for k, v in names.items()}
    ).save_pretrained(raw)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(config).save_pretrained(raw)
    return save_embedder(build_embedder(str(raw), max_seq_length=64), folder / "encoder")


# --- child processes -------------------------------------------------------------------------


def child_first_step(path: str, model: str, out: str) -> None:
    """Open the records lazily and draw the first tokenised batch (2 DataLoader workers)."""
    started = time.perf_counter()
    from conan_embedding.data.records import open_records, records_loader
    from conan_embedding.modeling.embedder import load_embedder

    imported = time.perf_counter()
    tokenizer = load_embedder(model).tokenizer
    dataset = open_records(path, "retrieval")
    opened = time.perf_counter()

    def collate(batch):
        texts = [t for r in batch for t in (r.query, *r.pos, *r.neg)]
        return tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")

    loader = records_loader(dataset, 32, collate, shuffle=True, num_workers=2, prefetch_factor=4)
    batch = next(iter(loader))
    first = time.perf_counter()
    last = dataset[len(dataset) - 1]  # random access to the far end reads one line
    result = {
        "rows": len(dataset),
        "import_seconds": imported - started,
        "open_seconds": opened - imported,
        "first_batch_seconds": first - opened,
        "time_to_first_step_seconds": first - started,
        "batch_shape": list(batch["input_ids"].shape),
        "last_query_words": len(last.query.split()),
        "peak_rss_mb": peak_rss_mb(),
    }
    Path(out).write_text(json.dumps(result), encoding="utf-8")


def child_eager(path: str, rows: int, out: str) -> None:
    """The eager reader on the first ``rows`` rows (a copy of them), for scale."""
    from itertools import islice

    from conan_embedding.data.records import read_records

    part = Path(out).with_suffix(".part.jsonl")
    with open(path, encoding="utf-8") as source, open(part, "w", encoding="utf-8") as target:
        target.writelines(islice(source, rows))
    base = peak_rss_mb()
    started = time.perf_counter()
    records = read_records(part, "retrieval")
    seconds = time.perf_counter() - started
    part.unlink()
    result = {"rows": len(records), "seconds": seconds, "rss_growth_mb": peak_rss_mb() - base}
    Path(out).write_text(json.dumps(result), encoding="utf-8")


def child_mine(records: str, corpus: str, model: str, cache: str, out: str, chunk: int) -> None:
    from conan_embedding.mining.offline import MiningConfig, mine_file

    # no margin: a random encoder scores most candidates above the positive, and this bench is
    # about memory and I/O, so every pool is filled to its full window of 190
    config = MiningConfig(
        range_min=10, range_max=200, num_negatives=7, chunk_size=chunk, device="cpu",
        batch_size=256, relative_margin=None,
    )  # fmt: skip
    import conan_embedding.mining.offline  # noqa: F401  (imports counted in the baseline)
    from conan_embedding.modeling.embedder import load_embedder

    load_embedder(model)
    baseline = peak_rss_mb()
    started = time.perf_counter()
    stats = mine_file(records, Path(out).with_suffix(".jsonl"), model, corpus_path=corpus,
                      config=config, cache_dir=cache, show_progress=False)  # fmt: skip
    result = {
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_and_model_mb": baseline,
        "stats": stats.as_dict(),
    }
    Path(out).write_text(json.dumps(result), encoding="utf-8")


def child_st(records: str, corpus: str, model: str, out: str, size: int, queries: int) -> None:
    """sentence-transformers' ``mine_hard_negatives`` on the first ``size`` texts / ``queries``
    queries (what a user would run instead, holding texts and vectors in memory)."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    from conan_embedding.modeling.embedder import load_embedder

    st_model = load_embedder(model)
    baseline = peak_rss_mb()
    started = time.perf_counter()
    with open(corpus, encoding="utf-8") as handle:
        texts = [line.rstrip("\n") for _, line in zip(range(size), handle, strict=False)]
    pairs = {"query": [], "pos": []}
    with open(records, encoding="utf-8") as handle:
        for _, line in zip(range(queries), handle, strict=False):
            row = json.loads(line)
            pairs["query"].append(row["query"])
            pairs["pos"].append(row["pos"][0])
    mined = mine_hard_negatives(
        Dataset.from_dict(pairs), st_model, corpus=texts, range_min=10, range_max=200,
        num_negatives=7, sampling_strategy="top", output_format="n-tuple", use_faiss=True,
        batch_size=256, verbose=False,
    )  # fmt: skip
    result = {
        "corpus": len(texts),
        "queries": len(pairs["query"]),
        "rows_out": len(mined),
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_and_model_mb": baseline,
    }
    Path(out).write_text(json.dumps(result), encoding="utf-8")


# --- parent ----------------------------------------------------------------------------------


def run_child(*args: str) -> None:
    subprocess.run([sys.executable, __file__, "--child", *args], check=True)


def bench_train(args, folder: Path, model: Path) -> dict:
    path = folder / "train.jsonl"
    started = time.perf_counter()
    write_training_file(path, args.rows)
    print(f"training file: {args.rows} rows, {path.stat().st_size / 2**30:.2f} GiB, "
          f"written in {time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    out = folder / "first-step.json"
    run_child("first_step", str(path), str(model), str(out))
    result = json.loads(out.read_text())
    result["file_gib"] = path.stat().st_size / 2**30
    eager = folder / "eager.json"
    run_child("eager", str(path), str(min(args.eager_rows, args.rows)), str(eager))
    result["eager_read_records"] = json.loads(eager.read_text())
    path.unlink()
    print(f"  lazy: first step after {result['time_to_first_step_seconds']:.1f} s "
          f"(index {result['open_seconds']:.1f} s), peak RSS {result['peak_rss_mb']:.0f} MB; "
          f"eager read_records of {result['eager_read_records']['rows']} rows: "
          f"{result['eager_read_records']['seconds']:.1f} s, "
          f"+{result['eager_read_records']['rss_growth_mb']:.0f} MB", flush=True)  # fmt: skip
    return result


def bench_mine(args, folder: Path, model: Path) -> dict:
    import numpy as np

    from conan_embedding.mining.pools import PoolFile, pool_files

    rng = np.random.default_rng(1)
    corpus = folder / "corpus.txt"
    texts = sentences(rng, args.corpus, 6, 30)
    corpus.write_text("\n".join(f"{t} {i}" for i, t in enumerate(texts)) + "\n")
    del texts
    records = folder / "queries.jsonl"
    with open(records, "w", encoding="utf-8") as handle:
        for query, pos in zip(
            *(sentences(rng, args.queries, 4, 12) for _ in range(2)), strict=True
        ):
            handle.write(json.dumps({"query": query, "pos": [pos]}) + "\n")
    cache, out = folder / "cache", folder / "mined.json"
    common = [str(records), str(corpus), str(model), str(cache), str(out), str(args.chunk_size)]
    child = subprocess.Popen([sys.executable, __file__, "--child", "mine", *common])
    width, target = 32, int(args.kill_at * args.corpus)
    seen = 0
    while child.poll() is None:
        files = [f for f in cache.glob("emb-*.f32")]
        seen = max((f.stat().st_size // (4 * width) for f in files), default=0)
        if seen >= target:
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    child.wait()
    killed = child.returncode == -signal.SIGKILL
    on_disk = max((f.stat().st_size // (4 * width) for f in cache.glob("emb-*.f32")), default=0)
    print(f"mining: killed={killed} with {on_disk} of {args.corpus} corpus vectors on disk "
          f"(last seen before the kill: {seen}; chunk {args.chunk_size})", flush=True)  # fmt: skip
    run_child("mine", *common)
    result = json.loads(out.read_text())
    pool = Path(str(out.with_suffix(".jsonl")).replace(".jsonl", ".pool.json"))
    files = pool_files(pool)
    pool_bytes = sum(p.stat().st_size for p in files.values())
    pools = PoolFile(pool)
    sample = min(1000, len(pools))
    text_bytes = sum(
        len(json.dumps(p.model_dump(), ensure_ascii=False)) + 1 for p in pools[:sample]
    )
    # the corpus (with the positives added to it) and the queries, float32
    vectors_mb = (result["stats"]["corpus_size"] + args.queries) * width * 4 / 2**20
    result.update(
        killed=killed,
        rows_on_disk_at_kill=on_disk,
        rows_seen_before_kill=seen,
        chunk_size=args.chunk_size,
        vectors_mb=vectors_mb,
        rss_over_vectors_mb=result["peak_rss_mb"] - vectors_mb,
        mining_rss_over_vectors_mb=result["peak_rss_mb"]
        - result["rss_after_imports_and_model_mb"]
        - vectors_mb,
        pool_files_mb={name: p.stat().st_size / 2**20 for name, p in files.items()},
        pool_mb=pool_bytes / 2**20,
        jsonl_pool_mb_estimate=text_bytes / sample * len(pools) / 2**20,
    )
    print(f"  resumed: re-used {result['stats']['rows_resumed']} vectors, "
          f"{result['seconds']:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
          f"({result['rss_after_imports_and_model_mb']:.0f} MB of it imports + model; "
          f"vectors {vectors_mb:.0f} MB); pool {result['pool_mb']:.1f} MB on disk "
          f"vs ~{result['jsonl_pool_mb_estimate']:.0f} MB as text JSONL", flush=True)  # fmt: skip
    return result


def bench_st(args, folder: Path, model: Path, budget_mb: float | None) -> dict:
    """ST's ``mine_hard_negatives`` on doubling sizes of part 2's corpus until it exceeds
    ``budget_mb`` (our peak RSS at the full size) or fails."""
    records, corpus = folder / "queries.jsonl", folder / "corpus.txt"
    sizes, size = [], args.st_start
    while size < args.corpus:
        sizes.append(size)
        size *= 2
    sizes.append(args.corpus)
    runs, largest_within = [], None
    for size in sizes:
        out = folder / f"st-{size}.json"
        queries = max(1, size * args.queries // args.corpus)
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                "st",
                str(records),
                str(corpus),
                str(model),
                str(out),
                str(size),
                str(queries),
            ]  # fmt: skip
        )
        if done.returncode != 0:
            runs.append({"corpus": size, "queries": queries, "failed": done.returncode})
            print(f"  ST at {size} texts failed (exit {done.returncode})", flush=True)
            break
        run = json.loads(out.read_text())
        runs.append(run)
        print(f"  ST at {size} texts / {queries} queries: {run['seconds']:.0f} s, "
              f"peak RSS {run['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
        if budget_mb is not None and run["peak_rss_mb"] > budget_mb:
            break
        largest_within = size
    return {"budget_mb": budget_mb, "runs": runs, "largest_corpus_within_budget": largest_within}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        name, rest = sys.argv[2], sys.argv[3:]
        if name == "first_step":
            child_first_step(*rest)
        elif name == "eager":
            child_eager(rest[0], int(rest[1]), rest[2])
        elif name == "st":
            child_st(*rest[:4], int(rest[4]), int(rest[5]))
        else:
            child_mine(*rest[:5], int(rest[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--eager-rows", type=int, default=200_000)
    parser.add_argument("--corpus", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--chunk-size", type=int, default=16_384)
    parser.add_argument("--kill-at", type=float, default=0.5)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-mine", action="store_true")
    parser.add_argument("--skip-st", action="store_true", help="skip part 3 (ST's ladder)")
    parser.add_argument("--st-start", type=int, default=125_000, help="ST ladder's first size")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temp folder")
    args = parser.parse_args()
    result: dict = {"args": vars(args) | {"work_dir": str(args.work_dir)}, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.work_dir) as tmp:
        folder = Path(tmp)
        model = build_tiny_encoder(folder)
        if not args.skip_train:
            result["train"] = bench_train(args, folder, model)
        if not args.skip_mine:
            result["mine"] = bench_mine(args, folder, model)
            if not args.skip_st:
                print("sentence-transformers' mine_hard_negatives, doubling sizes:", flush=True)
                budget = result["mine"]["peak_rss_mb"]
                result["st_mine"] = bench_st(args, folder, model, budget)
    result["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {RESULTS / 'scale.json'}")


if __name__ == "__main__":
    main()
