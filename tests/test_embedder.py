from __future__ import annotations

import json

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from conan_embedding.modeling.embedder import (
    build_embedder,
    embedding_width,
    load_embedder,
    matryoshka_dims,
    save_embedder,
)

TEXTS = ["the cat sat on the mat", "where can i open a bank account", "green tree by the river"]


@pytest.mark.parametrize("pooling", ["cls", "mean", "lasttoken"])
def test_saved_model_round_trips_through_sentence_transformers(tmp_path, tiny_bert, pooling):
    model = build_embedder(
        tiny_bert,
        pooling=pooling,
        dense_dim=48,
        matryoshka_dims=[16, 48],
        prompts={"query": "query: ", "passage": "passage: "},
        seed=0,
    )
    ours = model.encode(TEXTS, prompt_name="query")
    path = save_embedder(model, tmp_path / "model")
    theirs = SentenceTransformer(str(path), device="cpu").encode(TEXTS, prompt_name="query")
    assert ours.shape == theirs.shape == (3, 48)  # the Dense projection is kept
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert np.allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-5)
    reloaded = load_embedder(path)
    assert matryoshka_dims(reloaded) == [16, 48]
    assert reloaded.prompts["query"] == "query: "
    assert json.loads((path / "modules.json").read_text())[2]["type"].endswith("Dense")


def test_prompts_change_the_vectors(tiny_bert):
    model = build_embedder(tiny_bert, prompts={"query": "what is "}, seed=0)
    plain, prompted = model.encode(TEXTS[:1]), model.encode(TEXTS[:1], prompt_name="query")
    assert not np.allclose(plain, prompted)


def test_dense_weights_are_seeded(tiny_bert):
    a = build_embedder(tiny_bert, dense_dim=20, seed=1).encode(TEXTS)
    b = build_embedder(tiny_bert, dense_dim=20, seed=1).encode(TEXTS)
    c = build_embedder(tiny_bert, dense_dim=20, seed=2).encode(TEXTS)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_matryoshka_dims_must_fit_the_width(tiny_bert):
    with pytest.raises(ValueError, match="outside"):
        build_embedder(tiny_bert, dense_dim=24, matryoshka_dims=[8, 32])


def test_save_replaces_an_existing_model_atomically(tmp_path, tiny_bert):
    first = build_embedder(tiny_bert, dense_dim=16, seed=0)
    second = build_embedder(tiny_bert, dense_dim=16, seed=5)
    path = save_embedder(first, tmp_path / "m")
    save_embedder(second, path)
    np.testing.assert_allclose(load_embedder(path).encode(TEXTS), second.encode(TEXTS), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.integration
def test_minilm_with_conan_projection_round_trips(tmp_path, minilm_path):
    model = build_embedder(minilm_path, pooling="cls", dense_dim=512, seed=0)
    assert embedding_width(model) == 512
    path = save_embedder(model, tmp_path / "minilm-dense")
    np.testing.assert_allclose(
        model.encode(TEXTS), SentenceTransformer(str(path), device="cpu").encode(TEXTS), atol=1e-6
    )
