"""Fuzz the server from its own OpenAPI spec (schemathesis): malformed requests never get a 5xx."""

from __future__ import annotations

from pathlib import Path

import pytest

from conan_embedding.encoding.engine import EmbeddingEngine
from conan_embedding.modeling.embedder import build_embedder, save_embedder
from conan_embedding.serving.server import ServerSettings, background_server

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the `dev` extra")
hypothesis = pytest.importorskip("hypothesis")


@pytest.fixture(scope="module")
def fuzz_server(tiny_bert: Path, tmp_path_factory):
    model = build_embedder(
        tiny_bert, dense_dim=40, matryoshka_dims=[8, 20], prompts={"query": "what is "}, seed=1
    )
    path = save_embedder(model, tmp_path_factory.mktemp("fuzz") / "fuzz-model")
    engine = EmbeddingEngine.from_path(path, threads=1, name="fuzz-model")
    settings = ServerSettings(max_inputs_per_request=8, max_body_bytes=4096, max_wait_ms=0)
    with background_server(engine, settings) as url:
        yield url


@pytest.mark.parametrize(
    ("path", "method", "mode", "examples"),
    [
        ("/v1/embeddings", "POST", "positive", 60),
        ("/v1/embeddings", "POST", "negative", 100),
        ("/v1/models", "GET", "positive", 5),
        ("/health", "GET", "positive", 5),
    ],
)
def test_fuzzed_requests_never_get_a_server_error(fuzz_server: str, path, method, mode, examples):
    import httpx
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    spec = httpx.get(f"{fuzz_server}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(spec)
    operation = schema[path][method]
    generation_mode = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    statuses: list[int] = []

    @given(case=operation.as_strategy(generation_mode=generation_mode))
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same requests every run: a failure reproduces
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case) -> None:
        if mode == "positive" and path == "/v1/embeddings":
            case.body["model"] = "fuzz-model"  # otherwise nearly every case is a 404
        response = case.call(base_url=fuzz_server, timeout=30)
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.body, response.text)

    fuzz()
    assert statuses, "the fuzzer sent no request"
    if path == "/v1/embeddings" and mode == "positive":
        assert 200 in statuses  # some generated requests were valid and got served
    if mode == "negative" and path == "/v1/embeddings":
        assert any(400 <= s < 500 for s in statuses)


def test_raw_garbage_bodies_never_get_a_server_error(fuzz_server: str):
    import httpx
    from hypothesis import given, settings
    from hypothesis import strategies as st

    statuses: list[int] = []
    bodies = st.one_of(
        st.binary(max_size=300),
        st.text(max_size=200).map(str.encode),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=8), inner, max_size=4)
            ),
            max_leaves=12,
        ).map(
            lambda value: httpx.Request(
                "POST", "/", json={"model": "fuzz-model", "input": value}
            ).read()
        ),
    )

    @given(body=bodies, content_type=st.sampled_from(["application/json", "text/plain", ""]))
    @settings(max_examples=80, deadline=None, derandomize=True, database=None)
    def fuzz(body: bytes, content_type: str) -> None:
        headers = {"Content-Type": content_type} if content_type else {}
        response = httpx.post(
            f"{fuzz_server}/v1/embeddings", content=body, headers=headers, timeout=30
        )
        statuses.append(response.status_code)
        assert response.status_code < 500, (body, response.text)
        assert "error" in response.json() or response.status_code == 200

    fuzz()
    assert len(statuses) >= 40 and any(400 <= s < 500 for s in statuses)
