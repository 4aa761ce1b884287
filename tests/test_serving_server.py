"""The OpenAI-compatible server: official client, Dense width, limits, concurrency, fuzzing."""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from conan_embedding.encoding.engine import EmbeddingEngine
from conan_embedding.modeling.embedder import build_embedder, save_embedder
from conan_embedding.serving.server import ServerSettings, background_server

API_KEY = "test-key-123"
TEXTS = [
    "the cat sat on the mat",
    "how can i open a bank account",
    "dog",
    "red sun and blue moon over the river",
    "where is my card",
]
QUERY_PROMPT = "what is "


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.fixture(scope="module")
def dense_model(tiny_bert: Path, tmp_path_factory) -> Path:
    """Hidden width 32, projected by a Dense layer to 48: the server must serve 48."""
    model = build_embedder(
        tiny_bert,
        pooling="mean",
        dense_dim=48,
        matryoshka_dims=[16, 32],
        prompts={"query": QUERY_PROMPT, "passage": ""},
        max_seq_length=24,
        seed=0,
    )
    return save_embedder(model, tmp_path_factory.mktemp("served") / "dense-model")


@pytest.fixture(scope="module")
def engine(dense_model: Path) -> EmbeddingEngine:
    return EmbeddingEngine.from_path(dense_model, threads=1, name="dense-model")


@pytest.fixture(scope="module")
def server(engine: EmbeddingEngine):
    settings = ServerSettings(
        api_key=API_KEY, max_inputs_per_request=16, max_body_bytes=20_000, max_wait_ms=30
    )
    with background_server(engine, settings) as url:
        yield url


def _post(url: str, body: dict, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/embeddings", json=body, headers=headers, timeout=30, **kwargs)


def test_openai_client_gets_full_dense_width_and_model_vectors(
    server: str, engine: EmbeddingEngine
):
    from openai import OpenAI

    assert engine.model[0].get_embedding_dimension() == 32  # the transformer's own width
    client = OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    # The client asks for base64 by default and decodes it itself.
    result = client.embeddings.create(model="dense-model", input=TEXTS)
    got = np.array([item.embedding for item in result.data], dtype=np.float32)
    assert got.shape == (len(TEXTS), 48)
    expected = engine.model.encode(TEXTS)
    assert _cos_rows(got, expected).min() >= 0.9999
    assert [item.index for item in result.data] == list(range(len(TEXTS)))
    assert result.usage.prompt_tokens == sum(len(r) for r in engine.tokenize(TEXTS).ids) > 0

    as_float = client.embeddings.create(
        model="dense-model", input=TEXTS[0], encoding_format="float"
    )
    assert np.allclose(as_float.data[0].embedding, got[0], atol=1e-5)

    models = client.models.list()
    assert [m.id for m in models.data] == ["dense-model"]


def test_openai_client_dimensions_and_wrong_key(server: str, engine: EmbeddingEngine):
    import openai

    client = OpenAI = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    short = client.embeddings.create(model="dense-model", input=TEXTS, dimensions=16)
    got = np.array([item.embedding for item in short.data], dtype=np.float32)
    assert got.shape == (len(TEXTS), 16)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    full = engine.model.encode(TEXTS)[:, :16]
    assert _cos_rows(got, full).min() >= 0.9999  # truncation of the full vector, re-normalised

    with pytest.raises(openai.BadRequestError, match="trained for"):
        client.embeddings.create(model="dense-model", input="dog", dimensions=20)
    with pytest.raises(openai.AuthenticationError):
        OpenAI.with_options(api_key="wrong").embeddings.create(model="dense-model", input="dog")
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.embeddings.create(model="text-embedding-3-small", input="dog")


def test_prompts_token_arrays_and_base64(server: str, engine: EmbeddingEngine):
    query = _post(server, {"model": "dense-model", "input": TEXTS, "input_type": "query"})
    assert query.status_code == 200
    vectors = np.array([row["embedding"] for row in query.json()["data"]], dtype=np.float32)
    expected = engine.model.encode(TEXTS, prompt_name="query")
    assert _cos_rows(vectors, expected).min() >= 0.9999
    plain = engine.model.encode(TEXTS)
    assert _cos_rows(vectors, plain).min() < 0.999  # the prompt really changed the input

    ids = [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:2]]
    by_ids = _post(server, {"model": "dense-model", "input": ids, "encoding_format": "base64"})
    assert by_ids.status_code == 200
    decoded = np.stack(
        [
            np.frombuffer(base64.b64decode(r["embedding"]), dtype="<f4")
            for r in by_ids.json()["data"]
        ]
    )
    assert _cos_rows(decoded, plain[:2]).min() >= 0.9999
    one_array = _post(server, {"model": "dense-model", "input": ids[0]})
    assert len(one_array.json()["data"]) == 1


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"model": "dense-model", "input": []}, 400, "empty"),
        ({"model": "dense-model", "input": ""}, 400, "empty"),
        ({"model": "dense-model", "input": ["dog"] * 17}, 400, "at most 16"),
        ({"model": "dense-model", "input": "dog " * 40}, 400, "limit of 24"),
        ({"model": "dense-model", "input": [[5, 10**9]]}, 400, "vocabulary"),
        ({"model": "dense-model", "input": [-1]}, 400, "vocabulary"),
        ({"model": "dense-model", "input": "dog", "dimensions": 0}, 400, "dimensions"),
        (
            {"model": "dense-model", "input": "dog", "encoding_format": "int8"},
            400,
            "encoding_format",
        ),
        ({"model": "dense-model", "input": "dog", "typo": 1}, 400, "typo"),
        ({"model": "dense-model", "input": [1.5]}, 400, "input"),
        ({"input": "dog"}, 400, "model"),
    ],
)
def test_bad_requests_get_clear_4xx(server: str, body: dict, status: int, fragment: str):
    response = _post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"


def test_body_limit_missing_key_and_open_health(server: str):
    huge = _post(server, {"model": "dense-model", "input": ["dog " * 5] * 10 + ["x" * 20_000]})
    assert huge.status_code == 413
    assert "20000 bytes" in huge.json()["error"]["message"]
    assert _post(server, {"model": "dense-model", "input": "dog"}, key=None).status_code == 401
    assert httpx.get(f"{server}/v1/models", timeout=10).status_code == 401
    health = httpx.get(f"{server}/health", timeout=10).json()
    assert health == {"status": "ok", "model": "dense-model", "backend": "torch", "dimensions": 48}
    spec = httpx.get(f"{server}/openapi.json", timeout=10).json()
    assert "/v1/embeddings" in spec["paths"]


def test_truncation_setting_accepts_long_input(engine: EmbeddingEngine):
    with background_server(engine, ServerSettings(truncate=True)) as url:
        response = _post(url, {"model": "dense-model", "input": "dog " * 40}, key=None)
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == 24


def test_concurrent_callers_each_get_their_own_vectors(engine: EmbeddingEngine):
    words = ["cat", "dog", "bank", "river", "tea", "moon", "car", "park", "fish", "tree"]
    requests = [
        [f"{words[i]} {words[(i + k) % 10]} on the mat" for k in range(1 + i % 3)]
        for i in range(10)
    ]
    settings = ServerSettings(max_wait_ms=100)
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(requests))

    with background_server(engine, settings) as url:
        app_stats_url = url

        def call(i: int) -> None:
            start.wait()
            response = _post(
                app_stats_url, {"model": "dense-model", "input": requests[i]}, key=None
            )
            assert response.status_code == 200
            results[i] = np.array(
                [r["embedding"] for r in response.json()["data"]], dtype=np.float32
            )

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

    assert sorted(results) == list(range(len(requests)))
    for i, texts in enumerate(requests):
        assert results[i].shape == (len(texts), 48)
        assert _cos_rows(results[i], engine.model.encode(texts)).min() >= 0.9999


def test_micro_batcher_joins_concurrent_requests(engine: EmbeddingEngine):
    import asyncio

    from conan_embedding.serving.batching import MicroBatcher

    async def run() -> tuple[list[np.ndarray], MicroBatcher]:
        batcher = MicroBatcher(engine, max_batch_inputs=64, max_wait_ms=50)
        await batcher.start()
        jobs = [engine.tokenize([text]) for text in TEXTS]
        out = await asyncio.gather(*(batcher.embed(job.ids, job.prompt_length) for job in jobs))
        await batcher.stop()
        return out, batcher

    out, batcher = asyncio.run(run())
    assert batcher.stats.jobs == len(TEXTS)
    assert batcher.stats.batches < len(TEXTS)  # requests were joined into fewer forward passes
    expected = engine.model.encode(TEXTS)
    assert _cos_rows(np.concatenate(out), expected).min() >= 0.9999
