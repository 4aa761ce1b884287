"""Training-data builders: cross-lingual retrieval (CLR) by query translation, LLM-generated
pairs, teacher-score filtering, and deduplication against every evaluation set.

Modules: :mod:`.clr`, :mod:`.generate`, :mod:`.filter`, :mod:`.dedup`, :mod:`.translators`
(parallel corpus and LLM translation), :mod:`.backends` (OpenAI-compatible HTTP and local
Hugging Face chat back-ends) and :mod:`.cache` (the persistent completion cache).
"""

from __future__ import annotations
