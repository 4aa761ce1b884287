"""CLR building: weighted target languages, translation by parallel corpus and by LLM,
deduplication, the config, the command and a real en<->zh build from ../shared/data."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conan_embedding.cli import app
from conan_embedding.data.builders.backends import OpenAIChatBackend
from conan_embedding.data.builders.clr import (
    LANGUAGE_WEIGHT_PRESETS,
    CLRConfig,
    CLRStats,
    build_clr,
    load_clr_config,
    run_clr,
    sample_target_languages,
)
from conan_embedding.data.builders.translators import (
    AlignedPair,
    CorpusSpec,
    LLMTranslator,
    ParallelCorpusError,
    ParallelCorpusTranslator,
    clean_translation,
    read_corpus,
)
from conan_embedding.data.leakage import EvalIndex, normalize_text
from conan_embedding.data.records import RetrievalRecord, read_records
from test_builders_backends import ChatServer


def test_target_languages_follow_the_weights_and_skip_the_source():
    weights = LANGUAGE_WEIGHT_PRESETS["conan-v2"]
    draws = sample_target_languages(20000, "en", weights, 1, np.random.default_rng(0))
    counts = Counter(d[0] for d in draws)
    assert "en" not in counts
    total_other = sum(w for lang, w in weights.items() if lang != "en")
    for lang, weight in weights.items():
        if lang != "en":
            assert counts[lang] / 20000 == pytest.approx(weight / total_other, abs=0.015)
    two = sample_target_languages(50, "zh", weights, 2, np.random.default_rng(1))
    assert all(len(set(d)) == 2 and "zh" not in d for d in two)
    again = sample_target_languages(50, "zh", weights, 2, np.random.default_rng(1))
    assert two == again  # seeded
    with pytest.raises(ValueError, match="no target language"):
        sample_target_languages(1, "en", {"en": 1.0}, 1, np.random.default_rng(0))


def _translator() -> ParallelCorpusTranslator:
    return ParallelCorpusTranslator([
        AlignedPair("en", "Where is the bank?", "zh", "银行在哪里？"),
        AlignedPair("en", "Where is the bank?", "zh", "银行在哪儿？"),  # second translation: ignored
        AlignedPair("en", "I like tea.", "zh", "我喜欢茶。"),
        AlignedPair("en", "How do I open an account?", "zh", "我怎么开户？"),
    ])  # fmt: skip


def test_parallel_translator_looks_up_normalised_text_in_both_directions():
    translator = _translator()
    assert translator.translate(["where is the  BANK?", "unknown"], "en", "zh") == [
        "银行在哪里？",
        None,
    ]
    assert translator.translate(["我喜欢茶。"], "zh", "en") == ["I like tea."]
    assert translator.translate(["I like tea."], "en", "fr") == [None]
    assert translator.directions() == [("en", "zh"), ("zh", "en")]


def test_parallel_translator_drops_pairs_touching_eval_sentences():
    index = EvalIndex()
    index.add("tatoeba", ["我喜欢茶。"])
    translator = ParallelCorpusTranslator(
        [
            AlignedPair("en", "I like tea.", "zh", "我喜欢茶。"),
            AlignedPair("en", "Hi.", "zh", "嗨。"),
        ],
        exclude=index,
    )
    assert translator.stats.pairs_read == 2 and translator.stats.pairs_dropped_eval == 1
    assert translator.translate(["I like tea.", "Hi."], "en", "zh") == [None, "嗨。"]


def test_build_clr_translates_queries_and_keeps_documents():
    records = [
        RetrievalRecord(
            query="Where is the bank?",
            pos=["The bank is on Main Street."],
            neg=["Tea is green."],
            id="a",
        ),
        RetrievalRecord(query="No translation for me", pos=["doc"], id="b"),
        RetrievalRecord(query="I like tea.", pos=["Tea is a drink."], id="c"),
    ]
    stats = CLRStats()
    out = build_clr(
        records, _translator(), "en", {"zh": 1.0, "en": 5.0}, stats=stats, show_progress=False
    )
    assert [r.query for r in out] == ["银行在哪里？", "我喜欢茶。"]
    assert out[0].pos == ["The bank is on Main Street."] and out[0].neg == ["Tea is green."]
    assert out[0].id == "a:zh"
    assert out[0].meta["clr"] == {
        "query_lang": "zh", "doc_lang": "en", "original_query": "Where is the bank?", "translator": "parallel-corpus",
    }  # fmt: skip
    assert stats.requested == {"en->zh": 3} and stats.untranslatable == {"en->zh": 1}
    assert stats.written == 2


def test_build_clr_drops_unsupported_targets_and_eval_sentences():
    index = EvalIndex()
    index.add("eval", ["Tea is a drink."])
    stats = CLRStats()
    out = build_clr(
        [RetrievalRecord(query="I like tea.", pos=["Tea is a drink."]),
         RetrievalRecord(query="Where is the bank?", pos=["On Main Street."])],
        _translator(), "en", {"zh": 0.5, "fr": 0.5}, eval_index=index, stats=stats, show_progress=False,
    )  # fmt: skip
    assert [r.query for r in out] == ["银行在哪里？"]
    assert stats.unsupported_targets == ["en->fr"]
    assert stats.dedup.records_dropped == 1 and stats.dedup.hits_by_eval_set == {"eval": 1}


def test_build_clr_dedups_on_the_original_query_too():
    index = EvalIndex()
    index.add("eval", ["Where is the bank?"])
    translator = ParallelCorpusTranslator(
        [AlignedPair("en", "Where is the bank?", "zh", "银行在哪里？")]
    )
    out = build_clr([RetrievalRecord(query="Where is the bank?", pos=["x"])], translator, "en", {"zh": 1},
                    eval_index=index, show_progress=False)  # fmt: skip
    assert out == []


def test_llm_translator_through_the_openai_backend():
    table = {
        "Where is the bank?": '"银行在哪里？"\n(This is the translation.)',
        "I like tea.": "   ",
    }

    def translate(body: dict) -> str:
        content = body["messages"][-1]["content"]
        assert "into Chinese" in content
        return next(v for k, v in table.items() if content.endswith(k))

    with ChatServer(responder=translate) as server:
        backend = OpenAIChatBackend(server.base_url, "qwen", backoff_base=0.01, show_progress=False)
        stats = CLRStats()
        out = build_clr(
            [RetrievalRecord(query=q, pos=["doc"]) for q in table], LLMTranslator(backend), "en", {"zh": 1.0},
            stats=stats, show_progress=False,
        )  # fmt: skip
    assert [r.query for r in out] == ["银行在哪里？"]
    assert stats.untranslatable == {"en->zh": 1}
    assert out[0].meta["clr"]["translator"] == "llm:openai:qwen"
    assert clean_translation("「你好」") == "你好" and clean_translation("\n\n") is None
    with pytest.raises(ValueError, match="must contain"):
        LLMTranslator(backend, prompt="no placeholders")


def test_corpus_readers_report_file_and_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("Hi.\t嗨。\tattrib\nonly one column\n", encoding="utf-8")
    with pytest.raises(ParallelCorpusError, match=r"bad.tsv:2"):
        list(read_corpus(CorpusSpec(format="tsv", paths=[str(bad)], langs=("en", "zh"))))
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one\ntwo\n", encoding="utf-8")
    b.write_text("一\n", encoding="utf-8")
    with pytest.raises(ParallelCorpusError, match="not aligned"):
        list(
            read_corpus(
                CorpusSpec(format="aligned_lines", paths=[str(a), str(b)], langs=("en", "zh"))
            )
        )


def _write_small_clr_inputs(tmp_path):
    (tmp_path / "data" / "bitext").mkdir(parents=True)
    (tmp_path / "data" / "bitext" / "tatoeba.cmn-eng.eng").write_text(
        "I like tea.\n", encoding="utf-8"
    )
    (tmp_path / "data" / "bitext" / "tatoeba.cmn-eng.cmn").write_text(
        "我喜欢茶。\n", encoding="utf-8"
    )
    (tmp_path / "en.csv").write_text(
        "Where is the bank?,The bank is on Main Street.,4.5\nI like tea.,Tea is nice.,4.8\nLow score,pair,1.0\n",
        encoding="utf-8",
    )
    (tmp_path / "corpus.tsv").write_text(
        "\ufeffWhere is the bank?\t银行在哪里？\tCC-BY\nI like tea.\t我喜欢茶。\tCC-BY\n",
        encoding="utf-8",
    )
    config = {
        "inputs": [{"path": str(tmp_path / "en.csv"), "format": "sts_csv", "lang": "en", "min_score": 4.0}],
        "preset": "en-zh",
        "translator": {"kind": "parallel", "corpora": [
            {"format": "tsv", "paths": [str(tmp_path / "corpus.tsv")], "langs": ["en", "zh"]}]},
        "output": str(tmp_path / "out" / "clr.jsonl"),
    }  # fmt: skip
    path = tmp_path / "clr.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_data_clr_command_end_to_end(tmp_path):
    config_path = _write_small_clr_inputs(tmp_path)
    result = CliRunner().invoke(
        app,
        ["data", "clr", str(config_path), "--data-dir", str(tmp_path / "data"), "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    rows = read_records(tmp_path / "out" / "clr.jsonl", "retrieval")
    assert [(r.query, r.pos) for r in rows] == [("银行在哪里？", ["The bank is on Main Street."])]
    report = json.loads((tmp_path / "out" / "clr.report.json").read_text(encoding="utf-8"))
    assert report["parallel_corpus"]["pairs_dropped_as_eval"] == 1  # the Tatoeba pair
    assert report["untranslatable"] == {"en->zh": 1} and report["written"] == 1


def test_clr_config_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"inputs": [], "preset": "en-zh", "output": "x",
                                    "translator": {"kind": "parallel", "corpora": []}}), encoding="utf-8")  # fmt: skip
    with pytest.raises(ValueError, match=r"bad.yaml: field 'inputs'"):
        load_clr_config(path)
    with pytest.raises(ValueError, match="exactly one of"):
        CLRConfig.model_validate({"inputs": [{"path": "x", "lang": "en"}], "output": "o",
                                  "translator": {"kind": "llm", "backend": {"kind": "hf", "model": "m"}}})  # fmt: skip
    result = CliRunner().invoke(app, ["data", "clr", str(path)])
    assert result.exit_code == 2 and "field 'inputs'" in result.output


@pytest.mark.integration
def test_real_en_zh_clr_set_has_no_evaluation_sentence(data_dir, tmp_path):
    config = load_clr_config("configs/clr-en-zh.yaml")
    report = run_clr(config, data_dir, output=str(tmp_path / "clr.jsonl"), show_progress=False)
    rows = read_records(tmp_path / "clr.jsonl", "retrieval")
    assert report["written"] == len(rows) > 2000
    langs = Counter((r.meta["clr"]["query_lang"], r.meta["clr"]["doc_lang"]) for r in rows)
    assert langs[("zh", "en")] > 1000 and langs[("en", "zh")] > 1000
    eval_sentences = set()
    for name in ("bitext/tatoeba.cmn-eng.eng", "bitext/tatoeba.cmn-eng.cmn"):
        eval_sentences |= {
            normalize_text(s) for s in (data_dir / name).read_text(encoding="utf-8").splitlines()
        }
    for name in ("sts/stsb-en-test.csv", "sts/stsb-zh-test.csv"):
        import csv

        with open(data_dir / name, encoding="utf-8", newline="") as handle:
            for row in csv.reader(handle):
                eval_sentences |= {normalize_text(row[0]), normalize_text(row[1])}
    texts = [t for r in rows for t in (r.query, r.meta["clr"]["original_query"], *r.pos)]
    assert not any(normalize_text(t) in eval_sentences for t in texts)
    assert (
        report["parallel_corpus"]["pairs_dropped_as_eval"] > 457
    )  # every Tatoeba-touching cmn.txt pair and more
