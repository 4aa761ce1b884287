"""A missing base model or data path is an error naming the path and the command that makes it.

Before, ``conan-embed recipe run`` without ``recipe prepare`` ended in the hub's ``OSError``
about repo ids, because ``runs/models/me5-small`` was taken for a hub name.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conan_embedding.cli import app
from conan_embedding.config import load_config
from conan_embedding.experiments.recipe_v1.arms import recipe_config_dir
from conan_embedding.experiments.recipe_v1.inputs import check_recipe_inputs
from conan_embedding.modeling.embedder import (
    build_embedder,
    looks_like_local_path,
    resolve_model_path,
)


@pytest.mark.parametrize(
    "name", ["runs/models/me5-small", "./model", "../model", "/abs/model", "a/b/c", "~/m", "a b"]
)
def test_local_looking_names(name):
    assert looks_like_local_path(name)


@pytest.mark.parametrize(
    "name", ["all-MiniLM-L6-v2", "intfloat/multilingual-e5-small", "BAAI/bge-m3", "bert.base"]
)
def test_hub_ids_are_not_local_paths(name):
    assert not looks_like_local_path(name)
    assert isinstance(resolve_model_path(name), str)  # a hub name or a PyPI model, no error


def test_missing_local_model_names_the_path_and_the_command(tmp_path):
    missing = tmp_path / "runs" / "models" / "nope"
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_path(str(missing), made_by="conan-embed recipe prepare")
    assert str(missing) in str(err.value)
    assert "`conan-embed recipe prepare`" in str(err.value)


def test_build_embedder_on_a_missing_folder_is_file_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="runs/models/me5-small: no such model folder"):
        build_embedder("runs/models/me5-small")


def test_existing_folder_resolves_as_is(tiny_bert):
    assert resolve_model_path(str(tiny_bert)) == str(tiny_bert)


def test_recipe_inputs_check_names_each_missing_file(tmp_path, tiny_bert):
    config = load_config(
        recipe_config_dir() / "full.yaml",
        {"data_dir": str(tmp_path / "data"), "model.name": str(tmp_path / "no-model")},
    )
    with pytest.raises(FileNotFoundError) as err:
        check_recipe_inputs(config, tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'no-model'}: no such base model folder")
    assert f"`conan-embed recipe prepare --work-dir {tmp_path}`" in message
    assert "zh-pairs-sts.jsonl" in message  # the data files are listed too

    # with the model there, the first missing data file is named
    model = tmp_path / "model"
    build_embedder(str(tiny_bert)).save(str(model))
    config.model.name = str(model)
    with pytest.raises(FileNotFoundError, match=r"cnsd-stsb-train\.jsonl: no such data file"):
        check_recipe_inputs(config, tmp_path)


def test_recipe_run_before_prepare_is_a_clear_cli_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = Path("work")
    result = CliRunner().invoke(
        app, ["recipe", "run", "full", "--steps", "1", "--work-dir", str(work)]
    )
    assert result.exit_code == 2, result.output
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "runs/models/me5-small: no such base model folder" in output
    assert "conan-embed recipe prepare --work-dir work" in output
    assert "repo id" not in output.lower()


def test_any_command_ends_a_missing_model_in_one_error_line(tmp_path):
    import os
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    (tmp_path / "texts.txt").write_text("a cat\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "conan_embedding.cli", "encode", "runs/nope", "texts.txt", "o.npy"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: runs/nope: no such model folder ({tmp_path / 'runs' / 'nope'})"
    )
    assert "Traceback" not in done.stderr
