"""Stage 3 of Conan-v2: the trained LLM becomes an embedder under the soft mask.

Why: after pretraining and SFT the decoder knows the language but only attends causally.
Stage 3 (weak supervision) reuses the SFT rows as pairs, ``query = instruction + input``,
``positive = output``, trains with in-batch InfoNCE, and meanwhile opens the attention mask
from causal to bidirectional with the soft mask (``modeling.soft_mask``). Stage 4 is the
supervised multi-task stage of the foundation trainer (``training.supervised_stage``).

    L_weak = InfoNCE(q, p) with in-batch negatives, optionally averaged over MRL dims
    attention under  M_ij(t),  alpha(t) from the schedule, t = 0 .. T-1

How: the model is a :class:`~conan_embedding.modeling.llm_embedder.LLMEmbedder`; the settings
a :class:`~conan_embedding.config.WeakStageConfig`. Variants for the paper's ablation are
schedules of the same loop: ``linear`` / ``accelerating`` / ``decelerating`` (soft mask),
``hard`` (bidirectional from step 0), ``causal`` (never opened), and LoRA adapters (peft)
instead of full fine-tuning. :class:`SoftMaskWeakProgram` is the step on the engine; at the
end it exports a stock sentence-transformers folder with the model card
(``modeling.llm_embedder.export_sentence_transformer``).
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conan_embedding._io import write_json_atomic
from conan_embedding.config import LoraSettings, WeakStageConfig
from conan_embedding.data.records import read_sft_records
from conan_embedding.losses.infonce import info_nce_loss
from conan_embedding.losses.matryoshka import matryoshka_loss
from conan_embedding.modeling.llm_embedder import LLMEmbedder, export_sentence_transformer
from conan_embedding.modeling.soft_mask import SoftMaskSchedule
from conan_embedding.provenance import loadavg
from conan_embedding.training.engine import Engine, LoopSettings

# ---------------------------------------------------------------- data


def weak_pairs(
    path: str | os.PathLike[str], max_rows: int | None = None, seed: int = 0
) -> list[tuple[str, str]]:
    """SFT rows as (query, positive) pairs: ``instruction + input`` -> ``output``."""
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
        self.schedule = SoftMaskSchedule(config.schedule, config.optim.max_steps, config.variant)
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
        from conan_embedding.reporting.card import (
            card_info_from_weak_stage,
            card_writer,
            llm_stages,
        )
        from conan_embedding.training.logs import plot_losses

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
            "steps": config.optim.max_steps,
            "pairs": len(self.pairs),
            "teacher_filter": getattr(self, "teacher_report", None),
            "first_loss": self.losses[0],
            "final_loss_mean_last_10": float(np.mean(self.losses[-10:])),
            "seconds": round(result.seconds, 2),
            "loadavg": loadavg(),
            "processes": engine.world_size,
            "trainable_parameters": sum(p.numel() for p in params),
        }
        card = card_info_from_weak_stage(
            config, len(self.pairs), stages=llm_stages(config.llm), losses=self.losses
        )
        export_sentence_transformer(
            embedder,
            out / "model",
            bidirectional=self.schedule.ends_bidirectional,
            matryoshka_dims=self.dims or None,
            extra_meta=self.summary,
            readme=card_writer(card),
        )
        write_json_atomic(out / "summary.json", self.summary)


def train_weak_stage(
    config: WeakStageConfig, *, show_progress: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Stage 3: in-batch InfoNCE on SFT pairs under the soft-mask schedule; exports the model."""
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
    loop = LoopSettings(
        output_dir=out,
        steps=config.optim.max_steps,
        optim=config.optim,
        seed=config.seed,
        checkpoint=config.checkpoint,
        description=f"weak stage ({config.schedule})",
    )
    # every trainable weight reaches the loss (the decoder body, its final norm; frozen
    # embeddings and LoRA's frozen base have no gradient, so DDP ignores them; see
    # test_weak_stage_leaves_no_trainable_parameter_unused); a backbone that does leave some
    # unused sets engine.find_unused_parameters: true
    engine = Engine(config.engine, loop, find_unused_parameters=False)
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
