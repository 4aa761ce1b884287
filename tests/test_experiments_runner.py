"""The one experiment runner: train -> evaluate -> result JSON with provenance, resumable."""

from __future__ import annotations

import json
from typing import Any

from conan_embedding.experiments.runner import Arm, run_arm


def test_run_arm_trains_evaluates_and_writes_the_result_with_provenance(tmp_path):
    calls: list[str] = []

    def train() -> tuple[float, dict[str, Any]]:
        calls.append("train")
        return 0.5, {"steps": 2}

    def evaluate(model: float) -> dict[str, Any]:
        calls.append("evaluate")
        return {"scores": {"task": model}}

    path = tmp_path / "arm-s1.json"
    arm = Arm("arm", evaluate, train=train, record={"arm": "arm", "seed": 1}, result_path=path)
    record = run_arm(arm)
    assert calls == ["train", "evaluate"]
    assert json.loads(path.read_text(encoding="utf-8")) == record
    assert record["arm"] == "arm" and record["steps"] == 2 and record["scores"] == {"task": 0.5}
    for key in ("git_commit", "machine", "torch_threads", "loadavg_before", "loadavg_after",
                "train_seconds", "eval_seconds"):  # fmt: skip
        assert key in record
    assert run_arm(arm) == record and calls == ["train", "evaluate"]  # kept, not rerun
    run_arm(arm, force=True)
    assert calls == ["train", "evaluate"] * 2


def test_an_untrained_arm_without_provenance_stays_in_memory():
    arm = Arm("base", lambda model: {"scores": {"t": model}}, model=1.0, provenance=False)
    assert set(run_arm(arm)) == {"scores", "eval_seconds"}
