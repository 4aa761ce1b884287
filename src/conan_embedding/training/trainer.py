"""The training loop for both Conan stages, on a plain sentence-transformers model.

Why a loop of our own rather than the sentence-transformers/HF trainer: Conan needs
per-sample negative state that changes *during* training (dynamic hard negative mining reads
the scores the loss just computed and swaps a sample's negatives for the next step) and
steps that hold several task-homogeneous batches at once (cross-GPU batch balance). Both sit
awkwardly behind a Dataset/collator/``compute_loss`` interface; here they are a few explicit
lines. The model itself stays a stock :class:`~sentence_transformers.SentenceTransformer`,
so everything downstream (saving, ``encode``, mteb, serving) is the ecosystem's own.

How a step runs:

1. :class:`~conan_embedding.data.sampler.TaskSchedule` names the task(s) of the step.
2. Each task draws a batch from its :class:`~conan_embedding.data.sampler.TaskStream`;
   retrieval tasks ask their :class:`~conan_embedding.mining.base.NegativeProvider` for the
   current hard negatives.
3. Texts are encoded with gradient, the task's loss (InfoNCE / CoSENT /
   classification-as-retrieval, wrapped in Matryoshka when dims are set) is weighted and
   back-propagated; the provider sees the negative scores the loss used.
4. AdamW step with warmup + linear decay; log, progress bar, and every
   ``checkpoint_every`` steps an atomic safetensors checkpoint that includes the samplers'
   cursors, the providers' state and the RNG, so ``resume`` continues the same trajectory.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from conan_embedding.config import TaskConfig, TrainConfig
from conan_embedding.data.records import (
    PairRecord,
    read_records,
)
from conan_embedding.data.sampler import LabelIndex, TaskSchedule, TaskStream, cap_indices
from conan_embedding.losses import (
    classification_as_retrieval_loss,
    cosent_loss,
    info_nce_loss,
    matryoshka_loss,
)
from conan_embedding.losses.infonce import own_negative_scores
from conan_embedding.mining.base import NegativeProvider, StaticNegatives
from conan_embedding.modeling.embedder import build_embedder, save_embedder
from conan_embedding.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path
    steps: int
    final_loss: float
    seconds: float


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def encode_with_grad(
    model: SentenceTransformer, texts: Sequence[str], prompt: str | None = None
) -> torch.Tensor:
    """Sentence embeddings with autograd (``model.encode`` runs without gradient)."""
    if prompt:
        texts = [prompt + t for t in texts]
    features = model.preprocess(list(texts))
    features = {
        k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()
    }
    return model(features)["sentence_embedding"]


def _stable_text_ids(texts: Sequence[str]) -> torch.Tensor:
    """Equal texts get equal ids, so a duplicate of a positive is never used as its negative."""
    table: dict[str, int] = {}
    return torch.tensor([table.setdefault(t, len(table)) for t in texts])


class Trainer:
    """Runs one stage from a :class:`~conan_embedding.config.TrainConfig`."""

    def __init__(
        self,
        config: TrainConfig,
        model: SentenceTransformer | None = None,
        negative_providers: dict[str, NegativeProvider] | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ):
        if config.cbb is not None and type(self) is Trainer:
            raise ValueError(
                "the config has a 'cbb' section: train it with `conan-embed train-cbb` "
                "(training.distributed.CBBTrainer), or remove the section"
            )
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.on_step = on_step
        set_seed(config.seed)
        mc = config.model
        self.model = model or build_embedder(
            mc.name,
            pooling=mc.pooling,
            dense_dim=mc.dense_dim,
            normalize=mc.normalize,
            max_seq_length=mc.max_seq_length,
            prompts=mc.prompts or None,
            matryoshka_dims=mc.matryoshka_dims or None,
            seed=config.seed,
        )
        if mc.freeze_word_embeddings:
            self.model[0].auto_model.get_input_embeddings().weight.requires_grad_(False)
        self.query_prompt = self._prompt(mc.query_prompt)
        self.passage_prompt = self._prompt(mc.passage_prompt)

        self.source_rows: dict[str, list[int] | None] = {}
        """Per task, the file positions of the rows kept (None once a filter dropped some)."""
        self.records = {t.name: self._load_task(t) for t in config.tasks}
        self.streams = {
            t.name: TaskStream(t.name, len(self.records[t.name]), config.seed) for t in config.tasks
        }
        self.label_index = {
            t.name: LabelIndex(self.records[t.name])
            for t in config.tasks
            if t.kind == "classification"
        }
        self.providers: dict[str, NegativeProvider] = dict(negative_providers or {})
        for task in config.tasks:
            if task.kind == "retrieval" and task.name not in self.providers:
                self.providers[task.name] = self._default_provider(task)
        self.schedule = TaskSchedule(
            config.task_schedule,
            [t.name for t in config.tasks],
            [len(self.records[t.name]) for t in config.tasks],
            [t.weight for t in config.tasks],
            config.seed,
        )

        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.optim.lr,
        )
        total = config.optim.max_steps
        warmup = max(1, int(round(config.optim.warmup_ratio * total)))

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)

    # ----------------------------------------------------------------- setup helpers
    def _prompt(self, name: str | None) -> str | None:
        if name is None:
            return None
        prompts = self.model.prompts or {}
        if name not in prompts:
            raise ValueError(f"prompt '{name}' is not among the model's prompts {sorted(prompts)}")
        return prompts[name]

    def _load_task(self, task: TaskConfig) -> list:
        records = read_records(task.path, task.kind)
        rows = cap_indices(len(records), task.max_rows, self.config.seed, task.name)
        records = [records[i] for i in rows]
        self.source_rows[task.name] = rows
        if task.kind == "retrieval" and task.negatives and task.dynamic_negatives.rule == "none":
            short = [i for i, r in enumerate(records) if not r.neg]
            if short:
                raise ValueError(
                    f"{task.path}: task '{task.name}' wants {task.negatives} negatives but "
                    f"{len(short)} rows have none (first: row {short[0] + 1})"
                )
        if self.config.teacher_filter is not None:
            records = self._teacher_filter(task, records)
            self.source_rows[task.name] = None
        if not records:
            raise ValueError(f"task '{task.name}' has no rows left ({task.path})")
        return records

    def _teacher_filter(self, task: TaskConfig, records: list) -> list:
        from conan_embedding.modeling.embedder import load_embedder

        tf = self.config.teacher_filter
        teacher = load_embedder(tf.model)
        queries = [r.query for r in records]
        positives = [r.pos if isinstance(r, PairRecord) else r.pos[0] for r in records]
        q = teacher.encode(queries, batch_size=tf.batch_size, normalize_embeddings=True)
        p = teacher.encode(positives, batch_size=tf.batch_size, normalize_embeddings=True)
        scores = (q * p).sum(axis=1)
        kept = [r for r, s in zip(records, scores, strict=True) if s >= tf.threshold]
        logger.info(
            "teacher filter on '%s': kept %d of %d pairs (threshold %.2f)",
            task.name,
            len(kept),
            len(records),
            tf.threshold,
        )
        self.filter_report = {"task": task.name, "kept": len(kept), "total": len(records)}
        return kept

    def _default_provider(self, task: TaskConfig) -> NegativeProvider:
        records = self.records[task.name]
        if task.dynamic_negatives.rule == "none":
            return StaticNegatives(records, task.negatives)
        from conan_embedding.mining.dynamic import build_dynamic_negatives

        return build_dynamic_negatives(
            records,
            task.negatives,
            task.dynamic_negatives,
            task.path,
            rows=self.source_rows.get(task.name),
        )

    # ----------------------------------------------------------------- losses per kind
    def _loss(self, task: TaskConfig, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        records = self.records[task.name]
        rows = self.streams[task.name].next_indices(task.batch_size)
        rng = np.random.default_rng([self.config.seed, step, len(task.name)])
        dims = self.config.model.matryoshka_dims
        weights = self.config.model.matryoshka_weights
        tau = self.config.temperature
        stats: dict[str, float] = {}

        if task.kind in ("retrieval", "pairs"):
            batch = [records[i] for i in rows]
            queries = [r.query for r in batch]
            if task.kind == "pairs":
                positives = [r.pos for r in batch]
            else:
                positives = [r.pos[int(rng.integers(len(r.pos)))] for r in batch]
            negatives = (
                self.providers[task.name].negatives(rows) if task.kind == "retrieval" else []
            )
            n_neg = len(negatives[0]) if negatives and negatives[0] else 0
            q = encode_with_grad(self.model, queries, self.query_prompt)
            docs = positives + [t for negs in negatives for t in negs] if n_neg else positives
            d = encode_with_grad(self.model, docs, self.passage_prompt)
            p = d[: len(rows)]
            n = d[len(rows) :].reshape(len(rows), n_neg, -1) if n_neg else None
            ids = _stable_text_ids(
                positives + [t for negs in negatives for t in negs] if n_neg else positives
            )
            groups = ids[: len(rows)]
            neg_groups = ids[len(rows) :].reshape(len(rows), n_neg) if n_neg else None

            def loss_fn(qe, pe, ne=None):
                return info_nce_loss(
                    qe,
                    pe,
                    ne,
                    temperature=tau,
                    in_batch=task.in_batch_negatives,
                    groups=groups,
                    negative_groups=neg_groups,
                )

            loss = matryoshka_loss(loss_fn, [q, p, n], dims, weights)
            if n is not None:
                scores = own_negative_scores(q.detach(), n.detach())
                self.providers[task.name].observe(step, rows, scores)
                stats[f"{task.name}/neg_score"] = float(scores.mean())
            return loss, stats

        if task.kind == "sts":
            batch = [records[i] for i in rows]
            a = encode_with_grad(self.model, [r.sentence1 for r in batch], self.query_prompt)
            b = encode_with_grad(self.model, [r.sentence2 for r in batch], self.query_prompt)
            gold = torch.tensor([r.score for r in batch], dtype=torch.float32)
            if task.score_scale:
                gold = gold / task.score_scale
            loss = matryoshka_loss(
                lambda x, y: cosent_loss(x, y, gold, temperature=tau), [a, b], dims, weights
            )
            return loss, stats

        # classification cast as retrieval
        index = self.label_index[task.name]
        positives = [index.positive(i, rng) for i in rows]
        negatives = (
            [index.negatives(i, task.negatives, rng) for i in rows] if task.negatives else []
        )
        texts = [records[i].text for i in rows]
        q = encode_with_grad(self.model, texts, self.query_prompt)
        others = [records[i].text for i in positives] + [
            records[j].text for negs in negatives for j in negs
        ]
        d = encode_with_grad(self.model, others, self.query_prompt)
        p = d[: len(rows)]
        n = d[len(rows) :].reshape(len(rows), task.negatives, -1) if negatives else None
        labels = torch.as_tensor(index.ids[rows])
        neg_labels = torch.as_tensor(index.ids[np.asarray(negatives)]) if negatives else None
        loss = matryoshka_loss(
            lambda qe, pe, ne=None: classification_as_retrieval_loss(
                qe, pe, ne, labels, neg_labels, temperature=tau
            ),
            [q, p, n],
            dims,
            weights,
        )
        return loss, stats

    # ----------------------------------------------------------------- the loop
    def _encode_no_grad(self, texts: Sequence[str]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.model.encode(
                list(texts),
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
                batch_size=64,
            )
        self.model.train(was_training)
        return out

    def _extra_state(self, history: list[float]) -> dict[str, Any]:
        return {
            "streams": {k: s.state_dict() for k, s in self.streams.items()},
            "providers": {k: p.state_dict() for k, p in self.providers.items()},
            "recent_losses": history[-100:],
        }

    def _resume(self) -> int:
        checkpoints = list_checkpoints(self.output_dir / "checkpoints")
        if not checkpoints:
            logger.info("no checkpoint in %s: starting from step 0", self.output_dir)
            return 0
        state = load_checkpoint(checkpoints[-1], self.model, self.optimizer, self.scheduler)
        for name, stream_state in state["streams"].items():
            self.streams[name].load_state_dict(stream_state)
        for name, provider_state in state["providers"].items():
            self.providers[name].load_state_dict(provider_state)
        step = int(state["step"])
        log_path = self.output_dir / "train_log.jsonl"
        if log_path.exists():  # drop the killed run's steps past the checkpoint
            kept = [
                line
                for line in log_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step
            ]
            log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        logger.info("resumed from %s at step %d", checkpoints[-1], step)
        return step

    def train(self, resume: bool = False, show_progress: bool = True) -> TrainResult:
        config = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.json").write_text(
            config.model_dump_json(indent=2), encoding="utf-8"
        )
        handler = logging.FileHandler(self.output_dir / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("conan_embedding").addHandler(handler)
        logging.getLogger("conan_embedding").setLevel(logging.INFO)
        try:
            return self._train(resume, show_progress)
        finally:
            logging.getLogger("conan_embedding").removeHandler(handler)
            handler.close()

    def _accumulate_step(self, step: int, record: dict[str, Any]) -> float:
        """Back-propagate every loss of one step into ``.grad``; returns the weighted total.

        A method of its own so :class:`~conan_embedding.training.distributed.CBBTrainer` can
        replace how a step's losses are formed (cross-device batch balance) and keep the loop.
        """
        tasks = {t.name: t for t in self.config.tasks}
        total = 0.0
        for name in self.schedule.tasks_for_step(step):
            task = tasks[name]
            loss, stats = self._loss(task, step)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"loss of task '{name}' is {loss.item()} at step {step + 1}; "
                    "lower optim.lr or check the data (see train.log)"
                )
            (task.weight * loss).backward()
            total += task.weight * loss.item()
            record[f"loss/{name}"] = round(loss.item(), 6)
            record.update({k: round(v, 6) for k, v in stats.items()})
        return total

    def _train(self, resume: bool, show_progress: bool) -> TrainResult:
        config = self.config
        start = self._resume() if resume else 0
        if not resume:
            (self.output_dir / "train_log.jsonl").unlink(missing_ok=True)
        history: list[float] = []
        began = time.perf_counter()
        self.model.train()
        bar = tqdm(
            total=config.optim.max_steps,
            initial=start,
            disable=not show_progress,
            desc=f"{config.stage} training",
            unit="step",
            dynamic_ncols=True,
        )
        loss_value = float("nan")
        with open(self.output_dir / "train_log.jsonl", "a", encoding="utf-8") as log_file:
            for step in range(start, config.optim.max_steps):
                record: dict[str, Any] = {"step": step + 1}
                total = self._accumulate_step(step, record)
                if config.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.optim.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                for name, provider in self.providers.items():
                    # per task ("bge/dhnm/replaced"): two DHNM tasks must not overwrite each other
                    stats = provider.on_step_end(step + 1, self._encode_no_grad)
                    record.update({f"{name}/{key}": value for key, value in stats.items()})
                loss_value = total
                history.append(total)
                record.update({"loss": round(total, 6), "lr": self.scheduler.get_last_lr()[0]})
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}", refresh=False)
                if (step + 1) % config.log_every == 0:
                    logger.info("step %d loss %.4f lr %.2e", step + 1, total, record["lr"])
                if self.on_step:
                    self.on_step(step + 1, record)
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.optim.max_steps:
                    save_checkpoint(
                        self.output_dir / "checkpoints",
                        step + 1,
                        self.model,
                        self.optimizer,
                        self.scheduler,
                        self._extra_state(history),
                        keep=config.keep_checkpoints,
                    )
        bar.close()
        model_dir = save_embedder(
            self.model,
            self.output_dir / "model",
            extra_meta={"stage": config.stage, "steps": config.optim.max_steps},
        )
        plot_losses(self.output_dir / "train_log.jsonl", self.output_dir / "loss.png")
        seconds = time.perf_counter() - began
        logger.info("saved the model to %s after %.1f s", model_dir, seconds)
        return TrainResult(self.output_dir, model_dir, config.optim.max_steps, loss_value, seconds)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def plot_losses(log_path: str | Path, png_path: str | Path, window: int = 10) -> Path | None:
    """Total and per-task loss (moving average over ``window`` steps) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    keys = ["loss"] + sorted({k for r in rows for k in r if k.startswith("loss/")})
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
        if not pts:
            continue
        steps, values = zip(*pts, strict=True)
        # the total alternates between tasks step by step: average over whole task cycles
        width = window * max(1, len(keys) - 1) if key == "loss" else window
        width = min(width, len(values))
        smooth = np.convolve(values, np.ones(width) / width, "valid")
        ax.plot(steps[len(steps) - len(smooth) :], smooth, label=key, lw=2 if key == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (mean of {window} steps per task)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path
