"""Every YAML config we ship parses with its config model, and the one loader
(``config.load_yaml``): ``base:`` / ``set:`` / ``drop:``, dotted overrides, one error format."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from conan_embedding.config import ConfigError, TrainConfig, load_config, load_yaml, read_yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "conan_embedding"


def _train(path: Path) -> Any:
    return load_config(path)


def _model(module: str, name: str) -> Callable[[Path], Any]:
    def load(path: Path) -> Any:
        import importlib

        return load_yaml(path, getattr(importlib.import_module(module), name))

    return load


def _accelerate(path: Path) -> Any:
    from accelerate.commands.config.config_args import ClusterConfig

    return ClusterConfig.from_yaml_file(str(path))


# file-name pattern (relative to the repository) -> its loader; a new YAML without a row fails
SCHEMAS: list[tuple[str, Callable[[Path], Any]]] = [
    ("configs/cbb-*.yaml", _train),
    ("configs/clr-*.yaml", _model("conan_embedding.data.builders.clr", "CLRConfig")),
    ("configs/v2-demo.yaml", _model("conan_embedding.experiments.v2_demo", "V2DemoConfig")),
    ("configs/v2-*-ablation.yaml", _model("conan_embedding.experiments.decoder_v2", "ConversionAblationConfig")),
    ("configs/v2-pretrain-*.yaml", _model("conan_embedding.config", "PretrainConfig")),
    ("configs/v2-sft-*.yaml", _model("conan_embedding.config", "SFTConfig")),
    ("configs/generate/*.yaml", _model("conan_embedding.data.builders.generate", "PromptTemplates")),
    ("configs/accelerate/*.yaml", _accelerate),
    ("src/conan_embedding/recipes/*.yaml", _train),
    ("src/conan_embedding/recipes/*/*.yaml", _train),
]  # fmt: skip

SHIPPED = sorted(
    p.relative_to(ROOT).as_posix()
    for p in [*(ROOT / "configs").rglob("*.y*ml"), *(PACKAGE / "recipes").rglob("*.y*ml")]
)


def _loader(relative: str) -> Callable[[Path], Any]:
    for pattern, loader in SCHEMAS:
        if Path(relative).match(pattern) and relative.count("/") == pattern.count("/"):
            return loader
    raise AssertionError(f"{relative}: no config model in tests/test_configs.py::SCHEMAS")


def test_the_shipped_configs_are_found():
    assert "src/conan_embedding/recipes/v1/full.yaml" in SHIPPED
    assert "src/conan_embedding/recipes/minilm-v1.yaml" in SHIPPED
    assert "configs/v2-demo.yaml" in SHIPPED and len(SHIPPED) >= 30
    assert not (ROOT / "configs" / "recipe").exists(), "the recipe arms are package data now"


@pytest.mark.parametrize("relative", SHIPPED)
def test_every_shipped_yaml_validates_with_its_model(relative: str):
    assert _loader(relative)(ROOT / relative) is not None


# --------------------------------------------------------------------------- the loader
FULL = {
    "output_dir": "runs/full",
    "model": {"name": "m", "matryoshka_dims": [8, 16]},
    "tasks": [
        {"name": "sts", "kind": "sts", "path": "sts.jsonl", "batch_size": 4},
        {"name": "bge", "kind": "retrieval", "path": "bge.jsonl", "batch_size": 2, "negatives": 1,
         "dynamic_negatives": {"rule": "v2"}},
    ],
    "cbb": {"world_size": 2, "task_ranks": {"sts": [1], "bge": [0]}},
}  # fmt: skip


def _write(folder: Path, name: str, data: Any) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_base_set_and_drop_resolve_by_task_name(tmp_path):
    _write(tmp_path, "full", FULL)
    arm = _write(tmp_path, "arm", {
        "base": "full",
        "output_dir": "runs/arm",
        "set": {
            "tasks.bge.negatives": 3,
            "tasks.bge.dynamic_negatives.rule": "none",
            "tasks.pairs": {"kind": "pairs", "path": "p.jsonl", "batch_size": 8, "_after": "sts"},
            "tasks.tail": {"kind": "pairs", "path": "t.jsonl", "batch_size": 1},
            "optim.lr": 1.0e-4,
        },
        "drop": ["cbb", "model.matryoshka_dims"],
    })  # fmt: skip
    raw = read_yaml(arm)
    assert [t["name"] for t in raw["tasks"]] == ["sts", "pairs", "bge", "tail"]
    assert raw["tasks"][1] == {"name": "pairs", "kind": "pairs", "path": "p.jsonl", "batch_size": 8}
    bge = raw["tasks"][2]
    assert bge["negatives"] == 3 and bge["dynamic_negatives"] == {"rule": "none"}
    assert "cbb" not in raw and raw["model"] == {"name": "m"} and raw["output_dir"] == "runs/arm"
    assert raw["optim"] == {"lr": 1.0e-4}
    # the base file is untouched and a second read gives the same dict
    assert read_yaml(tmp_path / "full.yaml") == FULL and read_yaml(arm) == raw
    config = load_yaml(arm, TrainConfig)
    assert config.cbb is None and config.tasks[2].negatives == 3
    # a base of a base; an item set whole keeps its place
    second = _write(tmp_path, "second", {"base": "arm", "set": {"tasks.sts": {"kind": "sts",
                    "path": "x.jsonl", "batch_size": 2}}, "drop": ["tasks.tail"]})  # fmt: skip
    names = [t["name"] for t in read_yaml(second)["tasks"]]
    assert names == ["sts", "pairs", "bge"] and read_yaml(second)["tasks"][0]["path"] == "x.jsonl"


def test_overrides_address_tasks_by_name_and_none_sets_null(tmp_path):
    path = _write(tmp_path, "full", FULL)
    config = load_yaml(path, TrainConfig, {"tasks.bge.batch_size": 5, "cbb": None})
    assert config.tasks[1].batch_size == 5 and config.cbb is None
    config = load_config(path, {"engine.device": "cpu", "data_dir": str(tmp_path)})
    assert config.engine.device == "cpu" and config.tasks[0].path == str(tmp_path / "sts.jsonl")


def test_every_problem_is_reported_at_once_as_file_key_message(tmp_path):
    bad = {**FULL, "optim": {"lrr": 1.0, "max_steps": 0}, "tasks": [
        {**FULL["tasks"][0], "negatives": 2}, {**FULL["tasks"][1], "batch_size": 0}]}  # fmt: skip
    path = _write(tmp_path, "bad", bad)
    with pytest.raises(ConfigError) as info:
        load_yaml(path, TrainConfig)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for part in ("optim.lrr: Extra inputs", "optim.max_steps: Input should be greater than 0",
                 "tasks.sts: Value error, task 'sts': sts tasks take no negatives",
                 "tasks.bge.batch_size: Input should be greater than 0"):  # fmt: skip
        assert part in message, message
    _write(tmp_path, "full", FULL)
    arm = _write(tmp_path, "arm", {"base": "full", "set": {"tasks.nope.batch_size": 1,
                 "tasks.extra": 3, "tasks.x": {"name": "y"}},
                 "drop": ["tasks.gone", "cbb.world"]})  # fmt: skip
    with pytest.raises(ConfigError) as info:
        read_yaml(arm)
    message = str(info.value)
    assert message.startswith(f"{arm}: set.tasks.nope.batch_size: no item named 'nope'")
    assert "set.tasks.extra: a list item ('extra') must be set to a mapping" in message
    assert "set.tasks.x: the item's name 'y' is not its key 'x'" in message
    assert "drop.tasks.gone: no item named 'gone'" in message
    assert "drop.cbb.world: not set" in message


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: [1", "invalid YAML"),
        ("- 1\n- 2\n", "the top level must be a mapping"),
        ("base: missing\n", "base: no file"),
        ("base: loop\n", "base: a cycle"),
        ("base: full\nset: [1]\n", "set: must be a mapping"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, text: str, problem: str):
    _write(tmp_path, "full", FULL)
    path = tmp_path / "loop.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=problem) as info:
        load_yaml(path, TrainConfig)
    assert str(info.value).startswith(str(path))


def test_missing_file_and_packaged_recipe_names(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_yaml(tmp_path / "none.yaml", TrainConfig)
    assert load_config("v1/full").cbb is not None
    assert load_config("minilm-v1").model.name == "all-MiniLM-L6-v2"


def test_the_cli_reports_a_bad_stage_config_as_one_error_line(tmp_path):
    from typer.testing import CliRunner

    from conan_embedding.cli import app

    path = tmp_path / "sft.yaml"
    path.write_text("base_model: x\ndata: d.jsonl\nbogus: 1\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["sft", str(path)])
    assert result.exit_code == 2
    assert f"error: {path}: " in result.output and "bogus: Extra inputs" in result.output
    assert "output_dir: Field required" in result.output
