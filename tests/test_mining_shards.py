"""Offline mining under ``torchrun``: the encoding is shared by the ranks, rank 0 searches.

Each test launches ``conan-embed mine`` on 2 gloo processes through a driver that logs, per
rank, the size of every chunk it starts to encode (and, for the kill test, SIGKILLs rank 1 as
it starts its third chunk), then compares with one process run in this test.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import WORDS

from conan_embedding.data.records import read_records
from conan_embedding.mining.pools import read_pools

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
CHUNK = 64
QUERIES = 100
CORPUS = 1000

_DRIVER = """
import os, signal, sys
from conan_embedding.cli import app
from conan_embedding.encoding.texts import TextEncoder

log, kill_at = sys.argv[1], int(sys.argv[2])
rank = int(os.environ["RANK"])
real_encode = TextEncoder._encode_chunk
started = []

def logged_encode(self, texts, prompt, side=None):
    started.append(len(texts))
    with open(f"{log}.rank{rank}", "a") as handle:  # closed: on disk before any kill
        handle.write(f"{len(texts)}\\n")
    if rank == 1 and len(started) == kill_at:  # mid-encode: this chunk never reaches the disk
        os.kill(os.getpid(), signal.SIGKILL)
    return real_encode(self, texts, prompt, side)

TextEncoder._encode_chunk = logged_encode
sys.argv = ["conan-embed", *sys.argv[3:]]
app()
"""


def _sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(count)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_bert) -> dict:
    """Records, corpus, model, the mine arguments, and the one-process result to match."""
    from typer.testing import CliRunner

    from conan_embedding.cli import app
    from conan_embedding.modeling.embedder import build_embedder, save_embedder

    folder = tmp_path_factory.mktemp("mine-shards")
    model = save_embedder(build_embedder(str(tiny_bert)), folder / "model")
    queries, positives = _sentences(QUERIES, 1), _sentences(QUERIES, 2)
    train = folder / "train.jsonl"
    rows = [{"query": q, "pos": [p]} for q, p in zip(queries, positives, strict=True)]
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    corpus = _sentences(CORPUS, 3)
    (folder / "corpus.txt").write_text("\n".join(corpus) + "\n")
    options = ["--model", str(model), "--corpus", str(folder / "corpus.txt"), "--range-min", "1"]
    options += ["--range-max", "9", "--negatives", "2", "--chunk-size", str(CHUNK)]
    options += ["--relative-margin", "-1", "--device", "cpu"]  # full pools from a random model
    one = folder / "one.jsonl"
    result = CliRunner().invoke(
        app, ["mine", str(train), str(one), *options, "--cache-dir", str(folder / "one-cache")]
    )
    assert result.exit_code == 0, result.output
    # every rank's share: chunk c of a stream goes to rank c % 2 (corpus, then queries)
    shares = [0, 0]
    for stream in (list(dict.fromkeys(corpus + positives)), list(dict.fromkeys(queries))):
        for c, start in enumerate(range(0, len(stream), CHUNK)):
            shares[c % 2] += len(stream[start : start + CHUNK])
    return {
        "folder": folder,
        "args": ["mine", str(train)],
        "options": options,
        "one": one,
        "one_cache": folder / "one-cache",
        "shares": shares,
    }


def _torchrun(folder: Path, inputs: dict, out: Path, cache: Path, log: Path, kill_at: int = 0):
    driver = folder / "driver.py"
    driver.write_text(_DRIVER)
    command = [*TORCHRUN, "2", str(driver), str(log), str(kill_at), *inputs["args"], str(out)]
    command += [*inputs["options"], "--cache-dir", str(cache)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def _started(log: Path, rank: int) -> list[int]:
    path = log.with_name(f"{log.name}.rank{rank}")
    return [int(n) for n in path.read_text().split()] if path.is_file() else []


def _same_as_one_process(inputs: dict, out: Path, cache: Path) -> None:
    assert read_records(out, "retrieval") == read_records(inputs["one"], "retrieval")
    two = read_pools(out.with_name(out.stem + ".pool.json"))
    one = read_pools(inputs["one"].with_name(inputs["one"].stem + ".pool.json"))
    assert (np.asarray(one.ids) >= 0).all()  # full pools: the comparison is not vacuous
    np.testing.assert_array_equal(two.ids, one.ids)
    np.testing.assert_allclose(two.scores, one.scores, atol=1e-5)
    np.testing.assert_allclose(two.positive_scores, one.positive_scores, atol=1e-5)
    assert two.manifest["corpus_size"] == one.manifest["corpus_size"]
    # rank 0 merged the shards into the files one process writes, and removed the shards
    assert not list(cache.glob("*.shard-*"))
    merged = sorted(p.name for p in cache.glob("emb-*.f32"))
    assert merged == sorted(p.name for p in inputs["one_cache"].glob("emb-*.f32"))
    for name in merged:
        a = np.fromfile(cache / name, dtype="<f4")
        np.testing.assert_allclose(a, np.fromfile(inputs["one_cache"] / name, "<f4"), atol=1e-6)


def test_two_processes_mine_the_pools_of_one(inputs):
    """Each rank encodes exactly its share (chunk c -> rank c % 2), once; rank 0 writes the
    same negatives, pool ids and scores as one process, and prints the summary once."""
    folder = inputs["folder"]
    out, cache, log = folder / "two.jsonl", folder / "two-cache", folder / "two.log"
    done = _torchrun(folder, inputs, out, cache, log)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [sum(_started(log, r)) for r in (0, 1)] == inputs["shares"]
    assert done.stdout.count("queries, corpus") == 1
    _same_as_one_process(inputs, out, cache)


def test_a_rank_killed_mid_encode_resumes_and_loses_at_most_a_chunk(inputs):
    """Rank 1 is SIGKILLed as it starts its third chunk (torchrun then stops rank 0 wherever it
    is); the rerun re-encodes no row that reached the disk, each rank lost at most the one
    chunk it was encoding, and the pools equal one process's."""
    folder = inputs["folder"]
    out, cache, log = folder / "killed.jsonl", folder / "killed-cache", folder / "killed.log"
    killed = _torchrun(folder, inputs, out, cache, log, kill_at=3)
    assert killed.returncode != 0
    assert not out.with_name(out.stem + ".pool.json").exists()  # no half-written pool
    assert _started(log, 1) == [CHUNK] * 3
    manifest = next(inputs["one_cache"].glob("emb-*.json"))
    row_bytes = 4 * json.loads(manifest.read_text())["width"]
    on_disk = []
    for rank in (0, 1):
        shards = list(cache.glob(f"emb-*.shard-{rank:05d}-of-00002.f32"))
        on_disk.append(sum(p.stat().st_size // row_bytes for p in shards))
    assert on_disk[1] == 2 * CHUNK  # the third chunk died with its process
    resumed_log = folder / "resumed.log"
    done = _torchrun(folder, inputs, out, cache, resumed_log)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        before, after = sum(_started(log, rank)), sum(_started(resumed_log, rank))
        assert after == inputs["shares"][rank] - on_disk[rank]  # nothing on disk re-encoded
        assert before - on_disk[rank] <= CHUNK  # at most one chunk lost per rank
    _same_as_one_process(inputs, out, cache)


class _NoBarrier:
    """The ranks of the in-process tests below run one after the other: rank 1 first, so
    its shard is on disk when rank 0 passes the barrier and merges."""

    def wait_for_everyone(self) -> None:
        pass


def _sharded(encoder, chunks: list[list[str]], path: Path):
    from conan_embedding.runtime import Processes

    results = [
        encoder.encode_shards(iter(chunks), path, Processes(rank, 2, _NoBarrier()), key="k")
        for rank in (1, 0)
    ]
    assert results[0] is None  # rank 1 gets nothing back: rank 0 alone goes on
    return results[1]


def test_the_merge_is_the_one_process_file_and_resumes(tmp_path, tiny_bert):
    """In process: rank 0's merge equals what one process writes, also when a rank's share
    is empty or when the merged file was left half written (a killed merge, or a killed
    one-process run); a merged file is a warm cache that no rank re-encodes."""
    from conan_embedding.encoding.texts import TextEncoder, chunked
    from conan_embedding.modeling.embedder import build_embedder

    encoder = TextEncoder(build_embedder(str(tiny_bert)), chunk_size=8, show_progress=False)
    encoded: list[int] = []
    real_encode = encoder._encode_chunk

    def counted_encode(texts, prompt, side=None):
        encoded.append(len(texts))
        return real_encode(texts, prompt, side)

    encoder._encode_chunk = counted_encode
    texts = list(dict.fromkeys(_sentences(60, 9)))
    chunks = list(chunked(texts, 8))
    one = encoder.encode_stream(iter(chunks), tmp_path / "one" / "emb", key="k")
    reference = np.array(one.array())

    encoded.clear()
    merged = _sharded(encoder, chunks, tmp_path / "two" / "emb")
    np.testing.assert_array_equal(np.asarray(merged.array()), reference)
    assert sum(encoded) == len(texts) and merged.complete  # every chunk once, by some rank
    assert not list((tmp_path / "two").glob("*.shard-*"))

    encoded.clear()  # warm: nobody encodes, rank 0 gets the finished file back
    again = _sharded(encoder, chunks, tmp_path / "two" / "emb")
    assert encoded == [] and again.rows == len(texts)

    one_chunk = _sharded(encoder, chunks[:1], tmp_path / "short" / "emb")  # rank 1: no chunk
    np.testing.assert_array_equal(np.asarray(one_chunk.array()), reference[:8])

    def killed_after(count: int):
        yield from chunks[:count]
        raise KeyboardInterrupt  # the merged file stays incomplete, its rows on disk

    with pytest.raises(KeyboardInterrupt):
        encoder.encode_stream(killed_after(3), tmp_path / "half" / "emb", key="k")
    resumed = _sharded(encoder, chunks, tmp_path / "half" / "emb")
    np.testing.assert_array_equal(np.asarray(resumed.array()), reference)
