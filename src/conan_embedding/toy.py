"""Tiny random models and toy task files, for checks and tests only.

``scripts/gpu_check.py`` and the test suite build the same small fixtures: a 2-layer BERT with
a WordPiece vocabulary of :data:`WORDS`, a 2-layer Llama with its own BPE tokenizer and SFT
rows, toy retrieval/STS/classification files, a toy hard-negative pool, the toy training
configs (plain, CBB, DHNM) and a probe of the precision of a model's matrix products. They
live in the package (not in ``tests/``) so the GPU check runs from an installed wheel without
the test suite. Nothing here is meant for real training: the weights are random and the texts are
bags of :data:`WORDS`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = [
    "LLM_WORDS",
    "WORDS",
    "build_tiny_bert",
    "build_tiny_llm",
    "linear_output_dtypes",
    "toy_cbb_config",
    "toy_dhnm_config",
    "toy_retrieval_rows",
    "toy_sentence",
    "toy_sts_rows",
    "toy_train_config",
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


def toy_retrieval_rows(
    rng: np.random.Generator, rows: int, words: int = 5, negatives: int = 3
) -> list[dict]:
    """``rows`` retrieval rows: a query of ``words`` words, the query plus 2 words as the
    positive, ``negatives`` random sentences of ``words`` words."""
    out = []
    for _ in range(rows):
        q = toy_sentence(rng, words)
        out.append(
            {
                "query": q,
                "pos": [q + " " + toy_sentence(rng, 2)],
                "neg": [toy_sentence(rng, words) for _ in range(negatives)],
            }
        )
    return out


def toy_sts_rows(rng: np.random.Generator, rows: int, words: int = 5) -> list[dict]:
    """``rows`` STS rows scored 0-5; a pair scored 4 or more is the same sentence twice."""
    out = []
    for _ in range(rows):
        a = toy_sentence(rng, words)
        score = float(rng.integers(0, 6))
        b = a if score >= 4 else toy_sentence(rng, words)
        out.append({"sentence1": a, "sentence2": b, "score": score})
    return out


def write_toy_tasks(folder: Path, seed: int = 0) -> dict[str, Path]:
    """40 rows each of retrieval (3 negatives a row), STS and classification (3 labels) in
    ``folder``; returns ``{"retrieval": path, "sts": path, "classification": path}``."""
    from conan_embedding.data.records import write_records

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    retrieval = toy_retrieval_rows(rng, 40)
    sts = toy_sts_rows(rng, 40)
    classification = []
    for i in range(40):
        label = ["bank", "food", "sky"][i % 3]
        classification.append({"text": f"{label} " + toy_sentence(rng, 3), "label": label})
    paths = {}
    for name, rows in (("retrieval", retrieval), ("sts", sts), ("classification", classification)):
        paths[name] = folder / f"{name}.jsonl"
        write_records(paths[name], rows)
    return paths


def toy_train_config(
    folder: Path,
    model: Path,
    steps: int = 12,
    tasks: tuple[str, ...] = ("ret", "sts", "cls"),
    schedule: str = "round_robin",
) -> dict:
    """The toy embedding config (as a dict for ``TrainConfig``): :func:`write_toy_tasks`'
    files in ``folder`` as the tasks named in ``tasks`` (``ret``, ``sts``, ``cls``), a dense
    layer of 24 with Matryoshka dims 8 and 24, a checkpoint every 4 steps, output in
    ``folder/run``."""
    paths = write_toy_tasks(folder)
    every = {
        "ret": {
            "name": "ret",
            "kind": "retrieval",
            "path": str(paths["retrieval"]),
            "batch_size": 4,
            "negatives": 2,
        },
        "sts": {"name": "sts", "kind": "sts", "path": str(paths["sts"]), "batch_size": 8},
        "cls": {
            "name": "cls",
            "kind": "classification",
            "path": str(paths["classification"]),
            "batch_size": 6,
            "negatives": 2,
        },
    }
    return {
        "output_dir": str(Path(folder) / "run"),
        "seed": 3,
        "model": {
            "name": str(model),
            "dense_dim": 24,
            "matryoshka_dims": [8, 24],
            "max_seq_length": 32,
        },
        "optim": {"lr": 5e-4, "max_steps": steps, "warmup_ratio": 0.1},
        "checkpoint_every": 4,
        "task_schedule": schedule,
        "tasks": [every[name] for name in tasks],
    }


def toy_cbb_config(folder: Path, model: Path, steps: int = 3, **cbb) -> dict:
    """The toy CBB config (a dict for ``TrainConfig``): 24 retrieval rows (4 negatives, 2 a
    row trained) on virtual devices 0 and 1, 24 STS rows on device 1, written to
    ``folder/ret.jsonl`` and ``folder/sts.jsonl``; ``cbb`` adds to the ``cbb`` section."""
    from conan_embedding.data.records import write_records

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_records(folder / "ret.jsonl", toy_retrieval_rows(rng, 24, words=4, negatives=4))
    write_records(folder / "sts.jsonl", toy_sts_rows(rng, 24, words=4))
    return {
        "output_dir": str(folder / "run"),
        "seed": 5,
        "model": {"name": str(model), "dense_dim": 16, "max_seq_length": 24},
        "optim": {"lr": 1e-3, "max_steps": steps, "warmup_ratio": 0.0},
        "checkpoint_every": 1,
        "tasks": [
            {
                "name": "ret",
                "kind": "retrieval",
                "path": str(folder / "ret.jsonl"),
                "batch_size": 3,
                "negatives": 2,
            },
            {"name": "sts", "kind": "sts", "path": str(folder / "sts.jsonl"), "batch_size": 6},
        ],
        "cbb": {"world_size": 2, "task_ranks": {"ret": [0, 1], "sts": [1]}, **cbb},
    }


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


def toy_dhnm_config(
    output_dir: Path,
    model: Path | str,
    train: Path,
    steps: int,
    checkpoint_every: int = 4,
    **dynamic,
) -> dict:
    """A DHNM config (a dict for ``TrainConfig``) on :func:`write_toy_pools`' ``train``: one
    retrieval task, 2 negatives a row, ``dynamic`` as its ``dynamic_negatives`` section."""
    return {
        "output_dir": str(output_dir),
        "seed": 5,
        "model": {"name": str(model), "max_seq_length": 32},
        "optim": {"lr": 1e-4, "max_steps": steps, "warmup_ratio": 0.0},
        "checkpoint_every": checkpoint_every,
        "log_every": 1,
        "tasks": [
            {
                "name": "ret",
                "kind": "retrieval",
                "path": str(train),
                "batch_size": 4,
                "negatives": 2,
                "dynamic_negatives": dynamic,
            }
        ],
    }


@contextmanager
def linear_output_dtypes(model) -> Iterator[list]:
    """While the block runs, the dtype of every output of ``model``'s first ``nn.Linear`` (the
    precision its matrix products ran in), appended to the list this yields."""
    import torch

    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    seen: list[torch.dtype] = []
    hook = linear.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        yield seen
    finally:
        hook.remove()
