"""Where offline mining spends its time: tokenisation, padding, the transformer, the head,
FAISS and the candidate filter, each timed on its own over the bench's data.

One command::

    python bench/profile_mining.py [--queries 500] [--corpus 8000] [--backend onnx]

It runs the same stages as ``mine`` (:class:`~conan_embedding.encoding.engine.EmbeddingEngine`
on the corpus and the queries, an exact FAISS index, ``select_candidates``) but times each one
separately, plus ``SentenceTransformer.encode`` on the same texts for scale. Small sizes are
enough to see the shares; the CPU may be shared, so compare shares, not seconds.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_mining import WINDOW, load_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--corpus", type=int, default=8000)
    parser.add_argument("--backend", default="onnx", choices=["torch", "onnx", "onnx-int8"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--onnx-dir", type=Path, default=Path("/tmp/conan-profile-onnx"))
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    import torch

    from conan_embedding.data.sources import resolve_data_dir
    from conan_embedding.encoding.backends import get_backend
    from conan_embedding.encoding.engine import EmbeddingEngine
    from conan_embedding.encoding.tokens import token_batches
    from conan_embedding.mining.index import build_index, search
    from conan_embedding.mining.offline import MiningConfig, select_candidates
    from conan_embedding.modeling.embedder import load_embedder, resolve_model_path

    pairs, corpus = load_inputs(resolve_data_dir(args.data_dir), args.queries, args.corpus)
    texts = list(dict.fromkeys(corpus + [b for _, b in pairs]))
    model = load_embedder(resolve_model_path("all-MiniLM-L6-v2"))
    engine = EmbeddingEngine(
        model,
        backend=args.backend,
        onnx_dir=args.onnx_dir if get_backend(args.backend).needs_export else None,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        device="cpu",
        threads=torch.get_num_threads(),
    )
    times: dict[str, float] = dict.fromkeys(
        ("tokenize", "pad", "transformer", "head", "faiss", "filter"), 0.0
    )

    def timed(name: str, fn, *a, **k):
        started = time.perf_counter()
        out = fn(*a, **k)
        times[name] += time.perf_counter() - started
        return out

    def encode(rows: list[str]) -> np.ndarray:
        tokens = timed("tokenize", engine.tokenize, rows, None, truncate=True)
        lengths = [len(r) for r in tokens.ids]
        out = np.empty((len(rows), engine.width), np.float32)
        padded = real = 0
        for batch in token_batches(lengths, engine.batch_size, engine.max_batch_tokens):
            features = timed("pad", engine._pad, [tokens.ids[i] for i in batch])
            padded += features["input_ids"].numel()
            real += int(features["attention_mask"].sum())
            with torch.inference_mode():
                # a backend that runs only the transformer (TransformerThenHead) exposes it
                transformer = getattr(engine.runner, "transformer", None)
                if transformer is None:
                    hidden = timed("transformer", model[0], features)
                    features = hidden
                else:
                    features["token_embeddings"] = timed("transformer", transformer, features)
                for module in list(model)[1:]:
                    features = timed("head", module, features)
            out[batch] = features["sentence_embedding"].numpy()
        print(f"  {len(rows)} texts, padding {1 - real / padded:.1%} of {padded} tokens")
        return out

    started = time.perf_counter()
    corpus_vecs = encode(texts)
    query_vecs = encode([a for a, _ in pairs])
    total_encode = time.perf_counter() - started
    config = MiningConfig(**WINDOW)
    index = timed("faiss", build_index, corpus_vecs, "exact")
    scores, ids = timed(
        "faiss", search, index, query_vecs, config.range_max + 2, show_progress=False
    )
    position = {t: i for i, t in enumerate(texts)}
    excluded = [{position[b]} for _, b in pairs]
    positive = np.array(
        [corpus_vecs[position[b]] @ q for (_, b), q in zip(pairs, query_vecs, strict=True)]
    )
    timed("filter", select_candidates, scores, ids, excluded, positive.astype(np.float32), config)
    started = time.perf_counter()
    model.encode(texts + [a for a, _ in pairs], batch_size=32, normalize_embeddings=True)
    st_seconds = time.perf_counter() - started
    total = sum(times.values())
    print(f"{args.backend}, batch {args.batch_size}, threads {torch.get_num_threads()}:")
    for name, seconds in times.items():
        print(f"  {name:<12} {seconds:7.2f} s  {seconds / total:6.1%}")
    print(f"  encode wall {total_encode:.2f} s; ST encode of the same texts {st_seconds:.2f} s")


if __name__ == "__main__":
    main()
