"""Stages 3-4 of Conan-v2: turning the trained LLM into an embedder.

Why: after pretraining and SFT the decoder knows the language but only attends causally.
Stage 3 (weak supervision) reuses the SFT rows as pairs, ``query = instruction + input``,
``positive = output``, trains with in-batch InfoNCE, and meanwhile opens the attention mask
from causal to bidirectional with the soft mask (``modeling.soft_mask``). Stage 4 is the
supervised multi-task stage of the foundation trainer, run on the exported model.

    L_weak = InfoNCE(q, p) with in-batch negatives, optionally averaged over MRL dims
    attention under  M_ij(t),  alpha(t) from the schedule, t = 0 .. T-1

How: :class:`LLMEmbedder` runs the decoder of any causal LM (``AutoModel``, no LM head,
loaded strictly by ``modeling.decoders.load_backbone``: Llama, Qwen2/3, Mistral, Gemma 3,
GPT-2, ...) with the additive ``log M`` mask (only the padding mask and ``is_causal`` at
``alpha = 0`` and ``1``) and pools the last hidden states (``mean`` over real tokens, or the
``lasttoken``: the tokenizer's EOS appended to every text, BOS kept). Variants for the paper's
ablation are schedules of the same loop: ``linear`` / ``accelerating`` / ``decelerating``
(soft mask), ``hard`` (bidirectional from step 0), ``causal`` (never opened), and LoRA
adapters (peft) instead of full fine-tuning. :func:`export_sentence_transformer` merges any
adapter and saves a stock sentence-transformers folder whose model config says
``is_causal: false`` when the schedule ended bidirectional, so ``SentenceTransformer(path)``,
mteb and the serving code run the very attention the model was trained to end with.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from conan_embedding._io import write_json_atomic, write_text_atomic
from conan_embedding.config import EngineConfig, LoraSettings
from conan_embedding.losses.infonce import info_nce_loss
from conan_embedding.losses.matryoshka import matryoshka_loss
from conan_embedding.modeling.decoders import (
    PaddingSide,
    Pooling,
    check_config_flag,
    check_tokenizer_round_trip,
    load_backbone,
    load_decoder_tokenizer,
    pool,
    prepare_tokenizer,
)
from conan_embedding.modeling.soft_mask import (
    Schedule,
    SoftMaskSchedule,
    Variant,
    soft_masked_forward,
)
from conan_embedding.provenance import loadavg
from conan_embedding.training.engine import Engine

if TYPE_CHECKING:
    from conan_embedding.reporting.card import CardInfo

__all__ = [
    "LLMEmbedder",
    "LoraSettings",
    "WeakStageConfig",
    "export_sentence_transformer",
    "load_backbone",
    "pool",
    "prepare_tokenizer",
    "train_weak_stage",
    "weak_pairs",
    "with_eos_appended",
]


class WeakStageConfig(BaseModel):
    """Stage 3 settings; defaults follow the paper where it gives them (batch 64, InfoNCE)."""

    model_config = ConfigDict(extra="forbid")
    output_dir: str
    llm: str  # a causal-LM folder: saved by pretrain/sft, or `conan-embed import gguf`
    data: str  # SFT rows {"instruction", "input", "output"}
    schedule: Schedule = "linear"
    variant: Variant = "L_over_i"
    pooling: Pooling = "mean"
    lora: LoraSettings | None = None
    # the input embedding matrix stays as loaded: most of a small multilingual decoder's
    # weights (Gemma 3 270M: 168M of 268M) and of its optimizer state, for little gain
    freeze_embeddings: bool = False
    matryoshka_dims: list[int] = Field(default_factory=list)
    max_len: int = 64
    batch_size: int = 64
    steps: int = 200
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.001
    temperature: float = 0.05
    max_rows: int | None = None
    # the paper drops pairs a teacher embedder scores below 0.4 (data.builders.filter)
    teacher: str | None = None
    teacher_threshold: float = 0.4
    teacher_query_prompt: str = ""
    teacher_passage_prompt: str = ""
    seed: int = 0
    threads: int | None = None
    checkpoint_every: int = Field(1000, gt=0)
    engine: EngineConfig = Field(default_factory=EngineConfig)


class LLMEmbedder(torch.nn.Module):
    """A causal-LM backbone (any ``AutoModel`` decoder) + pooling, run under the soft mask."""

    def __init__(
        self,
        backbone: torch.nn.Module,
        tokenizer: Any,
        pooling: Pooling = "mean",
        max_len: int = 64,
        padding_side: PaddingSide = "right",
    ):
        super().__init__()
        if pooling not in ("mean", "lasttoken"):
            raise ValueError(f"pooling must be 'mean' or 'lasttoken', got {pooling!r}")
        self.backbone = backbone
        self.tokenizer = prepare_tokenizer(tokenizer, pooling, padding_side=padding_side)
        self.pooling, self.max_len = pooling, max_len

    @classmethod
    def from_llm(
        cls,
        path: str | os.PathLike[str],
        pooling: Pooling = "mean",
        max_len: int = 64,
        *,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
    ) -> LLMEmbedder:
        """Any causal-LM folder (model + tokenizer), loaded strictly by ``load_backbone``."""
        backbone = load_backbone(path, dtype=dtype, attn_implementation=attn_implementation)
        return cls(backbone, load_decoder_tokenizer(path), pooling, max_len)

    @property
    def width(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def _no_split_modules(self) -> list[str]:
        """The backbone's decoder-layer classes (``LlamaDecoderLayer``, ...): accelerate's FSDP
        ``TRANSFORMER_BASED_WRAP`` reads them from the root module it is given, and without
        them the whole embedder becomes one FSDP unit (gathered whole for every forward)."""
        return sorted(getattr(self.backbone, "_no_split_modules", None) or [])

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_len, return_tensors="pt"
        )

    def forward(
        self,
        texts: Sequence[str] | Mapping[str, torch.Tensor],
        alpha: float,
        variant: Variant = "L_over_i",
    ) -> torch.Tensor:
        """Pooled states of ``texts``, or of a batch :meth:`tokenize` already made (the weak
        stage tokenizes first to count real tokens)."""
        device = next(self.backbone.parameters()).device
        tokens = texts if isinstance(texts, Mapping) else self.tokenize(texts)
        batch = {k: v.to(device) for k, v in tokens.items()}
        hidden = soft_masked_forward(
            self.backbone, batch["input_ids"], batch["attention_mask"], alpha, variant
        )
        return pool(hidden, batch["attention_mask"], self.pooling)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64, alpha: float = 1.0) -> np.ndarray:
        """L2-normalised embeddings, as ``SentenceTransformer.encode`` would return them."""
        was_training = self.training
        self.eval()
        out = [
            F.normalize(self(texts[i : i + batch_size], alpha), dim=-1)
            for i in range(0, len(texts), batch_size)
        ]
        self.train(was_training)
        return torch.cat(out).float().cpu().numpy()


def with_eos_appended(tokenizer: Any) -> Any:
    """A copy of the tokenizer that ends every text with its EOS (the last-token pooling
    target), BOS and padding kept right (``modeling.decoders.prepare_tokenizer``)."""
    return prepare_tokenizer(tokenizer, "lasttoken")


# ---------------------------------------------------------------- data


def weak_pairs(
    path: str | os.PathLike[str], max_rows: int | None = None, seed: int = 0
) -> list[tuple[str, str]]:
    """SFT rows as (query, positive) pairs: ``instruction + input`` -> ``output``."""
    from conan_embedding.training.pretrain import read_sft_records

    rows = read_sft_records(path)
    pairs = [(f"{r.instruction}\n{r.input}" if r.input else r.instruction, r.output) for r in rows]
    if max_rows is not None and len(pairs) > max_rows:
        pairs = random.Random(seed).sample(pairs, max_rows)
    if len(pairs) < 2:
        raise ValueError(f"{path}: the weak stage needs at least 2 pairs")
    return pairs


# ---------------------------------------------------------------- stage 3


def apply_lora(embedder: LLMEmbedder, settings: LoraSettings) -> LLMEmbedder:
    from conan_embedding.modeling.lora import add_lora

    embedder.backbone = add_lora(embedder.backbone, settings)
    return embedder


class SoftMaskWeakProgram:
    """Stage 3's step: in-batch InfoNCE on pairs, attention under the soft mask at ``alpha(t)``.

    Every rank draws the same global batch (a seeded :class:`TaskStream`), encodes its own
    shard of it under a dropout seed of its own, and gathers the positives with gradient, so
    each rank's queries meet the whole batch's positives as negatives.
    """

    def __init__(
        self,
        engine: Engine,
        embedder: LLMEmbedder,
        pairs: list[tuple[str, str]],
        config: WeakStageConfig,
        dims: list[int],
    ):
        from conan_embedding.data.sampler import TaskStream

        self.engine, self.embedder, self.pairs = engine, embedder, pairs
        self.config, self.dims = config, dims
        self.schedule = SoftMaskSchedule(config.schedule, config.steps, config.variant)
        self.stream = TaskStream("weak", len(pairs), config.seed)
        self.batch_size = min(config.batch_size, len(pairs))
        if self.batch_size % engine.world_size:
            raise ValueError(
                f"batch_size {self.batch_size} does not split over {engine.world_size} processes"
            )
        engine.prepare(embedder)
        self.losses: list[float] = []

    @property
    def forward_model(self) -> torch.nn.Module:
        """The module to call for forward passes (the engine's DDP/FSDP wrapper while training)."""
        return self.engine.forward_model

    def step(self, step: int) -> dict[str, float]:
        from conan_embedding.training.collectives import all_gather_with_grad

        engine = self.engine
        rows = self.stream.next_indices(self.batch_size)
        share = len(rows) // engine.world_size
        mine = [self.pairs[i] for i in rows[engine.rank * share : (engine.rank + 1) * share]]
        alpha = self.schedule.alpha(step)
        variant = self.config.variant
        # tokenized here (the forward takes the batch as is) to count the real tokens
        query_batch = dict(self.embedder.tokenize([q for q, _ in mine]))
        positive_batch = dict(self.embedder.tokenize([p for _, p in mine]))
        tokens = int(query_batch["attention_mask"].sum() + positive_batch["attention_mask"].sum())
        with engine.seeded(step, engine.rank, 0):
            queries = self.forward_model(query_batch, alpha, variant).float()
        with engine.seeded(step, engine.rank, 1):
            positives = self.forward_model(positive_batch, alpha, variant).float()
        positives = torch.cat(all_gather_with_grad(positives))
        offset = engine.rank * share

        def loss_fn(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return info_nce_loss(q, p, temperature=self.config.temperature, query_offset=offset)

        loss = matryoshka_loss(loss_fn, [queries, positives], self.dims)
        engine.check_finite(loss, "the weak stage", step)
        engine.backward(loss)
        value = float(engine.mean_over_ranks(torch.tensor([loss.item()]))[0])
        self.losses.append(value)
        # throughput inputs: texts this rank encoded (queries and positives), real tokens
        return {"loss": value, "alpha": alpha, "samples": 2 * len(mine), "tokens": tokens}

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "losses": self.losses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self.losses = list(state["losses"])

    def finish(self, engine: Engine, result: Any) -> None:
        from conan_embedding.reporting.card import card_info_from_weak_stage, llm_stages
        from conan_embedding.training.trainer import plot_losses

        # every rank (a gather under FSDP/DeepSpeed); the main rank gets a plain module: the
        # embedder itself, or a fresh CPU copy with the gathered weights when sharded
        embedder = engine.consolidated_model(self.embedder)
        if embedder is None:
            return
        out = engine.output_dir
        config = self.config
        plot_losses(out / "train_log.jsonl", out / "loss.png")
        params = [p for p in embedder.parameters() if p.requires_grad]
        self.summary = {
            "stage": "weak",
            "schedule": config.schedule,
            "variant": config.variant,
            "pooling": config.pooling,
            "lora": config.lora.model_dump() if config.lora else None,
            "steps": config.steps,
            "pairs": len(self.pairs),
            "teacher_filter": getattr(self, "teacher_report", None),
            "first_loss": self.losses[0],
            "final_loss_mean_last_10": float(np.mean(self.losses[-10:])),
            "seconds": round(result.seconds, 2),
            "loadavg": loadavg(),
            "processes": engine.world_size,
            "trainable_parameters": sum(p.numel() for p in params),
        }
        export_sentence_transformer(
            embedder,
            out / "model",
            bidirectional=self.schedule.ends_bidirectional,
            matryoshka_dims=self.dims or None,
            extra_meta=self.summary,
            card=card_info_from_weak_stage(
                config, len(self.pairs), stages=llm_stages(config.llm), losses=self.losses
            ),
        )
        write_json_atomic(out / "summary.json", self.summary)


def train_weak_stage(
    config: WeakStageConfig, *, show_progress: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Stage 3: in-batch InfoNCE on SFT pairs under the soft-mask schedule; exports the model."""
    from conan_embedding.training.engine import stage_engine

    engine_config = config.engine
    if config.threads and not engine_config.threads:
        engine_config = engine_config.model_copy(update={"threads": config.threads})
    out = Path(config.output_dir)
    torch.manual_seed(config.seed)
    # the model before the engine: once the Accelerator exists with a ZeRO-3 plugin and
    # ``zero3_init_flag``, transformers builds every model already partitioned (empty
    # weights), which the skeleton kept for saving and any probe before ``prepare`` cannot use
    embedder = LLMEmbedder.from_llm(config.llm, config.pooling, config.max_len)
    if config.freeze_embeddings:
        embedder.backbone.get_input_embeddings().weight.requires_grad_(False)
    if config.lora is not None:
        apply_lora(embedder, config.lora)
    engine = stage_engine(
        engine_config,
        out,
        steps=config.steps,
        lr=config.lr,
        warmup_ratio=config.warmup_ratio,
        weight_decay=config.weight_decay,
        seed=config.seed,
        description=f"weak stage ({config.schedule})",
        checkpoint_every=config.checkpoint_every,
        # every trainable weight reaches the loss (the decoder body, its final norm; frozen
        # embeddings and LoRA's frozen base have no gradient, so DDP ignores them; see
        # test_weak_stage_leaves_no_trainable_parameter_unused); a backbone that does leave
        # some unused sets engine.find_unused_parameters: true
        find_unused_parameters=False,
    )
    pairs = weak_pairs(config.data, config.max_rows, config.seed)
    teacher_report = None
    if config.teacher:
        # the main rank alone scores the pairs and writes the files; the others wait for its
        # result (every rank encoding the whole set and writing the same files was waste)
        filtered = None
        if engine.is_main:
            out.mkdir(parents=True, exist_ok=True)
            with _unpartitioned_models(engine):
                filtered = teacher_filtered(pairs, config, out)
        pairs, teacher_report = engine.broadcast_object(filtered)
    dims = (
        [d for d in config.matryoshka_dims if d < embedder.width] + [embedder.width]
        if config.matryoshka_dims
        else []
    )
    program = SoftMaskWeakProgram(engine, embedder, pairs, config, dims)
    program.teacher_report = teacher_report
    engine.run(program, resume=resume, show_progress=show_progress)
    return engine.broadcast_object(getattr(program, "summary", None))


def _unpartitioned_models(engine: Engine) -> contextlib.AbstractContextManager:
    """Models built inside are whole even under ZeRO-3 with ``zero3_init_flag`` (the teacher:
    built on the main rank alone after the engine exists, it must not be partitioned)."""
    plugin = engine.accelerator.state.deepspeed_plugin
    if plugin is None:
        return contextlib.nullcontext()
    return plugin.zero3_init_context_manager(enable=False)


def teacher_filtered(
    pairs: list[tuple[str, str]], config: WeakStageConfig, out: Path
) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Keep the pairs the teacher scores at or above ``teacher_threshold`` (cosine)."""
    from conan_embedding.data.builders.filter import run_filter
    from conan_embedding.data.records import read_records, write_records

    raw, kept = out / "weak_pairs.jsonl", out / "weak_pairs.filtered.jsonl"
    write_records(raw, ({"query": q, "pos": p} for q, p in pairs))
    report = run_filter(
        raw,
        kept,
        config.teacher,
        kind="pairs",
        threshold=config.teacher_threshold,
        query_prompt=config.teacher_query_prompt,
        passage_prompt=config.teacher_passage_prompt,
        max_seq_length=config.max_len,
    )
    filtered = [(r.query, r.pos) for r in read_records(kept, "pairs")]
    if len(filtered) < 2:
        raise ValueError(
            f"the teacher kept {len(filtered)} of {len(pairs)} pairs at threshold {config.teacher_threshold}"
        )
    return filtered, {
        "teacher": config.teacher,
        "threshold": config.teacher_threshold,
        "kept": len(filtered),
        "scored": len(pairs),
        "report": report.get("report"),
    }


# ---------------------------------------------------------------- export


def export_sentence_transformer(
    embedder: LLMEmbedder,
    path: str | os.PathLike[str],
    *,
    bidirectional: bool,
    matryoshka_dims: Sequence[int] | None = None,
    extra_meta: dict[str, Any] | None = None,
    card: CardInfo | None = None,
) -> Path:
    """Save as a stock sentence-transformers folder (Transformer -> Pooling -> Normalize).

    ``card`` (:func:`~conan_embedding.reporting.card.card_info_from_weak_stage`) makes the
    folder's ``README.md`` Conan's model card instead of sentence-transformers' generic one.

    ``bidirectional`` writes ``is_causal: false`` into the model's config, which transformers
    (5.x, ``merge_with_config_defaults``) turns into full attention for every decoder it
    builds masks for (equal to the soft mask at ``alpha = 1``, the schedule's end);
    :func:`check_config_flag` proves that on the live model before saving. The tokenizer is
    saved with right padding: sentence-transformers passes no ``position_ids``, and right
    padding gives the real tokens positions ``0 .. L-1`` (GPT-2's positions are absolute).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    from conan_embedding.modeling.embedder import save_embedder, set_matryoshka_dims
    from conan_embedding.reporting.card import card_writer

    backbone = embedder.backbone
    if hasattr(backbone, "merge_and_unload"):  # a peft model: fold the adapters in
        backbone = copy.deepcopy(backbone).merge_and_unload()
    check_config_flag(backbone, bidirectional)
    with tempfile.TemporaryDirectory() as tmp:
        was_causal = getattr(backbone.config, "is_causal", True)
        backbone.config.is_causal = not bidirectional
        try:
            backbone.save_pretrained(tmp, safe_serialization=True)
        finally:
            backbone.config.is_causal = was_causal  # the live model keeps taking explicit masks
        tokenizer = embedder.tokenizer
        if tokenizer.padding_side != "right":
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.padding_side = "right"
        tokenizer.save_pretrained(tmp)
        check_tokenizer_round_trip(tokenizer, tmp)
        transformer = Transformer(tmp, max_seq_length=embedder.max_len)
        pooling = Pooling(embedder.width, pooling_mode=embedder.pooling)
        model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")
        set_matryoshka_dims(model, matryoshka_dims)
        meta = {
            "architecture": "conan-v2 llm embedder",
            "bidirectional": bidirectional,
            **(extra_meta or {}),
        }
        readme = card_writer(card) if card is not None else None
        return save_embedder(model, path, extra_meta=meta, readme=readme)


# ---------------------------------------------------------------- the end-to-end v2 demo


class DemoVariant(BaseModel):
    """One row of the ablation: a mask schedule, optionally with LoRA instead of full tuning."""

    model_config = ConfigDict(extra="forbid")
    name: str
    schedule: Schedule = "linear"
    variant: Variant = "L_over_i"
    lora: LoraSettings | None = None


class V2DemoConfig(BaseModel):
    """Everything the CPU demo runs: corpus -> tokenizer + LLM -> SFT -> weak-stage variants ->
    evaluation. ``quick`` shrinks every stage to a few steps (the CI form)."""

    model_config = ConfigDict(extra="forbid")
    output_dir: str = "runs/v2-demo"
    data_dir: str | None = None
    seed: int = 0
    threads: int | None = 1
    preset: str = "tiny"
    vocab_size: int = 4000
    source_weights: dict[str, float] = Field(
        default_factory=lambda: {"parallel": 2.0, "hsk": 1.0, "web": 1.0, "qa": 2.0, "sts": 1.0}
    )
    pretrain: dict[str, Any] = Field(default_factory=dict)  # PretrainConfig fields
    sft: dict[str, Any] = Field(default_factory=dict)  # SFTConfig fields
    weak: dict[str, Any] = Field(default_factory=dict)  # WeakStageConfig fields
    variants: list[DemoVariant] = Field(
        default_factory=lambda: [
            DemoVariant(name="soft-linear", schedule="linear"),
            DemoVariant(name="hard-switch", schedule="hard"),
            DemoVariant(name="causal", schedule="causal"),
            DemoVariant(name="lora-r16-soft", schedule="linear", lora=LoraSettings(r=16)),
        ]
    )
    ablation_tasks: list[str] = Field(
        default_factory=lambda: ["STSBenchmark", "STSB", "STSBenchmarkMultilingualSTS", "Tatoeba"]
    )
    final_tasks: list[str] = Field(
        default_factory=lambda: ["mini-mteb", "mini-cmteb", "cross-lingual"]
    )
    final_variant: str = "soft-linear"
    # stage 4 on the final variant (run_supervised_stage keyword arguments); None skips it
    supervised: dict[str, Any] | None = None
    max_corpus: int | None = 2000
    quick: bool = False


QUICK_OVERRIDES = {
    "pretrain": {
        "steps": 6,
        "eval_every": 3,
        "batch_size": 4,
        "seq_len": 64,
        "eval_blocks": 4,
        "max_documents": 1500,
        "vocab_size": 1000,
    },
    "sft": {"steps": 4, "eval_every": 2, "batch_size": 4, "eval_rows": 16},
    "weak": {"steps": 4, "batch_size": 8, "max_rows": 256},
}


def run_v2_demo(config: V2DemoConfig) -> dict[str, Any]:
    """The whole v2 path on a CPU; writes ``ablation.json`` / ``ablation.md`` in ``output_dir``."""
    from conan_embedding.evaluation.run import evaluate
    from conan_embedding.training.pretrain import (
        PretrainConfig,
        SFTConfig,
        SourceConfig,
        build_shared_corpus,
        run_pretraining,
        run_sft,
    )

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str, start: float) -> None:
        timings[name] = round(time.perf_counter() - start, 1)

    def section(name: str) -> dict[str, Any]:
        values = dict(getattr(config, name))
        if config.quick:
            values.update(QUICK_OVERRIDES[name])
        return values

    start = time.perf_counter()
    corpus = build_shared_corpus(out / "corpus", config.data_dir)
    stage("corpus", start)

    start = time.perf_counter()
    sources = [
        SourceConfig(name=name, path=path, weight=config.source_weights.get(name, 1.0))
        for name, path in corpus["sources"].items()
    ]
    pretrain = PretrainConfig(
        output_dir=str(out / "pretrain"),
        sources=sources,
        **{
            "preset": config.preset,
            "vocab_size": config.vocab_size,
            "seed": config.seed,
            "threads": config.threads,
            **section("pretrain"),
        },
    )
    pretrain_summary = run_pretraining(pretrain)
    stage("tokenizer+pretrain", start)

    start = time.perf_counter()
    sft = SFTConfig(
        output_dir=str(out / "sft"),
        base_model=str(out / "pretrain" / "model"),
        data=corpus["sft"],
        seed=config.seed,
        threads=config.threads,
        **section("sft"),
    )
    sft_summary = run_sft(sft)
    stage("sft", start)

    rows: list[dict[str, Any]] = []
    tasks = ["STSBenchmark"] if config.quick else config.ablation_tasks
    final: dict[str, float] = {}
    final_label = [config.final_variant]

    def evaluate_once(model_dir: Path, name: str, task_names: list[str]) -> dict[str, float]:
        """mteb scores, kept beside the model so a rerun of the demo does not recompute them."""
        from conan_embedding.evaluation.tasks import expand_task_names

        names = expand_task_names(task_names)
        cache = model_dir.parent / "scores.json"
        saved = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
        todo = [t for t in names if t not in saved]
        if todo:
            saved.update(
                evaluate(
                    model_dir,
                    todo,
                    output_dir=out / "results",
                    data_dir=config.data_dir,
                    max_corpus=config.max_corpus,
                    cache_dir=False,
                    show_progress=False,
                    model_name=name,
                )
            )
            write_json_atomic(cache, saved, default=str)
        return {t: saved[t] for t in names}

    def write_report() -> dict[str, Any]:
        import mteb

        report = {
            "config": config.model_dump(),
            "corpus": {k: v for k, v in corpus.items() if k != "sources"},
            "pretrain": pretrain_summary,
            "sft": sft_summary,
            "ablation": rows,
            "ablation_tasks": tasks,
            "final_variant": config.final_variant,
            "final_model": final_label[0],
            "final_scores": final,
            "timings_seconds": timings,
            "total_seconds": round(time.perf_counter() - began, 1),
            "mteb_version": mteb.__version__,
            "torch_threads": torch.get_num_threads(),
            "loadavg_at_end": loadavg(),
            "cpus": os.cpu_count(),
        }
        write_json_atomic(out / "ablation.json", report, default=str)
        write_text_atomic(out / "ablation.md", ablation_markdown(report))
        return report

    for variant in config.variants:
        start = time.perf_counter()
        weak = WeakStageConfig(
            output_dir=str(out / "embed" / variant.name),
            llm=str(out / "sft" / "model"),
            data=corpus["sft"],
            schedule=variant.schedule,
            variant=variant.variant,
            lora=variant.lora,
            seed=config.seed,
            threads=config.threads,
            **section("weak"),
        )
        folder = out / "embed" / variant.name
        summary = _reuse_json(
            folder / "summary.json", {"steps": weak.steps, "schedule": weak.schedule}
        )
        if summary is None:
            summary = train_weak_stage(weak)
        scores = evaluate_once(folder / "model", f"conan-v2-{config.preset}-{variant.name}", tasks)
        stage(f"embed:{variant.name}", start)
        rows.append({"variant": variant.model_dump(), "weak": summary, "scores": scores})
        write_report()  # after every variant, so a long run leaves partial results

    final_model = out / "embed" / config.final_variant / "model"
    final_name = f"conan-v2-{config.preset}-{config.final_variant}"
    if config.supervised is not None:
        start = time.perf_counter()
        settings = dict(config.supervised)
        if config.quick:
            settings.update(steps=2, max_rows=64, batch_size=4, sts_batch_size=8)
        folder = out / "embed" / f"{config.final_variant}+supervised"
        if not (folder / "model" / "modules.json").is_file():
            records = build_supervised_records(
                out / "supervised-data", config.data_dir, negatives=settings.get("negatives", 3)
            )
            settings.setdefault("threads", config.threads)
            run_supervised_stage(final_model, records, folder, seed=config.seed, **settings)
        scores = evaluate_once(folder / "model", f"{final_name}-supervised", tasks)
        stage("supervised", start)
        rows.append(
            {
                "variant": {"name": folder.name, "schedule": "stage 4", "lora": None},
                "weak": {"final_loss_mean_last_10": float("nan"), "seconds": timings["supervised"]},
                "scores": scores,
            }
        )
        final_model, final_name = folder / "model", f"{final_name}-supervised"
        final_label[0] = folder.name
        write_report()

    if not config.quick and config.final_tasks:
        start = time.perf_counter()
        final.update(evaluate_once(final_model, final_name, config.final_tasks))
        stage("final-eval", start)
    return write_report()


def _reuse_json(path: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """A finished stage's saved summary if it matches ``expected`` (so reruns skip it)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return saved if all(saved.get(k) == v for k, v in expected.items()) else None


def ablation_markdown(report: dict[str, Any]) -> str:
    tasks = report["ablation_tasks"]
    header = (
        "| variant | schedule | LoRA | "
        + " | ".join(tasks)
        + " | mean | weak loss (last 10) | train s |"
    )
    lines = [header, "|" + "---|" * (len(tasks) + 6)]
    for row in report["ablation"]:
        scores = [row["scores"][t] * 100 for t in tasks]
        lora = row["variant"]["lora"]
        lines.append(
            f"| {row['variant']['name']} | {row['variant']['schedule']} | "
            f"{'r=' + str(lora['r']) if lora else '-'} | "
            + " | ".join(f"{s:.2f}" for s in scores)
            + f" | {np.mean(scores):.2f} | {row['weak']['final_loss_mean_last_10']:.3f} | {row['weak']['seconds']:.0f} |"
        )
    if report["final_scores"]:
        lines += [
            "",
            f"Final model ({report.get('final_model', report['final_variant'])}) on the mini suites:",
            "",
        ]
        lines += ["| task | score |", "|---|---|"]
        lines += [
            f"| {task} | {score * 100:.2f} |" for task, score in report["final_scores"].items()
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- stage 4 (foundation trainer)


def build_supervised_records(
    output_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    *,
    negatives: int = 3,
    seed: int = 0,
) -> dict[str, str]:
    """Stage-4 training files in the foundation's JSONL schemas, from ``shared/data`` train sets.

    ``sts.jsonl`` (STS-B en/zh + CNSD *train*, CoSENT), ``retrieval.jsonl`` (text2vec's BGE
    triples, built from CNSD train), ``clr.jsonl`` (cross-lingual retrieval: an English
    sentence retrieves its Chinese translation from cmn.txt, ``negatives`` random other
    translations). Rows holding any sentence of the evaluation index
    (:mod:`conan_embedding.data.leakage`, every group) are dropped. That index holds the queries
    and positives of the 300 ``bge_finetune_data.jsonl`` rows ``BGEHeldoutRerankingLocal``
    scores, so neither those retrieval rows nor the CNSD train pairs they were built from are
    trained on (before 2026-12-06 they were: issue 25).
    """
    import csv

    from conan_embedding.data.leakage import build_eval_index, dedup_retrieval
    from conan_embedding.data.records import (
        RecordError,
        RetrievalRecord,
        iter_json_objects,
        write_records,
    )
    from conan_embedding.data.sources import resolve_data_dir

    data = resolve_data_dir(data_dir)
    out = Path(output_dir)
    index = build_eval_index(data)
    clean = index.clean

    sts = []
    for name in ("sts/stsb-en-train.csv", "sts/stsb-zh-train.csv"):
        with open(data / name, encoding="utf-8", newline="") as handle:
            sts += [(r[0], r[1], float(r[2])) for r in csv.reader(handle) if len(r) >= 3]
    for line in (data / "sts/cnsd-stsb.train.data").read_text(encoding="utf-8").splitlines():
        cells = line.split("\t")
        if len(cells) >= 3:
            sts.append((cells[0], cells[1], float(cells[2])))
    sts_rows = [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in sts if clean(a, b)]

    # as every builder: a row whose query or positives touch the index goes, touching
    # negatives are removed one by one (dropping the whole row for a touching negative, as
    # before, would lose half the file: the held-out sentences are random negatives elsewhere)
    bge = data / "retrieval/bge_finetune_data.jsonl"
    triples = []
    for line_no, row in iter_json_objects(bge):  # bad rows raise file:line: field
        for name in ("query", "pos", "neg"):
            if not isinstance(row.get(name), str if name == "query" else list):
                raise RecordError(bge, line_no, name, "missing or of the wrong type")
        triples.append(RetrievalRecord(query=row["query"], pos=row["pos"], neg=row["neg"]))
    retrieval_rows = [
        {"query": r.query, "pos": r.pos[:1], "neg": r.neg[:negatives]}
        for r in dedup_retrieval(triples, index)
        if len(r.neg) >= max(negatives, 1)  # every row keeps the negatives stage 4 asks for
    ]

    pairs = []
    for line in (data / "parallel/cmn.txt").read_text(encoding="utf-8-sig").splitlines():
        cells = line.split("\t")
        if len(cells) >= 2 and cells[0].strip() and cells[1].strip() and clean(cells[0], cells[1]):
            pairs.append((cells[0].strip(), cells[1].strip()))
    rng = random.Random(seed)
    chinese = [zh for _, zh in pairs]
    clr_rows = [
        {
            "query": en,
            "pos": [zh],
            "neg": [c for c in rng.sample(chinese, negatives + 1) if c != zh][:negatives],
        }
        for en, zh in pairs
    ]
    paths = {}
    for name, rows in (("sts", sts_rows), ("retrieval", retrieval_rows), ("clr", clr_rows)):
        write_records(out / f"{name}.jsonl", rows)
        paths[name] = str(out / f"{name}.jsonl")
    return paths


def run_supervised_stage(
    model_dir: str | os.PathLike[str],
    records: dict[str, str],
    output_dir: str | os.PathLike[str],
    *,
    steps: int = 100,
    lr: float = 2e-4,
    negatives: int = 3,
    batch_size: int = 16,
    sts_batch_size: int = 32,
    max_rows: int | None = None,
    matryoshka_dims: Sequence[int] | None = None,
    max_seq_length: int = 64,
    freeze_word_embeddings: bool = False,
    lora: LoraSettings | dict[str, Any] | None = None,
    prompt: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    show_progress: bool = True,
) -> Path:
    """Stage 4 with the foundation :class:`~conan_embedding.training.trainer.Trainer` on an
    exported LLM embedder: retrieval + CLR (InfoNCE, static hard negatives) and STS (CoSENT),
    every task in every step (``all_tasks``, the single-process reading of CBB)."""
    from conan_embedding.config import ModelConfig, OptimConfig, TaskConfig, TrainConfig
    from conan_embedding.training.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    tasks = [
        TaskConfig(
            name="retrieval",
            kind="retrieval",
            path=records["retrieval"],
            batch_size=batch_size,
            negatives=negatives,
            max_rows=max_rows,
        ),
        TaskConfig(
            name="clr",
            kind="retrieval",
            path=records["clr"],
            batch_size=batch_size,
            negatives=negatives,
            max_rows=max_rows,
        ),
        TaskConfig(
            name="sts",
            kind="sts",
            path=records["sts"],
            batch_size=sts_batch_size,
            max_rows=max_rows,
        ),
    ]
    config = TrainConfig(
        stage="supervised",
        output_dir=str(output_dir),
        seed=seed,
        model=ModelConfig(
            name=str(model_dir),
            max_seq_length=max_seq_length,
            matryoshka_dims=list(matryoshka_dims or []),
            freeze_word_embeddings=freeze_word_embeddings,
            lora=LoraSettings.model_validate(lora) if isinstance(lora, dict) else lora,
            # a model saved with prompts (e5: ``query: ``) trains with the one it is scored with
            query_prompt=prompt,
            passage_prompt=prompt,
        ),
        optim=OptimConfig(lr=lr, max_steps=steps, warmup_ratio=0.05, weight_decay=0.001),
        task_schedule="all_tasks",
        tasks=tasks,
        checkpoint_every=max(steps, 1),
    )
    return Trainer(config).train(show_progress=show_progress).model_dir
