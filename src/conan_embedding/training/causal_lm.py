"""Stages 1 and 2 of Conan-v2: causal-LM pretraining of our own LLM, then SFT.

Why: Conan-v2's embedder is an LLM trained from scratch, so the LM stages are part of the
recipe. Pretraining mixes sources with per-source weights (the paper up-weights news, QA and
web pairs); SFT teaches (instruction, input) -> output, and the same rows later become the
weak embedding pairs (stage 3, ``training.soft_mask_weak``).

How:
- Mixing and packing (``data.packing``): batch ``s`` is drawn from the weighted sources by a
  generator seeded with ``(seed, s)`` and packed into full blocks, so resuming replays the data.
- Settings: :class:`~conan_embedding.config.PretrainConfig` and
  :class:`~conan_embedding.config.SFTConfig` (``optim:``, ``engine:``, ``checkpoint_every``).
- Loss: next-token cross-entropy ``L = -1/N sum_t log p(x_{t+1} | x_<=t)``; perplexity is
  ``exp(L)`` on held-out documents of every source (every ``holdout_every``-th document).
- The loop is the training engine's (``training.engine``): AdamW with warmup then cosine or
  linear decay, bf16, DDP/FSDP/DeepSpeed, checkpoints (safetensors + JSON, every rank resumes
  at the same step), ``log.jsonl``. :class:`CausalLMProgram` says what a step is: this rank's
  rows of the batch, cut into ``micro_batch_size`` micro-batches whose gradients accumulate,
  and the held-out perplexity every ``eval_every`` steps; ``curve.png`` and ``summary.json``
  are written at the end, and a finished run is not redone.
- Memory at a 150k vocabulary: the loss is taken from the final hidden states,
  ``LOSS_CHUNK_TOKENS`` positions per ``lm_head`` call (checkpointed, so the backward
  recomputes each slice): no ``[rows, seq, vocab]`` logits exist in training or evaluation.
  The held-out set is scored a few rows per forward, split over the ranks, and its
  (loss, token) sums are all-reduced.
- SFT rows are ``{"instruction", "input", "output"}``; the model sees
  ``instruction \\n input \\n output <eos>`` and the loss covers the output tokens only
  (prompt and padding labels are ``-100``).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from tqdm.auto import tqdm

from conan_embedding._io import atomic_path, write_json_atomic
from conan_embedding.config import PretrainConfig, SFTConfig
from conan_embedding.data.builders.v2_corpus import build_shared_corpus
from conan_embedding.data.packing import MixtureBatcher, pack_blocks
from conan_embedding.data.records import SFTRecord, read_documents, read_sft_records
from conan_embedding.modeling.llm import (
    build_causal_lm,
    llm_config,
    load_llm,
    load_tokenizer,
    save_llm,
    save_tokenizer,
    train_tokenizer,
)
from conan_embedding.provenance import loadavg
from conan_embedding.training.engine import Engine, LoopSettings, RunResult

IGNORE_INDEX = -100

Batch = (
    tuple[torch.Tensor, torch.Tensor, dict[str, Any]]
    | tuple[torch.Tensor, torch.Tensor, dict[str, Any], torch.Tensor]
)
"""``(input_ids, labels, info[, attention_mask])`` of one step; the mask marks real tokens."""

LMStageConfig = PretrainConfig | SFTConfig
"""What an LM stage's loop reads: ``optim``, ``engine``, ``seed``, ``micro_batch_size``,
``eval_every``, ``checkpoint_every`` and ``keep_checkpoints``."""

# ---------------------------------------------------------------- the step program


class CausalLMProgram:
    """One LM step: ``next_batch(step)`` rows, this rank's share, cut into micro-batches.

    Rank ``r`` of ``W`` takes rows ``r*B/W .. (r+1)*B/W - 1`` of the step's batch; each
    micro-batch's mean token loss is weighted by its share of the rank's rows, so the rank's
    gradient is that of the mean over its rows, and DDP's average over ranks that of the
    whole batch (exact for packed pretraining blocks, where every row has the same tokens).
    """

    def __init__(
        self,
        engine: Engine,
        model: torch.nn.Module,
        tokenizer: Any,
        next_batch: Callable[[int], Batch],
        evaluate: HeldOut | Callable[[torch.nn.Module], float],
        config: LMStageConfig,
        *,
        description: str,
        extra_meta: dict[str, Any],
    ):
        self.engine, self.model, self.tokenizer = engine, model, tokenizer
        self.next_batch, self.evaluate, self.config = next_batch, evaluate, config
        self.description, self.extra_meta = description, extra_meta
        engine.prepare(model, decay_filter=lambda name, p: p.ndim >= 2 and "norm" not in name)
        self.evals: list[dict[str, Any]] = []

    @property
    def forward_model(self) -> torch.nn.Module:
        """The module to call for forward passes (the engine's DDP/FSDP wrapper while training)."""
        return self.engine.forward_model

    def _eval_entry(self, step: int) -> dict[str, float]:
        was_training = self.model.training
        model = self.engine.unwrap()
        if isinstance(self.evaluate, HeldOut):  # split over the ranks, summed by all-reduce
            val = self.evaluate.loss(model, self.engine)
        else:
            val = self.evaluate(model)
        self.model.train(was_training)
        entry = {"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        self.evals.append(entry)
        return {"val_loss": val, "val_ppl": entry["val_ppl"]}

    def step(self, step: int) -> dict[str, Any]:
        if step == 0 and not self.evals:
            self._eval_entry(0)
        input_ids, labels, info, *rest = self.next_batch(step)
        engine = self.engine
        rows = input_ids.shape[0]
        if rows % engine.world_size:
            raise ValueError(f"batch_size {rows} does not split over {engine.world_size} processes")
        share = rows // engine.world_size
        mine = slice(engine.rank * share, (engine.rank + 1) * share)
        input_ids, labels = input_ids[mine], labels[mine]
        # real tokens for the throughput log: the attention mask when the batch is padded
        # (SFT), else every position (packed pretraining blocks)
        tokens = int(rest[0][mine].sum()) if rest else input_ids.numel()
        size = self.config.micro_batch_size or share
        starts = list(range(0, share, size))
        device = next(self.model.parameters()).device
        total = 0.0
        for number, start in enumerate(starts):
            ids = input_ids[start : start + size].to(device)
            target = labels[start : start + size].to(device)
            with engine.sync(last=number == len(starts) - 1):
                # the chunked loss from hidden states: HF's loss value and gradient without
                # the [micro, seq, vocab] logits and their fp32 copies (1.4B: ~5 GB each)
                loss_sum, count = causal_lm_loss_sums(self.forward_model, self.model, ids, target)
                loss = loss_sum / count.clamp(min=1)
                engine.check_finite(loss, self.description, step)
                engine.backward(loss * ids.shape[0] / share)
            total += loss.item() * ids.shape[0] / share
        mean = float(engine.mean_over_ranks(torch.tensor([total]))[0])
        return {"loss": mean, "kind": "train", "samples": share, "tokens": tokens, **info}

    def after_step(self, step: int) -> dict[str, Any]:
        if step % self.config.eval_every == 0 or step == self.config.optim.max_steps:
            return self._eval_entry(step)
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"evals": self.evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evals = list(state["evals"])

    def finish(self, engine: Engine, result: RunResult) -> None:
        # every rank: under FSDP/DeepSpeed this gathers the weights (a collective); the main
        # rank gets a plain module to save (a fresh CPU copy when sharded, since FSDP2's
        # DTensors and ZeRO-3's partitions cannot take a full state dict), the others None
        model = engine.consolidated_model(self.model)
        if model is None:
            return
        out = engine.output_dir
        model.eval()
        train = [h for h in _read_jsonl(out / "log.jsonl") if "loss" in h]
        self.summary = {
            "steps": self.config.optim.max_steps,
            "resumed_from": result.start_step,
            "seconds_this_run": round(result.seconds, 2),
            "first_val_ppl": self.evals[0]["val_ppl"],
            "final_val_ppl": self.evals[-1]["val_ppl"],
            "final_train_loss": train[-1]["loss"] if train else float("nan"),
            "loadavg": loadavg(),
            "processes": engine.world_size,
            **self.extra_meta,
        }
        save_llm(model, self.tokenizer, out / "model", extra=self.summary)
        write_json_atomic(out / "summary.json", self.summary)
        plot_curve(train, self.evals, out / "curve.png", title=self.description)


def train_causal_lm(
    model: torch.nn.Module,
    tokenizer: Any,
    next_batch: Callable[[int], Batch],
    evaluate: HeldOut | Callable[[torch.nn.Module], float],
    config: LMStageConfig,
    output_dir: Path,
    *,
    description: str,
    resume: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run an LM stage on the engine; logs ``log.jsonl``, checkpoints, saves ``model/``,
    ``summary.json`` and ``curve.png``; returns the summary. A finished run is not redone."""
    torch.manual_seed(config.seed)
    steps = config.optim.max_steps
    loop = LoopSettings(
        output_dir=output_dir,
        steps=steps,
        optim=config.optim,
        seed=config.seed,
        checkpoint=config.checkpoint,
        description=description,
        log_name="log.jsonl",
    )
    # a decoder-only LM uses every weight in every step: DDP's search for unused ones would
    # only walk the autograd graph each forward (and warn); engine.find_unused_parameters wins
    engine = Engine(config.engine, loop, find_unused_parameters=False)
    # rank 0 decides and tells the others: on node-local disks the ranks may see different
    # folders, and ranks that disagree would hang (one trains, one returns)
    finished = engine.broadcast_object(
        _finished_summary(output_dir, steps) if resume and engine.is_main else None
    )
    if finished is not None:
        return finished
    program = CausalLMProgram(
        engine,
        model,
        tokenizer,
        next_batch,
        evaluate,
        config,
        description=description,
        extra_meta=extra_meta or {},
    )
    engine.run(program, resume=resume)
    return engine.broadcast_object(getattr(program, "summary", None))


def _finished_summary(out: Path, steps: int) -> dict[str, Any] | None:
    summary_path = out / "summary.json"
    if not (summary_path.is_file() and (out / "model" / "model.safetensors").is_file()):
        return None
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return summary if summary.get("steps") == steps else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def plot_curve(
    train: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]], path: Path, title: str = ""
) -> None:
    """Training loss and held-out perplexity against the step, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([h["step"] for h in train], [h["loss"] for h in train], lw=0.8)
    left.set(xlabel="step", ylabel="train loss", title=f"{title} loss")
    right.plot([h["step"] for h in evals], [h["val_ppl"] for h in evals], marker="o")
    right.set(xlabel="step", ylabel="held-out perplexity", yscale="log", title="perplexity")
    figure.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            figure.savefig(tmp, dpi=100)
    finally:
        plt.close(figure)


# ---------------------------------------------------------------- the loss in bounded memory

LOSS_CHUNK_TOKENS = 1024
"""Positions per ``lm_head`` call of the chunked loss: at a 150k vocabulary one slice of logits
is 1024 x 150k = 154M values (0.6 GB in fp32), not ``rows x 4096 x 150k`` (tens of GB)."""

EVAL_TOKENS_PER_FORWARD = 8192
"""Held-out rows per forward = this // seq_len (2 rows of the 1.4B config's 4096 tokens)."""


@contextlib.contextmanager
def _final_hidden_states(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the decoder body's last hidden state (after the final norm) of each forward.

    A hook, not ``output_hidden_states``: the forward still goes through the wrapper the
    engine prepared (DDP's gradient hooks, FSDP's root all-gather, DeepSpeed), and no other
    layer's output is kept.
    """
    box: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
        box.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = model.get_decoder().register_forward_hook(keep)
    try:
        yield box
    finally:
        handle.remove()


def _slice_loss(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # logits of this slice only, upcast as Hugging Face's ForCausalLMLoss does, summed
    logits = head(hidden).float()
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy from the final hidden states, ``chunk_tokens`` positions per
    ``lm_head`` call: ``(sum of token losses, number of scored tokens)``, both fp32.

    With gradients on, each slice is checkpointed: its logits are freed after the forward and
    recomputed in the backward, so no ``[rows, seq, vocab]`` tensor ever exists.
    """
    width = hidden.shape[-1]
    flat = hidden[:, :-1, :].reshape(-1, width)
    target = labels[:, 1:].reshape(-1).to(flat.device)
    total = torch.zeros((), dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], chunk_tokens):
        piece, wanted = flat[start : start + chunk_tokens], target[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            loss = torch.utils.checkpoint.checkpoint(
                _slice_loss, head, piece, wanted, use_reentrant=False
            )
        else:
            loss = _slice_loss(head, piece, wanted)
        total = total + loss.float()
    count = (target != IGNORE_INDEX).sum().to(torch.float32)
    return total, count


def causal_lm_loss_sums(
    forward: torch.nn.Module,
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of ``forward`` (the prepared wrapper, or ``model`` itself) and the chunked
    loss from its final hidden states; ``model`` is the unwrapped causal LM (its ``lm_head``).

    ``logits_to_keep=1`` makes Hugging Face project one position per row, so neither its
    logits nor accelerate's fp32 copy of them (``convert_outputs_to_fp32``) is vocab-sized.
    The sums are ``(loss, tokens)``; their ratio is HF's ``model(ids, labels=labels).loss``.
    """
    with _final_hidden_states(model) as box:
        forward(input_ids=input_ids, logits_to_keep=1)
    return chunked_lm_loss(box[-1], labels, model.get_output_embeddings(), chunk_tokens)


class _Ranks(Protocol):
    """What the held-out loss needs of :class:`Engine` (a stub in tests)."""

    rank: int
    world_size: int
    distributed: bool

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor: ...


def _held_out_loss(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    engine: _Ranks | None = None,
    rows_per_forward: int | None = None,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> float:
    """Mean next-token loss over every scored token of ``blocks`` (HF's loss, token-weighted).

    Bounded memory: ``rows_per_forward`` rows per forward (default
    ``EVAL_TOKENS_PER_FORWARD // seq_len``) and the chunked loss. With ``engine`` the rows are
    split over the ranks and one all-reduce sums (loss, tokens). Every rank runs the same
    forwards on the same shapes, because under FSDP and ZeRO-3 each forward (and, under
    ZeRO-3, each ``lm_head`` slice) is a collective: a rank short of rows fills its last
    forwards with copies of a block whose labels are all ignored (they add 0 to both sums).
    """
    model.eval()
    device = next(model.parameters()).device
    rank, world = (engine.rank, engine.world_size) if engine is not None else (0, 1)
    labels = blocks if labels is None else labels
    per_rank = -(-len(blocks) // world)
    rows = min(per_rank, rows_per_forward or max(1, EVAL_TOKENS_PER_FORWARD // blocks.shape[1]))
    mine = list(range(rank * per_rank, min(len(blocks), (rank + 1) * per_rank)))
    padded = -(-per_rank // rows) * rows
    ids = torch.cat([blocks[mine], blocks[:1].expand(padded - len(mine), -1)])
    target = torch.cat(
        [labels[mine], torch.full((padded - len(mine), labels.shape[1]), IGNORE_INDEX)]
    )
    sums = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, padded, rows):
            # the blocks live on the CPU (pack_blocks, encode_sft); the model on its device
            total, count = causal_lm_loss_sums(
                model,
                model,
                ids[start : start + rows].to(device),
                target[start : start + rows].to(device),
                chunk_tokens,
            )
            sums += torch.stack([total.double(), count.double()]).cpu()
    if engine is not None and engine.distributed:
        sums = engine.mean_over_ranks(sums) * engine.world_size
    total, count = (float(v) for v in sums)
    return total / max(round(count), 1)


@dataclass
class HeldOut:
    """The held-out rows of an LM stage, scored by :func:`_held_out_loss` on every rank."""

    blocks: torch.Tensor
    labels: torch.Tensor | None = None

    def loss(self, model: torch.nn.Module, engine: _Ranks | None = None) -> float:
        return _held_out_loss(model, self.blocks, self.labels, engine=engine)


# ---------------------------------------------------------------- pretraining


def run_pretraining(config: PretrainConfig, *, resume: bool = True) -> dict[str, Any]:
    """Tokenizer (trained on the sources unless given), tiny..1.4B model, mixed packed LM loss."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    missing = [s.path for s in config.sources if not Path(s.path).is_file()]
    if missing and config.shared_corpus_dir:
        build_shared_corpus(config.shared_corpus_dir)
    documents = {source.name: read_documents(source.path) for source in config.sources}
    if config.max_documents:
        documents = {
            name: docs
            if len(docs) <= config.max_documents
            else random.Random(f"{config.seed}-{name}").sample(docs, config.max_documents)
            for name, docs in documents.items()
        }
    if len(documents) != len(config.sources):
        raise ValueError("source names must be unique")
    train_docs = {
        n: [d for k, d in enumerate(docs) if k % config.holdout_every]
        for n, docs in documents.items()
    }
    held_docs = {n: docs[:: config.holdout_every] for n, docs in documents.items()}

    if config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    elif (out / "tokenizer").is_dir():
        tokenizer = load_tokenizer(out / "tokenizer")
    else:
        texts = [d for docs in train_docs.values() for d in docs]
        tokenizer = train_tokenizer(texts, config.vocab_size)
        save_tokenizer(tokenizer, out / "tokenizer")

    def encode(docs: list[str]) -> list[list[int]]:
        return tokenizer(docs, add_special_tokens=False)["input_ids"]

    tokens = {n: encode(d) for n, d in tqdm(train_docs.items(), desc="tokenize")}
    batcher = MixtureBatcher(
        tokens,
        {s.name: s.weight for s in config.sources},
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        eos_id=tokenizer.eos_token_id,
        seed=config.seed,
    )
    held_blocks = torch.cat(
        [
            pack_blocks(
                encode(docs),
                config.seq_len,
                tokenizer.eos_token_id,
                max(1, config.eval_blocks // len(held_docs)),
            )
            for docs in held_docs.values()
        ]
    )
    model_config = llm_config(
        config.preset,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{"max_position_embeddings": max(config.seq_len, 512), **config.model_overrides},
    )
    model = build_causal_lm(model_config, seed=config.seed)

    def next_batch(step: int):
        ids, drawn = batcher.batch(step)
        return ids, ids, {f"tokens_{k}": v for k, v in drawn.items()}

    meta = {
        "stage": "pretrain",
        "preset": config.preset,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "tokens_per_step": config.batch_size * config.seq_len,
        "source_weights": {s.name: s.weight for s in config.sources},
        "held_out_blocks": int(held_blocks.shape[0]),
    }
    return train_causal_lm(
        model,
        tokenizer,
        next_batch,
        HeldOut(held_blocks),
        config,
        out,
        description="pretrain",
        resume=resume,
        extra_meta=meta,
    )


# ---------------------------------------------------------------- SFT


def sft_prompt(record: SFTRecord) -> str:
    return f"{record.instruction}\n{record.input}\n" if record.input else f"{record.instruction}\n"


def encode_sft(
    records: Sequence[SFTRecord], tokenizer: Any, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 except on output + eos tokens)."""
    rows_ids, rows_labels = [], []
    for record in records:
        prompt = tokenizer(sft_prompt(record), add_special_tokens=False)["input_ids"]
        answer = tokenizer(record.output, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        prompt = prompt[: max(1, max_len - len(answer))]  # keep the answer, trim a long prompt
        ids = (prompt + answer)[:max_len]
        labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_len]
        rows_ids.append(ids)
        rows_labels.append(labels)
    width = max(len(ids) for ids in rows_ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows_ids), width), pad, dtype=torch.long)
    labels = torch.full((len(rows_ids), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows_ids), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(zip(rows_ids, rows_labels, strict=True)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention[row, : len(ids)] = 1
    return input_ids, attention, labels


def run_sft(config: SFTConfig, *, resume: bool = True) -> dict[str, Any]:
    """Fine-tune a pretrained LLM on instruction rows, loss on the outputs only."""
    records = read_sft_records(config.data)
    if len(records) < 2:
        raise ValueError(f"{config.data}: SFT needs at least 2 rows")
    held = records[: min(config.eval_rows, len(records) // 10 or 1)]
    train = records[len(held) :]
    model, tokenizer = load_llm(config.base_model)
    held_ids, _, held_labels = encode_sft(held, tokenizer, config.max_len)

    def next_batch(step: int):
        rng = random.Random(f"{config.seed}-{step}")
        batch = [train[rng.randrange(len(train))] for _ in range(config.batch_size)]
        ids, attention, labels = encode_sft(batch, tokenizer, config.max_len)
        # the mask is for counting real tokens only: right padding under a causal mask never
        # changes a real token's output, so the forward runs without it (SDPA's causal path)
        return ids, labels, {"output_tokens": int((labels != IGNORE_INDEX).sum())}, attention

    meta = {
        "stage": "sft",
        "base_model": config.base_model,
        "train_rows": len(train),
        "held_rows": len(held),
    }
    return train_causal_lm(
        model,
        tokenizer,
        next_batch,
        HeldOut(held_ids, held_labels),
        config,
        Path(config.output_dir),
        description="sft",
        resume=resume,
        extra_meta=meta,
    )
