"""scripts/gpu_check.sh --device cpu: every row the CPU can run passes, the rest are listed.

The check runs each row in a child process (the GPU rows (A)-(H) of
../shared/audits/gpu-readiness.md at CPU sizes, the throughput table at toy sizes); rows that
need a GPU, several GPUs, DeepSpeed or 2 nodes must appear in the report with the command that
runs them, never silently dropped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CPU_ROWS = {"S", "A", "B", "C", "F", "G", "H1", "H2", "T-cpu"}
"""Rows whose CPU form must pass."""
LISTED = {
    "A2",
    "E1",
    "E3",
    "N-ddp",
    "N-cbb",
    "N-dhnm",
    "N-mine",
    "N-zero2",
    "N-fsdp",
    "N-zero3",
    "N-timeout",
    "M-2node",
}
"""Rows a CPU cannot run: listed as skipped with the command that runs them."""


def test_gpu_check_on_the_cpu_passes_every_row_it_can_run(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_DISTRIBUTED_DEBUG", None)
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert (tmp_path / "report.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["id"]: r for r in report["rows"]}
    failed = {k: r["why"][:800] for k, r in rows.items() if r["result"] == "FAIL"}
    assert not failed, failed
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "report.md").read_text().count("| pass |") >= len(CPU_ROWS)
    for row in CPU_ROWS:
        assert rows[row]["result"] == "pass", (row, rows[row])
    for row in ("B", "C", "G", "H1", "H2"):
        assert rows[row]["seconds_per_step"] and rows[row]["peak_mb"], rows[row]
    # no GPU result is ever claimed here; what the CPU cannot run is listed with its command
    for row in LISTED:
        assert rows[row]["result"] == "skipped", rows[row]
        assert "needs" in rows[row]["why"] and (
            "gpu_check.py --only" in rows[row]["why"]
            or "torchrun" in rows[row]["why"]
            or "section 4b" in rows[row]["why"]
        ), rows[row]
    assert "needs 2 GPUs" in rows["N-ddp"]["why"] and "needs 3 GPUs" in rows["N-cbb"]["why"]
    assert rows["H3"]["result"] == "skipped" and "--only H3" in rows["H3"]["why"]
    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    for row in ("D", "E2"):
        if has_deepspeed:
            assert rows[row]["result"] == "pass", rows[row]
        else:
            assert rows[row]["result"] == "skipped", rows[row]
            assert "deepspeed not installed" in rows[row]["why"]
            assert f"gpu_check.py --only {row}" in rows[row]["why"]
    # accelerate never runs FSDP for a CPU process: the FSDP rows say so
    assert "unsharded on the CPU" in rows["E1"]["why"]
    # H: the shim saw the collectives, all on the CPU here (on a GPU: on CUDA)
    assert rows["H1"]["details"]["collectives"].get("all_reduce")
    assert rows["H2"]["details"]["layout"] == {"ret": [0, 1], "sts": [2]}
    # the throughput table: both models, our trainer and both ST losses, encoders and mining
    table = report["throughput"]
    for arch in ("all-MiniLM-L6-v2", "multilingual-e5-small"):
        tools = {r["tool"] for r in table if r["arch"] == arch and "samples_per_s" in r}
        assert tools == {"ours", "st-mnrl", "st-cached-mnrl"}, tools
        assert all(r["samples_per_s"] and r["tokens_per_s"] for r in table if "samples_per_s" in r)
    assert {r["tool"] for r in table if "corpus" in r} == {
        "ours mine (torch-bf16)",
        "ST mine_hard_negatives (bf16)",
    }
    assert any(r["tool"].startswith("ours encode") for r in table)


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_collective_shim_refuses_tensors_off_the_checked_device(tmp_path, monkeypatch):
    """Row H's shim is not vacuous: a CPU tensor in a collective fails when the run is on CUDA
    (what NCCL would refuse), and passes (counted) when the run is on the CPU."""
    import pytest
    import torch
    import torch.distributed as dist

    gpu_check = _load_gpu_check()
    for name in gpu_check.COLLECTIVES:  # the shim patches torch.distributed: undo after
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, getattr(dist, name))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        counts = gpu_check.install_collective_shim("cuda")
        with pytest.raises(AssertionError, match=r"all_reduce got tensors on \['cpu'\]"):
            dist.all_reduce(torch.ones(2))
        assert counts == {}
        counts = gpu_check.install_collective_shim("cpu")
        out = [torch.empty(2)]
        dist.all_gather(out, torch.ones(2))
        assert counts == {"all_gather": 1}
    finally:
        dist.destroy_process_group()


def test_seconds_per_step_leaves_out_start_up_and_gaps_between_runs():
    gpu_check = _load_gpu_check()
    assert gpu_check.seconds_per_step([[10.0, 10.5, 11.0, 11.5], [50.0, 50.5]]) == 0.5
    assert gpu_check.seconds_per_step([[3.0]]) is None
