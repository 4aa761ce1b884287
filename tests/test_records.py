from __future__ import annotations

import json

import pytest

from conan_embedding.data.records import (
    RecordError,
    RetrievalRecord,
    read_records,
    write_records,
)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_each_kind(tmp_path):
    ret = _write(tmp_path / "r.jsonl", ['{"query": "q", "pos": ["p"], "neg": ["n1", "n2"]}'])
    sts = _write(tmp_path / "s.jsonl", ['{"sentence1": "a", "sentence2": "b", "score": 3.5}'])
    cls = _write(tmp_path / "c.jsonl", ['{"text": "t", "label": 7}'])
    pairs = _write(tmp_path / "p.jsonl", ['{"query": "q", "pos": "p"}', ""])
    assert read_records(ret, "retrieval")[0].neg == ["n1", "n2"]
    assert read_records(sts, "sts")[0].score == 3.5
    assert read_records(cls, "classification")[0].label == "7"
    assert len(read_records(pairs, "pairs")) == 1


@pytest.mark.parametrize(
    ("line", "field", "problem"),
    [
        ('{"query": "q", "pos": []}', "pos", "at least 1"),
        ('{"query": "q", "pos": ["p"], "negs": ["x"]}', "negs", "Extra inputs"),
        ('{"query": "  ", "pos": ["p"]}', "query", "non-empty"),
        ('{"query": "q", "pos": ["p"]', "<json>", "invalid JSON"),
        ('["q", "p"]', "<row>", "JSON object"),
        ('{"query": "q", "pos": ["p", 3]}', "pos.1", "string"),
    ],
)
def test_bad_row_names_file_line_and_field(tmp_path, line, field, problem):
    path = _write(tmp_path / "bad.jsonl", ['{"query": "ok", "pos": ["fine"]}', line])
    with pytest.raises(RecordError) as info:
        read_records(path, "retrieval")
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 2, field)
    assert problem in str(err)
    assert str(err).startswith(f"{path}:2: field '{field}'")


def _every_jsonl_reader():
    from conan_embedding.data.builders.generate import read_passages
    from conan_embedding.data.records import read_documents, read_sft_records
    from conan_embedding.mining.offline import read_corpus, read_pools
    from conan_embedding.serving.encode import iter_texts

    return {
        "records": lambda p: read_records(p, "sts"),
        "sft": read_sft_records,
        "documents": read_documents,
        "corpus": read_corpus,
        "pools": read_pools,
        "passages": read_passages,
        "encode": lambda p: list(iter_texts(p)),
    }


@pytest.mark.parametrize("reader", sorted(_every_jsonl_reader()))
@pytest.mark.parametrize(
    ("line", "field"), [('{"text": "cut', "<json>"), ('"just a string"', "<row>")]
)
def test_every_jsonl_reader_names_the_bad_line_the_same_way(tmp_path, reader, line, field):
    path = _write(tmp_path / "bad.jsonl", ["", line])
    with pytest.raises(RecordError) as info:
        _every_jsonl_reader()[reader](path)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 2, field)


def test_write_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "out" / "r.jsonl"
    rows = [RetrievalRecord(query="q", pos=["p"], neg=["n"]), {"query": "x", "pos": ["y"]}]
    assert write_records(path, rows) == 2
    assert [r.query for r in read_records(path, "retrieval")] == ["q", "x"]

    def boom():
        yield {"query": "partial", "pos": ["p"]}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_records(path, boom())
    # the earlier complete file is untouched and no temp file is left behind
    assert [json.loads(x)["query"] for x in path.read_text().splitlines()] == ["q", "x"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.jsonl"]


def test_unknown_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown task kind"):
        read_records(_write(tmp_path / "x.jsonl", ["{}"]), "qa")


def test_lazy_records_match_the_eager_reader_and_shard(tmp_path):
    from conan_embedding.data.records import open_records

    rows = [json.dumps({"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}"]}) for i in range(10)]
    path = tmp_path / "r.jsonl"
    path.write_bytes(("\ufeff" + "\n".join(rows[:4] + ["", "  "] + rows[4:])).encode("utf-8"))
    eager, lazy = read_records(path, "retrieval"), open_records(path, "retrieval")
    assert len(lazy) == 10 and list(lazy) == eager and lazy[-1] == eager[-1]
    assert [lazy[i] for i in range(10)] == eager and list(lazy[2:5]) == eager[2:5]
    assert lazy.line_of(4) == 7  # blank lines are skipped but counted
    shards = [lazy.shard(r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3]
    assert sorted((r.query for s in shards for r in s), key=lambda q: int(q[1:])) == [
        r.query for r in eager
    ]
    assert [len(lazy.shard(r, 3, even=True)) for r in range(3)] == [3, 3, 3]
    with pytest.raises(IndexError):
        lazy[10]


def test_lazy_records_raise_the_same_error_only_when_the_bad_row_is_read(tmp_path):
    from conan_embedding.data.records import open_records

    good = '{"query": "ok", "pos": ["fine"]}'
    path = _write(tmp_path / "bad.jsonl", [good, "", '{"query": "q", "pos": ["p", 3]}', good])
    lazy = open_records(path, "retrieval")  # opening parses nothing
    assert len(lazy) == 3 and lazy[0].query == "ok" and lazy[2].query == "ok"
    with pytest.raises(RecordError) as info:
        lazy[1]
    assert str(info.value).startswith(f"{path}:3: field 'pos.1'")
    with pytest.raises(RecordError, match=r":3: field 'pos.1'"):
        lazy.validate()
    cut = _write(tmp_path / "cut.jsonl", [good, '{"query": "q"'])
    with pytest.raises(RecordError, match=r"cut.jsonl:2: field '<json>'"):
        open_records(cut, "retrieval")[1]


def test_lazy_records_feed_a_dataloader_with_workers(tmp_path):
    from conan_embedding.data.records import open_records, records_loader

    rows = [{"query": f"q{i}", "pos": f"p{i}"} for i in range(25)]
    path = _write(tmp_path / "p.jsonl", [json.dumps(r) for r in rows])
    dataset = open_records(path, "pairs")
    dataset[0]  # an open descriptor in the parent: the workers must reopen their own

    loader = records_loader(
        dataset, 4, collate=lambda batch: [r.query for r in batch], num_workers=2, shuffle=True
    )
    seen = [q for batch in loader for q in batch]
    assert sorted(seen) == sorted(r["query"] for r in rows)
    assert seen != [r["query"] for r in rows]  # shuffled, seeded
