"""FAISS-GPU resources are made once per GPU, not once per index (audit §8/§17).

No GPU (nor FAISS-GPU) here: the GPU entry points of ``faiss`` are replaced by stand-ins that
record their calls and keep the index on the CPU."""

from __future__ import annotations

import numpy as np


def test_build_index_reuses_one_gpu_resources_per_device(monkeypatch):
    import faiss

    from conan_embedding.mining import index as index_module

    made: list[object] = []
    moved: list[tuple[object, int]] = []

    class Resources:
        def __init__(self):
            made.append(self)

    def to_gpu(resources, device, cpu_index):
        moved.append((resources, device))
        return cpu_index

    monkeypatch.setattr(faiss, "StandardGpuResources", Resources, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(index_module, "_GPU_RESOURCES", {})
    vectors = np.eye(4, dtype=np.float32)
    for device in ("cuda:0", "cuda:0", "cuda:1", "cuda:0"):
        assert index_module.build_index(vectors, "exact", device=device).ntotal == 4
    assert len(made) == 2  # one per GPU, however many indexes
    assert [d for _, d in moved] == [0, 0, 1, 0]
    assert moved[0][0] is moved[1][0] is moved[3][0] and moved[2][0] is not moved[0][0]
