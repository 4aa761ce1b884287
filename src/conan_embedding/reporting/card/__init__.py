"""The model card (``README.md``) a training run writes into every saved model folder.

Why: sentence-transformers' generic card can only say "a sentence-transformers model"; it does
not know what Conan did to it. Someone who finds a checkpoint months later needs the base
model, the data each task read and how much of it, the stage, the losses, and how every Conan
mechanism was set: cross-GPU batch balance (CBB) with its device layout, dynamic hard negative
mining (DHNM) with its rule, Matryoshka dims, the v2 soft mask schedule, cross-lingual
retrieval (CLR) data, and the evaluation table when one was run. That is what this card holds.

How: the trainer fills a :class:`CardInfo` from its :class:`~conan_embedding.config.TrainConfig`
with :func:`card_info_from_config` (plus the rows each task used) and hands
:func:`card_writer` to :func:`~conan_embedding.modeling.embedder.save_embedder` as its
``readme``; inside the temp model folder, :func:`write_model_card` reads what the saved folder
itself says (modules, width, prompts) and renders markdown with Hugging Face front matter.
The card is reporting, not modeling: it knows configs, data sources and losses, so it sits in
the reporting layer and the embedder never imports it (docs/architecture.md). The card holds
only facts from those inputs; a section whose mechanism was off says so in one line. The full
config is embedded as YAML, so the card is also the recipe to retrain the model.

The package: :mod:`.schema` (the data model), :mod:`.adapters` (configs and folders -> the
data model, including each loss's words), :mod:`.render` (markdown, and writing the folder's
``README.md`` + ``conan_card.json``). This ``__init__`` only re-exports.
"""

from __future__ import annotations

from conan_embedding.reporting.card.adapters import (
    card_info_from_config,
    card_info_from_weak_stage,
    llm_stages,
    task_rows_in_files,
)
from conan_embedding.reporting.card.render import (
    CARD_FILE,
    card_writer,
    readme_for,
    render_model_card,
    write_model_card,
)
from conan_embedding.reporting.card.schema import (
    CardInfo,
    CBBCard,
    SoftMaskCard,
    TaskCard,
    ValidationCard,
)

__all__ = [
    "CARD_FILE",
    "CBBCard",
    "CardInfo",
    "SoftMaskCard",
    "TaskCard",
    "ValidationCard",
    "card_info_from_config",
    "card_info_from_weak_stage",
    "card_writer",
    "llm_stages",
    "readme_for",
    "render_model_card",
    "task_rows_in_files",
    "write_model_card",
]
