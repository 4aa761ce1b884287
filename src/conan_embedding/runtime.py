"""Where code runs, and among which processes: the one device rule, the launcher's processes,
and the autocast an encode runs in. It imports nothing of the package (the bottom layer).

Why one rule: mining, teacher filtering, evaluation, serving and training are started by the
same launchers (``torchrun`` / ``accelerate launch`` set ``LOCAL_RANK``), so each process must
pick *its* GPU, not all of them GPU 0. :func:`resolve_device` turns ``"auto"`` into
``cuda:$LOCAL_RANK`` (0 when unset; modulo the visible GPU count) when CUDA is available, else
``mps`` on Apple silicon, else ``cpu``; the training engine asks for the bare kind
(``per_process=False``) because accelerate picks the index itself.

Processes: a sharded encode (:meth:`~conan_embedding.encoding.texts.TextEncoder.encode_shards`)
only needs this process's rank, the process count and a barrier. They come from accelerate's
``PartialState``, the object under the training engine's ``Accelerator``, so ranks are read the
same way (torchrun's or accelerate's environment) and the process group is the same: NCCL
when the encoder is on a GPU, gloo on the CPU. Without a launcher (``WORLD_SIZE`` unset or 1)
no process group is made at all: a single process behaves exactly as before.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

BARRIER_TIMEOUT = timedelta(hours=24)
"""How long a rank waits for the others at a barrier. A rank that resumes with its share
already on disk waits for a peer still encoding its own (hours on a large corpus); a dead peer
does not make it wait that long: the launcher stops every rank when one fails."""


def resolve_device(
    device: str | torch.device | None = "auto", *, per_process: bool = True
) -> torch.device:
    """The one device rule of the package (encoders, mining, the training engine).

    ``"auto"``/``None``: this process's GPU when CUDA is available (``cuda:LOCAL_RANK``, modulo
    the visible GPU count), else ``mps`` on Apple silicon, else ``cpu``. Any other string or
    ``torch.device`` is taken as given (``"cpu"``, ``"cuda:1"``, ``"mps"``).

    ``per_process=False`` is the training engine's contract: accelerate places each process on
    ``cuda:LOCAL_RANK`` itself, so the answer is the bare kind (``cuda``/``mps``/``cpu``, no
    index), an explicit ``cuda:N`` is refused (choose GPUs with ``CUDA_VISIBLE_DEVICES``), and
    so is ``cuda`` when torch sees no GPU.
    """
    if isinstance(device, torch.device) and per_process:
        return device
    if device is None or device == "auto":
        if torch.cuda.is_available():
            if not per_process:
                return torch.device("cuda")
            # modulo: under per-rank GPU isolation (SLURM --gpus-per-task=1) rank 3 sees one
            # GPU, cuda:0, not cuda:3
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if per_process:
        return torch.device(device)
    name = str(device)
    kind = name.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be auto, cpu, cuda or mps, got {name!r}")
    if ":" in name:
        raise ValueError(
            f"device {name!r}: the engine places each process on cuda:LOCAL_RANK itself; "
            "choose GPUs with CUDA_VISIBLE_DEVICES and say 'cuda'"
        )
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(kind)


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes a launcher started (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    state: Any = None
    """accelerate's ``PartialState`` when ``world > 1`` (it holds the process group)."""
    owns_group: bool = False
    """Whether :func:`join_processes` made the group (then :meth:`close` ends it); a group
    that was already there (mining called inside a training run) is left to its owner."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        """Barrier: return once every process got here (nothing to wait for alone)."""
        if self.world > 1:
            self.state.wait_for_everyone()

    def close(self) -> None:
        """Leave the process group once this rank's last barrier is behind it (a local call:
        rank 0 may still be searching), so the process exits without the group's warning."""
        if self.owns_group:
            self.state.destroy_process_group()


def join_processes(device: str | torch.device | None = "auto") -> Processes:
    """Join the launcher's process group (NCCL when ``device`` is a GPU, else gloo), once.

    Call before building the encoder: accelerate also sets this rank's CUDA device and, on the
    CPU, a fair share of threads when ``OMP_NUM_THREADS`` is unset.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from accelerate import PartialState

    fresh = not torch.distributed.is_initialized()
    if fresh:  # a state left by an earlier call whose group was closed would not re-join
        PartialState._reset_state()
    state = PartialState(cpu=resolve_device(device).type != "cuda", timeout=BARRIER_TIMEOUT)
    return Processes(state.process_index, state.num_processes, state, owns_group=fresh)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(
    device: str | torch.device, mixed_precision: str = "no"
) -> contextlib.AbstractContextManager:
    """The autocast context an encode runs in: ``"bf16"`` / ``"fp16"`` on ``device``'s type,
    ``"no"`` none (float32).

    Why for encoding too: on a GPU bf16 is the usual inference precision, and on a CPU with
    AVX512-BF16 (recent Xeon / EPYC) oneDNN runs the encoder's matmuls about 1.5-1.9x faster
    than float32 with embeddings at cosine ~0.99999 to the float32 ones. Outputs stay in the
    autocast dtype where a layer produced them; callers that need float32 convert.
    """
    if mixed_precision == "no":
        return contextlib.nullcontext()
    if mixed_precision not in AUTOCAST_DTYPES:
        raise ValueError(f"mixed_precision must be one of no, bf16, fp16; got {mixed_precision!r}")
    return torch.autocast(resolve_device(device).type, dtype=AUTOCAST_DTYPES[mixed_precision])


def ambient_autocast(device: str | torch.device) -> str | None:
    """``"bf16"`` / ``"fp16"`` when the caller runs us inside an enabled autocast region for
    ``device``'s type, else None. Embedding caches add it to their key: vectors made under a
    caller's autocast differ from float32 ones and must never be served in their place."""
    device_type = resolve_device(device).type
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return next((name for name, known in AUTOCAST_DTYPES.items() if known == dtype), str(dtype))
