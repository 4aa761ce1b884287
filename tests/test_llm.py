"""The v2 LLM configs, the exact 1.4B parameter count, and the byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
import torch

from conan_embedding.modeling.llm import (
    CONAN_V2_PARAMETERS,
    EOS_TOKEN,
    PAD_TOKEN,
    build_causal_lm,
    count_parameters,
    llm_config,
    load_llm,
    load_tokenizer,
    save_llm,
    save_tokenizer,
    train_tokenizer,
)

CORPUS = [
    "今天天气很好，我们去公园散步吧。",
    "The weather is nice today, let's take a walk in the park.",
    "他每天早上喝一杯咖啡。",
    "He drinks a cup of coffee every morning.",
    "这本书很有意思，我已经读了三遍。",
] * 20


def test_conan_v2_config_counts_exactly_the_papers_parameters():
    config = llm_config("conan-v2-1.4b")
    assert (config.num_hidden_layers, config.hidden_size) == (8, 3584)
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 8)
    assert (config.intermediate_size, config.vocab_size) == (8192, 150_000)
    assert config.hidden_act == "silu" and not config.attention_bias
    model = build_causal_lm(config, device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert count_parameters(model) == CONAN_V2_PARAMETERS == 1_499_205_120
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # GQA: 8 key/value heads of 112 dims
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (8 * 112, 3584)


def test_presets_grow_and_vocab_override_applies():
    sizes = {}
    for preset in ("tiny", "small"):
        sizes[preset] = count_parameters(build_causal_lm(llm_config(preset), device="meta"))
    assert sizes["tiny"] < sizes["small"] < CONAN_V2_PARAMETERS
    assert llm_config("tiny", vocab_size=777).vocab_size == 777


def test_tokenizer_is_byte_level_lossless_and_saved_with_the_model(tmp_path):
    tokenizer = train_tokenizer(CORPUS, vocab_size=400, show_progress=False)
    assert len(tokenizer) <= 400
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    unseen = "Ünïcödé 😀 未见过的字"  # byte-level: nothing is unknown
    assert tokenizer.decode(tokenizer(unseen).input_ids) == unseen
    # trained merges make frequent text shorter than its bytes
    assert len(tokenizer(CORPUS[0]).input_ids) < len(CORPUS[0].encode("utf-8")) / 2

    save_tokenizer(tokenizer, tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok")(CORPUS[1]).input_ids == tokenizer(CORPUS[1]).input_ids

    config = llm_config(
        "tiny",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        hidden_size=32,
        intermediate_size=64,
    )
    model = build_causal_lm(config, seed=0)
    save_llm(model, tokenizer, tmp_path / "llm", extra={"preset": "tiny"})
    assert (tmp_path / "llm" / "model.safetensors").is_file()
    assert (tmp_path / "llm" / "conan_llm.json").is_file()
    reloaded, reloaded_tokenizer = load_llm(tmp_path / "llm")
    ids = torch.tensor([tokenizer(CORPUS[2]).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits)
    assert reloaded_tokenizer.pad_token_id == tokenizer.pad_token_id


def test_the_memory_arithmetic_of_docs_uses_these_counts():
    """docs/distributed.md's 1.4B memory estimate rests on these meta-device counts: the tied
    embedding/head, the layers' matmul weights (autocast keeps a bf16 copy of both) and P."""
    model = build_causal_lm(llm_config("conan-v2-1.4b"), device="meta")
    embedding = model.model.embed_tokens.weight.numel()
    matmuls = sum(p.numel() for p in model.model.layers.parameters() if p.ndim == 2)
    assert embedding == 150_000 * 3584 == 537_600_000
    assert matmuls == 8 * (2 * 3584**2 + 2 * 3584 * 896 + 3 * 3584 * 8192) == 961_544_192
    assert 16 * count_parameters(model) / 2**30 == pytest.approx(22.34, abs=0.01)  # fp32 + AdamW
    assert 2 * (embedding + matmuls) / 2**30 == pytest.approx(2.79, abs=0.01)  # bf16 casts
