"""Moved to :mod:`conan_embedding.reporting.card` (issue #25, step 6); this name stays for
callers not yet updated (``training/llm_embedding.py``)."""

from conan_embedding.reporting.card import (
    CARD_FILE,
    CardInfo,
    card_info_from_config,
    card_info_from_weak_stage,
    card_writer,
    llm_stages,
    render_model_card,
    task_rows_in_files,
    write_model_card,
)

__all__ = [
    "CARD_FILE",
    "CardInfo",
    "card_info_from_config",
    "card_info_from_weak_stage",
    "card_writer",
    "llm_stages",
    "render_model_card",
    "task_rows_in_files",
    "write_model_card",
]
