from __future__ import annotations

import json

import pytest

from conan_embedding.data.leakage import build_eval_index
from conan_embedding.data.prepare import prepare
from conan_embedding.data.records import read_records
from conan_embedding.data.splits import reranking_holdout_indices


@pytest.mark.integration
def test_prepare_converts_training_files_and_drops_test_overlap(tmp_path, data_dir):
    report = prepare(
        tmp_path,
        data_dir=data_dir,
        only=[
            "parallel-en-zh",
            "bge-finetune",
            "banking77-train",
            "stsb-en-train",
            "cmrc2018-trial",
        ],
    )
    # cmn.txt holds 442 Tatoeba test sentences: every pair touching one is gone
    assert report["parallel-en-zh"]["dropped_eval_overlap"] > 400
    index = build_eval_index(data_dir, groups=("test",))
    pairs = read_records(tmp_path / "parallel-en-zh.jsonl", "pairs")
    assert not any(p.query in index or p.pos in index for p in pairs)
    bge = read_records(tmp_path / "bge-finetune.jsonl", "retrieval")
    assert report["bge-finetune"]["rows"] == len(bge) <= 2701 - 300
    # the rows the reranking task scores are never trained on
    source = read_records(data_dir / "retrieval" / "bge_finetune_data.jsonl", "retrieval")
    held_out = {source[i].query for i in reranking_holdout_indices(len(source))}
    assert not held_out & {r.query for r in bge}
    assert (
        len({r.label for r in read_records(tmp_path / "banking77-train.jsonl", "classification")})
        == 77
    )
    sts = read_records(tmp_path / "stsb-en-train.jsonl", "sts")
    assert all(0 <= r.score <= 5 for r in sts)
    cmrc = read_records(tmp_path / "cmrc2018-trial.jsonl", "retrieval")
    assert all(len(r.neg) == 7 and r.pos[0] not in r.neg for r in cmrc)
    assert json.loads((tmp_path / "prepare_report.json").read_text()) == report


def test_prepare_rejects_unknown_sources(tmp_path, data_dir):
    with pytest.raises(ValueError, match="unknown sources"):
        prepare(tmp_path, data_dir=data_dir, only=["nope"])
