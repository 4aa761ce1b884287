"""The v2 CPU demo end to end in its reduced (CI) form, through the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conan_embedding.cli import app
from conan_embedding.data.sources import local_data_available


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not local_data_available(), reason="shared/data not found")
def test_quick_demo_runs_every_stage_and_writes_the_ablation(tmp_path):
    config = tmp_path / "demo.yaml"
    config.write_text(
        "\n".join(
            [
                f"output_dir: {tmp_path / 'demo'}",
                "variants:",
                "  - {name: soft-linear, schedule: linear}",
                "  - {name: causal, schedule: causal}",
                "supervised: {steps: 50, negatives: 2}",
            ]
        ),
        encoding="utf-8",
    )
    result = CliRunner().invoke(app, ["v2-demo", "--config", str(config), "--quick"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "demo" / "ablation.json").read_text(encoding="utf-8"))
    assert report["pretrain"]["final_val_ppl"] < report["pretrain"]["first_val_ppl"]
    names = [row["variant"]["name"] for row in report["ablation"]]
    assert names == ["soft-linear", "causal", "soft-linear+supervised"]
    for row in report["ablation"]:
        assert 0.0 < row["scores"]["STSBenchmark"] < 1.0
    assert (tmp_path / "demo" / "pretrain" / "curve.png").is_file()
    assert json.loads(
        (tmp_path / "demo" / "embed" / "causal" / "model" / "config.json").read_text()
    )["is_causal"]
    supervised = tmp_path / "demo" / "embed" / "soft-linear+supervised" / "model" / "config.json"
    assert json.loads(supervised.read_text())["is_causal"] is False
    assert "| soft-linear | linear |" in (tmp_path / "demo" / "ablation.md").read_text(
        encoding="utf-8"
    )
