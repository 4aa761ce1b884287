"""No training file any builder writes shares a normalised sentence with a set we report.

The reported sentences are taken from the evaluator itself (every task of
``evaluation/tasks/``, built from the data folder), not from the leakage index, so a task
the index forgot makes these tests fail. Each builder is run (v1 ``data prepare``, CLR,
generated pairs, the teacher filter in Python and as ``data filter``, the v2 corpus, v2
stage 4) and every text field of every file it writes is checked. The old stage-4 leak
(the 300 ``BGEHeldoutRerankingLocal`` rows trained on) is reproduced on a small data folder
built here, and must be dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conan_embedding.data.leakage import (
    ALL_GROUPS,
    BGE_FINETUNE,
    EVAL_SETS,
    REPORTED_GROUPS,
    EvalIndex,
    build_eval_index,
    normalize_text,
    reranking_holdout_rows,
)
from conan_embedding.data.records import RecordError, RetrievalRecord, write_records
from conan_embedding.data.splits import reranking_holdout_indices

# files a task reads that are not scored rows: probe training splits, a shared corpus, qrels
NOT_SCORED = {
    "classification/banking77-train.csv",  # the logistic probe's train split
    "classification/csl-cls_ctg-train.tsv",  # idem
    "retrieval/scifact/corpus.jsonl.gz",  # MTEB's SciFact corpus; train queries use it too
    "retrieval/scifact/qrels/test.tsv",  # ids only
}


# ---------------------------------------------------------------- helpers


def _texts(value: Any) -> Iterator[str]:
    """Every string inside a JSON value (records, metadata included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in ("score", "label", "id", "generated_by", "translator"):
                yield from _texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)


def _file_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                yield from _texts(row)
                # a pretraining document holds "english\nchinese": each side is a sentence
                if isinstance(row.get("text"), str) and "\n" in row["text"]:
                    yield from row["text"].split("\n")


def _jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def leaks(paths: list[Path], forbidden: set[str]) -> dict[str, list[str]]:
    """``{file: [normalised sentences it shares with forbidden]}``, for the files that leak."""
    found = {}
    for path in paths:
        shared = sorted({normalize_text(t) for t in _file_texts(path)} & forbidden)
        if shared:
            found[str(path)] = shared[:5]
    return found


def _datasets(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    from datasets import Dataset

    if isinstance(node, Dataset):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _datasets(value, (*path, str(key)))


def evaluator_sentences(data_dir: Path) -> dict[str, set[str]]:
    """``{task: normalised sentences it scores}``, read through the evaluator's own tasks.

    Retrieval tasks score their queries (and, for reranking, the labelled positives); a
    retrieval corpus is not held out (SciFact's train queries share MTEB's corpus by design).
    """
    from conan_embedding.evaluation.tasks import TASKS, build_task

    out: dict[str, set[str]] = {}
    for name in TASKS:
        task = build_task(name, data_dir=data_dir)
        data = task.build_dataset()
        sentences: set[str] = set()
        for where, ds in _datasets(data):
            if "test" not in where or where[-1] == "corpus":
                continue
            columns = ["text"] if where[-1] == "queries" else ds.column_names
            for column in columns:
                if column in ("id", "label", "labels", "score"):
                    continue
                values = ds[column]
                if values and isinstance(values[0], str):
                    sentences.update(normalize_text(v) for v in values)
                elif values and isinstance(values[0], list) and isinstance(values[0][0], str):
                    sentences.update(normalize_text(v) for vs in values for v in vs)
        if name == "BGEHeldoutRerankingLocal":  # its labelled positives are scored rows too
            sentences.update(
                normalize_text(p)
                for _, row in reranking_holdout_rows(data_dir / BGE_FINETUNE)
                for p in row["pos"]
            )
        sentences.discard("")
        out[name] = sentences
    return out


@pytest.fixture(scope="module")
def reported(data_dir_module: Path) -> set[str]:
    return set().union(*evaluator_sentences(data_dir_module).values())


@pytest.fixture(scope="module")
def full_index(data_dir_module: Path) -> EvalIndex:
    return build_eval_index(data_dir_module, ALL_GROUPS)


@pytest.fixture(scope="module")
def data_dir_module() -> Path:
    from conftest import shared_data_dir

    found = shared_data_dir()
    if found is None:
        pytest.skip("../shared/data is not present (set CONAN_DATA_DIR to run this test)")
    return found


# ---------------------------------------------------------------- the index covers the evaluator


def test_every_evaluation_task_and_its_scored_files_are_in_the_index():
    from conan_embedding.evaluation.tasks import TASKS

    covered = {task for eval_set in EVAL_SETS for task in eval_set.tasks}
    assert set(TASKS) - covered == set(), "a task of evaluation/tasks/ has no EvalSet"
    indexed = {s.relative_path for s in EVAL_SETS}
    for name, info in TASKS.items():
        scored = set(info.task_class.data_files) - NOT_SCORED
        assert scored <= indexed, f"{name} scores {sorted(scored - indexed)}, not in EVAL_SETS"
    assert {s.group for s in EVAL_SETS if s.tasks} == {"test"}  # reported => test group


@pytest.mark.integration
def test_index_holds_every_sentence_the_evaluator_scores(data_dir_module):
    index = build_eval_index(data_dir_module, REPORTED_GROUPS)
    assert index.missing == []
    for task, sentences in evaluator_sentences(data_dir_module).items():
        missing = sorted(s for s in sentences if s not in index.owners)
        assert not missing, f"{task}: {len(missing)} scored sentences not indexed: {missing[:3]}"


def test_leaks_detects_a_held_out_query_in_a_written_file(tmp_path):
    # the checker itself: a file holding an indexed sentence (any case/width/space) is reported
    path = tmp_path / "retrieval.jsonl"
    write_records(path, [RetrievalRecord(query="Ｈｅｌｄ  OUT query", pos=["p"], neg=["n"])])
    assert leaks([path], {"held out query"}) == {str(path): ["held out query"]}
    assert leaks([path], {"something else"}) == {}


# ---------------------------------------------------------------- the old leak, on small data


def _small_data(root: Path, n_rows: int = 400) -> tuple[list[str], list[str]]:
    """A data folder with just what stage 4 and ``data prepare`` read for bge and CNSD train.

    Row ``i`` of bge_finetune_data is built from CNSD train pair ``i`` (as text2vec built it),
    and one non-held-out row repeats a held-out query. Returns the held-out queries and
    positives.
    """
    (root / "retrieval").mkdir(parents=True)
    (root / "sts").mkdir()
    (root / "parallel").mkdir()
    held = set(reranking_holdout_indices(n_rows))
    rows = [
        {"query": f"query {i}", "pos": [f"positive {i}"], "neg": [f"neg {i} {j}" for j in range(4)]}
        for i in range(n_rows)
    ]
    first_held = min(held)
    free = next(i for i in range(n_rows) if i not in held)
    rows[free]["query"] = rows[first_held]["query"]  # the file repeats queries on several rows
    (root / BGE_FINETUNE).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "sts/cnsd-stsb.train.data").write_text(
        "".join(f"{r['query']}\t{r['pos'][0]}\t4\n" for r in rows), encoding="utf-8"
    )
    for name in ("stsb-en-train.csv", "stsb-zh-train.csv"):
        (root / "sts" / name).write_text("a clean one,a clean two,4.0\n", encoding="utf-8")
    (root / "parallel/cmn.txt").write_text(
        "".join(f"english {i}\t中文 {i}\tCC-BY\n" for i in range(8)), encoding="utf-8-sig"
    )
    queries = [rows[i]["query"] for i in sorted(held)]
    positives = [rows[i]["pos"][0] for i in sorted(held)]
    return queries, positives


def test_stage4_drops_the_held_out_reranking_rows(tmp_path):
    from conan_embedding.data.builders.v2_corpus import build_supervised_records

    queries, positives = _small_data(tmp_path / "data")
    forbidden = {normalize_text(t) for t in (*queries, *positives)}
    paths = build_supervised_records(tmp_path / "out", tmp_path / "data", negatives=3)
    assert leaks([Path(p) for p in paths.values()], forbidden) == {}
    retrieval = _jsonl(paths["retrieval"])
    assert len(retrieval) == 400 - 300 - 1  # the row repeating a held-out query went too
    sts = _jsonl(paths["sts"])
    assert len(sts) == 2 + 400 - 300 - 1  # the CNSD pairs the held-out rows were built from


def test_prepare_drops_the_held_out_rows_and_their_cnsd_pairs(tmp_path):
    from conan_embedding.data.prepare import prepare

    queries, positives = _small_data(tmp_path / "data")
    forbidden = {normalize_text(t) for t in (*queries, *positives)}
    report = prepare(
        tmp_path / "out", data_dir=tmp_path / "data", only=["bge-finetune", "cnsd-stsb-train"]
    )
    written = sorted((tmp_path / "out").glob("*.jsonl"))
    assert len(written) == 2 and leaks(written, forbidden) == {}
    assert report["cnsd-stsb-train"]["dropped_eval_overlap"] == 301


def test_a_bad_bge_row_names_file_and_line(tmp_path):
    from conan_embedding.data.builders.v2_corpus import build_supervised_records

    _small_data(tmp_path / "data", n_rows=310)
    path = tmp_path / "data" / BGE_FINETUNE
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[6] = '{"query": "no positives"}'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"bge_finetune_data.jsonl:7: field 'pos'"):
        build_supervised_records(tmp_path / "out", tmp_path / "data")
    lines[6] = "{not json"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"bge_finetune_data.jsonl:7: field '<json>'"):
        build_eval_index(tmp_path / "data", ["test"])


# ---------------------------------------------------------------- every builder, real data


@pytest.mark.integration
def test_v2_stage4_files_share_nothing_with_reported_sets(
    data_dir_module, reported, full_index, tmp_path
):
    from conan_embedding.data.builders.v2_corpus import build_supervised_records

    paths = [Path(p) for p in build_supervised_records(tmp_path, data_dir_module).values()]
    assert leaks(paths, reported) == {}
    assert leaks(paths, set(full_index.owners)) == {}
    held = {
        normalize_text(row["query"])
        for _, row in reranking_holdout_rows(data_dir_module / BGE_FINETUNE)
    }
    assert len(held) == 297  # 300 rows, 3 queries repeated
    trained = {normalize_text(row["query"]) for row in _jsonl(tmp_path / "retrieval.jsonl")}
    assert len(trained) > 1500 and not trained & held


@pytest.mark.integration
def test_v2_corpus_shares_nothing_with_reported_sets(
    data_dir_module, reported, full_index, tmp_path
):
    from conan_embedding.data.builders.v2_corpus import build_shared_corpus

    summary = build_shared_corpus(tmp_path, data_dir_module)
    paths = [Path(p) for p in summary["sources"].values()] + [Path(summary["sft"])]
    assert leaks(paths, reported) == {}
    assert leaks(paths, set(full_index.owners)) == {}
    assert summary["eval_files_missing"] == []


@pytest.mark.integration
def test_data_prepare_shares_nothing_with_reported_sets(data_dir_module, reported, tmp_path):
    from conan_embedding.data.prepare import prepare

    report = prepare(tmp_path, data_dir=data_dir_module)
    written = sorted(tmp_path.glob("*.jsonl"))
    assert len(written) == len(report) >= 14
    # LCQMC / BQ dev and ATEC are prepare's own training data (no task we report scores them)
    assert leaks(written, reported) == {}


@pytest.mark.integration
def test_clr_set_shares_nothing_with_reported_sets(data_dir_module, reported, tmp_path):
    from conan_embedding.data.builders.clr import load_clr_config, run_clr

    config = load_clr_config(Path(__file__).parents[1] / "configs" / "clr-en-zh.yaml")
    run_clr(config, data_dir_module, output=str(tmp_path / "clr.jsonl"), show_progress=False)
    assert leaks([tmp_path / "clr.jsonl"], reported) == {}


class _ScriptedLLM:
    """A chat back-end that answers every prompt with a fixed list (held-out sentences in it)."""

    name = "scripted"

    def __init__(self, answer: list[str]):
        self.answer = answer

    def complete(self, conversations):
        return [json.dumps(self.answer, ensure_ascii=False) for _ in conversations]


@pytest.mark.integration
def test_generated_pairs_share_nothing_with_reported_sets(
    data_dir_module, reported, full_index, tmp_path
):
    from conan_embedding.data.builders.generate import run_generate

    held = reranking_holdout_rows(data_dir_module / BGE_FINETUNE)
    tatoeba = (data_dir_module / "bitext/tatoeba.cmn-eng.eng").read_text(encoding="utf-8")
    passages = tmp_path / "passages.txt"
    passages.write_text(
        f"A clean passage about rivers.\n{held[0][1]['query']}\n{tatoeba.splitlines()[0]}\n",
        encoding="utf-8",
    )
    answer = [held[1][1]["query"], held[2][1]["pos"][0], "a clean generated question"]
    report = run_generate(passages, tmp_path / "out", _ScriptedLLM(answer), eval_index=full_index)
    written = sorted((tmp_path / "out").glob("*.jsonl"))
    assert len(written) == 2 and leaks(written, reported) == {}
    assert report["passages_skipped_eval"] == 2
    assert report["queries"] == 1 and report["paraphrases"] == 1


@pytest.mark.integration
def test_teacher_filter_output_shares_nothing_with_reported_sets(
    data_dir_module, reported, full_index, tmp_path, monkeypatch
):
    from conan_embedding.data.builders import filter as teacher_filter
    from conan_embedding.data.records import PairRecord

    held = reranking_holdout_rows(data_dir_module / BGE_FINETUNE)
    rows = [
        PairRecord(query=held[0][1]["query"], pos="anything"),
        PairRecord(query="clean query", pos=held[0][1]["pos"][0]),
        PairRecord(query="clean query", pos="clean positive"),
    ]
    write_records(tmp_path / "in.jsonl", rows)
    # every pair passes the teacher: only the index can remove the held-out ones
    monkeypatch.setattr(teacher_filter, "pair_scores", lambda m, q, p, **k: np.ones(len(q)))
    monkeypatch.setattr(teacher_filter, "plot_histogram", lambda *a, **k: None)
    report = teacher_filter.run_filter(
        tmp_path / "in.jsonl", tmp_path / "kept.jsonl", "unused", model=object(),
        eval_index=full_index, show_progress=False,
    )  # fmt: skip
    assert leaks([tmp_path / "kept.jsonl"], reported) == {}
    assert report["records_in"] == 3 and report["records_kept"] == 1
    assert report["eval_overlap"]["records_dropped"] == 2
    assert "bge-reranking-holdout" in report["eval_overlap"]["hits_by_eval_set"]


def _filter_on_the_command_line(tmp_path, monkeypatch, data_dir: Path, rows, *extra: str):
    """``conan-embed data filter`` with a teacher under which every pair passes: only the
    evaluation index can remove a row. Returns the kept file and the report."""
    from typer.testing import CliRunner

    from conan_embedding.cli import app
    from conan_embedding.data.builders import filter as teacher_filter
    from conan_embedding.modeling import embedder

    write_records(tmp_path / "in.jsonl", rows)
    monkeypatch.setattr(embedder, "load_embedder", lambda *a, **k: object())
    monkeypatch.setattr(teacher_filter, "pair_scores", lambda m, q, p, **k: np.ones(len(q)))
    monkeypatch.setattr(teacher_filter, "plot_histogram", lambda *a, **k: None)
    kept = tmp_path / "kept.jsonl"
    result = CliRunner().invoke(
        app,
        ["data", "filter", str(tmp_path / "in.jsonl"), "--output", str(kept),
         "--teacher", "unused", "--data-dir", str(data_dir), *extra],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return kept, json.loads(kept.with_suffix(".filter.json").read_text(encoding="utf-8"))


def test_data_filter_command_drops_held_out_rows(tmp_path, monkeypatch):
    """The command line passes the evaluation index to the filter (``--dedup``, the default)."""
    from conan_embedding.data.records import PairRecord

    queries, positives = _small_data(tmp_path / "data")
    forbidden = {normalize_text(t) for t in (*queries, *positives)}
    rows = [
        PairRecord(query=queries[0], pos="anything"),
        PairRecord(query="clean query", pos=positives[1]),
        PairRecord(query="clean query", pos="clean positive"),
    ]
    kept, report = _filter_on_the_command_line(tmp_path, monkeypatch, tmp_path / "data", rows)
    assert leaks([kept], forbidden) == {}
    assert report["records_in"] == 3 and report["records_kept"] == 1
    assert report["eval_overlap"]["records_dropped"] == 2
    # --no-dedup: the same rows all pass (the index, not the teacher, removed them)
    kept, report = _filter_on_the_command_line(
        tmp_path, monkeypatch, tmp_path / "data", rows, "--no-dedup"
    )
    assert report["records_kept"] == 3 and "eval_overlap" not in report
    assert set(leaks([kept], forbidden)) == {str(kept)}


@pytest.mark.integration
def test_data_filter_command_output_shares_nothing_with_reported_sets(
    data_dir_module, reported, tmp_path, monkeypatch
):
    held = reranking_holdout_rows(data_dir_module / BGE_FINETUNE)
    tatoeba = (data_dir_module / "bitext/tatoeba.cmn-eng.eng").read_text(encoding="utf-8")
    rows = [
        RetrievalRecord(query=held[0][1]["query"], pos=["anything"], neg=["n"]),
        RetrievalRecord(query="clean query", pos=[held[1][1]["pos"][0], "clean"], neg=["n"]),
        RetrievalRecord(query=tatoeba.splitlines()[0], pos=["p"], neg=["n"]),
        RetrievalRecord(query="clean query", pos=["clean positive"], neg=["n"]),
    ]
    kept, report = _filter_on_the_command_line(
        tmp_path, monkeypatch, data_dir_module, rows, "--kind", "retrieval"
    )
    assert leaks([kept], reported) == {}
    assert report["records_in"] == 4 and report["eval_overlap"]["records_dropped"] == 2
    assert report["eval_files_missing"] == []
