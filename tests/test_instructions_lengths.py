"""Per-task instructions and separate query / passage lengths (issue #26 items 2 and 3):
what a training step tokenizes, what is saved with the model, and how mining, evaluation and
serving apply both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from conan_embedding.config import TrainConfig
from conan_embedding.data.records import write_records
from conan_embedding.modeling.embedder import (
    build_embedder,
    load_embedder,
    save_embedder,
    set_side_lengths,
    side_max_length,
)
from conan_embedding.toy import WORDS

Q_LEN, P_LEN, SEQ = 8, 14, 30
INSTRUCTION = "find the answer"
STS_INSTRUCTION = "same meaning"
PROMPT = f"Instruct: {INSTRUCTION}\nQuery: "


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def _config(folder: Path, model: Path, **model_extra: Any) -> dict:
    """A retrieval and an sts task of long texts (20-40 words, far over both lengths)."""
    rng = np.random.default_rng(0)
    ret = [
        {"query": _words(rng, 20), "pos": [_words(rng, 40)], "neg": [_words(rng, 40)]}
        for _ in range(8)
    ]
    sts = [
        {"sentence1": _words(rng, 20), "sentence2": _words(rng, 20), "score": float(i % 5)}
        for i in range(8)
    ]
    write_records(folder / "ret.jsonl", ret)
    write_records(folder / "sts.jsonl", sts)
    return {
        "output_dir": str(folder / "run"),
        "seed": 1,
        "model": {"name": str(model), "max_seq_length": SEQ, **model_extra},
        "optim": {"lr": 1e-4, "max_steps": 1},
        "tasks": [
            {
                "name": "ret",
                "kind": "retrieval",
                "path": str(folder / "ret.jsonl"),
                "batch_size": 4,
                "negatives": 1,
                "instruction": INSTRUCTION,
            },
            {
                "name": "sts",
                "kind": "sts",
                "path": str(folder / "sts.jsonl"),
                "batch_size": 4,
                "instruction": STS_INSTRUCTION,
            },
        ],
    }


def _spy(model: SentenceTransformer) -> list[tuple[list[str], list[int]]]:
    """Record every batch ``model.preprocess`` tokenizes: its texts and real token counts."""
    seen: list[tuple[list[str], list[int]]] = []
    original = model.preprocess

    def preprocess(texts: list[str], *args: Any, **kwargs: Any) -> dict[str, Any]:
        features = original(texts, *args, **kwargs)
        seen.append((list(texts), features["attention_mask"].sum(1).tolist()))
        return features

    model.preprocess = preprocess  # type: ignore[method-assign]
    return seen


@pytest.fixture(scope="module")
def trained(tiny_bert: Path, tmp_path_factory) -> tuple[Path, TrainConfig]:
    """One training step with both lengths and instructions; the saved model folder."""
    from conan_embedding.reporting.card import readme_for
    from conan_embedding.training.trainer import Trainer

    folder = tmp_path_factory.mktemp("instr")
    config = TrainConfig.model_validate(
        _config(folder, tiny_bert, query_max_length=Q_LEN, passage_max_length=P_LEN)
    )
    trainer = Trainer(config, readme=readme_for(config))
    trainer.train(show_progress=False)
    return trainer.model_dir, config


# ----------------------------------------------------------------------------- config


def test_config_template_and_cbb(tiny_bert: Path, tmp_path: Path):
    config = TrainConfig.model_validate(_config(tmp_path, tiny_bert))
    assert config.model.instruction_prompt("x") == "Instruct: x\nQuery: "
    custom = {**_config(tmp_path, tiny_bert)}
    custom["model"]["instruction_template"] = "<{instruction}> {text}"
    assert TrainConfig.model_validate(custom).model.instruction_prompt("x") == "<x> "
    custom["model"]["instruction_template"] = "{text} <{instruction}>"
    with pytest.raises(ValueError, match="end with"):
        TrainConfig.model_validate(custom)
    # CBB encodes with the same prompts and lengths (tests/test_cbb_options.py checks it)
    cbb = _config(tmp_path, tiny_bert, query_max_length=4, passage_max_length=6)
    cbb["cbb"] = {"world_size": 1}
    config = TrainConfig.model_validate(cbb)
    assert config.model.query_max_length == 4 and config.tasks[0].instruction == INSTRUCTION


# ----------------------------------------------------------------------------- training


def test_training_step_instruction_on_query_side_and_lengths_per_side(
    tiny_bert: Path, tmp_path: Path
):
    from conan_embedding.training.trainer import Trainer

    config = TrainConfig.model_validate(
        _config(tmp_path, tiny_bert, query_max_length=Q_LEN, passage_max_length=P_LEN)
    )
    trainer = Trainer(config)
    seen = _spy(trainer.model)
    tasks = {t.name: t for t in config.tasks}

    trainer.task_loss(tasks["ret"], step=0)
    (queries, q_tokens), (documents, d_tokens) = seen
    assert all(t.startswith(PROMPT) for t in queries)
    assert not any("Instruct:" in t for t in documents)
    assert q_tokens == [Q_LEN] * 4  # the long queries are cut at query_max_length
    assert d_tokens == [P_LEN] * 8  # 4 positives + 4 negatives at passage_max_length

    seen.clear()
    trainer.task_loss(tasks["sts"], step=1)
    (first, a_tokens), (second, b_tokens) = seen
    sts_prompt = f"Instruct: {STS_INSTRUCTION}\nQuery: "
    assert all(t.startswith(sts_prompt) for t in first + second)  # symmetric: both sides
    assert a_tokens == b_tokens == [Q_LEN] * 4  # both sts texts are query side

    # DHNM's no-grad re-encodes use the same prompts and lengths per role
    seen.clear()
    trainer._encode_no_grad(["dog " * 30], role="query", task="ret")
    trainer._encode_no_grad(["dog " * 30], role="passage", task="ret")
    assert seen[0][0][0].startswith(PROMPT) and seen[0][1] == [Q_LEN]
    assert seen[1][0][0].startswith("dog") and seen[1][1] == [P_LEN]


def test_training_without_the_new_fields_is_unchanged(tiny_bert: Path, tmp_path: Path):
    from conan_embedding.training.trainer import Trainer

    raw = _config(tmp_path, tiny_bert)
    for task in raw["tasks"]:
        task.pop("instruction")
    trainer = Trainer(TrainConfig.model_validate(raw))
    seen = _spy(trainer.model)
    trainer.task_loss(trainer.config.tasks[0], step=0)
    (queries, q_tokens), (_, d_tokens) = seen
    assert not any("Instruct" in t for t in queries)
    assert q_tokens == [22] * 4 and d_tokens == [SEQ] * 8  # 20 words + 2 specials; cut at 30
    assert side_max_length(trainer.model, "query") is None
    assert not any(trainer.model.prompts.values())  # ST's empty defaults only


# ----------------------------------------------------------------------------- saved model


def test_saved_model_has_prompts_lengths_and_card(trained: tuple[Path, TrainConfig]):
    folder, _ = trained
    st_config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"]["ret"] == PROMPT
    assert st_config["prompts"]["sts"] == f"Instruct: {STS_INSTRUCTION}\nQuery: "
    card = (folder / "README.md").read_text()
    assert "### Instructions" in card
    assert f"- `ret` (retrieval): {INSTRUCTION}" in card
    assert f"- `sts` (sts): {STS_INSTRUCTION}" in card
    assert "max query length (tokens) | 8" in card

    # a plain sentence-transformers load and ours both restore the lengths
    for model in (SentenceTransformer(str(folder), device="cpu"), load_embedder(folder)):
        assert side_max_length(model, "query") == Q_LEN
        assert side_max_length(model, "passage") == P_LEN
        text = "bank river " * 3
        named = model.encode([text], prompt_name="ret", normalize_embeddings=True)
        prefixed = model.encode([PROMPT + text], normalize_embeddings=True)
        np.testing.assert_allclose(named, prefixed, atol=1e-6)


def test_model_without_side_lengths_behaves_as_before(tiny_bert: Path, tmp_path: Path):
    model = build_embedder(tiny_bert, max_seq_length=SEQ)
    assert side_max_length(model, "query") is side_max_length(model, "passage") is None
    saved = save_embedder(model, tmp_path / "plain")
    assert "query_max_length" not in json.loads((saved / "conan_embedding.json").read_text())
    from conan_embedding.encoding.engine import EmbeddingEngine

    engine = EmbeddingEngine(load_embedder(saved), threads=1, device="cpu")
    assert engine.limit("query") == engine.limit("passage") == engine.limit(None) == SEQ
    set_side_lengths(model, 5, None)
    assert side_max_length(model, "query") == 5 and side_max_length(model, "passage") is None


# ----------------------------------------------------------------------------- encode paths

LONG = "red sun and blue moon over the river " * 6


def _reference(model: SentenceTransformer, text: str, length: int, prompt: str = "") -> np.ndarray:
    """sentence-transformers' own encode with its length set to ``length``."""
    before = model.max_seq_length
    model.max_seq_length = length
    try:
        with torch.no_grad():
            return model.encode([prompt + text], normalize_embeddings=True)
    finally:
        model.max_seq_length = before


def test_mining_encodes_queries_and_corpus_at_their_lengths(trained: tuple[Path, TrainConfig]):
    from conan_embedding.encoding.texts import TextEncoder
    from conan_embedding.mining.offline import MiningConfig, mine

    model = load_embedder(trained[0])
    encoder = TextEncoder(model, show_progress=False, device="cpu")
    query = encoder.encode([LONG], side="query")
    passage = encoder.encode([LONG], side="passage")
    np.testing.assert_allclose(query, _reference(model, LONG, Q_LEN), atol=1e-5)
    np.testing.assert_allclose(passage, _reference(model, LONG, P_LEN), atol=1e-5)
    assert encoder.key("k", None, "query") != encoder.key("k", None, "passage")

    sides: list[tuple[str | None, int]] = []
    original = encoder._encode_chunk

    def spy(texts: Any, prompt: Any, side: Any = None) -> np.ndarray:
        sides.append((side, len(texts)))
        return original(texts, prompt, side)

    encoder._encode_chunk = spy  # type: ignore[method-assign]
    rng = np.random.default_rng(1)
    from conan_embedding.data.records import RetrievalRecord

    records = [
        RetrievalRecord(query=_words(rng, 20), pos=[_words(rng, 30)], neg=[]) for _ in range(3)
    ]
    corpus = [_words(rng, 30) for _ in range(30)]
    config = MiningConfig(range_min=0, range_max=10, num_negatives=2, relative_margin=None)
    mine(records, model, corpus, config, show_progress=False, encoder=encoder)
    assert ("passage", 33) in sides and ("query", 3) in sides


def test_eval_maps_a_task_to_a_prompt_and_cuts_per_side(trained: tuple[Path, TrainConfig]):
    from mteb.types import PromptType

    from conan_embedding.cli.eval import parse_prompt_map
    from conan_embedding.evaluation.encoder import CachedEncoder
    from conan_embedding.evaluation.tasks import TASKS

    model = load_embedder(trained[0])
    sts = TASKS["STSBenchmark"].task_class.metadata
    retrieval = TASKS["SciFact"].task_class.metadata
    prompt_map = parse_prompt_map(["STS=sts", "SciFact=ret"])
    assert prompt_map == {"STS": "sts", "SciFact": "ret"}
    encoder = CachedEncoder(
        model, name="m", prompt_map=prompt_map, show_progress=False, device="cpu"
    )
    sts_prompt = f"Instruct: {STS_INSTRUCTION}\nQuery: "
    assert encoder.resolve_prompt(sts, None) == sts_prompt
    assert encoder.resolve_prompt(retrieval, PromptType.query) == PROMPT
    assert encoder.resolve_prompt(retrieval, PromptType.document) is None  # passages: no prompt

    kwargs = {"hf_split": "test", "hf_subset": "default"}
    symmetric = encoder.encode([{"text": [LONG]}], task_metadata=sts, **kwargs)
    np.testing.assert_allclose(symmetric, _reference(model, LONG, Q_LEN, sts_prompt), atol=1e-5)
    query = encoder.encode(
        [{"text": [LONG]}], task_metadata=retrieval, prompt_type=PromptType.query, **kwargs
    )
    np.testing.assert_allclose(query, _reference(model, LONG, Q_LEN, PROMPT), atol=1e-5)
    document = encoder.encode(
        [{"text": [LONG]}], task_metadata=retrieval, prompt_type=PromptType.document, **kwargs
    )
    np.testing.assert_allclose(document, _reference(model, LONG, P_LEN), atol=1e-5)

    with pytest.raises(ValueError, match="does not have.*'nope'"):
        CachedEncoder(model, name="m", prompt_map={"STS": "nope"}, device="cpu")
    with pytest.raises(Exception, match="TASK=PROMPT_NAME"):
        parse_prompt_map(["STS"])


def test_serve_applies_a_named_prompt_rejects_unknown_and_cuts_per_side(
    trained: tuple[Path, TrainConfig],
):
    from conan_embedding.encoding.engine import EmbeddingEngine
    from conan_embedding.serving.server import ServerSettings, background_server

    engine = EmbeddingEngine.from_path(trained[0], threads=1, name="m", device="cpu")
    model = engine.model
    with background_server(engine, ServerSettings(truncate=True)) as url:

        def post(**body: Any) -> httpx.Response:
            return httpx.post(f"{url}/v1/embeddings", json={"model": "m", **body}, timeout=30)

        text = "bank river tea"
        named = post(input=text, prompt_name="ret")
        assert named.status_code == 200
        vector = np.asarray(named.json()["data"][0]["embedding"], dtype=np.float32)
        # a named prompt reads its texts as queries: prompt + text cut at the query length
        reference = engine.embed([text], prompt=PROMPT, side="query")[0]
        np.testing.assert_allclose(vector, reference, atol=1e-5)
        assert not np.allclose(vector, engine.embed([PROMPT + text])[0], atol=1e-3)
        with torch.no_grad():  # sentence-transformers' own query encode agrees
            st = model.encode([text], prompt_name="ret", task="query", normalize_embeddings=True)
        np.testing.assert_allclose(vector, st[0], atol=1e-5)

        unknown = post(input=text, prompt_name="nope")
        assert unknown.status_code == 400
        error = unknown.json()["error"]
        assert error["param"] == "prompt_name" and error["code"] == "unknown_prompt"
        assert "'ret'" in error["message"] and "'sts'" in error["message"]

        tokens = {
            kind: post(input=LONG, **({"input_type": kind} if kind else {})).json()["usage"][
                "prompt_tokens"
            ]
            for kind in ("query", "passage", "document", None)
        }
        assert tokens == {"query": Q_LEN, "passage": P_LEN, "document": P_LEN, None: SEQ}
        assert post(input=LONG, prompt_name="ret").json()["usage"]["prompt_tokens"] == Q_LEN
        listed = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["prompts"]
        assert {"ret", "sts"} <= set(listed)

    with background_server(engine, ServerSettings()) as url:  # no truncation: a 400
        long = httpx.post(
            f"{url}/v1/embeddings",
            json={"model": "m", "input": LONG[:80], "input_type": "query"},
            timeout=30,
        )
        assert long.status_code == 400 and f"limit of {Q_LEN}" in long.json()["error"]["message"]
