"""Tiny random models and toy task files, for checks and tests only.

``scripts/gpu_check.py`` and the test suite build the same small fixtures: a 2-layer BERT with
a WordPiece vocabulary of :data:`WORDS`, a 2-layer Llama with its own BPE tokenizer and SFT
rows, toy retrieval/STS/classification files and a toy hard-negative pool. They live in the
package (not in ``tests/``) so the GPU check runs from an installed wheel without the test
suite. Nothing here is meant for real training: the weights are random and the texts are
bags of :data:`WORDS`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = [
    "LLM_WORDS",
    "WORDS",
    "build_tiny_bert",
    "build_tiny_llm",
    "toy_sentence",
    "write_toy_pools",
    "write_toy_tasks",
]

WORDS = [
    "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "in", "park",
    "bank", "money", "loan", "card", "account", "what", "how", "is", "my", "where",
    "can", "i", "get", "open", "close", "fee", "river", "water", "fish", "boat",
    "tree", "green", "red", "blue", "sky", "sun", "moon", "night", "day", "car",
    "road", "fast", "slow", "happy", "sad", "food", "eat", "drink", "tea", "coffee",
]  # fmt: skip
"""The toy vocabulary: every toy text is a bag of these words (all in :func:`build_tiny_bert`'s
WordPiece vocabulary, so nothing maps to ``[UNK]``)."""

LLM_WORDS = ["apple", "river", "mountain", "苹果", "河流", "高山", "green", "绿色", "music", "音乐"]
"""English and Chinese words for the tiny LLM's SFT rows."""


def build_tiny_bert(
    directory: Path,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    dropout: float | None = None,
) -> Path:
    """A randomly initialised BERT (``layers`` x ``hidden``) with a small WordPiece vocabulary
    of :data:`WORDS`, saved with its tokenizer in ``directory``. ``dropout`` sets both BERT
    dropout rates (``None``: BERT's default 0.1)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = Path(directory)
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
    extra = {}
    if dropout is not None:
        extra = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
        **extra,
    )
    BertModel(config).save_pretrained(directory)
    return directory


def build_tiny_llm(folder: Path, hidden: int = 32) -> Path:
    """A 2-layer Llama with its own BPE tokenizer in ``folder/model``, and beside it 60 SFT rows
    (``sft.jsonl``) and the same texts as documents (``docs.txt``)."""
    from conan_embedding.modeling.llm import build_causal_lm, llm_config, save_llm, train_tokenizer

    folder = Path(folder)
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


def toy_sentence(rng: np.random.Generator, n: int = 5) -> str:
    """``n`` words of :data:`WORDS` drawn with ``rng``."""
    return " ".join(rng.choice(WORDS, size=n))


def write_toy_tasks(folder: Path, seed: int = 0) -> dict[str, Path]:
    """40 rows each of retrieval (3 negatives a row), STS and classification (3 labels) in
    ``folder``; returns ``{"retrieval": path, "sts": path, "classification": path}``."""
    from conan_embedding.data.records import write_records

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    retrieval, sts, classification = [], [], []
    for _ in range(40):
        q = toy_sentence(rng)
        retrieval.append(
            {
                "query": q,
                "pos": [q + " " + toy_sentence(rng, 2)],
                "neg": [toy_sentence(rng) for _ in range(3)],
            }
        )
    for _ in range(40):
        a = toy_sentence(rng)
        score = float(rng.integers(0, 6))
        b = a if score >= 4 else toy_sentence(rng)
        sts.append({"sentence1": a, "sentence2": b, "score": score})
    for i in range(40):
        label = ["bank", "food", "sky"][i % 3]
        classification.append({"text": f"{label} " + toy_sentence(rng, 3), "label": label})
    paths = {}
    for name, rows in (("retrieval", retrieval), ("sts", sts), ("classification", classification)):
        paths[name] = folder / f"{name}.jsonl"
        write_records(paths[name], rows)
    return paths


def write_toy_pools(folder: Path, rows: int = 16, score: float = 0.5) -> Path:
    """``folder/train.jsonl`` (``rows`` queries with one positive, no negatives) and beside it
    ``train.pool.jsonl``: 30 candidates a query, all scored ``score``, for dynamic hard
    negative mining; returns the training file's path."""
    from conan_embedding.data.records import RetrievalRecord, write_records
    from conan_embedding.mining.offline import PoolCandidate, PoolEntry, write_pools

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records, pools = [], []
    for i in range(rows):
        query = " ".join(rng.choice(WORDS, size=5))
        records.append(RetrievalRecord(query=query, pos=[query + " " + WORDS[i % len(WORDS)]]))
        cands = [
            PoolCandidate(text=" ".join(rng.choice(WORDS, size=4)), score=score, rank=r)
            for r in range(10, 40)
        ]
        pools.append(PoolEntry(index=i, query=query, positive_score=0.9, candidates=cands))
    train = folder / "train.jsonl"
    write_records(train, records)
    write_pools(folder / "train.pool.jsonl", pools)
    return train
