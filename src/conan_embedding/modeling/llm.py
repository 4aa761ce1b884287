"""The Conan-v2 language model: Llama-style configs from ``tiny`` to the paper's 1.4B, and
the byte-level BPE tokenizer trained on the user's own corpus.

Why: Conan-v2 does not start from a borrowed LLM. It trains its own decoder (8 layers,
hidden 3584, 32 query heads sharing 8 key/value heads, SwiGLU FFN 8192, RMSNorm, vocab
150,000 byte-level BPE) and only then turns it into an embedder. The parameter count the
paper reports, 1,499,205,120, is reproduced exactly by a Llama layout with rotary positions,
no attention bias and the output head tied to the input embedding:

    embed      150,000 * 3584                                  =   537,600,000
    per layer  q,o 2 * 3584^2 + k,v 2 * 3584 * 896 + 3 * 3584 * 8192 + 2 * 3584
                                                               =   120,200,192  (x 8)
    final RMSNorm                                              =         3,584
    total                                                      = 1,499,205,120

How: every config is a stock :class:`transformers.LlamaConfig` (GQA via
``num_key_value_heads``, SwiGLU via ``hidden_act="silu"`` with gate/up/down projections,
RMSNorm, RoPE), so the models load anywhere transformers does. :func:`build_causal_lm` can
build on the ``meta`` device, which is how the 1.4B config is counted on a laptop without
allocating 6 GB. The tokenizer is a ``tokenizers`` byte-level BPE wrapped as a
:class:`~transformers.PreTrainedTokenizerFast` and saved beside the weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conan_embedding._io import atomic_dir

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]

# The paper's count for conan-v2-1.4b (embedding tied to the output head).
CONAN_V2_PARAMETERS = 1_499_205_120

# Shapes only; the vocabulary of tiny/small comes from the tokenizer trained for them.
LLM_PRESETS: dict[str, dict[str, Any]] = {
    # trains in minutes on 2 CPU cores
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=344,
        max_position_embeddings=512,
        vocab_size=4000,
    ),
    "small": dict(
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1376,
        max_position_embeddings=2048,
        vocab_size=32000,
    ),
    "conan-v2-1.4b": dict(
        hidden_size=3584,
        num_hidden_layers=8,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        max_position_embeddings=32768,
        vocab_size=150_000,
    ),
}


def llm_config(
    preset: str,
    *,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    **overrides: Any,
) -> LlamaConfig:
    """A :class:`LlamaConfig` for a named preset; ``vocab_size`` defaults to the preset's."""
    if preset not in LLM_PRESETS:
        raise ValueError(f"unknown LLM preset {preset!r}; known: {sorted(LLM_PRESETS)}")
    shape = {**LLM_PRESETS[preset], **overrides}
    if vocab_size is not None:
        shape["vocab_size"] = vocab_size
    return LlamaConfig(
        hidden_act="silu",  # SwiGLU: down(silu(gate(x)) * up(x))
        attention_bias=False,
        mlp_bias=False,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
        **shape,
    )


def build_causal_lm(
    config: LlamaConfig, *, device: str | torch.device = "cpu", seed: int | None = None
) -> LlamaForCausalLM:
    """A freshly initialised causal LM; ``device="meta"`` allocates no memory (for counting)."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied head is counted once), meta tensors included."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (any language: no unknown tokens are possible)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is below the 256 bytes + special tokens")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(core)


def wrap_tokenizer(core: Any) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
    )
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | os.PathLike[str]) -> Path:
    return atomic_dir(path, lambda tmp: tokenizer.save_pretrained(str(tmp)))


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    tokenizer.padding_side = "right"
    return tokenizer


# ---------------------------------------------------------------- save / load


def save_llm(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast | None,
    path: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Model (safetensors) + tokenizer + ``conan_llm.json`` in one folder, written atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if extra:
            (tmp / "conan_llm.json").write_text(json.dumps(extra, indent=2), encoding="utf-8")

    return atomic_dir(path, write)


def load_llm(
    path: str | os.PathLike[str],
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    model = LlamaForCausalLM.from_pretrained(str(path), use_safetensors=True)
    return model, load_tokenizer(path)
