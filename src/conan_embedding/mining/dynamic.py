"""Dynamic hard negative mining (DHNM): swap a sample's negatives once they stop being hard.

Why: negatives mined once with the initial model go stale; after some training the model
separates them easily and their gradient fades. Conan keeps, per sample, the score each
negative had when it was assigned (``S_0``) and replaces negatives whose score has fallen,
taking the next candidates of the sample's offline-mined pool (``mining.offline``).

The two published rules (thresholds are configurable; defaults are the papers')::

    v1, every check_every steps, on the mean over the sample's n negatives:
        replace all n   if  current * 1.15 < initial  and  |current| < 0.8
    v2, every step, per negative j, from the scores the loss already computed:
        replace j       if  S_0 < 0.4 (never hard)  or  (1.2 * S_j < S_0  and  S_j < 0.7)

v1's i-th replacement takes pool ranks ``(i-1)*n + 10 .. i*n + 10``; the samples checked are
those trained on since the last check, and ``current`` is re-scored through the ``encode``
hook (``v1_current="encode"``: one no-grad forward of each checked sample's query and
negatives) or is the last score the loss computed (``"observed"``: free, possibly stale).

``S_0``, the score at assignment (``initial_score``; v1's ``initial`` is its mean):

- ``pool``: the candidate's mined score (``PoolCandidate.score``), for the initial negatives
  too (a record's ``neg`` found in its pool). So a negative is judged at its query's *first*
  draw and a replacement is used at the next one.
- ``assignment``: a new negative is scored when it is assigned, ``cos(q, e(neg))``, with the
  query row ``q`` of the step that replaced it (``observe(..., query_embeddings=q)``, no
  query forward) and one no-grad forward of the new negative in :meth:`on_step_end`. A record's
  initial negatives, assigned before training, take their first observed score.
- ``auto`` (default): ``pool`` when the pool's :class:`~conan_embedding.mining.offline.PoolMeta`
  matches the training model's (same prompts and max length, and the two models embed a probe
  text at cosine >= 0.999), else ``assignment``: another model's scores are on another scale.

Thresholds (``thresholds``): ``absolute`` compares cosines with the numbers above. Their scale
is the papers' models'; me5-small puts its pool at about 0.89, where ``1.2 * S < S_0`` and
``S < 0.7`` never hold. ``pool_quantile`` applies the same rule and numbers to each score's
quantile in the reference distribution ``P``::

    F(s) = P(score <= s),  estimated on a grid of 1001 quantiles of P (linear in between)
    v2: replace j  if  F(S_0) < 0.4  or  (1.2 * F(S_j) < F(S_0)  and  F(S_j) < 0.7)
    v1: replace    if  mean_j F(S_j) * 1.15 < mean_j F(S_0,j)  and  mean_j F(S_j) < 0.8

so "never hard" is the pool's easiest 40% and "no longer hard" a fall from quantile ``u`` below
``u / 1.2`` and below the 70% quantile. ``P`` is every pool candidate's mined score when those
are on the model's scale (``pool``), else the first ``calibration_size`` values of ``S_0``;
until ``P`` is known no negative is replaced. ``P`` is fixed, so like the absolute rule this
reads a global fall of the model's scores (fine-tuning me5-small at tau 0.05 spreads its scale,
``docs/ablations.md``) as negatives no longer hard; with ``remine_every`` each re-mining puts
``S_0``, the pools and ``P`` back on the current model's scale.

State (:meth:`state_tensors`): per sample ``assigned [S, n]`` corpus ids, ``s0``, ``current``,
``replacements``, ``pointer`` (next pool position), ``pending`` (v1); the quantile grid; the
pools (CSR: ``pool_ids``, ``pool_offsets``, ``pool_scores``) once re-mined. A replacement draws
the next pool candidates at the pointer, skipping ones the sample holds; when a pool runs out
the sample keeps its negatives and counts as *exhausted*. Pool candidates ranked below
``pool_offset`` are never used (the paper's ``+10``; mined pools already start there).
:meth:`state_dict` is JSON whose arrays are one safetensors blob (base64); a checkpoint that
stores tensors itself calls ``state_dict(arrays=False)`` and :meth:`state_tensors`, and
restores with ``load_state_dict(state, tensors)``.

Several ranks (cross-GPU batch balance: the ranks of a retrieval task share its rows and merge
their negatives' scores): their scores may differ in the last bits, so their decisions could
too. After :meth:`sync_from` the source rank alone decides (and encodes); at the end of each
:meth:`on_step_end` it broadcasts the rows it changed (one safetensors payload) and every other
rank of the group overwrites its own with them. A re-mine's encoding (corpus, queries,
positives) is the one piece every rank shares: each encodes a slice and the slices are
gathered, so on W ranks a re-mine costs each about 1/W of the encoding.

Beyond the papers: ``remine_every > 0`` re-mines every pool with the current model
(ANCE-style): corpus and queries re-encoded in ``encode_batch`` chunks and searched with FAISS
(:mod:`conan_embedding.mining.index`, queries in chunks: no queries x corpus matrix), same
false-negative filters and window; every query then holds its new pool's first ``n``
candidates (the current model's hardest in the window), whose pool scores are ``S_0``. Where the
false-negative margin leaves a query too few candidates (a barely trained model scores its
negatives about as high as its positive), that query keeps its previous pool, re-scored:
:meth:`remine` says when, and ``dhnm/remine_kept_old`` counts them.
"""

from __future__ import annotations

import base64
import inspect
import itertools
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from conan_embedding.config import DynamicNegativesConfig
from conan_embedding.data.records import RetrievalRecord
from conan_embedding.mining.base import EncodeFn
from conan_embedding.mining.index import build_index, search, texts_fingerprint
from conan_embedding.mining.offline import (
    MiningConfig,
    PoolEntry,
    PoolMeta,
    default_pool_path,
    read_pool_meta,
    read_pools,
    select_candidates,
)

logger = logging.getLogger(__name__)

STATE_VERSION = 2
QUANTILE_GRID = 1001
_PER_SAMPLE = ("assigned", "s0", "current", "replacements", "pointer", "pending")
FAISS_GPU_MAX_K = 2048
"""FAISS-GPU's largest ``k``: a re-mine that wants more neighbours searches on the CPU."""

DHNMConfig = DynamicNegativesConfig
"""The rules' thresholds and schedule: the training config's ``dynamic_negatives`` section
(one definition, in :mod:`conan_embedding.config`; defaults are the papers')."""


def v1_should_replace(
    initial: torch.Tensor, current: torch.Tensor, decay: float = 1.15, abs_cap: float = 0.8
) -> torch.Tensor:
    """v1: the mean negative score fell by more than the decay factor and is not extreme."""
    return (current * decay < initial) & (current.abs() < abs_cap)


def v2_should_replace(
    initial: torch.Tensor,
    current: torch.Tensor,
    never_hard: float = 0.4,
    decay: float = 1.2,
    abs_cap: float = 0.7,
) -> torch.Tensor:
    """v2: never hard (``S_0 < 0.4``) or no longer hard (``1.2 S_i < S_0`` and ``S_i < 0.7``)."""
    return (initial < never_hard) | ((decay * current < initial) & (current < abs_cap))


def quantile_grid(scores: np.ndarray | torch.Tensor, size: int = QUANTILE_GRID) -> torch.Tensor:
    """``size`` evenly spaced quantiles of the finite ``scores`` (empty if there are none)."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return torch.zeros(0)
    return torch.from_numpy(np.quantile(values, np.linspace(0.0, 1.0, size))).float()


def to_quantile(scores: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F(s)``: the quantile of each score on ``grid`` (linear between grid points; NaN kept)."""
    levels = np.linspace(0.0, 1.0, len(grid))
    values = scores.detach().cpu().numpy().astype(np.float64)
    out = np.interp(values, grid.numpy().astype(np.float64), levels)
    out[np.isnan(values)] = np.nan
    return torch.from_numpy(out).float()


def _accepts_role(encode: EncodeFn) -> bool:
    try:
        params = inspect.signature(encode).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "role" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _to_b64(tensors: dict[str, torch.Tensor]) -> str:
    return base64.b64encode(save_tensors(_contiguous(tensors))).decode("ascii")


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


class DynamicNegatives:
    """A :class:`~conan_embedding.mining.base.NegativeProvider` that applies the v1/v2 rule.

    ``pools[i]`` is sample ``i``'s ranked candidate list (``PoolEntry`` from
    :func:`~conan_embedding.mining.offline.read_pools`); ``pool_meta`` is the pool file's meta
    and ``trained_with`` the training model's (``PoolMeta.of(model, query_prompt,
    passage_prompt)``): with ``initial_score: auto`` the pool's scores are ``S_0`` only when
    the two are equal.
    """

    def __init__(
        self,
        records: Sequence[RetrievalRecord],
        n: int,
        pools: Sequence[PoolEntry],
        config: DHNMConfig | None = None,
        *,
        pool_meta: PoolMeta | None = None,
        trained_with: PoolMeta | None = None,
        last_step: int | None = None,
    ):
        config = config if config is not None else DHNMConfig(rule="v2")
        if config.rule == "none":
            raise ValueError("DynamicNegatives needs rule 'v1' or 'v2' (rule 'none' = static)")
        if n <= 0:
            raise ValueError("dynamic hard negative mining needs n >= 1 negatives per sample")
        if len(pools) != len(records):
            raise ValueError(f"{len(pools)} pools for {len(records)} records: mine them together")
        self.records, self.n = records, n  # a lazy dataset stays lazy: passes stream it
        self.config = config
        self.last_step = last_step
        """The run's last step: no re-mining after it (nothing would train on the new pools,
        and one re-mine of a large corpus costs as much as many steps)."""
        self.use_pool_scores = self._resolve_initial_score(pool_meta, trained_with)
        # Every text a sample can hold gets a corpus id; state refers to ids, not texts.
        texts: dict[str, int] = {}
        for record in records:
            for text in record.neg:
                texts.setdefault(text, len(texts))
        ids, scores, offsets = [], [], [0]
        self._initial_scores: list[dict[int, float]] = []
        for i, (record, pool) in enumerate(zip(records, pools, strict=True)):
            if pool.query != record.query:
                raise ValueError(
                    f"pool {i} is for query {pool.query[:60]!r}, record {i} is "
                    f"{record.query[:60]!r}: the pool file does not match the records"
                )
            mined: dict[int, float] = {}
            for cand in pool.candidates:
                cid = texts.setdefault(cand.text, len(texts))
                mined.setdefault(cid, cand.score)
                if cand.rank >= config.pool_offset:
                    ids.append(cid)
                    scores.append(cand.score)
            offsets.append(len(ids))
            self._initial_scores.append(mined)
        self.corpus = list(texts)
        self._corpus_ids = texts  # text -> corpus id
        self._set_pools(
            np.asarray(ids, np.int64), np.asarray(offsets, np.int64), np.asarray(scores, np.float32)
        )
        # the re-mining window's width: the widest mined pool, fixed here rather than taken
        # from the pools at each re-mine (filtered pools would narrow it, down to none at all)
        self._remine_width = max(int(np.diff(self.pool_offsets).max(initial=0)), n)
        self.fingerprint = texts_fingerprint(self.corpus)
        self._role = False
        self._sync: tuple[int, Any, torch.device] | None = None
        self.index_device: torch.device | str = "cpu"
        """Where :meth:`remine` builds its FAISS index: the trainer sets its own device, so
        a GPU run searches on that GPU (when FAISS has GPU support; else the CPU)."""
        self._inert = False
        self._reset_state()
        del self._initial_scores

    def _resolve_initial_score(self, pool: PoolMeta | None, trained: PoolMeta | None) -> bool:
        choice = self.config.initial_score
        if choice != "auto":
            return choice == "pool"
        if pool is not None and trained is not None and pool.matches(trained):
            return True
        reason = (
            "the pool file has no meta (mined before metas were written)"
            if pool is None
            else "the training model is not known"
            if trained is None
            else "the pool was mined with another model, prompt or max length "
            f"({pool.model} {pool.query_prompt!r} {pool.passage_prompt!r} {pool.max_seq_length}"
            f" vs {trained.model} {trained.query_prompt!r} {trained.passage_prompt!r} "
            f"{trained.max_seq_length})"
        )
        logger.info("DHNM: S_0 scored at assignment, not taken from the pool: %s", reason)
        return False

    # ----------------------------------------------------------------- state
    def _set_pools(self, ids: np.ndarray, offsets: np.ndarray, scores: np.ndarray) -> None:
        self.pool_ids, self.pool_offsets, self.pool_scores = ids, offsets, scores
        self._pool_lengths = torch.from_numpy(np.diff(offsets))

    def pool(self, sid: int) -> list[int]:
        """Sample ``sid``'s pool as corpus ids, best rank first."""
        return self.pool_ids[self.pool_offsets[sid] : self.pool_offsets[sid + 1]].tolist()

    def _reset_state(self) -> None:
        size, n = len(self.records), self.n
        self.s0 = torch.full((size, n), math.nan)
        self.current = torch.full((size, n), math.nan)
        self.replacements = torch.zeros(size, dtype=torch.int64)
        self.pending = torch.zeros(size, dtype=torch.bool)
        self.pools_remined = False
        self._grid = torch.zeros(0)
        self._calibration: list[float] = []
        self._to_score: dict[tuple[int, int], torch.Tensor | None] = {}
        self._pending_q: dict[int, torch.Tensor] = {}
        self._dirty: set[int] = set()
        self._full_sync = False
        self._since_log = self._empty_log()
        lookup = self._corpus_ids
        assigned, pointer = [], [0] * size
        for sid, record in enumerate(self.records):
            if record.neg:
                assigned.append([lookup[record.neg[k % len(record.neg)]] for k in range(n)])
                continue
            drawn, pointer[sid] = self._next_candidates(sid, 0, set(), n)
            if len(drawn) < n:
                raise ValueError(
                    f"sample {sid} has no negatives and its pool holds fewer than {n} "
                    "candidates; mine a wider window or drop it"
                )
            assigned.append([cid for cid, _ in drawn])
        self.assigned = torch.tensor(assigned, dtype=torch.int64).reshape(size, n)
        self.pointer = torch.tensor(pointer, dtype=torch.int64)
        if self.use_pool_scores:
            for sid, row in enumerate(self.assigned.tolist()):
                mined = self._initial_scores[sid]
                self.s0[sid] = torch.tensor([mined.get(cid, math.nan) for cid in row])
            if self.config.thresholds == "pool_quantile":
                self._grid = quantile_grid(self.pool_scores)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every array of the state (CPU tensors), for a safetensors file."""
        tensors = {
            "assigned": self.assigned,
            "s0": self.s0,
            "current": self.current,
            "replacements": self.replacements,
            "pointer": self.pointer,
            "pending": self.pending,
            "quantile_grid": self._grid,
            "calibration": torch.tensor(self._calibration, dtype=torch.float32),
        }
        if self.pools_remined:
            tensors["pool_ids"] = torch.from_numpy(self.pool_ids)
            tensors["pool_offsets"] = torch.from_numpy(self.pool_offsets)
            tensors["pool_scores"] = torch.from_numpy(self.pool_scores)
        return _contiguous(tensors)

    def state_dict(self, *, arrays: bool = True) -> dict[str, Any]:
        """JSON-serialisable state; ``arrays=False`` leaves out :meth:`state_tensors`."""
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "rule": self.config.rule,
            "n": self.n,
            "corpus_fingerprint": self.fingerprint,
            "use_pool_scores": self.use_pool_scores,
            "pools_remined": self.pools_remined,
        }
        if arrays:
            state["arrays"] = _to_b64(self.state_tensors())
        return state

    def load_state_dict(
        self, state: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Restore from :meth:`state_dict` (with its arrays, or ``tensors`` from a file)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"DHNM state version {state.get('version')} != {STATE_VERSION}: a checkpoint "
                "from before S_0 at assignment; restart the run"
            )
        if state["corpus_fingerprint"] != self.fingerprint or state["n"] != self.n:
            raise ValueError(
                "the DHNM state was saved for other records/pools or another n; resume with "
                "the same training file and pool file"
            )
        if state["rule"] != self.config.rule:
            logger.warning(
                "DHNM state saved under rule %s, resuming under %s", state["rule"], self.config.rule
            )
        if tensors is None or not tensors:
            if "arrays" not in state:
                raise ValueError("DHNM state without arrays: pass the tensors saved beside it")
            tensors = load_tensors(base64.b64decode(state["arrays"]))
        self.use_pool_scores = bool(state["use_pool_scores"])
        self.load_state_tensors(tensors)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the arrays of :meth:`state_tensors` (shapes are checked)."""
        size, n = len(self.records), self.n
        expected = {"assigned": (size, n), "s0": (size, n), "current": (size, n)}
        expected.update({k: (size,) for k in ("replacements", "pointer", "pending")})
        for key, shape in expected.items():
            if key not in tensors or tuple(tensors[key].shape) != shape:
                got = tuple(tensors[key].shape) if key in tensors else "missing"
                raise ValueError(f"DHNM state array '{key}': {got}, expected {shape}")
        self.assigned = tensors["assigned"].to(torch.int64).clone()
        self.s0 = tensors["s0"].float().clone()
        self.current = tensors["current"].float().clone()
        self.replacements = tensors["replacements"].to(torch.int64).clone()
        self.pointer = tensors["pointer"].to(torch.int64).clone()
        self.pending = tensors["pending"].bool().clone()
        self._grid = tensors["quantile_grid"].float().clone()
        self._calibration = tensors["calibration"].tolist()
        if "pool_ids" in tensors:
            self._set_pools(
                tensors["pool_ids"].numpy().astype(np.int64),
                tensors["pool_offsets"].numpy().astype(np.int64),
                tensors["pool_scores"].numpy().astype(np.float32),
            )
            self.pools_remined = True

    # ----------------------------------------------------------------- contract
    def negatives(self, sample_ids: Sequence[int]) -> list[list[str]]:
        return [[self.corpus[i] for i in self.assigned[sid].tolist()] for sid in sample_ids]

    def observe(
        self,
        step: int,
        sample_ids: Sequence[int],
        neg_scores: torch.Tensor,
        query_embeddings: torch.Tensor | None = None,
    ) -> None:
        ids = torch.as_tensor(list(sample_ids), dtype=torch.int64)
        scores = neg_scores.detach().float().cpu()
        if scores.shape != (len(ids), self.n):
            raise ValueError(
                f"neg_scores has shape {tuple(scores.shape)}, expected {(len(ids), self.n)}"
            )
        queries = None
        if query_embeddings is not None:
            queries = F.normalize(query_embeddings.detach().float().cpu(), dim=-1)
            if queries.dim() != 2 or len(queries) != len(ids):
                raise ValueError(
                    f"query_embeddings has shape {tuple(queries.shape)}, expected ({len(ids)}, dim)"
                )
        if self._follower():
            return  # the source rank decides; on_step_end receives its rows
        ids, scores, queries = self._merge_duplicates(ids, scores, queries)
        self._since_log["score_sum"] += float(scores.sum())
        self._since_log["score_count"] += scores.numel()
        self._dirty.update(ids.tolist())
        self.current[ids] = scores
        fresh = torch.isnan(self.s0[ids])
        self.s0[ids] = torch.where(fresh, scores, self.s0[ids])
        self._calibrate(scores[fresh])
        if self.config.rule == "v2":
            replace = self._v2(self.s0[ids], scores)
            for row, slot in replace.nonzero().tolist():
                query = queries[row] if queries is not None else None
                self._replace_slots(int(ids[row]), [slot], query)
        else:
            self.pending[ids] = True
            if queries is not None:
                self._pending_q.update(zip(ids.tolist(), queries, strict=True))

    def on_step_end(self, step: int, encode: EncodeFn) -> dict[str, float]:
        if self._inert:
            return {}
        self._role = _accepts_role(encode)
        config = self.config
        last = self.last_step is not None and step >= self.last_step
        remine_now = bool(config.remine_every) and step % config.remine_every == 0 and not last
        if self._follower():
            if remine_now:  # this rank's share of the re-mine's encoding, for the source
                self._remine_vectors(encode)
            self._receive()
            return self._log()
        if config.rule == "v1" and step % config.check_every == 0 and bool(self.pending.any()):
            self._v1_check(encode)
        self._score_assigned(encode)
        if remine_now:
            began = time.perf_counter()
            self.remine(encode)
            self._since_log["remine_seconds"] += time.perf_counter() - began
        if self._sync is not None:
            self._broadcast()
        return self._log()

    # ----------------------------------------------------------------- rules
    def _thresholds_ready(self) -> bool:
        return self.config.thresholds == "absolute" or len(self._grid) > 0

    def _scale(self, scores: torch.Tensor) -> torch.Tensor:
        if self.config.thresholds == "absolute":
            return scores
        return to_quantile(scores, self._grid)

    def _v2(self, s0: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        if not self._thresholds_ready():
            return torch.zeros_like(current, dtype=torch.bool)
        c = self.config
        return v2_should_replace(
            self._scale(s0), self._scale(current), c.v2_never_hard, c.v2_decay, c.v2_abs_cap
        )

    def _v1(self, s0: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        if not self._thresholds_ready():
            return torch.zeros(len(current), dtype=torch.bool)
        initial = self._scale(s0).mean(dim=1)
        now = self._scale(current).mean(dim=1)
        return v1_should_replace(initial, now, self.config.v1_decay, self.config.v1_abs_cap)

    def _calibrate(self, s0_values: torch.Tensor) -> None:
        """Without pool scores on the model's scale, ``F`` is fitted on the first S_0 values."""
        if self.config.thresholds != "pool_quantile" or len(self._grid):
            return
        values = s0_values[torch.isfinite(s0_values)].tolist()
        self._calibration.extend(values[: self.config.calibration_size - len(self._calibration)])
        if len(self._calibration) >= self.config.calibration_size:
            self._grid = quantile_grid(np.asarray(self._calibration))
            self._calibration = []

    def _v1_check(self, encode: EncodeFn) -> None:
        ids = torch.nonzero(self.pending).flatten()
        self.pending[ids] = False
        queries: torch.Tensor | None = None
        if self.config.v1_current == "encode":
            current, queries = self._rescore(ids, encode)
            self.current[ids] = current
        else:
            current = self.current[ids]
        self._dirty.update(ids.tolist())
        replace = self._v1(self.s0[ids], current)
        for row in replace.nonzero().flatten().tolist():
            sid = int(ids[row])
            query = queries[row] if queries is not None else self._pending_q.get(sid)
            self._replace_slots(sid, list(range(self.n)), query)
        self._pending_q.clear()

    def _encode(self, encode: EncodeFn, texts: Sequence[str], role: str) -> torch.Tensor:
        batch = self.config.encode_batch
        parts = []
        for start in range(0, len(texts), batch):
            chunk = list(texts[start : start + batch])
            out = encode(chunk, role=role) if self._role else encode(chunk)
            parts.append(F.normalize(torch.as_tensor(out).detach().float().cpu(), dim=-1))
        return torch.cat(parts) if parts else torch.zeros((0, 1))

    def _encode_shared(self, encode: EncodeFn, texts: Sequence[str], role: str) -> torch.Tensor:
        """:meth:`_encode` of ``texts``, shared out over the sync group's ranks: each encodes
        one contiguous slice and every rank gets all rows back, in order (``all_gather``; the
        slices are padded to one length). Alone (no group): :meth:`_encode`. A collective:
        every rank of the group calls it with the same texts."""
        if self._sync is None or not texts:
            return self._encode(encode, texts, role)
        _, group, device = self._sync
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        bounds = [len(texts) * r // world for r in range(world + 1)]
        local = self._encode(encode, texts[bounds[rank] : bounds[rank + 1]], role)
        # a rank whose slice is empty (fewer texts than ranks) does not know the width
        dim = torch.tensor([local.shape[1] if len(local) else 0], device=device)
        dist.all_reduce(dim, op=dist.ReduceOp.MAX, group=group)
        longest = max(b - a for a, b in itertools.pairwise(bounds))
        padded = torch.zeros(longest, int(dim.item()), device=device)
        padded[: len(local)] = local.to(device)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[: bounds[r + 1] - bounds[r]].cpu() for r, part in enumerate(parts)])

    def _remine_vectors(self, encode: EncodeFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The re-mine's encodes, shared over the ranks (every rank of the group calls it):
        the corpus, the queries and the positives (flattened in record order). A positive that
        is also a corpus text (another query's candidate: most of them, when a pool was mined
        from the records' own texts) takes the corpus row instead of being encoded again."""
        corpus = self._encode_shared(encode, self.corpus, "passage")
        queries = self._encode_shared(encode, [r.query for r in self.records], "query")
        positives = [p for record in self.records for p in record.pos]
        missing = list(dict.fromkeys(p for p in positives if p not in self._corpus_ids))
        extra = self._encode_shared(encode, missing, "passage")
        rows = {text: extra[i] for i, text in enumerate(missing)}
        if not positives:
            return corpus, queries, torch.zeros((0, corpus.shape[1]))
        stacked = [
            corpus[self._corpus_ids[p]] if p in self._corpus_ids else rows[p] for p in positives
        ]
        return corpus, queries, torch.stack(stacked)

    def _rescore(self, ids: torch.Tensor, encode: EncodeFn) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos(query, negative)`` of ``ids`` with the current model, and the query rows."""
        part = ids.tolist()
        queries = self._encode(encode, [self.records[s].query for s in part], "query")
        negs = self._encode(encode, [t for s in part for t in self.negatives([s])[0]], "passage")
        negs = negs.reshape(len(part), self.n, -1)
        return torch.einsum("bd,bnd->bn", queries, negs), queries

    def _score_assigned(self, encode: EncodeFn) -> None:
        """``S_0`` of the negatives assigned this step: ``cos(q, e(neg))`` with the step's q."""
        if not self._to_score:
            return
        keys = list(self._to_score)
        missing = [sid for (sid, _), q in self._to_score.items() if q is None]
        if missing:  # no query row from the step (e.g. after a resume): encode the query
            unique = sorted(set(missing))
            rows = self._encode(encode, [self.records[s].query for s in unique], "query")
            found = dict(zip(unique, rows, strict=True))
            for key, q in self._to_score.items():
                if q is None:
                    self._to_score[key] = found[key[0]]
        queries = torch.stack([self._to_score[key] for key in keys])
        texts = [self.corpus[int(self.assigned[sid, slot])] for sid, slot in keys]
        negs = self._encode(encode, texts, "passage")
        scores = (queries * negs).sum(dim=-1)
        sids = torch.tensor([k[0] for k in keys])
        slots = torch.tensor([k[1] for k in keys])
        self.s0[sids, slots] = scores
        self._calibrate(scores)
        self._dirty.update(sids.tolist())
        self._to_score.clear()

    def _replace_slots(self, sid: int, slots: list[int], query: torch.Tensor | None) -> bool:
        drawn = self._draw(sid, len(slots))
        if drawn is None:
            self._since_log["blocked"] += 1
            return False
        for slot, (cand, score) in zip(slots, drawn, strict=True):
            self.assigned[sid, slot] = cand
            self.current[sid, slot] = math.nan
            if self.use_pool_scores:
                self.s0[sid, slot] = score
            else:
                self.s0[sid, slot] = math.nan
                self._to_score[(sid, slot)] = query
        self.replacements[sid] += 1
        self._since_log["replaced"] += len(slots)
        self._dirty.add(sid)
        return True

    def _draw(self, sid: int, count: int) -> list[tuple[int, float]] | None:
        """The next ``count`` pool candidates the sample does not hold; None if too few."""
        held = set(self.assigned[sid].tolist())
        drawn, position = self._next_candidates(sid, int(self.pointer[sid]), held, count)
        if len(drawn) < count:
            return None
        self.pointer[sid] = position
        return drawn

    def _next_candidates(
        self, sid: int, position: int, held: set[int], count: int
    ) -> tuple[list[tuple[int, float]], int]:
        start, stop = int(self.pool_offsets[sid]), int(self.pool_offsets[sid + 1])
        drawn: list[tuple[int, float]] = []
        taken: set[int] = set()
        while start + position < stop and len(drawn) < count:
            cand = int(self.pool_ids[start + position])
            score = float(self.pool_scores[start + position])
            position += 1
            if cand not in held and cand not in taken:
                drawn.append((cand, score))
                taken.add(cand)
        return drawn, position

    @staticmethod
    def _merge_duplicates(
        ids: torch.Tensor, scores: torch.Tensor, queries: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A sample drawn twice in one batch: its scores averaged, its first query row kept."""
        unique, inverse = torch.unique(ids, return_inverse=True)
        if len(unique) == len(ids):
            return ids, scores, queries
        sums = torch.zeros((len(unique), scores.shape[1])).index_add_(0, inverse, scores)
        counts = torch.zeros(len(unique)).index_add_(0, inverse, torch.ones(len(ids)))
        if queries is not None:
            first = torch.full((len(unique),), len(ids), dtype=torch.int64)
            first = first.scatter_reduce(0, inverse, torch.arange(len(ids)), reduce="amin")
            queries = queries[first]
        return unique, sums / counts[:, None], queries

    @staticmethod
    def _empty_log() -> dict[str, float]:
        return {
            "replaced": 0.0,
            "blocked": 0.0,
            "score_sum": 0.0,
            "score_count": 0.0,
            "remines": 0.0,
            "remine_kept_old": 0.0,
            "remine_reassigned": 0.0,
            "remine_seconds": 0.0,
        }

    def _log(self) -> dict[str, float]:
        since = self._since_log
        exhausted = int((self.pointer >= self._pool_lengths).sum())
        out = {
            "dhnm/replaced": float(since["replaced"]),
            "dhnm/blocked": float(since["blocked"]),
            "dhnm/pool_exhausted": exhausted / max(1, len(self.records)),
            "dhnm/replacements_total": float(self.replacements.sum()),
        }
        if self.config.thresholds == "pool_quantile":
            out["dhnm/calibrated"] = float(len(self._grid) > 0)
        if since["score_count"]:
            out["dhnm/neg_score"] = since["score_sum"] / since["score_count"]
        if since["remines"]:  # only on re-mining steps: a 0 elsewhere would read as "none kept"
            out["dhnm/remine_kept_old"] = float(since["remine_kept_old"])
            out["dhnm/remine_reassigned"] = float(since["remine_reassigned"])
            out["dhnm/remine_seconds"] = round(since["remine_seconds"], 3)
        self._since_log = self._empty_log()
        return out

    # ----------------------------------------------------------------- several ranks
    def sync_from(
        self, src: int = 0, group: Any = None, device: torch.device | str | None = None
    ) -> None:
        """From now on rank ``src`` (a global rank in ``group``) decides for every rank.

        Call once on every rank of ``group`` (``None``: the default group), after building the
        provider; ``device`` holds the broadcast buffer (a CUDA device under NCCL, default CPU).
        This call copies ``src``'s whole state to the others. Then, each step, the others skip
        the rules and the encoding, and at the end of :meth:`on_step_end` ``src`` broadcasts
        the rows it changed, which they take over. A no-op without ``torch.distributed`` or on
        a group of one. On a rank outside ``group`` (it may be called there too) the provider
        turns inert: :meth:`on_step_end` does nothing (no v1 check, no re-mining).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_rank(group) < 0:  # this rank does not run the task
            self._inert = True
            return
        if dist.get_world_size(group) <= 1:
            return
        self._sync = (src, group, torch.device(device or "cpu"))
        if dist.get_rank() == src:
            self._full_sync = True
            self._broadcast()
        else:
            self._receive()

    def _follower(self) -> bool:
        return self._sync is not None and dist.get_rank() != self._sync[0]

    def _changed(self) -> bool:
        """Whether this step touched anything a follower holds or logs (every change of a
        sample marks it dirty; re-mining and the first sync send everything)."""
        return self._full_sync or bool(self._dirty) or any(self._since_log.values())

    def _broadcast(self) -> None:
        assert self._sync is not None
        src, group, device = self._sync
        if not self._changed():
            # a step that did not run the task: size 0 tells the others there is nothing,
            # one small broadcast instead of two (every rank still joins the same collective)
            dist.broadcast(torch.zeros(1, dtype=torch.int64, device=device), src=src, group=group)
            return
        if self._full_sync:
            payload = self.state_tensors()
            payload["full"] = torch.ones(1, dtype=torch.uint8)
        else:
            rows = torch.tensor(sorted(self._dirty), dtype=torch.int64)
            payload = {key: getattr(self, key)[rows] for key in _PER_SAMPLE}
            payload["rows"] = rows
            payload["quantile_grid"] = self._grid
            payload["calibration"] = torch.tensor(self._calibration, dtype=torch.float32)
        payload["flags"] = torch.tensor([self.use_pool_scores], dtype=torch.uint8)
        payload["log"] = torch.tensor([self._since_log[k] for k in self._empty_log()])
        buffer = torch.frombuffer(bytearray(save_tensors(_contiguous(payload))), dtype=torch.uint8)
        size = torch.tensor([buffer.numel()], dtype=torch.int64, device=device)
        dist.broadcast(size, src=src, group=group)
        dist.broadcast(buffer.to(device), src=src, group=group)
        self._dirty.clear()
        self._full_sync = False

    def _receive(self) -> None:
        assert self._sync is not None
        src, group, device = self._sync
        size = torch.zeros(1, dtype=torch.int64, device=device)
        dist.broadcast(size, src=src, group=group)
        if not int(size.item()):  # nothing changed on the source this step
            self._since_log = self._empty_log()
            return
        buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        dist.broadcast(buffer, src=src, group=group)
        payload = load_tensors(buffer.cpu().numpy().tobytes())
        self.use_pool_scores = bool(payload["flags"][0])
        if "full" in payload:
            self.load_state_tensors(payload)
        else:
            rows = payload["rows"]
            for key in _PER_SAMPLE:
                getattr(self, key)[rows] = payload[key]
            self._grid = payload["quantile_grid"].clone()
            self._calibration = payload["calibration"].tolist()
        for key, value in zip(self._empty_log(), payload["log"].tolist(), strict=True):
            self._since_log[key] = value

    # ----------------------------------------------------------------- ANCE-style re-mining
    def remine(self, encode: EncodeFn, window: tuple[int, int] | None = None) -> None:
        """Rebuild every pool with the current model, and give every query its new pool's head.

        Texts are encoded in ``encode_batch`` chunks and searched with FAISS in query chunks.
        Each query's negatives become the first ``n`` candidates of its new pool (ANCE: from
        its next draw on it trains against the current model's hardest candidates in the
        window, not the mining model's), with their new pool scores as ``S_0``, and its pointer
        moves past them. Only swapping the pools would change nothing a run trains on until the
        rule replaces a negative at a query's draw, and a query is drawn about once in a short
        run: a 200-step recipe run with re-mining at step 100 trained the very same weights as
        the run without it. ``pool_quantile`` re-fits ``F`` on the pools now in use. The window
        is ranks ``pool_offset`` to ``pool_offset`` plus the widest mined pool (at least ``n``),
        unless ``window`` says otherwise. Logged: ``dhnm/remine_reassigned`` queries.

        A query keeps its previous pool, and its pointer in it, when its new pool offers fewer
        than ``n`` candidates it does not hold and fewer than the rest of its previous pool
        does (from the pointer, not held). So a re-mine never leaves a query fewer candidates
        than a replacement of all ``n`` negatives needs unless it had fewer before. This happens
        when the false-negative margin (``remine_relative_margin``) drops nearly everything: on
        a barely trained model the negatives score about as high as the positive. The kept pool
        is re-scored with the current model (order unchanged), so ``S_0`` of what it hands out
        is on the same scale as the new pools', and so is ``S_0`` of the negatives it keeps
        holding (their score now). The number of such queries is logged as
        ``dhnm/remine_kept_old``.

        Under :meth:`sync_from` the source rank runs it from :meth:`on_step_end` while every
        other rank of the group encodes its share there (:meth:`_remine_vectors`).
        """
        self._role = _accepts_role(encode)
        width = self._remine_width
        start, stop = window or (self.config.pool_offset, self.config.pool_offset + width)
        config = MiningConfig(
            range_min=start,
            range_max=stop,
            num_negatives=1,
            relative_margin=self.config.remine_relative_margin,
        )
        corpus_vecs, query_vecs, pos_vecs = (v.numpy() for v in self._remine_vectors(encode))
        lookup = self._corpus_ids
        excluded = [
            {lookup[t] for t in (*record.pos, record.query) if t in lookup}
            for record in self.records
        ]
        positive_scores = np.empty(len(self.records), np.float32)
        at = 0
        for sid, record in enumerate(self.records):
            span = pos_vecs[at : at + len(record.pos)]
            positive_scores[sid] = float((span @ query_vecs[sid]).min())
            at += len(record.pos)
        k = min(len(self.corpus), stop + max((len(b) for b in excluded), default=0))
        device = self.index_device if k <= FAISS_GPU_MAX_K else "cpu"
        index = build_index(corpus_vecs, "auto", device=device)
        top_scores, top_ids = search(index, query_vecs, k, show_progress=False)
        del index
        windows = select_candidates(top_scores, top_ids, excluded, positive_scores, config)
        ids, scores, offsets, pointer, kept = self._new_or_kept_pools(
            windows, query_vecs, corpus_vecs
        )
        if kept.any():
            logger.warning(
                "DHNM re-mine: %d of %d queries kept their previous pool (re-scored): the "
                "false-negative margin left them fewer than %d candidates",
                int(kept.sum()),
                len(self.records),
                self.n,
            )
        self._set_pools(ids, offsets, scores)
        # what a query keeps holding is put on the new scale: S_0 = its score now
        held = corpus_vecs[self.assigned.numpy()]  # [S, n, dim]
        self.s0 = torch.from_numpy(np.einsum("sd,snd->sn", query_vecs, held)).float()
        self.current.fill_(math.nan)
        self.pointer = pointer
        reassigned = self._take_new_heads(~kept)
        self.pools_remined = True
        self._since_log["remines"] += 1
        self._since_log["remine_kept_old"] += int(kept.sum())
        self._since_log["remine_reassigned"] += reassigned
        self.use_pool_scores = True
        if self.config.thresholds == "pool_quantile":
            self._grid = quantile_grid(scores)
            self._calibration = []
        self._full_sync = True

    def _take_new_heads(self, rows: torch.Tensor) -> int:
        """Queries ``rows`` (a mask) hold the first ``n`` candidates of their pool, ``S_0`` their
        pool scores, the pointer past them; a pool with fewer than ``n`` leaves the query what
        it holds. Returns how many queries took new negatives."""
        taken = 0
        for sid in rows.nonzero().flatten().tolist():
            drawn, position = self._next_candidates(sid, 0, set(), self.n)
            if len(drawn) < self.n:
                continue
            self.assigned[sid] = torch.tensor([cand for cand, _ in drawn], dtype=torch.int64)
            self.s0[sid] = torch.tensor([score for _, score in drawn], dtype=torch.float32)
            self.pointer[sid] = position
            self.pending[sid] = False  # v1 judges the new negatives from their first draw on
            for slot in range(self.n):
                self._to_score.pop((sid, slot), None)
            taken += 1
        return taken

    def _new_or_kept_pools(
        self,
        windows: Sequence[Sequence[tuple[int, float, int]]],
        query_vecs: np.ndarray,
        corpus_vecs: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
        """Per query the new window or, by :meth:`remine`'s rule, its previous pool re-scored:
        ``(ids, scores, offsets, pointer, kept)``, ``kept`` a mask of the queries that kept
        theirs."""
        ids_parts: list[np.ndarray] = []
        score_parts: list[np.ndarray] = []
        pointer = torch.zeros_like(self.pointer)
        kept = torch.zeros(len(windows), dtype=torch.bool)
        for sid, window in enumerate(windows):
            held = set(self.assigned[sid].tolist())
            fresh = sum(cid not in held for cid, _, _ in window)
            start, stop = int(self.pool_offsets[sid]), int(self.pool_offsets[sid + 1])
            old = self.pool_ids[start:stop]
            left = sum(int(cid) not in held for cid in old[int(self.pointer[sid]) :])
            if fresh < self.n and left > fresh:
                ids_parts.append(old.astype(np.int64))
                # the current model's scores: S_0 and F stay on one scale across all pools
                score_parts.append((corpus_vecs[old] @ query_vecs[sid]).astype(np.float32))
                pointer[sid] = self.pointer[sid]
                kept[sid] = True
            else:
                ids_parts.append(np.asarray([c for c, _, _ in window], np.int64))
                score_parts.append(np.asarray([s for _, s, _ in window], np.float32))
        lengths = [len(part) for part in ids_parts]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
        scores = np.concatenate(score_parts) if score_parts else np.zeros(0, np.float32)
        return ids.astype(np.int64), scores.astype(np.float32), offsets, pointer, kept


def build_dynamic_negatives(
    records: Sequence[RetrievalRecord],
    n: int,
    config: DHNMConfig,
    records_path: str | Path | None = None,
    *,
    rows: Sequence[int] | None = None,
    trained_with: PoolMeta | None = None,
    last_step: int | None = None,
) -> DynamicNegatives:
    """The trainer's factory: the pool file is ``config.pool_path`` or ``<records>.pool.jsonl``.
    When the task kept a subset of the file's records (``max_rows``), ``rows`` are their
    positions in the file, which pick their pools; without them each row's pool is found by its
    query (unambiguous only when no query repeats).

    ``config`` is the training config's ``dynamic_negatives`` section; ``trained_with`` is
    ``PoolMeta.of(model, query_prompt, passage_prompt)`` of the model being trained, compared
    with the pool file's meta (``initial_score: auto``).
    """
    pool_path = config.pool_path
    if pool_path is None:
        if records_path is None:
            raise ValueError("dynamic negatives need a pool file: set dynamic_negatives.pool_path")
        pool_path = default_pool_path(records_path)
    if not Path(pool_path).is_file():
        raise FileNotFoundError(
            f"pool file {pool_path} not found: run `conan-embed mine` on {records_path} first "
            "or set dynamic_negatives.pool_path"
        )
    pools = read_pools(pool_path)
    if rows is not None and len(pools) != len(records):
        if len(rows) != len(records) or (len(rows) and int(np.max(rows)) >= len(pools)):
            raise ValueError(f"{pool_path}: rows {len(rows)} do not index {len(pools)} pools")
        pools = [pools[i] for i in rows]
    elif len(pools) != len(records):  # a subset without positions: find each row's pool
        by_query = {pool.query: pool for pool in pools}
        if len(by_query) != len(pools):
            raise ValueError(
                f"{pool_path}: {len(pools)} pools for {len(records)} records and repeated "
                "queries, so the subset's pools cannot be matched; mine the subset itself"
            )
        missing = [r.query for r in records if r.query not in by_query]
        if missing:
            raise ValueError(f"{pool_path}: no pool for query {missing[0][:60]!r}")
        pools = [by_query[r.query] for r in records]
    return DynamicNegatives(
        records,
        n,
        pools,
        config,
        pool_meta=read_pool_meta(pool_path),
        trained_with=trained_with,
        last_step=last_step,
    )
