"""Where the encoder runs: ``"auto"`` is this process's GPU when CUDA is available, else the CPU.

Why one rule: mining, teacher filtering, evaluation and serving are started by the same
launchers as training (``torchrun`` / ``accelerate launch`` set ``LOCAL_RANK``), so each process
must pick *its* GPU, not all of them GPU 0. ``"auto"`` resolves to ``cuda:$LOCAL_RANK`` (0 when
unset) when ``torch.cuda.is_available()``, else ``cpu``; any other string is passed to
``torch.device`` as given (``"cpu"``, ``"cuda:1"``, ``"mps"``).
"""

from __future__ import annotations

import os

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(device)
