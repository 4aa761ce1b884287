"""Offline mining: filters, rank window, pool files, FAISS indexes, encoder cache/backends,
agreement with sentence-transformers' ``mine_hard_negatives`` and the ``mine`` command."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from conan_embedding.data.records import RecordError, RetrievalRecord, read_records
from conan_embedding.encoding.texts import TextEncoder
from conan_embedding.mining.index import build_index, search
from conan_embedding.mining.offline import (
    MiningConfig,
    PoolCandidate,
    PoolEntry,
    default_pool_path,
    mine,
    read_corpus,
    read_pools,
    select_candidates,
    write_pools,
)
from conftest import WORDS


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from conan_embedding.modeling.embedder import build_embedder
    from conftest import build_tiny_bert

    return build_embedder(str(build_tiny_bert(tmp_path_factory.mktemp("mine-bert"), seed=3)))


def _sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10))) for _ in range(count)]


def _records(count: int = 40, seed: int = 1) -> list[RetrievalRecord]:
    queries, positives = _sentences(count, seed), _sentences(count, seed + 100)
    return [RetrievalRecord(query=q, pos=[p]) for q, p in zip(queries, positives, strict=True)]


def test_filters_and_window_on_hand_made_scores():
    # one query, positive score 0.8; corpus ids 0..7 sorted by score
    ids = np.array([[5, 0, 1, 2, 3, 4, 6, 7]])
    scores = np.array([[0.95, 0.9, 0.79, 0.77, 0.7, 0.6, 0.5, 0.4]], dtype=np.float32)
    config = MiningConfig(range_min=1, range_max=4, num_negatives=2, relative_margin=0.05)
    # id 5 is the positive; threshold 0.8 - 0.04 = 0.76 drops ids 0 (0.9), 1 (0.79), 2 (0.77)
    pools = select_candidates(
        ids=ids, scores=scores, excluded=[{5}], positive_scores=np.array([0.8]), config=config
    )
    # survivors: 3 (0.7), 4 (0.6), 6 (0.5), 7 (0.4); window ranks 1..3 -> 4, 6, 7
    assert [c for c, _, _ in pools[0]] == [4, 6, 7]
    assert [r for _, _, r in pools[0]] == [1, 2, 3]
    capped = select_candidates(
        scores,
        ids,
        [{5}],
        np.array([0.8]),
        MiningConfig(
            range_min=0, range_max=8, num_negatives=1, relative_margin=None, max_score=0.65
        ),
    )
    assert [c for c, _, _ in capped[0]] == [4, 6, 7]
    absolute = select_candidates(
        scores,
        ids,
        [{5}],
        np.array([0.8]),
        MiningConfig(
            range_min=0, range_max=8, num_negatives=1, relative_margin=None, absolute_margin=0.15
        ),
    )
    assert [c for c, _, _ in absolute[0]] == [4, 6, 7]
    # a negative positive score must not raise the threshold above the positive
    negative_pos = select_candidates(
        np.array([[-0.1, -0.2]], dtype=np.float32),
        np.array([[0, 1]]),
        [set()],
        np.array([-0.2]),
        MiningConfig(range_min=0, range_max=2, num_negatives=1, relative_margin=0.5),
    )
    assert negative_pos[0] == []


def test_window_must_hold_the_negatives():
    with pytest.raises(ValueError, match="cannot hold"):
        MiningConfig(range_min=10, range_max=12, num_negatives=7)


def test_mine_drops_positive_duplicates_and_the_query(tiny_model):
    records = [RetrievalRecord(query="what is my card fee", pos=["the card fee"])]
    corpus = ["the  card fee", "what is my card fee", *_sentences(60, 7)]
    config = MiningConfig(range_min=0, range_max=20, num_negatives=3, relative_margin=None)
    mined, pools, stats = mine(records, tiny_model, corpus, config, show_progress=False)
    texts = [c.text for c in pools[0].candidates]
    assert "the  card fee" not in texts and "the card fee" not in texts
    assert "what is my card fee" not in texts
    assert stats.skipped["positive_or_query"] >= 2
    assert mined[0].neg == texts[:3]
    assert [c.rank for c in pools[0].candidates] == list(range(len(texts)))


def test_same_negatives_as_sentence_transformers(tiny_model):
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    records, corpus = _records(40), _sentences(300, 9)
    config = MiningConfig(
        range_min=3, range_max=30, num_negatives=4, relative_margin=None, max_score=0.999
    )
    mined, _, _ = mine(records, tiny_model, corpus, config, show_progress=False)
    reference = mine_hard_negatives(
        Dataset.from_dict({"q": [r.query for r in records], "p": [r.pos[0] for r in records]}),
        tiny_model,
        corpus=corpus,
        range_min=3,
        range_max=30,
        max_score=0.999,
        num_negatives=4,
        sampling_strategy="top",
        output_format="n-tuple",
        verbose=False,
        batch_size=32,
    )
    theirs = {row["q"]: {row[f"negative_{i}"] for i in range(1, 5)} for row in reference}
    overlap = [len(set(r.neg) & theirs[r.query]) / 4 for r in mined if r.query in theirs]
    assert len(overlap) >= 30
    assert np.mean(overlap) >= 0.95


def test_encoder_dedups_and_caches(tiny_model, tmp_path):
    encoder = TextEncoder(tiny_model, cache_dir=tmp_path, chunk_size=7, show_progress=False)
    texts = _sentences(30, 4) * 2
    first = encoder.encode(texts)
    assert first.shape == (60, tiny_model.get_embedding_dimension())
    np.testing.assert_allclose(first[:30], first[30:])
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    direct = tiny_model.encode(texts[:30], normalize_embeddings=True)
    np.testing.assert_allclose(first[:30], direct, atol=1e-5)
    again = TextEncoder(tiny_model, cache_dir=tmp_path, show_progress=False)
    np.testing.assert_array_equal(again.encode(texts), first)
    assert again.cache_hits == 1
    assert len(list(tmp_path.glob("emb-*.f32"))) == 1
    prompted = again.encode(texts, prompt="query: ")
    assert again.cache_hits == 1 and not np.allclose(prompted, first)


def test_onnx_backend_matches_torch(tiny_model, tmp_path):
    pytest.importorskip("onnxruntime")
    texts = _sentences(25, 5)
    torch_vecs = TextEncoder(tiny_model, show_progress=False).encode(texts)
    onnx_vecs = TextEncoder(
        tiny_model, backend="onnx", cache_dir=tmp_path, batch_size=8, show_progress=False
    ).encode(texts)
    assert np.min(np.sum(torch_vecs * onnx_vecs, axis=1)) > 0.9999


def test_token_batches_keep_input_order(tiny_model):
    """Batches are formed by token count (rows and a padded-token budget); rows must come back
    in the caller's order and equal one-text-at-a-time encoding."""
    from conan_embedding.encoding.engine import EmbeddingEngine
    from conan_embedding.encoding.tokens import token_batches

    texts = _sentences(40, 9)  # 2-10 words: batches mix lengths once re-sorted
    engine = EmbeddingEngine(tiny_model, device="cpu", batch_size=6, max_batch_tokens=40)
    one_by_one = np.concatenate([engine.embed([t]) for t in texts])
    np.testing.assert_allclose(engine.embed(texts), one_by_one, atol=1e-5)
    batches = token_batches([3, 9, 1, 9, 4], batch_size=3, max_tokens=18)
    assert [b.tolist() for b in batches] == [[1, 3], [4, 0, 2]]


def test_int8_backend_is_close_to_fp32_and_cached_apart(tiny_model, tmp_path):
    pytest.importorskip("onnxruntime")
    texts = _sentences(25, 5)
    fp32 = TextEncoder(tiny_model, backend="onnx", cache_dir=tmp_path, show_progress=False)
    int8 = TextEncoder(tiny_model, backend="onnx-int8", cache_dir=tmp_path, show_progress=False)
    fp32_vecs, int8_vecs = fp32.encode(texts), int8.encode(texts)
    (quantized,) = tmp_path.glob("onnx/*/model_int8.onnx")
    onnx = pytest.importorskip("onnx")
    assert "MatMulInteger" in {node.op_type for node in onnx.load(quantized).graph.node}
    assert np.sum(fp32_vecs * int8_vecs, axis=1).min() > 0.95
    assert len(list(tmp_path.glob("emb-*.f32"))) == 2  # never served from the fp32 cache
    np.testing.assert_array_equal(int8.encode(texts), int8_vecs)
    assert int8.cache_hits == 1


@pytest.mark.parametrize(
    ("precision", "dtype"), [("no", "float32"), ("bf16", "bfloat16"), ("fp16", "float16")]
)
def test_autocast_for_sets_the_matmul_precision(precision, dtype):
    import torch

    from conan_embedding.runtime import autocast_for

    layer = torch.nn.Linear(4, 3)
    with autocast_for("cpu", precision):
        out = layer(torch.ones(2, 4))
    assert out.dtype == getattr(torch, dtype)
    assert layer(torch.ones(2, 4)).dtype == torch.float32  # nothing leaks out of the context
    with pytest.raises(ValueError, match="one of no, bf16, fp16; got 'int4'"):
        autocast_for("cpu", "int4")


def test_bf16_backend_multiplies_in_bf16_and_is_cached_apart(tiny_model, tmp_path):
    import torch

    from conan_embedding.toy import linear_output_dtypes

    texts = _sentences(25, 5)
    fp32 = TextEncoder(tiny_model, cache_dir=tmp_path, show_progress=False)
    bf16 = TextEncoder(tiny_model, backend="torch-bf16", cache_dir=tmp_path, show_progress=False)
    fp32_vecs = fp32.encode(texts)
    with linear_output_dtypes(tiny_model) as dtypes:
        bf16_vecs = bf16.encode(texts)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert bf16_vecs.dtype == np.float32
    cosine = np.sum(fp32_vecs * bf16_vecs, axis=1)
    assert cosine.min() > 0.99 and not np.array_equal(fp32_vecs, bf16_vecs)
    assert len(list(tmp_path.glob("emb-*.f32"))) == 2  # never served from the fp32 cache
    np.testing.assert_array_equal(bf16.encode(texts), bf16_vecs)
    assert bf16.cache_hits == 1
    # a caller's bf16 autocast around the fp32 backend is the bf16 backend's computation: it
    # reads the bf16 entry, never the fp32 one
    from conan_embedding.runtime import autocast_for

    with autocast_for("cpu", "bf16"):
        wrapped = fp32.encode(texts)
    assert fp32.cache_hits == 1 and len(list(tmp_path.glob("emb-*.f32"))) == 2
    np.testing.assert_array_equal(wrapped, bf16_vecs)
    # the fp32 path after it is untouched by the autocast (no leaked state)
    np.testing.assert_array_equal(TextEncoder(tiny_model, show_progress=False).encode(texts),
                                  fp32_vecs)  # fmt: skip


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_exact_neighbours(kind):
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(2000, 16)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[:50] + 0.05 * rng.normal(size=(50, 16)).astype(np.float32)
    _, exact = search(build_index(corpus, "exact"), queries, 10, show_progress=False)
    _, approx = search(build_index(corpus, kind), queries, 10, show_progress=False)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.9
    assert build_index(corpus[:10], "auto", exact_max=100).ntotal == 10
    _, padded = search(build_index(corpus[:5], "exact"), queries[:2], 8, show_progress=False)
    assert (padded[:, 5:] == -1).all()


def test_pool_file_roundtrip_and_errors(tmp_path):
    pools = [
        PoolEntry(
            index=0,
            query="q",
            positive_score=0.5,
            candidates=[PoolCandidate(text="a", score=0.4, rank=10)],
        )
    ]
    path = tmp_path / "train.pool.jsonl"
    write_pools(path, pools)
    assert read_pools(path) == pools
    assert default_pool_path(tmp_path / "train.jsonl") == path
    path.write_text(
        path.read_text()
        + json.dumps(
            {
                "index": 1,
                "query": "q2",
                "positive_score": 0.1,
                "candidates": [{"text": "b", "rank": 3}],
            }
        )
        + "\n"
    )
    with pytest.raises(RecordError, match=r"train.pool.jsonl:2: field 'candidates.0.score'"):
        read_pools(path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"title": "T", "text": "body"}\n{"text": ""}\n')
    with pytest.raises(RecordError, match=r"corpus.jsonl:2: field 'text'"):
        read_corpus(corpus)


def test_mine_command_writes_records_and_pool(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from conan_embedding.cli import app
    from conan_embedding.modeling.embedder import save_embedder

    model_dir = save_embedder(tiny_model, tmp_path / "model")
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"query": r.query, "pos": r.pos}) + "\n" for r in _records(12))
    )
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_sentences(80, 11)) + "\n")
    out = tmp_path / "mined.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "mine",
            str(train),
            str(out),
            "--model",
            str(model_dir),
            "--corpus",
            str(corpus),
            "--range-min",
            "2",
            "--range-max",
            "20",
            "--negatives",
            "3",
            "--relative-margin",
            "-1",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert result.exit_code == 0, result.output
    mined = read_records(out, "retrieval")
    pools = read_pools(tmp_path / "mined.pool.json")
    assert len(mined) == len(pools) == 12
    assert all(
        len(r.neg) == 3 and r.neg == [c.text for c in p.candidates[:3]]
        for r, p in zip(mined, pools, strict=True)
    )
    assert all(c.rank >= 2 for p in pools for c in p.candidates)


def test_pool_arrays_are_int32_ids_into_one_corpus_file(tiny_model, tmp_path):
    from conan_embedding.mining.pools import POOL_FORMAT, PoolFile, pool_files

    records = _records(20, seed=21)
    config = MiningConfig(range_min=1, range_max=9, num_negatives=3, relative_margin=None)
    mined, entries, _ = mine(records, tiny_model, _sentences(150, 22), config, show_progress=False)
    path = tmp_path / "train.pool.json"
    write_pools(path, entries)
    files = pool_files(path)
    manifest = json.loads(path.read_text())
    assert manifest["format"] == POOL_FORMAT and manifest["first_rank"] == 1
    ids = np.load(files["ids"], allow_pickle=False)
    scores = np.load(files["scores"], allow_pickle=False)
    assert ids.dtype == np.int32 and scores.dtype == np.float32
    assert ids.shape == scores.shape == (20, 8)
    corpus = [json.loads(line) for line in files["corpus"].read_text().splitlines()]
    assert len(corpus) == len(set(corpus)) == manifest["corpus_size"]  # one copy of each text
    assert np.isnan(scores[ids < 0]).all() and not np.isnan(scores[ids >= 0]).any()
    for q, entry in enumerate(entries):  # row q, column j = candidate j, left-aligned
        n = len(entry.candidates)
        assert [corpus[i] for i in ids[q, :n]] == [c.text for c in entry.candidates]
        assert (ids[q, n:] == -1).all()
        np.testing.assert_allclose(scores[q, :n], [c.score for c in entry.candidates], atol=1e-6)
    pools = read_pools(path)
    assert isinstance(pools, PoolFile) and len(pools) == 20
    assert [p.model_dump() for p in pools] == [e.model_dump() for e in entries]
    assert default_pool_path(tmp_path / "train.jsonl") == path
    assert all(
        r.neg == [c.text for c in e.candidates[:3]] for r, e in zip(mined, entries, strict=True)
    )
    gappy = entries[0].model_copy(
        update={"candidates": [c.model_copy(update={"rank": 5}) for c in entries[0].candidates]}
    )
    with pytest.raises(ValueError, match="consecutive|start at ranks"):
        write_pools(tmp_path / "bad.pool.json", [gappy, *entries[1:]])
    files["ids"].write_bytes(files["ids"].read_bytes()[:-4])  # a truncated array is refused
    with pytest.raises(ValueError):
        read_pools(path)


_MINE_SCRIPT = """
import sys
from conan_embedding.mining.offline import MiningConfig, mine_file
config = MiningConfig(range_min=1, range_max=9, num_negatives=2, chunk_size=64, device="cpu")
mine_file(sys.argv[1], sys.argv[2], sys.argv[3], corpus_path=sys.argv[4], config=config,
          cache_dir=sys.argv[5], show_progress=False)
"""


def test_killed_mining_resumes_where_it_stopped(tiny_model, tmp_path):
    """SIGKILL in mid-encode: the rerun re-encodes only what was not on disk (at most the
    chunk in flight is lost) and writes the same negatives and pools as an unbroken run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conan_embedding.mining.offline import mine_file
    from conan_embedding.modeling.embedder import save_embedder

    model_dir = save_embedder(tiny_model, tmp_path / "model")
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"query": r.query, "pos": r.pos}) + "\n" for r in _records(30))
    )
    corpus = tmp_path / "corpus.txt"
    rng = random.Random(5)
    corpus.write_text(  # distinct texts, so the corpus is long enough to be killed inside
        "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + f" {i}" for i in range(40_000))
    )
    cache = tmp_path / "cache"
    args = [str(train), str(tmp_path / "killed.jsonl"), str(model_dir), str(corpus), str(cache)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _MINE_SCRIPT, *args], env=env)
    width = tiny_model.get_embedding_dimension()
    seen_rows, deadline = 0, time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        files = list(cache.glob("emb-*.f32"))
        seen_rows = max((f.stat().st_size // (4 * width) for f in files), default=0)
        if seen_rows >= 3 * 64:
            break
        time.sleep(0.01)
    assert child.poll() is None, "the child finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    (vectors,) = cache.glob("emb-*.f32")
    on_disk = vectors.stat().st_size // (4 * width)
    assert on_disk >= seen_rows  # nothing that was on disk before the kill is lost
    assert not (tmp_path / "killed.pool.json").exists()  # no half-written pool is trusted
    config = MiningConfig(range_min=1, range_max=9, num_negatives=2, chunk_size=64, device="cpu")
    resumed = mine_file(*args[:3], corpus_path=corpus, config=config, cache_dir=cache,
                        show_progress=False)  # fmt: skip
    assert resumed.rows_resumed == on_disk
    unbroken = mine_file(str(train), str(tmp_path / "unbroken.jsonl"), str(model_dir),
                         corpus_path=corpus, config=config, show_progress=False)  # fmt: skip
    assert unbroken.rows_resumed == 0
    assert read_records(tmp_path / "killed.jsonl", "retrieval") == read_records(
        tmp_path / "unbroken.jsonl", "retrieval"
    )
    a, b = read_pools(tmp_path / "killed.pool.json"), read_pools(tmp_path / "unbroken.pool.json")
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert not (tmp_path / ".unbroken.jsonl.mining").exists()  # the default work dir is removed
