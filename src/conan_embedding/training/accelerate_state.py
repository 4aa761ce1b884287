"""What one process's earlier stages leave in accelerate's process-wide state, undone.

Why: one process may run several stages (the v2 demo: pretrain, SFT, weak, supervised), each
with its own engine, and accelerate keeps some choices process-wide; each
:class:`~conan_embedding.training.engine.Engine` calls :func:`forget_previous_stage_plugins`
before building its ``Accelerator``.
"""

from __future__ import annotations

import os

_LAUNCHED_WITH_DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
"""Whether the launcher (``accelerate launch`` with a DeepSpeed config) asked for DeepSpeed,
read before any engine ran: accelerate writes the same variable itself whenever an
``Accelerator`` gets a DeepSpeed plugin, so later it no longer tells the two apart."""


def forget_previous_stage_plugins() -> None:
    """Undo what an earlier engine of this process left in accelerate's process-wide state.

    One process may run several stages (the v2 demo). An ``Accelerator`` given a DeepSpeed
    plugin sets ``ACCELERATE_USE_DEEPSPEED=true`` for the whole process, and the next
    ``Accelerator`` would silently build a default ``DeepSpeedPlugin()`` from it. It also
    writes its distributed type (DEEPSPEED, FSDP) into ``PartialState``, which survives the
    engine's reset and which accelerate does not recompute, so a plain stage would go on
    as DeepSpeed (or FSDP without its plugin). Called when this engine has no DeepSpeed of
    its own; what the launcher asked for (DeepSpeed or FSDP from its environment) is kept.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if _LAUNCHED_WITH_DEEPSPEED:
        return
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    shared = PartialState._shared_state
    if shared.get("distributed_type") in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        state = PartialState()
        if state.backend is None:
            shared["distributed_type"] = DistributedType.NO
        else:  # what PartialState itself chose for this launcher and device
            _, shared["distributed_type"] = state._prepare_backend(state._cpu, False, state.backend)
