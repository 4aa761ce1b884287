"""Fast tests of the evaluator on a tiny random BERT and a tiny copy of the data folder."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import mteb
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sentence_transformers import SentenceTransformer

from conan_embedding.evaluation.encoder import CachedEncoder, EmbeddingCache, model_fingerprint
from conan_embedding.evaluation.run import evaluate
from conan_embedding.evaluation.tasks import (
    SUITES,
    DataFormatError,
    build_task,
    cap_corpus,
    expand_task_names,
    file_revision,
)
from conan_embedding.modeling.embedder import build_embedder

WORDS = [
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "is",
    "playing",
    "guitar",
    "piano",
    "running",
    "eating",
    "food",
    "the",
    "on",
    "in",
    "car",
    "plane",
]
STS_ROWS = [
    ("a man is playing guitar", "a man plays the guitar", 4.8),
    ("a woman is eating food", "a woman eats", 4.0),
    ("a dog is running", "a cat is running", 2.5),
    ("the plane is in the car", "a man is playing piano", 0.2),
    ("a cat is eating", "a dog is eating food", 2.0),
    ("a man is running", "a woman is playing piano", 0.5),
    ("the dog is on the car", "a dog is on a car", 4.6),
    ("a woman is playing guitar", "a man is eating", 0.4),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> SentenceTransformer:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *WORDS,
        *letters,
        *[f"##{c}" for c in letters],
    ]
    vocab = list(dict.fromkeys(vocab))
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return build_embedder(folder, pooling="mean")


def write_sts_benchmark(data_dir: Path, rows: list[tuple[str, str, float]] = STS_ROWS) -> None:
    path = data_dir / "sts" / "stsbenchmark.tsv.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["split\tgenre\tdataset\tyear\tsid\tscore\tsentence1\tsentence2"]
    lines.append("train\tmain\tMSRvid\t2012\t0001\t5.0\ta train row\tnot in the test\r")
    lines += [
        f"test\tmain\tMSRvid\t2012\t{i:04d}\t{s:.3f}\t{a}\t{b}" for i, (a, b, s) in enumerate(rows)
    ]
    with gzip.open(path, "wt", encoding="utf-8", newline="") as handle:
        handle.write("\r\n".join(lines) + "\r\n")


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_sts_benchmark(root)
    return root


def direct_sts_spearman(model: SentenceTransformer, rows: list[tuple[str, str, float]]) -> float:
    """Spearman of cosine computed without mteb, as the independent reference."""
    first = model.encode([a for a, _, _ in rows], normalize_embeddings=True)
    second = model.encode([b for _, b, _ in rows], normalize_embeddings=True)
    cosine = (first * second).sum(axis=1)
    return float(spearmanr(cosine, [s for _, _, s in rows])[0])


def test_sts_score_equals_spearman_of_cosine(tiny_model, data_dir, tmp_path):
    scores = evaluate(
        tiny_model, ["STSBenchmark"], data_dir=data_dir, cache_dir=False, show_progress=False
    )
    assert set(scores) == {"STSBenchmark"}
    assert scores["STSBenchmark"] == pytest.approx(
        direct_sts_spearman(tiny_model, STS_ROWS), abs=1e-6
    )


def test_results_are_written_in_mteb_layout(tiny_model, data_dir, tmp_path):
    out = tmp_path / "results"
    scores = evaluate(
        tiny_model,
        "STSBenchmark",
        output_dir=out,
        data_dir=data_dir,
        cache_dir=False,
        show_progress=False,
        model_name="org/tiny-bert",
    )
    revision = model_fingerprint(tiny_model)[:12]
    folder = out / "org__tiny-bert" / revision
    result = mteb.TaskResult.from_disk(folder / "STSBenchmark.json")
    assert result.mteb_version == mteb.__version__
    assert result.task_name == "STSBenchmark"
    assert result.get_score() == pytest.approx(scores["STSBenchmark"], abs=1e-6)
    # the dataset revision names the bytes of the local file, not the hub copy
    assert result.dataset_revision == file_revision(data_dir / "sts" / "stsbenchmark.tsv.gz")
    info = json.loads((folder / "run_info.json").read_text(encoding="utf-8"))
    assert info["tasks"]["STSBenchmark"]["comparable_to_mteb"] is True
    assert info["mteb_version"] == mteb.__version__
    assert (folder / "model_meta.json").is_file()
    assert not list(folder.glob(".*tmp"))  # no temp files left behind


def test_second_run_is_served_from_the_cache(tiny_model, data_dir, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "results"
    first = evaluate(
        tiny_model,
        ["STSBenchmark"],
        data_dir=data_dir,
        cache_dir=cache,
        output_dir=out,
        show_progress=False,
    )
    second = evaluate(
        tiny_model,
        ["STSBenchmark"],
        data_dir=data_dir,
        cache_dir=cache,
        output_dir=out,
        show_progress=False,
    )
    assert first == second
    info = json.loads(next(out.rglob("run_info.json")).read_text(encoding="utf-8"))
    assert info["tasks"]["STSBenchmark"]["texts_encoded"] == 0
    assert info["tasks"]["STSBenchmark"]["cache_hits"] == 2 * len(STS_ROWS)
    assert list((cache / model_fingerprint(tiny_model)).glob("shard-*.safetensors"))


def test_cached_embeddings_equal_fresh_ones(tiny_model, tmp_path):
    texts = ["a man is running", "a dog", "a man is running", "the car"]
    encoder = CachedEncoder(tiny_model, name="tiny", cache_dir=tmp_path, show_progress=False)
    fresh = encoder.encode_texts(texts)
    assert encoder.encoded_texts == 3  # the duplicate is encoded once
    reloaded = CachedEncoder(tiny_model, name="tiny", cache_dir=tmp_path, show_progress=False)
    cached = reloaded.encode_texts(texts)
    assert reloaded.encoded_texts == 0
    np.testing.assert_array_equal(fresh, cached)
    np.testing.assert_allclose(fresh, tiny_model.encode(texts), atol=1e-5)
    # a different prompt is a different key
    reloaded.encode_texts(texts[:1], prompt="query: ")
    assert reloaded.encoded_texts == 1


def test_vectors_made_under_autocast_are_never_served_to_a_float32_evaluation(tiny_model, tmp_path):
    """A bf16 evaluation (``recipe run --mixed-precision bf16`` wraps mteb in autocast) and a
    float32 one of the same model share the cache folder's parent, never its entries."""
    from conan_embedding.runtime import autocast_for

    texts = ["a man is running", "a dog", "the car"]
    encoder = CachedEncoder(tiny_model, name="tiny", cache_dir=tmp_path, show_progress=False)
    with autocast_for("cpu", "bf16"):
        in_bf16 = encoder.encode_texts(texts)
    in_fp32 = encoder.encode_texts(texts)
    assert encoder.encoded_texts == 6  # the float32 pass found nothing to reuse
    assert not np.array_equal(in_bf16, in_fp32)
    np.testing.assert_allclose(in_fp32, tiny_model.encode(texts), atol=1e-5)
    fingerprint = model_fingerprint(tiny_model)
    assert {p.name for p in tmp_path.iterdir()} == {fingerprint, f"{fingerprint}-bf16"}
    again = CachedEncoder(tiny_model, name="tiny", cache_dir=tmp_path, show_progress=False)
    with autocast_for("cpu", "bf16"):
        np.testing.assert_array_equal(again.encode_texts(texts), in_bf16)
    np.testing.assert_array_equal(again.encode_texts(texts), in_fp32)
    assert again.encoded_texts == 0


def test_changing_a_weight_changes_the_cache_namespace(tiny_model):
    before = model_fingerprint(tiny_model)
    parameter = next(tiny_model.parameters())
    with torch.no_grad():
        parameter[0, 0] += 1.0
    try:
        assert model_fingerprint(tiny_model) != before
    finally:
        with torch.no_grad():
            parameter[0, 0] -= 1.0
    assert model_fingerprint(tiny_model) == before


def test_a_different_token_limit_is_a_different_cache_namespace(tiny_model, tmp_path):
    """Same weights cut at another length give other embeddings; they must not be shared."""
    limit = tiny_model.max_seq_length
    texts = ["word " * 40]
    try:
        tiny_model.max_seq_length = 8
        short_key = model_fingerprint(tiny_model)
        short = CachedEncoder(
            tiny_model, name="t", cache_dir=tmp_path, show_progress=False
        ).encode_texts(texts)
        tiny_model.max_seq_length = 32
        assert model_fingerprint(tiny_model) != short_key
        longer = CachedEncoder(
            tiny_model, name="t", cache_dir=tmp_path, show_progress=False
        ).encode_texts(texts)
    finally:
        tiny_model.max_seq_length = limit
    assert float(np.dot(short[0], longer[0])) < 0.9999


def test_cache_rejects_a_corrupt_shard(tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "abc"
    folder.mkdir()
    save_file(
        {
            "keys": np.zeros((2, 3), dtype=np.uint8),
            "embeddings": np.zeros((2, 4), dtype=np.float32),
        },
        str(folder / "shard-bad.safetensors"),
    )
    with pytest.raises(ValueError, match="shard-bad"):
        EmbeddingCache(tmp_path, "abc").lookup([b"x" * 16])


def test_symmetric_tasks_use_the_query_prompt_on_both_sides(tiny_model, data_dir):
    prompted = SentenceTransformer(
        modules=list(tiny_model), prompts={"query": "query: ", "passage": "passage: "}
    )
    scores = evaluate(
        prompted, ["STSBenchmark"], data_dir=data_dir, cache_dir=False, show_progress=False
    )
    rows = [(f"query: {a}", f"query: {b}", s) for a, b, s in STS_ROWS]
    assert scores["STSBenchmark"] == pytest.approx(direct_sts_spearman(tiny_model, rows), abs=1e-6)
    no_prompt = evaluate(
        prompted,
        ["STSBenchmark"],
        data_dir=data_dir,
        cache_dir=False,
        show_progress=False,
        symmetric_prompt=None,
    )
    assert no_prompt["STSBenchmark"] == pytest.approx(
        direct_sts_spearman(tiny_model, STS_ROWS), abs=1e-6
    )


def test_bad_row_names_file_and_line(tmp_path):
    root = tmp_path / "data"
    (root / "sts").mkdir(parents=True)
    (root / "sts" / "cnsd-stsb.test.data").write_text(
        "一个\t两个\t3\n一个\t两个\tfive\n", encoding="utf-8"
    )
    task = build_task("STSB", data_dir=root)
    with pytest.raises(DataFormatError, match=r"cnsd-stsb\.test\.data:2: score: not a number"):
        task.load_data()
    (root / "sts" / "cnsd-stsb.test.data").write_text("only two\tfields\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"cnsd-stsb\.test\.data:1: expected 3 fields"):
        build_task("STSB", data_dir=root).load_data()


def test_suites_expand_to_known_tasks():
    assert expand_task_names("mini-mteb") == SUITES["mini-mteb"]
    assert {"STSBenchmark", "Banking77Classification", "SciFact"} <= set(SUITES["mini-mteb"])
    assert {"STSB", "LCQMC", "BQ", "WaimaiLocal", "CMRC2018RetrievalLocal"} <= set(
        SUITES["mini-cmteb"]
    )
    assert set(expand_task_names("all")) >= set(SUITES["cross-lingual"])
    assert expand_task_names("stsbenchmark, STSB,STSBenchmark") == ["STSBenchmark", "STSB"]
    with pytest.raises(KeyError, match="unknown task or suite"):
        expand_task_names(["NoSuchTask"])


def test_corpus_cap_keeps_every_relevant_document():
    corpus = [f"d{i}" for i in range(100)]
    relevant = {"q1": {"d5": 1, "d70": 1}, "q2": {"d99": 1}}
    kept, qrels = cap_corpus(corpus, relevant, 10)
    assert len(kept) == 10 and {"d5", "d70", "d99"} <= set(kept)
    assert qrels == relevant
    assert (kept, qrels) == cap_corpus(corpus, relevant, 10)  # seeded
    assert cap_corpus(corpus, relevant, None) == (corpus, relevant)
    # a cap below the relevant documents keeps fewer queries, each with all its documents
    kept, qrels = cap_corpus(corpus, relevant, 2)
    assert len(kept) == 2 and len(qrels) == 1
    assert all(doc in kept for docs in qrels.values() for doc in docs)


def write_scifact(data_dir: Path) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    docs = {
        "10": ("Guitar", "a man is playing guitar"),
        "11": ("", "a woman is eating food"),
        "12": ("Dogs", "a dog is running on the car"),
        "13": ("", "the plane is in the car"),
        "14": ("Piano", "a woman is playing piano"),
        "15": ("", "a cat is eating"),
    }
    queries = {"1": "man guitar", "2": "dog running", "3": "cat eating food", "4": "train query"}
    qrels = {"1": {"10"}, "2": {"12", "15"}, "3": {"15", "11"}}
    folder = data_dir / "retrieval" / "scifact"
    (folder / "qrels").mkdir(parents=True)
    with gzip.open(folder / "corpus.jsonl.gz", "wt", encoding="utf-8") as handle:
        for doc_id, (title, text) in docs.items():
            handle.write(
                json.dumps({"_id": doc_id, "title": title, "text": text, "metadata": {}}) + "\n"
            )
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as handle:
        for query_id, text in queries.items():
            # metadata holds the answers in the real file: it must never reach the model
            handle.write(
                json.dumps({"_id": query_id, "text": text, "metadata": {"answer": "10"}}) + "\n"
            )
    lines = ["query-id\tcorpus-id\tscore"] + [
        f"{q}\t{d}\t1" for q, ds in qrels.items() for d in sorted(ds)
    ]
    (folder / "qrels" / "test.tsv").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    doc_texts = {d: f"{t} {x}".strip() for d, (t, x) in docs.items()}
    return doc_texts, {q: queries[q] for q in qrels}, qrels


def direct_ndcg_at_10(model, docs: dict[str, str], queries: dict[str, str], qrels) -> float:
    """nDCG@10 with binary relevance, written out from its definition (no mteb, no pytrec_eval)."""
    doc_ids = list(docs)
    doc_emb = model.encode([docs[d] for d in doc_ids], normalize_embeddings=True)
    values = []
    for query_id, text in queries.items():
        query_emb = model.encode([text], normalize_embeddings=True)[0]
        ranking = [doc_ids[i] for i in np.argsort(-(doc_emb @ query_emb), kind="stable")][:10]
        dcg = sum(1 / np.log2(rank + 2) for rank, d in enumerate(ranking) if d in qrels[query_id])
        ideal = sum(1 / np.log2(rank + 2) for rank in range(min(len(qrels[query_id]), 10)))
        values.append(dcg / ideal)
    return float(np.mean(values))


def test_retrieval_ndcg_equals_its_definition(tiny_model, tmp_path):
    root = tmp_path / "data"
    docs, queries, qrels = write_scifact(root)
    scores = evaluate(tiny_model, ["SciFact"], data_dir=root, cache_dir=False, show_progress=False)
    assert scores["SciFact"] == pytest.approx(
        direct_ndcg_at_10(tiny_model, docs, queries, qrels), abs=1e-5
    )


def test_capped_corpus_is_reported(tiny_model, tmp_path):
    root = tmp_path / "data"
    write_scifact(root)
    out = tmp_path / "results"
    evaluate(
        tiny_model,
        ["SciFact"],
        data_dir=root,
        cache_dir=False,
        show_progress=False,
        output_dir=out,
        max_corpus=4,
    )
    info = json.loads(next(out.rglob("run_info.json")).read_text(encoding="utf-8"))
    assert info["max_corpus"] == 4
    assert info["tasks"]["SciFact"]["corpus_sizes"] == {"default": 4}
    assert info["tasks"]["SciFact"]["corpus_capped"] is True
    assert info["tasks"]["SciFact"]["comparable_to_mteb"] is False
    from conan_embedding.evaluation.report import load_all, summary_table

    table = summary_table(load_all(out))
    assert "SciFact" in table and " *" in table


def write_banking(data_dir: Path) -> None:
    folder = data_dir / "classification"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = {"card": ["card", "guitar"], "food": ["food", "eating"], "pets": ["dog", "cat"]}
    for split, count in (("train", 12), ("test", 5)):
        rows = ["text,category"]
        for label, words in labels.items():
            for _ in range(count):
                rows.append(f'"{" ".join(rng.choice(words, 3))} a man",{label}')
        (folder / f"banking77-{split}.csv").write_text("\r\n".join(rows) + "\r\n", encoding="utf-8")


def test_classification_runs_mtebs_undersampled_probe(tiny_model, tmp_path):
    root = tmp_path / "data"
    write_banking(root)
    out = tmp_path / "results"
    scores = evaluate(
        tiny_model,
        ["Banking77Classification"],
        data_dir=root,
        cache_dir=False,
        show_progress=False,
        output_dir=out,
    )
    result = mteb.TaskResult.from_disk(next(out.rglob("Banking77Classification.json")))
    test_scores = result.scores["test"][0]
    # mteb's protocol: n_experiments=10 probes on 8 samples per label, accuracy averaged
    assert len(test_scores["scores_per_experiment"]) == 10
    accuracies = [run["accuracy"] for run in test_scores["scores_per_experiment"]]
    assert scores["Banking77Classification"] == pytest.approx(float(np.mean(accuracies)), abs=1e-6)
    assert scores["Banking77Classification"] > 0.5  # the words separate the three labels


def test_summary_chart_and_compare(tiny_model, data_dir, tmp_path):
    from conan_embedding.evaluation.report import (
        compare,
        compare_table,
        load_all,
        summary_table,
        write_summary,
    )

    out = tmp_path / "results"
    before = evaluate(
        tiny_model,
        ["STSBenchmark"],
        data_dir=data_dir,
        cache_dir=False,
        show_progress=False,
        output_dir=out,
        model_name="base",
    )
    changed = SentenceTransformer(modules=list(tiny_model))
    changed.load_state_dict({k: v.clone() for k, v in tiny_model.state_dict().items()})
    with torch.no_grad():
        next(changed.parameters()).mul_(1.5)
    after = evaluate(
        changed,
        ["STSBenchmark"],
        data_dir=data_dir,
        cache_dir=False,
        show_progress=False,
        output_dir=out,
        model_name="tuned",
    )
    models = load_all(out)
    assert {m.name for m in models} == {"base", "tuned"}
    table = summary_table(models)
    assert (
        f"{100 * before['STSBenchmark']:.2f}" in table
        and f"{100 * after['STSBenchmark']:.2f}" in table
    )
    markdown, chart = write_summary(out)
    assert markdown.read_text(encoding="utf-8") == table
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    base_folder = next(p.parent for p in (out / "base").rglob("STSBenchmark.json"))
    tuned_folder = next(p.parent for p in (out / "tuned").rglob("STSBenchmark.json"))
    first, second, deltas = compare(base_folder, tuned_folder)
    assert [d.task for d in deltas] == ["STSBenchmark"]
    assert deltas[0].change == pytest.approx(
        after["STSBenchmark"] - before["STSBenchmark"], abs=1e-6
    )
    rendered = compare_table(first, second, deltas)
    assert f"{100 * deltas[0].change:+.2f}" in rendered
    with pytest.raises(ValueError, match="2 model folders"):
        compare(out, tuned_folder)


def test_cli_eval_then_compare(tiny_model, data_dir, tmp_path):
    from typer.testing import CliRunner

    from conan_embedding.cli import app
    from conan_embedding.modeling.embedder import save_embedder

    model_dir = save_embedder(tiny_model, tmp_path / "tiny-model")
    out = tmp_path / "results"
    runner = CliRunner()
    common = ["--data-dir", str(data_dir), "--output-dir", str(out), "--no-cache", "--no-progress"]
    result = runner.invoke(app, ["eval", str(model_dir), "--tasks", "STSBenchmark", *common])
    assert result.exit_code == 0, result.output
    expected = direct_sts_spearman(tiny_model, STS_ROWS)
    assert f"{100 * expected:6.2f}" in result.output
    assert (out / "summary.md").is_file() and (out / "summary.png").is_file()
    folder = next(out.rglob("STSBenchmark.json")).parent
    result = runner.invoke(
        app, ["compare", str(folder), str(folder), "--output", str(tmp_path / "d.md")]
    )
    assert result.exit_code == 0, result.output
    assert "+0.00" in (tmp_path / "d.md").read_text(encoding="utf-8")
    listing = runner.invoke(app, ["eval", "--list"])
    assert "CMRC2018RetrievalLocal" in listing.output and "mini-cmteb" in listing.output
