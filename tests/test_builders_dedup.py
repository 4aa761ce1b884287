"""Deduplication against evaluation sets (data/leakage.py): normalisation, the index, removal."""

from __future__ import annotations

import pytest

from conan_embedding.data.builders.translators import read_tsv_pairs
from conan_embedding.data.leakage import (
    EVAL_SETS,
    DedupReport,
    EvalIndex,
    build_eval_index,
    dedup_retrieval,
    normalize_text,
)
from conan_embedding.data.records import RetrievalRecord


def test_normalize_text_applies_nfkc_whitespace_case_and_bom():
    assert normalize_text("\ufeff  Ｈｅｌｌｏ,\u3000 World！ ") == "hello, world!"
    assert normalize_text("你好。") == normalize_text("你好。 ")
    assert normalize_text("A\tB\nC") == "a b c"


def test_index_remembers_which_sets_own_a_sentence():
    index = EvalIndex()
    index.add("set-a", ["The cat sat.", "  "])
    index.add("set-b", ["the  CAT sat."])
    assert index.hits("THE CAT SAT.") == ("set-a", "set-b")
    assert "the cat sat." in index and "a dog" not in index
    assert index.loaded == {"set-a": 1, "set-b": 1}


def test_dedup_drops_records_touching_eval_sentences_and_prunes_negatives():
    index = EvalIndex()
    index.add("test-set", ["leaked query", "leaked positive", "leaked negative"])
    records = [
        RetrievalRecord(query="clean query", pos=["clean pos"], neg=["leaked negative", "ok neg"]),
        RetrievalRecord(query="Leaked  Query", pos=["clean pos"]),
        RetrievalRecord(query="q3", pos=["leaked positive"]),
        RetrievalRecord(query="q4", pos=["leaked positive", "kept pos"]),
        RetrievalRecord(query="q5", pos=["p5"], meta={"src": "x"}),
        RetrievalRecord(query="translated", pos=["p6"], meta={"orig": "leaked query"}),
    ]
    report = DedupReport()
    kept = list(
        dedup_retrieval(
            records,
            index,
            report,
            extra_texts=lambda r: [r.meta["orig"]] if r.meta and "orig" in r.meta else [],
        )
    )
    assert [r.query for r in kept] == ["clean query", "q4", "q5"]
    assert kept[0].neg == ["ok neg"]
    assert kept[1].pos == ["kept pos"]
    assert kept[2] is records[4]  # untouched records pass through unchanged
    assert report.records_in == 6 and report.records_dropped == 3
    assert report.negatives_dropped == 1 and report.positives_dropped == 2
    assert report.hits_by_eval_set["test-set"] == 5


def test_build_eval_index_reads_a_data_folder_and_lists_missing_files(tmp_path):
    (tmp_path / "bitext").mkdir()
    (tmp_path / "bitext" / "tatoeba.cmn-eng.eng").write_text(
        "I like tea.\nHello!\n", encoding="utf-8"
    )
    (tmp_path / "bitext" / "tatoeba.cmn-eng.cmn").write_text(
        "我喜欢茶。\n你好！\n", encoding="utf-8"
    )
    (tmp_path / "sts").mkdir()
    (tmp_path / "sts" / "stsb-en-test.csv").write_text(
        '"A, quoted",B two,3.0\r\n', encoding="utf-8"
    )
    index = build_eval_index(tmp_path)
    assert index.hits("i like tea.") == ("tatoeba-cmn-eng.eng",)
    assert "我喜欢茶。" in index and "a, quoted" in index and "b two" in index
    assert "sts/lcqmc-test.txt" in index.missing
    only_pools = build_eval_index(tmp_path, groups=["pool"])
    assert len(only_pools) == 0
    with pytest.raises(ValueError, match="unknown evaluation groups"):
        build_eval_index(tmp_path, groups=["train"])


@pytest.mark.integration
def test_real_eval_index_covers_every_eval_file_and_cleans_cmn_txt(data_dir):
    index = build_eval_index(data_dir)
    assert index.missing == []
    assert set(index.loaded) == {s.name for s in EVAL_SETS}
    # The README's measured overlap: 442 Tatoeba English test sentences occur in cmn.txt.
    tatoeba_eng = (data_dir / "bitext/tatoeba.cmn-eng.eng").read_text(encoding="utf-8").splitlines()
    cmn_english = {
        normalize_text(p.text_a)
        for p in read_tsv_pairs(data_dir / "parallel/cmn.txt", ("en", "zh"))
    }
    assert sum(normalize_text(s) in cmn_english for s in tatoeba_eng) == 442
    assert all(s in index for s in tatoeba_eng)
