"""Installable as users install it (issue #25, item 8): build the wheel, install it into a
fresh venv, and from a folder outside the checkout validate the packaged recipe and train
two steps. Torch and the other dependencies come from this environment
(``--system-site-packages``); the wheel itself goes in with ``--no-deps``. No network, no
``../shared/data``: the model and data are the package's own toys (``conan_embedding.toy``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

TOYS = """
import sys
from pathlib import Path
from conan_embedding.toy import build_tiny_bert, write_toy_tasks
out = Path(sys.argv[1])
build_tiny_bert(out / "model")
write_toy_tasks(out / "data")
"""


def _run(args: list[str | Path], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _clean_env() -> dict[str, str]:
    """This environment without anything that points Python or pip at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")  # fmt: skip
    return env


def _build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    """The wheel of a copy of the sources (the build writes ``build/`` into the tree it
    builds, and the checkout is shared)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "src",
        source / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"),
    )
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", source, "-w", wheels], tmp_path, env)  # fmt: skip
    (wheel,) = wheels.glob("conan_embedding-*.whl")
    return wheel


def test_the_wheel_validates_a_packaged_recipe_and_trains_outside_the_checkout(tmp_path):
    env = _clean_env()
    wheel = _build_wheel(tmp_path, env)
    names = zipfile.ZipFile(wheel).namelist()
    assert "conan_embedding/recipes/minilm-v1.yaml" in names
    assert "conan_embedding/recipes/v1/full.yaml" in names
    assert "conan_embedding/recipes/v1/minus-cbb.yaml" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv],
         tmp_path, env)  # fmt: skip
    python = venv / "bin" / "python"
    # --ignore-installed: the editable checkout is "installed" in the system site-packages
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
          "--ignore-installed", "--no-index", wheel], tmp_path, env)  # fmt: skip

    outside = tmp_path / "outside"
    outside.mkdir()
    located = _run([python, "-c", "import conan_embedding; print(conan_embedding.__file__)"],
                   outside, env)  # fmt: skip
    assert Path(located.strip()).resolve().is_relative_to(venv.resolve()), located

    conan = venv / "bin" / "conan-embed"
    validated = _run([conan, "recipe", "validate", "full", "minus-cbb", "vanilla"], outside, env)
    assert "full: ok" in validated and "vanilla: ok" in validated

    _run([python, "-c", TOYS, outside], outside, env)
    config = {
        "output_dir": "run",
        "data_dir": "data",
        "model": {"name": str(outside / "model"), "max_seq_length": 32},
        "optim": {"lr": 5.0e-4, "max_steps": 2},
        "engine": {"device": "cpu", "trackers": []},
        "tasks": [
            {"name": "ret", "kind": "retrieval", "path": "retrieval.jsonl", "batch_size": 4,
             "negatives": 1},
            {"name": "sts", "kind": "sts", "path": "sts.jsonl", "batch_size": 4},
        ],
    }  # fmt: skip
    (outside / "toy.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    trained = _run([conan, "train", "toy.yaml", "--no-progress"], outside, env)
    assert "after 2 steps" in trained, trained
    assert (outside / "run" / "model" / "config_sentence_transformers.json").is_file()
