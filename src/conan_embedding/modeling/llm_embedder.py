"""A causal LM as an embedder: :class:`LLMEmbedder` runs any decoder under the soft mask and
pools it; :func:`export_sentence_transformer` saves it as a stock sentence-transformers folder.

Why: Conan-v2's stages 3 and 4 train a decoder as an embedder, and everything downstream
(mteb, serving, ``SentenceTransformer(path)``) must run the very attention it was trained to
end with.

How: :class:`LLMEmbedder` runs the decoder of any causal LM (``AutoModel``, no LM head,
loaded strictly by ``modeling.decoders.load_backbone``: Llama, Qwen2/3, Mistral, Gemma 3,
GPT-2, ...) with the additive ``log M`` mask (only the padding mask and ``is_causal`` at
``alpha = 0`` and ``1``) and pools the last hidden states (``mean`` over real tokens, or the
``lasttoken``: the tokenizer's EOS appended to every text, BOS kept).
:func:`export_sentence_transformer` merges any LoRA adapter and saves a folder whose model
config says ``is_causal: false`` when the schedule ended bidirectional.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from conan_embedding.modeling.decoders import (
    PaddingSide,
    Pooling,
    check_config_flag,
    check_tokenizer_round_trip,
    load_backbone,
    load_decoder_tokenizer,
    pool,
    prepare_tokenizer,
)
from conan_embedding.modeling.soft_mask import Variant, soft_masked_forward

if TYPE_CHECKING:
    from conan_embedding.modeling.embedder import ReadmeWriter


class LLMEmbedder(torch.nn.Module):
    """A causal-LM backbone (any ``AutoModel`` decoder) + pooling, run under the soft mask."""

    def __init__(
        self,
        backbone: torch.nn.Module,
        tokenizer: Any,
        pooling: Pooling = "mean",
        max_len: int = 64,
        padding_side: PaddingSide = "right",
    ):
        super().__init__()
        if pooling not in ("mean", "lasttoken"):
            raise ValueError(f"pooling must be 'mean' or 'lasttoken', got {pooling!r}")
        self.backbone = backbone
        self.tokenizer = prepare_tokenizer(tokenizer, pooling, padding_side=padding_side)
        self.pooling, self.max_len = pooling, max_len

    @classmethod
    def from_llm(
        cls,
        path: str | os.PathLike[str],
        pooling: Pooling = "mean",
        max_len: int = 64,
        *,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
    ) -> LLMEmbedder:
        """Any causal-LM folder (model + tokenizer), loaded strictly by ``load_backbone``."""
        backbone = load_backbone(path, dtype=dtype, attn_implementation=attn_implementation)
        return cls(backbone, load_decoder_tokenizer(path), pooling, max_len)

    @property
    def width(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def _no_split_modules(self) -> list[str]:
        """The backbone's decoder-layer classes (``LlamaDecoderLayer``, ...): accelerate's FSDP
        ``TRANSFORMER_BASED_WRAP`` reads them from the root module it is given, and without
        them the whole embedder becomes one FSDP unit (gathered whole for every forward)."""
        return sorted(getattr(self.backbone, "_no_split_modules", None) or [])

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_len, return_tensors="pt"
        )

    def forward(
        self,
        texts: Sequence[str] | Mapping[str, torch.Tensor],
        alpha: float,
        variant: Variant = "L_over_i",
    ) -> torch.Tensor:
        """Pooled states of ``texts``, or of a batch :meth:`tokenize` already made (the weak
        stage tokenizes first to count real tokens)."""
        device = next(self.backbone.parameters()).device
        tokens = texts if isinstance(texts, Mapping) else self.tokenize(texts)
        batch = {k: v.to(device) for k, v in tokens.items()}
        hidden = soft_masked_forward(
            self.backbone, batch["input_ids"], batch["attention_mask"], alpha, variant
        )
        return pool(hidden, batch["attention_mask"], self.pooling)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64, alpha: float = 1.0) -> np.ndarray:
        """L2-normalised embeddings, as ``SentenceTransformer.encode`` would return them."""
        was_training = self.training
        self.eval()
        out = [
            F.normalize(self(texts[i : i + batch_size], alpha), dim=-1)
            for i in range(0, len(texts), batch_size)
        ]
        self.train(was_training)
        return torch.cat(out).float().cpu().numpy()


def with_eos_appended(tokenizer: Any) -> Any:
    """A copy of the tokenizer that ends every text with its EOS (the last-token pooling
    target), BOS and padding kept right (``modeling.decoders.prepare_tokenizer``)."""
    return prepare_tokenizer(tokenizer, "lasttoken")


# ---------------------------------------------------------------- export


def export_sentence_transformer(
    embedder: LLMEmbedder,
    path: str | os.PathLike[str],
    *,
    bidirectional: bool,
    matryoshka_dims: Sequence[int] | None = None,
    extra_meta: dict[str, Any] | None = None,
    readme: str | ReadmeWriter | None = None,
) -> Path:
    """Save as a stock sentence-transformers folder (Transformer -> Pooling -> Normalize).

    ``readme`` is the folder's ``README.md``, as for ``save_embedder``: the weak stage passes
    Conan's model card (``reporting.card.card_writer``) instead of sentence-transformers'
    generic one.

    ``bidirectional`` writes ``is_causal: false`` into the model's config, which transformers
    (5.x, ``merge_with_config_defaults``) turns into full attention for every decoder it
    builds masks for (equal to the soft mask at ``alpha = 1``, the schedule's end);
    :func:`check_config_flag` proves that on the live model before saving. The tokenizer is
    saved with right padding: sentence-transformers passes no ``position_ids``, and right
    padding gives the real tokens positions ``0 .. L-1`` (GPT-2's positions are absolute).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    from conan_embedding.modeling.embedder import save_embedder, set_matryoshka_dims

    backbone = embedder.backbone
    if hasattr(backbone, "merge_and_unload"):  # a peft model: fold the adapters in
        backbone = copy.deepcopy(backbone).merge_and_unload()
    check_config_flag(backbone, bidirectional)
    with tempfile.TemporaryDirectory() as tmp:
        was_causal = getattr(backbone.config, "is_causal", True)
        backbone.config.is_causal = not bidirectional
        try:
            backbone.save_pretrained(tmp, safe_serialization=True)
        finally:
            backbone.config.is_causal = was_causal  # the live model keeps taking explicit masks
        tokenizer = embedder.tokenizer
        if tokenizer.padding_side != "right":
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.padding_side = "right"
        tokenizer.save_pretrained(tmp)
        check_tokenizer_round_trip(tokenizer, tmp)
        transformer = Transformer(tmp, max_seq_length=embedder.max_len)
        pooling = Pooling(embedder.width, pooling_mode=embedder.pooling)
        model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")
        set_matryoshka_dims(model, matryoshka_dims)
        meta = {
            "architecture": "conan-v2 llm embedder",
            "bidirectional": bidirectional,
            **(extra_meta or {}),
        }
        return save_embedder(model, path, extra_meta=meta, readme=readme)
