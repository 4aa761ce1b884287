"""Task and benchmark names beyond the local registry (issue #26 item 7): resolution, mteb
benchmark expansion (metadata only), the offline error, and a mixed local + mteb run.

Nothing here touches the network: the offline tests set ``HF_HUB_OFFLINE=1`` and point the
Hugging Face caches at empty folders.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import mteb
import pytest
from mteb.mocks.mock_tasks.sts import MockSTSTask
from tests.test_evaluation import data_dir, tiny_model  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from conan_embedding.cli import app
from conan_embedding.evaluation import run as run_module
from conan_embedding.evaluation.report import load_model_scores, summary_table
from conan_embedding.evaluation.run import evaluate
from conan_embedding.evaluation.selection import (
    DatasetUnavailableError,
    SelectedTask,
    UnknownBenchmarkError,
    UnknownTaskError,
    check_datasets_available,
    dataset_cached,
    select_tasks,
)
from conan_embedding.evaluation.tasks import SUITES

AFQMC = mteb.get_task("AFQMC").metadata.dataset  # {"path": "C-MTEB/AFQMC", "revision": ...}


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HF_HUB_OFFLINE=1 with empty datasets / hub caches (so nothing is cached, nothing fetched)."""
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))
    return cache


def test_local_names_stay_local_and_other_names_go_to_mteb():
    selected = select_tasks("stsbenchmark, AFQMC,mini-cmteb, lcqmc, t2retrieval")
    by_name = {item.name: item for item in selected}
    assert [item.name for item in selected[:2]] == ["STSBenchmark", "AFQMC"]
    # LCQMC, STSB, BQ exist in mteb too: the local file wins, and no duplicate is added
    assert all(by_name[name].source == "local" for name in SUITES["mini-cmteb"])
    assert by_name["LCQMC"].mteb_task is None
    assert [item.name for item in selected].count("LCQMC") == 1
    assert by_name["AFQMC"].source == "mteb"
    assert by_name["AFQMC"].dataset == AFQMC
    assert by_name["T2Retrieval"].source == "mteb"  # case-insensitive when unambiguous


def test_unknown_names_error_with_close_matches_from_both():
    with pytest.raises(UnknownTaskError) as caught:
        select_tasks("STSBenchmark,STSBenchmarc,AFQMX")
    message = str(caught.value)
    assert "'STSBenchmarc'" in message and "'AFQMX'" in message
    line = next(li for li in message.splitlines() if "'STSBenchmarc'" in li and "close" in li)
    assert "close local names: STSBenchmark" in line
    assert "STSBenchmark.v2" in line  # an mteb-only name
    assert "AFQMC" in next(li for li in message.splitlines() if li.startswith("  'AFQMX':"))
    assert isinstance(caught.value, ValueError)  # the CLI prints it as one line


def test_a_benchmark_expands_to_mtebs_tasks_with_its_splits():
    expected = mteb.get_benchmark("MTEB(cmn, v1)").tasks
    selected = select_tasks(None, "MTEB(cmn, v1)")
    assert [item.name for item in selected] == [t.metadata.name for t in expected]
    assert all(item.source == "mteb" for item in selected)
    by_name = {item.name: item.mteb_task for item in selected}
    assert by_name["AFQMC"].eval_splits == ["validation"]  # as the benchmark selects
    assert by_name["T2Retrieval"].eval_splits == ["dev"]
    assert not any(task.data_loaded for task in by_name.values())  # metadata only
    # an alias, and spacing/case, name the same benchmark
    assert [i.name for i in select_tasks(None, "mteb(cmn,v1)")] == [i.name for i in selected]
    assert [i.name for i in select_tasks(None, "CMTEB")] == [i.name for i in selected]
    # a name in --tasks wins over the benchmark's task of the same name (local STSB file)
    mixed = select_tasks("STSB", "MTEB(cmn, v1)")
    assert mixed[0] == SelectedTask("STSB", "local")
    assert [i.name for i in mixed].count("STSB") == 1


def test_an_unknown_benchmark_lists_close_benchmark_names():
    with pytest.raises(UnknownBenchmarkError, match=r"'MTEB\(cmn, v1\)'"):
        select_tasks(None, "MTEB(cmn, v9)")


def test_offline_names_the_dataset_and_leaves_no_output(offline: Path, tmp_path: Path):
    out = tmp_path / "out"
    # the model is never loaded: the check comes first (a bad model name would fail otherwise)
    with pytest.raises(DatasetUnavailableError) as caught:
        evaluate("no-such-model", "STSBenchmark,AFQMC", output_dir=out, cache_dir=False)
    message = str(caught.value)
    assert f"AFQMC: dataset {AFQMC['path']} revision {AFQMC['revision']}" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "mteb.get_task(n).load_data() for n in ['AFQMC']" in message
    assert "STSBenchmark" not in message  # local tasks need no network
    assert not out.exists()


@pytest.fixture()
def package_logging() -> Iterator[None]:
    """The CLI adds a handler on CliRunner's stderr; take it away again after the test."""
    package = logging.getLogger("conan_embedding")
    handlers, level = list(package.handlers), package.level
    yield
    package.handlers[:] = handlers
    package.setLevel(level)


def test_cli_offline_error_is_one_message_and_writes_nothing(
    offline: Path, tmp_path: Path, package_logging: None
):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["eval", "no-such-model", "--tasks", "AFQMC", "--output-dir", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and AFQMC["path"] in result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    result = CliRunner().invoke(app, ["eval", "m", "--benchmark", "MTEB(cmn, v9)"])
    assert result.exit_code == 2 and "MTEB(cmn, v1)" in result.output


def test_a_cached_dataset_passes_the_offline_check(offline: Path):
    assert not dataset_cached(AFQMC["path"], AFQMC["revision"])
    # what datasets' own offline loader looks for: <namespace>___<snake_name>/<config>/<v>/<hash>
    (offline / "datasets" / "C-MTEB___afqmc" / "default" / "0.0.0" / "abc").mkdir(parents=True)
    assert dataset_cached(AFQMC["path"], AFQMC["revision"])
    check_datasets_available(select_tasks("AFQMC"))  # no error


def test_mixed_local_and_mteb_tasks_keep_the_result_format(
    tiny_model,  # noqa: F811
    data_dir,  # noqa: F811
    offline: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    mock = MockSTSTask()  # an mteb task with in-memory data: nothing to download
    mock.load_data()
    selected = [SelectedTask("STSBenchmark", "local"), SelectedTask("MockSTSTask", "mteb", mock)]
    monkeypatch.setattr(run_module, "select_tasks", lambda tasks, benchmark=None: selected)
    out = tmp_path / "out"
    scores = evaluate(
        tiny_model, "ignored", output_dir=out, data_dir=data_dir, cache_dir=False,
        show_progress=False, model_name="tiny",
    )  # fmt: skip
    assert list(scores) == ["STSBenchmark", "MockSTSTask"]
    folder = next(out.glob("tiny/*"))
    assert {p.name for p in folder.glob("*.json")} >= {"STSBenchmark.json", "MockSTSTask.json"}
    info = json.loads((folder / "run_info.json").read_text(encoding="utf-8"))["tasks"]
    assert info["STSBenchmark"]["source"] == "local"
    assert info["MockSTSTask"]["source"] == "mteb"
    assert info["MockSTSTask"]["main_score"] == scores["MockSTSTask"]
    assert info["MockSTSTask"]["main_metric"] == "cosine_spearman"
    assert info["MockSTSTask"]["eval_splits"] == ["test"]
    loaded = load_model_scores(folder)
    assert loaded.scores == pytest.approx(scores, abs=1e-4)  # as rounded on disk
    assert "| MockSTSTask | cosine_spearman |" in summary_table([loaded])
