"""The model as mteb sees it: the shared batch encoder with an on-disk embedding cache.

Why: on two CPU cores an evaluation suite spends nearly all of its time encoding, and the same
texts come back again and again (the same STS test set before and after every training run,
the SciFact corpus for every retrieval experiment, a rerun after a crash). Caching each
embedding by ``(model fingerprint, prompt, text)`` makes the second run of anything nearly free
and lets a run that died half way resume where it stopped.

How:

- the cache is :class:`~conan_embedding.encoding.cache.EmbeddingCache` (one folder per
  :func:`~conan_embedding.encoding.cache.model_fingerprint`, safetensors shards keyed by
  ``prompt + text`` digests), so changing one weight gives a new namespace; an evaluation run
  inside a caller's autocast (bf16 / fp16) has its own folder ``<fingerprint>-bf16``;
- the misses are embedded by :class:`~conan_embedding.encoding.engine.EmbeddingEngine` (token
  batches, on ``device``), the encoder mining, filtering and serving use too;
- :class:`CachedEncoder` implements mteb's encoder protocol (``encode(dataloader, task_metadata,
  hf_split, hf_subset, prompt_type)``) so ``mteb.evaluate`` drives it, looks each text up in the
  cache and only encodes the misses.

Prompts: mteb picks the prompt by task name, task type and prompt type (query/document). e5
models expect ``query: `` on *both* sides of symmetric tasks (STS, classification, clustering,
bitext mining), where mteb asks for no prompt type at all; :class:`CachedEncoder` then uses the
model's ``query`` prompt (``symmetric_prompt="query"``, configurable). A ``passage`` prompt is
treated as mteb's ``document`` prompt, the name e5 models ship with.

``prompt_map`` (``conan-embed eval --prompt TASK=PROMPT_NAME``) names the model prompt of an
evaluation task's queries (and of both sides of a symmetric task), e.g. a training task's
instruction saved as a model prompt; ``TASK`` is an mteb task name (``STSBenchmark``) or task
type (``STS``, ``Retrieval``), the name winning. Documents keep the ``document`` / ``passage``
prompt. Lengths: documents are cut at the model's passage length, everything else (queries,
symmetric tasks) at its query length (``model.query_max_length`` / ``passage_max_length``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name

from conan_embedding.encoding.cache import EmbeddingCache, model_fingerprint, text_key
from conan_embedding.encoding.engine import EmbeddingEngine
from conan_embedding.progress import progress

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.types import PromptType
    from sentence_transformers import SentenceTransformer
    from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)


def normalized_prompts(model: SentenceTransformer) -> dict[str, str]:
    """The model's prompts with e5's ``passage`` also offered under mteb's name ``document``."""
    prompts = {k: v for k, v in (getattr(model, "prompts", None) or {}).items() if v}
    if "passage" in prompts and "document" not in prompts:
        prompts["document"] = prompts["passage"]
    return prompts


class CachedEncoder(AbsEncoder):
    """mteb's encoder protocol over a SentenceTransformer, with :class:`EmbeddingCache`.

    ``cache_dir=None`` disables the disk cache (embeddings are still computed the same way).
    """

    def __init__(
        self,
        model: SentenceTransformer,
        *,
        name: str,
        cache_dir: str | os.PathLike[str] | None = None,
        symmetric_prompt: str | None = "query",
        show_progress: bool = True,
        flush_every: int = 2048,
        device: str | torch.device | None = "auto",
        prompt_map: dict[str, str] | None = None,
    ) -> None:
        self.model = model
        # the current torch thread count is kept (evaluate(num_threads=...) may have set it)
        self.engine = EmbeddingEngine(model, device=device, threads=torch.get_num_threads())
        self.flush_every = flush_every
        self.fingerprint = model_fingerprint(model)
        meta = ModelMeta.from_sentence_transformer_model(model)
        self.mteb_model_meta = meta.model_copy(
            update={"name": name, "revision": self.fingerprint[:12]}
        )
        self.model_prompts = normalized_prompts(model)
        self.prompt_map = dict(prompt_map or {})
        unknown = {k: v for k, v in self.prompt_map.items() if v not in self.model_prompts}
        if unknown:
            raise ValueError(
                f"--prompt names prompts this model does not have: {unknown}; its prompts: "
                f"{sorted(self.model_prompts) or 'none'}"
            )
        self.symmetric_prompt = symmetric_prompt
        self.show_progress = show_progress
        self.cache_dir = cache_dir
        self._caches: dict[str | None, EmbeddingCache] = {}
        self.encoded_texts = 0  # texts actually run through the network (cache misses)

    @property
    def cache(self) -> EmbeddingCache | None:
        """The disk cache for the precision this encode runs in: float32, or the autocast a
        caller wrapped the evaluation in (its own folder, ``<fingerprint>-bf16``), so bf16
        vectors are never served to a float32 evaluation of the same model, nor the reverse."""
        if not self.cache_dir:
            return None
        precision = self.engine.precision
        if precision not in self._caches:
            folder = self.fingerprint + (f"-{precision}" if precision else "")
            self._caches[precision] = EmbeddingCache(self.cache_dir, folder)
        return self._caches[precision]

    def resolve_prompt(
        self, task_metadata: TaskMetadata, prompt_type: PromptType | None
    ) -> str | None:
        is_document = prompt_type is not None and prompt_type.value == "document"
        mapped = self.prompt_map.get(task_metadata.name, self.prompt_map.get(task_metadata.type))
        if mapped is not None and not is_document:
            return self.model_prompts[mapped]
        name = get_prompt_name(self.model_prompts or None, task_metadata, prompt_type)
        if name is None and prompt_type is None and self.symmetric_prompt:
            name = self.symmetric_prompt if self.symmetric_prompt in self.model_prompts else None
        return self.model_prompts.get(name) if name else None

    def encode(
        self,
        inputs: DataLoader[Any],
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        prompt = self.resolve_prompt(task_metadata, prompt_type)
        document = prompt_type is not None and prompt_type.value == "document"
        return self.encode_texts(
            texts,
            prompt=prompt,
            side="passage" if document else "query",
            batch_size=int(kwargs.get("batch_size", 32)),
            desc=task_metadata.name,
        )

    def encode_texts(
        self,
        texts: Sequence[str],
        *,
        prompt: str | None = None,
        batch_size: int = 32,
        desc: str = "encode",
        side: str | None = None,
    ) -> np.ndarray:
        """Embeddings of ``texts`` (float32, one row each), from the cache where possible;
        ``side`` (``query`` / ``passage``) cuts them at the model's length for that side."""
        length = self.engine.side_tokens.get(side or "")
        # a side length is part of the key (vectors cut elsewhere are other vectors)
        tag = f"{prompt or ''}\x00max_length={length}" if length is not None else prompt
        keys = [text_key(tag, text) for text in texts]
        cache = self.cache
        if cache is not None:
            found, missing = cache.lookup(keys)
        else:
            found, missing = [None] * len(texts), list(range(len(texts)))
        # Duplicates inside one call are encoded once.
        unique_missing: dict[bytes, int] = {}
        for index in missing:
            unique_missing.setdefault(keys[index], index)
        todo = list(unique_missing.values())
        by_key: dict[bytes, np.ndarray] = {}
        bar = progress(
            total=len(todo),
            desc=f"{desc}: encoding {len(todo)} texts",
            disable=not self.show_progress or not todo,
        )
        # Encode and store in chunks so an interrupted run keeps what it already paid for.
        for start in range(0, len(todo), self.flush_every):
            chunk = todo[start : start + self.flush_every]
            fresh = self.engine.embed(
                [texts[i] for i in chunk], prompt=prompt, batch_size=batch_size, side=side
            )
            if self.model.truncate_dim:  # as SentenceTransformer.encode: cut, no re-normalising
                fresh = np.ascontiguousarray(fresh[:, : self.model.truncate_dim])
            self.encoded_texts += len(chunk)
            if cache is not None:
                cache.add([keys[i] for i in chunk], fresh)
            by_key.update({keys[i]: fresh[j] for j, i in enumerate(chunk)})
            bar.update(len(chunk))
        bar.close()
        for index in missing:
            found[index] = by_key[keys[index]]
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack(found).astype(np.float32, copy=False)
