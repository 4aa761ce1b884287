"""Training-data builders: cross-lingual retrieval (CLR) by query translation, LLM-generated
pairs and teacher-score filtering, each deduplicated against every evaluation set through
:mod:`conan_embedding.data.leakage`.

Modules: :mod:`.clr`, :mod:`.generate`, :mod:`.filter`, :mod:`.translators`
(parallel corpus and LLM translation), :mod:`.backends` (OpenAI-compatible HTTP and local
Hugging Face chat back-ends) and :mod:`.cache` (the persistent completion cache).
"""

from __future__ import annotations
