"""Teacher-score filtering: scores equal the teacher's cosine, the threshold splits the rows,
the report and the PNG histogram are written; with MiniLM, related pairs survive 0.4."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conan_embedding.cli import app
from conan_embedding.data.builders.filter import (
    filter_records,
    pair_scores,
    run_filter,
    score_histogram,
)
from conan_embedding.data.records import PairRecord, RetrievalRecord, read_records, write_records
from conan_embedding.modeling.embedder import build_embedder, save_embedder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def teacher(tiny_bert):
    return build_embedder(tiny_bert, pooling="mean", seed=0)


def test_pair_scores_equal_the_teachers_cosine(teacher):
    queries = ["the cat sat", "the cat sat", "bank loan"]
    passages = ["on the mat", "river water", "open account"]
    scores = pair_scores(teacher, queries, passages, show_progress=False, query_prompt="what ")
    q = teacher.encode(["what " + t for t in queries], normalize_embeddings=True)
    p = teacher.encode(passages, normalize_embeddings=True)
    np.testing.assert_allclose(scores, (q * p).sum(axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="2 queries but 1 passages"):
        pair_scores(teacher, ["a", "b"], ["c"])


def test_filter_keeps_exactly_the_pairs_at_or_above_the_threshold(teacher):
    records = [PairRecord(query=q, pos=p) for q, p in [
        ("the cat sat", "the cat sat"), ("bank money", "river fish boat"), ("tea coffee", "drink tea"),
        ("night moon", "sun day"), ("fast car", "road car fast"),
    ]]  # fmt: skip
    scores = pair_scores(
        teacher, [r.query for r in records], [r.pos for r in records], show_progress=False
    )
    threshold = float(np.median(scores))
    result = filter_records(records, teacher, threshold, show_progress=False)
    assert [r.query for r in result.kept] == [
        r.query for r, s in zip(records, scores, strict=True) if s >= threshold
    ]
    assert (
        len(result.kept) + len(result.dropped) == 5 and result.kept[0].query == "the cat sat"
    )  # cosine 1
    assert 0 < len(result.dropped) < 5


def test_filter_prunes_positives_of_retrieval_records(teacher):
    record = RetrievalRecord(query="the cat sat", pos=["the cat sat", "money loan fee"], neg=["x"])
    low = pair_scores(teacher, ["the cat sat"], ["money loan fee"], show_progress=False)[0]
    result = filter_records(
        [record], teacher, threshold=min(0.999, float(low) + 1e-3), show_progress=False
    )
    assert result.kept[0].pos == ["the cat sat"] and result.kept[0].neg == ["x"]
    assert result.pairs_scored == 2 and result.pairs_kept == 1


def test_score_histogram_counts_every_score():
    hist = score_histogram(np.array([-1.0, 0.01, 0.39, 0.41, 1.0]), bin_width=0.1)
    assert sum(hist["counts"]) == 5 and len(hist["edges"]) == 21


def test_data_filter_command_writes_kept_dropped_report_and_png(teacher, tmp_path):
    model_dir = save_embedder(teacher, tmp_path / "teacher")
    rows = [
        PairRecord(query="the cat sat", pos="the cat sat"),
        PairRecord(query="tea", pos="car road fast"),
    ]
    write_records(tmp_path / "pairs.jsonl", rows)
    scores = pair_scores(
        teacher, [r.query for r in rows], [r.pos for r in rows], show_progress=False
    )
    threshold = float(scores.mean())
    result = CliRunner().invoke(app, [
        "data", "filter", str(tmp_path / "pairs.jsonl"), "--output", str(tmp_path / "kept.jsonl"),
        "--teacher", str(model_dir), "--threshold", str(threshold), "--dropped", str(tmp_path / "dropped.jsonl"),
        "--no-dedup",  # the evaluation index is tested in tests/test_leakage.py
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "kept 1 / dropped 1 records" in result.output
    assert [r.pos for r in read_records(tmp_path / "kept.jsonl", "pairs")] == ["the cat sat"]
    assert [r.pos for r in read_records(tmp_path / "dropped.jsonl", "pairs")] == ["car road fast"]
    report = json.loads((tmp_path / "kept.filter.json").read_text())
    assert report["records_kept"] == 1 and report["records_dropped"] == 1
    assert sum(report["histogram"]["counts"]) == 2
    assert (tmp_path / "kept.scores.png").read_bytes()[:8] == PNG_MAGIC


def test_data_filter_reports_bad_rows_with_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text(
        '{"query": "a", "pos": "b"}\n{"query": "a"}\n', encoding="utf-8"
    )
    result = CliRunner().invoke(app, ["data", "filter", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                                      "--teacher", "unused", "--no-dedup"])  # fmt: skip
    assert result.exit_code == 2 and "bad.jsonl:2: field 'pos'" in result.output


@pytest.mark.integration
def test_minilm_teacher_keeps_paraphrases_and_drops_unrelated_pairs(minilm_path, tmp_path):
    rows = [
        PairRecord(
            query="How do I open a bank account?", pos="Steps to open a new bank account online."
        ),
        PairRecord(query="A man is playing a guitar.", pos="Someone plays the guitar."),
        PairRecord(
            query="How do I open a bank account?", pos="The giraffe is the tallest land animal."
        ),
        PairRecord(
            query="Best pizza recipe", pos="Quantum chromodynamics describes the strong force."
        ),
    ]
    write_records(tmp_path / "pairs.jsonl", rows)
    report = run_filter(
        tmp_path / "pairs.jsonl", tmp_path / "kept.jsonl", minilm_path, show_progress=False
    )
    kept = read_records(tmp_path / "kept.jsonl", "pairs")
    assert [r.pos for r in kept] == [rows[0].pos, rows[1].pos]
    assert report["threshold"] == 0.4 and report["records_dropped"] == 2
