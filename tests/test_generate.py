"""LLM-generated pairs: answer parsing, templates, the builder and the command, run against the
loopback OpenAI-compatible server (including a resume after the server dies)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from conan_embedding.cli import app
from conan_embedding.data.builders.backends import BackendError, OpenAIChatBackend
from conan_embedding.data.builders.cache import CompletionCache
from conan_embedding.data.builders.generate import (
    GeneratedItem,
    GenerateStats,
    PromptTemplates,
    generate_pairs,
    load_templates,
    parse_generated_items,
    read_passages,
)
from conan_embedding.data.leakage import EvalIndex
from conan_embedding.data.records import read_records
from test_builders_backends import ChatServer

PASSAGES = [
    "The river bank is green in spring.",
    "Open a bank account with a card.",
    "Tea and coffee are drinks.",
]


def fake_llm(body: dict) -> str:
    """Answers like an instruction-following LLM would, keyed on the passage in the prompt."""
    content = body["messages"][-1]["content"]
    passage = next(p for p in PASSAGES if p in content)
    word = passage.split()[1]
    if "search queries" in content:
        return f'```json\n["what about {word}?", "{word} facts", "{passage}"]\n```'
    return json.dumps([{"text": f"Something about {word}.", "score": 4}, {"text": f"A {word} story.", "score": 7},
                       f"Plain {word} rewrite"])  # fmt: skip


def test_parse_generated_items_accepts_json_fences_objects_and_lines():
    assert parse_generated_items('["a", " ", "b"]') == [GeneratedItem("a"), GeneratedItem("b")]
    assert parse_generated_items('Sure!\n```json\n[{"text": "x", "score": "3.5"}, {"query": "y"}]\n```') == [
        GeneratedItem("x", 3.5), GeneratedItem("y"),
    ]  # fmt: skip
    assert parse_generated_items("1. first query\n2) second\n- third\n• fourth") == [
        GeneratedItem("first query"), GeneratedItem("second"), GeneratedItem("third"), GeneratedItem("fourth"),
    ]  # fmt: skip
    assert parse_generated_items("[not json at all") == [GeneratedItem("[not json at all")]
    assert parse_generated_items("") == []


def test_parse_generated_items_survives_a_small_models_broken_format():
    # SmolLM2-135M's answers, seen here: a preamble, a fence, a list cut off by max_tokens
    cut = 'Here are three queries:\n```json\n["dendrite growth in Drosophila", "synaptic in'
    assert parse_generated_items(cut) == [GeneratedItem("dendrite growth in Drosophila")]
    lines = "Here is a JSON list of strings that this passage answers:\n```json\n{\n[\n}"
    assert parse_generated_items(lines) == []
    assert parse_generated_items("Sure:\nWhat does MPO do in atrial fibrillation?") == [
        GeneratedItem("What does MPO do in atrial fibrillation?")
    ]


def test_templates_validate_placeholders_and_load_from_yaml(tmp_path):
    with pytest.raises(ValueError, match=r"\{passage\}"):
        PromptTemplates(query="Write {n} queries")
    with pytest.raises(ValueError, match="literal braces"):
        PromptTemplates(query="{passage} {n} {oops}")
    path = tmp_path / "t.yaml"
    path.write_text(
        yaml.safe_dump({"query": "Q {n} for: {passage}", "system": None}), encoding="utf-8"
    )
    templates = load_templates(path)
    assert templates.query == "Q {n} for: {passage}" and templates.system is None
    path.write_text(yaml.safe_dump({"query": "missing"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"t.yaml: field 'query'"):
        load_templates(path)


def test_generate_pairs_builds_retrieval_and_sts_records():
    eval_index = EvalIndex()
    eval_index.add("eval", ["AND facts", PASSAGES[1]])
    stats = GenerateStats()
    with ChatServer(responder=fake_llm) as server:
        backend = OpenAIChatBackend(server.base_url, "gen", backoff_base=0.01, show_progress=False)
        retrieval, sts = generate_pairs(
            [*PASSAGES, PASSAGES[0]],
            backend,
            n_queries=2,
            n_paraphrases=3,
            eval_index=eval_index,
            stats=stats,
        )
    assert (
        stats.passages == 2 and stats.passages_skipped_eval == 1
    )  # duplicate and eval passage skipped
    assert [(r.query, r.pos) for r in retrieval] == [
        ("what about river?", [PASSAGES[0]]), ("river facts", [PASSAGES[0]]), ("what about and?", [PASSAGES[2]]),
    ]  # fmt: skip
    assert stats.dropped["query_eval_sentence"] == 1  # "and facts" is an evaluation sentence
    assert stats.dropped["query_duplicate_or_copy"] == 2  # the passage copied back as a query
    assert [(s.sentence1, s.sentence2, s.score) for s in sts[:3]] == [
        (PASSAGES[0], "Something about river.", 4.0), (PASSAGES[0], "A river story.", 5.0),
        (PASSAGES[0], "Plain river rewrite", 5.0),
    ]  # fmt: skip
    assert retrieval[0].meta == {"generated_by": "openai:gen"}


def test_data_generate_command_resumes_after_the_server_dies(tmp_path):
    passages = tmp_path / "passages.jsonl"
    passages.write_text("".join(json.dumps({"text": p}) + "\n" for p in PASSAGES), encoding="utf-8")
    cache = tmp_path / "cache.sqlite"
    args = ["data", "generate", str(passages), "--out-dir", str(tmp_path / "out"), "--model", "gen",
            "--cache", str(cache), "--no-dedup", "--n-queries", "2", "--n-paraphrases", "2",
            "--concurrency", "1", "--max-retries", "0"]  # fmt: skip
    with ChatServer(responder=fake_llm) as server:
        server.policy = lambda number, body: 503 if number > 4 else None
        result = CliRunner().invoke(app, [*args, "--base-url", server.base_url])
    assert result.exit_code == 2 and "failed after 1 attempts" in result.output
    assert len(CompletionCache(cache)) == 4
    assert not (tmp_path / "out" / "queries.jsonl").exists()

    with ChatServer(responder=fake_llm) as revived:
        result = CliRunner().invoke(app, [*args, "--base-url", revived.base_url])
    assert result.exit_code == 0, result.output
    assert revived.requests == 2  # 6 prompts in all, 4 were cached
    queries = read_records(tmp_path / "out" / "queries.jsonl", "retrieval")
    paraphrases = read_records(tmp_path / "out" / "paraphrases.jsonl", "sts")
    assert len(queries) == 6 and len(paraphrases) == 6
    report = json.loads((tmp_path / "out" / "generate.report.json").read_text(encoding="utf-8"))
    assert report["queries"] == 6 and report["paraphrases"] == 6


def test_data_generate_dump_templates_and_bad_input(tmp_path):
    out = tmp_path / "templates.yaml"
    result = CliRunner().invoke(
        app,
        ["data", "generate", "x", "--out-dir", "o", "--model", "m", "--dump-templates", str(out)],
    )
    assert result.exit_code == 0 and load_templates(out) == PromptTemplates()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text'"):
        read_passages(bad)
    with pytest.raises(BackendError):
        OpenAIChatBackend(
            "http://127.0.0.1:9/v1", "m", max_retries=0, show_progress=False
        ).complete([[{"role": "user", "content": "x"}]])
