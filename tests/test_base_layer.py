"""The base layer's one-home helpers (issue #25, step 6): the device rule (runtime), atomic
writes (_io) and provenance."""

from __future__ import annotations

import json

import pytest
import torch

from conan_embedding import _io, provenance, runtime


def _no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_one_device_rule_for_encoders_and_the_engine(monkeypatch):
    _no_accelerator(monkeypatch)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    assert runtime.resolve_device(None, per_process=False) == torch.device("cpu")
    # encoders take any explicit device as given; the engine only the bare kinds
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        runtime.resolve_device("cuda:1", per_process=False)
    with pytest.raises(ValueError, match="must be auto, cpu, cuda or mps"):
        runtime.resolve_device("tpu", per_process=False)
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        runtime.resolve_device("cuda", per_process=False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.resolve_device("auto").type == "mps"  # both contracts agree on auto now
    assert runtime.resolve_device("auto", per_process=False).type == "mps"


def test_auto_is_this_ranks_gpu_for_encoders_and_bare_cuda_for_the_engine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert runtime.resolve_device("auto") == torch.device("cuda", 1)
    assert runtime.resolve_device("auto", per_process=False) == torch.device("cuda")


def test_atomic_path_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "plot.png"
    with _io.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".png" and tmp != target
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError), _io.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["plot.png"]


def test_write_json_atomic_is_utf8_indented_with_a_newline(tmp_path):
    path = _io.write_json_atomic(tmp_path / "r.json", {"任务": 1, "p": tmp_path}, default=str)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and "任务" in text and json.loads(text)["p"] == str(tmp_path)


def test_provenance_keys():
    commit = provenance.git_commit()
    assert commit is None or len(commit.removesuffix("+dirty")) == 40
    assert set(provenance.machine()) == {"platform", "cpus"}
    assert {"cpu", "python", "OMP_NUM_THREADS"} <= set(provenance.machine(detail=True))
    assert "torch" in provenance.versions() and "python" in provenance.versions()
    assert len(provenance.loadavg()) in (0, 3)
