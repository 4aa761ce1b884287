"""Datasets as training input (issue #26 item 6): save_to_disk folders, parquet and arrow
files, hub names (offline error), column mapping, bad-row errors, a 2-step training run."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import yaml

from conan_embedding.config import ConfigError, load_config
from conan_embedding.data.hf_sources import DatasetRecords, DatasetRowError, export_jsonl
from conan_embedding.data.records import RecordError, open_records, read_records
from conan_embedding.toy import toy_train_config

ROWS = {
    "question": [f"question {i}" for i in range(20)],
    "answer": [f"answer {i}" for i in range(20)],  # one string where `pos` is a list
    "neg": [[f"wrong {i}", f"other {i}"] for i in range(20)],
    "title": ["unused"] * 20,  # a column no field reads
}
MAPPING = {"query": "question", "pos": "answer"}


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Parquet inputs are converted into the datasets cache: keep it in the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _check(records, n: int = 20) -> None:
    assert isinstance(records, DatasetRecords) and len(records) == n
    assert records[3].query == "question 3"
    assert records[3].pos == ["answer 3"] and records[3].neg == ["wrong 3", "other 3"]
    view = records.select([5, 7]).shard(1, 2)
    assert [r.query for r in view] == ["question 7"] and view.line_of(0) == 7
    assert records.validate() == n


def test_save_to_disk_folder_dataset_and_dataset_dict(tmp_path):
    data = datasets.Dataset.from_dict(ROWS)
    data.save_to_disk(tmp_path / "ds")
    _check(open_records(tmp_path / "ds", "retrieval", columns=MAPPING))
    datasets.DatasetDict({"train": data, "test": data.select(range(4))}).save_to_disk(
        tmp_path / "dd"
    )
    _check(open_records(tmp_path / "dd", "retrieval", columns=MAPPING, split="train"))
    assert len(open_records(tmp_path / "dd", "retrieval", columns=MAPPING, split="test")) == 4
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]: set the task's split"):
        open_records(tmp_path / "dd", "retrieval", columns=MAPPING)


def test_parquet_and_arrow_files(tmp_path):
    data = datasets.Dataset.from_dict(ROWS)
    data.to_parquet(str(tmp_path / "train.parquet"))
    _check(open_records(tmp_path / "train.parquet", "retrieval", columns=MAPPING))
    data.save_to_disk(tmp_path / "ds")
    arrow = next((tmp_path / "ds").glob("*.arrow"))
    _check(open_records(arrow, "retrieval", columns=MAPPING))


def test_column_mapping_missing_columns_and_other_kinds(tmp_path):
    datasets.Dataset.from_dict(ROWS).save_to_disk(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"needs the field\(s\) \['query', 'pos'\].*question"):
        open_records(tmp_path / "ds", "retrieval")
    with pytest.raises(ValueError, match=r"not columns of the dataset"):
        open_records(tmp_path / "ds", "retrieval", columns={"query": "questoin", "pos": "answer"})
    with pytest.raises(ValueError, match=r"\['negs'\] are not fields of a retrieval row"):
        open_records(tmp_path / "ds", "retrieval", columns={**MAPPING, "negs": "neg"})
    pairs = open_records(tmp_path / "ds", "pairs", columns=MAPPING)
    assert (pairs[0].query, pairs[0].pos) == ("question 0", "answer 0")

    labels = datasets.ClassLabel(names=["bank", "cat"])
    features = datasets.Features({"sentence": datasets.Value("string"), "label": labels})
    cls = datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [1, 0]}, features=features)
    cls.save_to_disk(tmp_path / "cls")
    records = open_records(tmp_path / "cls", "classification", columns={"text": "sentence"})
    assert [r.label for r in records] == ["cat", "bank"]  # a ClassLabel column gives its names
    # read_records (the teacher filter's reader, before its leakage pass) reads one too
    sts = datasets.Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "score": [3]})
    sts.to_parquet(str(tmp_path / "sts.parquet"))
    assert read_records(tmp_path / "sts.parquet", "sts")[0].score == 3.0


def test_a_bad_row_names_the_dataset_row_and_column(tmp_path):
    rows = {k: list(v) for k, v in ROWS.items()}
    rows["answer"][17] = None  # a null where a positive is required
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "ds")
    records = open_records(tmp_path / "ds", "retrieval", columns=MAPPING)
    assert records[16].pos == ["answer 16"]  # rows before it are fine: validated when read
    with pytest.raises(DatasetRowError) as err:
        records.validate()
    assert isinstance(err.value, RecordError) and err.value.row == 17
    assert str(err.value) == (
        f"{tmp_path / 'ds'}: row 17: column 'answer' (field 'pos'): "
        "expected a list of strings, got null"
    )

    ints = datasets.Dataset.from_dict({"query": ["q", "r"], "pos": [1, 2]})
    ints.save_to_disk(tmp_path / "ints")
    with pytest.raises(
        DatasetRowError, match=r"ints: row 1: column 'pos': expected a list of strings, got int"
    ):
        open_records(tmp_path / "ints", "retrieval")[1]

    empty = {k: list(v) for k, v in ROWS.items()}
    empty["question"][4] = "  "
    datasets.Dataset.from_dict(empty).to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(
        DatasetRowError, match=r"e.parquet: row 4: column 'question' \(field 'query'\): .*non-empty"
    ):
        open_records(tmp_path / "e.parquet", "retrieval", columns=MAPPING).validate()


def test_hub_name_offline_names_the_dataset_and_how_to_fetch_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError) as err:
        open_records("hf://nobody-here/no-such-set:default:train", "retrieval")
    message = str(err.value)
    assert "hf://nobody-here/no-such-set" in message and "offline" in message
    assert "load_dataset('nobody-here/no-such-set', 'default', split='train')" in message
    assert ".save_to_disk(" in message


def test_config_fields_and_refusals(tmp_path):
    base = toy_train_config(tmp_path, tmp_path / "model", 2, tasks=("ret",))
    task = base["tasks"][0]

    def load(**changes):
        config = {**base, "tasks": [{**task, **changes}]}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return load_config(path)

    hub = load(path="hf://owner/name:cfg:train", columns={"query": "q"})
    assert hub.tasks[0].path == "hf://owner/name:cfg:train"  # not resolved as a local path
    assert hub.tasks[0].columns == {"query": "q"}
    with pytest.raises(ConfigError, match="streaming: true is not supported.*memory-mapped"):
        load(path="data/ds", streaming=True)
    with pytest.raises(ConfigError, match="columns and split apply to dataset inputs"):
        load(columns={"query": "q"})
    with pytest.raises(ConfigError, match="conan-embed data export hf://o/n OUT.jsonl"):
        load(path="hf://o/n", dynamic_negatives={"rule": "v1"})


def test_export_writes_our_jsonl_and_mining_refuses_a_hub_name(tmp_path):
    datasets.Dataset.from_dict(ROWS).save_to_disk(tmp_path / "ds")
    out = tmp_path / "out.jsonl"
    assert export_jsonl(tmp_path / "ds", "retrieval", out, columns=MAPPING, limit=5) == 5
    rows = read_records(out, "retrieval")
    assert rows[2].query == "question 2" and rows[2].pos == ["answer 2"]

    from conan_embedding.mining.offline import mine_file

    with pytest.raises(ValueError, match=r"conan-embed data export hf://o/n OUT.jsonl"):
        mine_file("hf://o/n", tmp_path / "mined.jsonl", "unused")


def test_two_training_steps_on_a_parquet_task(tmp_path, tiny_bert):
    from conan_embedding.training.trainer import Trainer

    config = toy_train_config(tmp_path, tiny_bert, 2, tasks=("ret", "sts"))
    retrieval = read_records(config["tasks"][0]["path"], "retrieval")
    columns = {
        "question": [r.query for r in retrieval],
        "answer": [r.pos[0] for r in retrieval],  # one string: read as [answer]
        "neg": [r.neg for r in retrieval],
    }
    datasets.Dataset.from_dict(columns).to_parquet(str(tmp_path / "ret.parquet"))
    config["tasks"][0].update(path=str(tmp_path / "ret.parquet"), columns=MAPPING)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    trainer = Trainer(load_config(path))
    assert isinstance(trainer.records["ret"], DatasetRecords)
    result = trainer.train(show_progress=False)
    assert result.steps == 2 and result.model_dir.is_dir()
    assert Path(result.model_dir).parent == Path(config["output_dir"])
