"""Dynamic hard negative mining (DHNM): swap a sample's negatives once they stop being hard.

Why: negatives mined once with the initial model go stale; after some training the model
separates them easily and their gradient fades. Conan keeps, per sample, the score each
negative had when it was assigned (``S_0``) and replaces negatives whose score has fallen,
taking the next candidates of the sample's offline-mined pool (``mining.offline``).

The two published rules (thresholds are configurable; defaults are the papers'):

- **v1** (Conan-embedding v1), checked every ``check_every`` steps (paper: 100; the v2 paper
  says 1k) on the sample's *mean* negative score::

      replace all n negatives  if  current * 1.15 < initial  and  |current| < 0.8

  and the i-th replacement takes pool ranks ``(i-1)*n + 10 .. i*n + 10``. The samples
  checked are those trained on since the last check. ``current`` is re-scored with the
  current model through the ``encode`` hook (``v1_current="encode"``, the default: one
  no-grad forward of each checked sample's query and negatives, roughly a third of what
  training on it cost) or taken from the last scores the loss computed (``"observed"``:
  free, but up to ``check_every`` steps old).
- **v2** (Conan-embedding v2), at every step, per negative, from the scores the loss
  already computed (no extra encoding)::

      replace negative j  if  S_0 < 0.4  (never hard)  or  (1.2 * S_j < S_0 and S_j < 0.7)

  The new negative is used from the next step; its ``S_0`` is its first observed score.

How it is kept: per-sample state of ``n`` slots (assigned candidate, ``S_0``, current
score), a replacement count and a pool pointer; a replacement draws the next pool
candidates at the pointer, skipping ones the sample holds already. When a pool runs out the
sample keeps its negatives and counts as *exhausted*. Initial negatives are the record's own
``neg`` (cycled, like :class:`~conan_embedding.mining.base.StaticNegatives`), or the head of
the pool when the record has none; so with ``neg`` from elsewhere the i-th v1 replacement is
exactly pool ranks ``(i-1)*n+10 .. i*n+10``. Pool candidates ranked below ``pool_offset``
are never used (the paper's ``+10``; mined pools already start there).

The state is plain JSON (lists; NaN written as ``null``) so the trainer stores it in its
checkpoint's ``state.json`` and :meth:`DynamicNegatives.load_state_dict` restores it on resume.

Under ``torch.distributed`` every rank keeps the full state, and decisions must come from
identical inputs on every rank. Two set-ups:

- ranks that train on *different* samples (data parallel): pass ``group`` (e.g.
  ``torch.distributed.group.WORLD``); :meth:`observe` all-gathers every rank's (sample id,
  scores) and every rank applies the same updates in the same order (a sample seen on two
  ranks in one step gets its scores averaged), the v1 re-scoring shards the samples over the
  group and all-gathers the scores, and re-mining runs on the group's first rank and is
  broadcast. Every rank of the group must then call ``observe``/``on_step_end`` each step.
- ranks that already see the *same* rows and scores (Conan's cross-GPU batch balance: the
  ranks of a retrieval task share queries and merge their negatives' scores before
  ``observe``): leave ``group=None``; each rank computes the same updates on its own, and no
  collective is issued, so ranks running other tasks are never waited for.

Beyond the papers: ``remine_every > 0`` re-mines every pool with the current model
(ANCE-style: corpus and queries re-encoded, same filters and window); off by default.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from conan_embedding.config import DynamicNegativesConfig
from conan_embedding.data.records import RetrievalRecord
from conan_embedding.mining.base import EncodeFn
from conan_embedding.mining.index import texts_fingerprint
from conan_embedding.mining.offline import (
    MiningConfig,
    PoolEntry,
    default_pool_path,
    read_pools,
    select_candidates,
)

logger = logging.getLogger(__name__)

STATE_VERSION = 1


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


def _synced(group: Any) -> bool:
    return (
        group is not None
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size(group) > 1
    )


def _all_gather_rows(
    ids: torch.Tensor, rows: torch.Tensor, group: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's ``ids [b]`` and ``rows [b, n]`` in rank order (b may differ)."""
    if not _synced(group):
        return ids, rows
    world = dist.get_world_size(group)
    size = torch.tensor([ids.numel()], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    width = rows.shape[1] if rows.dim() == 2 else 0
    padded_ids = torch.full((longest,), -1, dtype=torch.int64)
    padded_ids[: ids.numel()] = ids
    padded_rows = torch.zeros((longest, width), dtype=torch.float32)
    padded_rows[: ids.numel()] = rows.float()
    all_ids = [torch.empty_like(padded_ids) for _ in range(world)]
    all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
    dist.all_gather(all_ids, padded_ids, group=group)
    dist.all_gather(all_rows, padded_rows, group=group)
    keep = [int(s.item()) for s in sizes]
    return (
        torch.cat([t[:k] for t, k in zip(all_ids, keep, strict=True)]),
        torch.cat([t[:k] for t, k in zip(all_rows, keep, strict=True)]),
    )


def _nan_to_none(values: torch.Tensor) -> list:
    return [[None if math.isnan(x) else x for x in row] for row in values.tolist()]


def _none_to_nan(values: list) -> torch.Tensor:
    return torch.tensor(
        [[math.nan if x is None else float(x) for x in row] for row in values], dtype=torch.float32
    )


class DynamicNegatives:
    """A :class:`~conan_embedding.mining.base.NegativeProvider` that applies the v1/v2 rule.

    ``pools[i]`` is sample ``i``'s ranked candidate list (``PoolEntry`` from
    :func:`~conan_embedding.mining.offline.read_pools`); ``group``: see the module docstring.
    """

    def __init__(
        self,
        records: Sequence[RetrievalRecord],
        n: int,
        pools: Sequence[PoolEntry],
        config: DHNMConfig | None = None,
        group: Any = None,
    ):
        config = config if config is not None else DHNMConfig(rule="v2")
        if config.rule == "none":
            raise ValueError("DynamicNegatives needs rule 'v1' or 'v2' (rule 'none' = static)")
        if n <= 0:
            raise ValueError("dynamic hard negative mining needs n >= 1 negatives per sample")
        if len(pools) != len(records):
            raise ValueError(f"{len(pools)} pools for {len(records)} records: mine them together")
        self.records, self.n = list(records), n
        self.config = config
        self.group = group
        # Every text a sample can hold gets a corpus id; state refers to ids, not texts.
        texts: dict[str, int] = {}
        for record in records:
            for text in record.neg:
                texts.setdefault(text, len(texts))
        pool_ids = []
        for i, (record, pool) in enumerate(zip(records, pools, strict=True)):
            if pool.query != record.query:
                raise ValueError(
                    f"pool {i} is for query {pool.query[:60]!r}, record {i} is "
                    f"{record.query[:60]!r}: the pool file does not match the records"
                )
            ids = []
            for cand in pool.candidates:
                if cand.rank >= self.config.pool_offset:
                    ids.append(texts.setdefault(cand.text, len(texts)))
            pool_ids.append(ids)
        self.corpus = list(texts)
        self._set_pools(pool_ids)
        self.fingerprint = texts_fingerprint(self.corpus)
        self._reset_state()

    # ----------------------------------------------------------------- state
    def _set_pools(self, pools: list[list[int]]) -> None:
        self.pools = pools
        self._pool_lengths = torch.tensor([len(p) for p in pools], dtype=torch.int64)

    def _reset_state(self) -> None:
        size, n = len(self.records), self.n
        self.assigned = torch.full((size, n), -1, dtype=torch.int64)
        self.s0 = torch.full((size, n), math.nan)
        self.current = torch.full((size, n), math.nan)
        self.replacements = torch.zeros(size, dtype=torch.int64)
        self.pointer = torch.zeros(size, dtype=torch.int64)
        self.pools_remined = False
        self._pending: set[int] = set()
        self._since_log = {"replaced": 0, "blocked": 0, "score_sum": 0.0, "score_count": 0}
        lookup = {t: i for i, t in enumerate(self.corpus)}
        assigned, pointer = [], [0] * size
        for sid, record in enumerate(self.records):
            if record.neg:
                assigned.append([lookup[record.neg[k % len(record.neg)]] for k in range(n)])
                continue
            drawn, pointer[sid] = self._next_candidates(self.pools[sid], 0, set(), n)
            if len(drawn) < n:
                raise ValueError(
                    f"sample {sid} has no negatives and its pool holds fewer than {n} "
                    "candidates; mine a wider window or drop it"
                )
            assigned.append(drawn)
        self.assigned = torch.tensor(assigned, dtype=torch.int64).reshape(size, n)
        self.pointer = torch.tensor(pointer, dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "version": STATE_VERSION,
            "rule": self.config.rule,
            "n": self.n,
            "corpus_fingerprint": self.fingerprint,
            "assigned": self.assigned.tolist(),
            "s0": _nan_to_none(self.s0),
            "current": _nan_to_none(self.current),
            "replacements": self.replacements.tolist(),
            "pointer": self.pointer.tolist(),
            "pending": sorted(self._pending),
            "pools": self.pools if self.pools_remined else None,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"DHNM state version {state.get('version')} != {STATE_VERSION}")
        if state["corpus_fingerprint"] != self.fingerprint or state["n"] != self.n:
            raise ValueError(
                "the DHNM state was saved for other records/pools or another n; resume with "
                "the same training file and pool file"
            )
        if state["rule"] != self.config.rule:
            logger.warning(
                "DHNM state saved under rule %s, resuming under %s", state["rule"], self.config.rule
            )
        self.assigned = torch.tensor(state["assigned"], dtype=torch.int64)
        self.s0 = _none_to_nan(state["s0"])
        self.current = _none_to_nan(state["current"])
        self.replacements = torch.tensor(state["replacements"], dtype=torch.int64)
        self.pointer = torch.tensor(state["pointer"], dtype=torch.int64)
        self._pending = set(state["pending"])
        if state.get("pools") is not None:
            self._set_pools([list(p) for p in state["pools"]])
            self.pools_remined = True

    # ----------------------------------------------------------------- contract
    def negatives(self, sample_ids: Sequence[int]) -> list[list[str]]:
        return [[self.corpus[i] for i in self.assigned[sid].tolist()] for sid in sample_ids]

    def observe(self, step: int, sample_ids: Sequence[int], neg_scores: torch.Tensor) -> None:
        ids = torch.as_tensor(list(sample_ids), dtype=torch.int64)
        scores = neg_scores.detach().float().cpu()
        if scores.shape != (len(ids), self.n):
            raise ValueError(
                f"neg_scores has shape {tuple(scores.shape)}, expected {(len(ids), self.n)}"
            )
        ids, scores = _all_gather_rows(ids, scores, self.group)
        ids, scores = self._merge_duplicates(ids, scores)
        self._since_log["score_sum"] += float(scores.sum())
        self._since_log["score_count"] += scores.numel()
        self.current[ids] = scores
        fresh = torch.isnan(self.s0[ids])
        self.s0[ids] = torch.where(fresh, scores, self.s0[ids])
        if self.config.rule == "v2":
            replace = v2_should_replace(
                self.s0[ids],
                scores,
                self.config.v2_never_hard,
                self.config.v2_decay,
                self.config.v2_abs_cap,
            )
            for row, slot in replace.nonzero().tolist():
                self._replace_slots(int(ids[row]), [slot])
        else:
            self._pending.update(ids.tolist())

    def on_step_end(self, step: int, encode: EncodeFn) -> dict[str, float]:
        config = self.config
        if config.rule == "v1" and step % config.check_every == 0 and self._pending:
            self._v1_check(encode)
        if config.remine_every and step % config.remine_every == 0:
            self.remine(encode)
        return self._log()

    # ----------------------------------------------------------------- rules
    def _v1_check(self, encode: EncodeFn) -> None:
        ids = torch.tensor(sorted(self._pending), dtype=torch.int64)
        self._pending.clear()
        if self.config.v1_current == "encode":
            current = self._rescore(ids, encode)
            self.current[ids] = current
        else:
            current = self.current[ids]
        initial = self.s0[ids].mean(dim=1)
        replace = v1_should_replace(
            initial, current.mean(dim=1), self.config.v1_decay, self.config.v1_abs_cap
        )
        for sid in ids[replace].tolist():
            self._replace_slots(sid, list(range(self.n)))

    def _rescore(self, ids: torch.Tensor, encode: EncodeFn) -> torch.Tensor:
        """``cos(query, negative)`` of ``ids`` with the current model, sharded over ranks."""
        synced = _synced(self.group)
        rank, world = (
            (dist.get_rank(self.group), dist.get_world_size(self.group)) if synced else (0, 1)
        )
        mine = ids[rank::world]
        rows = torch.zeros((len(mine), self.n))
        batch = max(1, self.config.encode_batch // (self.n + 1))
        for start in range(0, len(mine), batch):
            part = mine[start : start + batch].tolist()
            queries = encode([self.records[s].query for s in part]).float().cpu()
            negs = encode([t for s in part for t in self.negatives([s])[0]]).float().cpu()
            negs = negs.reshape(len(part), self.n, -1)
            rows[start : start + len(part)] = torch.einsum("bd,bnd->bn", queries, negs)
        gathered_ids, gathered = _all_gather_rows(mine, rows, self.group)
        order = {int(s): i for i, s in enumerate(gathered_ids.tolist())}
        return gathered[[order[int(s)] for s in ids.tolist()]]

    def _replace_slots(self, sid: int, slots: list[int]) -> bool:
        drawn = self._draw(sid, len(slots))
        if drawn is None:
            self._since_log["blocked"] += 1
            return False
        for slot, cand in zip(slots, drawn, strict=True):
            self.assigned[sid, slot] = cand
            self.s0[sid, slot] = math.nan
            self.current[sid, slot] = math.nan
        self.replacements[sid] += 1
        self._since_log["replaced"] += len(slots)
        return True

    def _draw(self, sid: int, count: int) -> list[int] | None:
        """The next ``count`` pool candidates the sample does not hold; None if too few."""
        held = set(self.assigned[sid].tolist())
        drawn, position = self._next_candidates(
            self.pools[sid], int(self.pointer[sid]), held, count
        )
        if len(drawn) < count:
            return None
        self.pointer[sid] = position
        return drawn

    @staticmethod
    def _next_candidates(
        pool: list[int], position: int, held: set[int], count: int
    ) -> tuple[list[int], int]:
        drawn: list[int] = []
        while position < len(pool) and len(drawn) < count:
            cand = pool[position]
            position += 1
            if cand not in held and cand not in drawn:
                drawn.append(cand)
        return drawn, position

    @staticmethod
    def _merge_duplicates(
        ids: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        unique, inverse = torch.unique(ids, return_inverse=True)
        if len(unique) == len(ids):
            return ids, scores
        sums = torch.zeros((len(unique), scores.shape[1])).index_add_(0, inverse, scores)
        counts = torch.zeros(len(unique)).index_add_(0, inverse, torch.ones(len(ids)))
        return unique, sums / counts[:, None]

    def _log(self) -> dict[str, float]:
        since = self._since_log
        exhausted = int((self.pointer >= self._pool_lengths).sum())
        out = {
            "dhnm/replaced": float(since["replaced"]),
            "dhnm/blocked": float(since["blocked"]),
            "dhnm/pool_exhausted": exhausted / max(1, len(self.records)),
            "dhnm/replacements_total": float(self.replacements.sum()),
        }
        if since["score_count"]:
            out["dhnm/neg_score"] = since["score_sum"] / since["score_count"]
        self._since_log = {"replaced": 0, "blocked": 0, "score_sum": 0.0, "score_count": 0}
        return out

    # ----------------------------------------------------------------- ANCE-style re-mining
    def remine(self, encode: EncodeFn, window: tuple[int, int] | None = None) -> None:
        """Rebuild every pool with the current model; pointers restart at the new pools' head.

        With a ``group``, its first rank computes the pools and broadcasts them.
        """
        lengths = [len(p) for p in self.pools]
        size = max(lengths) if lengths else 0
        start, stop = window or (self.config.pool_offset, self.config.pool_offset + size)
        config = MiningConfig(
            range_min=start,
            range_max=stop,
            num_negatives=1,
            relative_margin=self.config.remine_relative_margin,
        )
        ids_out = torch.full((len(self.records), stop - start), -1, dtype=torch.int64)
        synced = _synced(self.group)
        if not synced or dist.get_rank(self.group) == 0:
            corpus_vecs = self._encode_all(encode, self.corpus)
            query_vecs = self._encode_all(encode, [r.query for r in self.records])
            scores = query_vecs @ corpus_vecs.T
            lookup = {t: i for i, t in enumerate(self.corpus)}
            k = min(len(self.corpus), stop + 1)
            top_scores, top_ids = torch.topk(scores, k=k, dim=1)
            excluded, positive_scores = [], np.empty(len(self.records), np.float32)
            for sid, record in enumerate(self.records):
                banned = {lookup[t] for t in (*record.pos, record.query) if t in lookup}
                excluded.append(banned)
                pos = self._encode_all(encode, record.pos)
                positive_scores[sid] = float((pos @ query_vecs[sid]).min())
            windows = select_candidates(
                top_scores.numpy(), top_ids.numpy(), excluded, positive_scores, config
            )
            for sid, window in enumerate(windows):
                ids_out[sid, : len(window)] = torch.tensor(
                    [c for c, _, _ in window], dtype=torch.int64
                )
        if synced:
            dist.broadcast(ids_out, src=dist.get_global_rank(self.group, 0), group=self.group)
        self._set_pools([[c for c in row if c >= 0] for row in ids_out.tolist()])
        self.pointer.zero_()
        self.pools_remined = True

    def _encode_all(self, encode: EncodeFn, texts: Sequence[str]) -> torch.Tensor:
        batch = self.config.encode_batch
        parts = [
            encode(list(texts[i : i + batch])).float().cpu() for i in range(0, len(texts), batch)
        ]
        return torch.cat(parts) if parts else torch.zeros((0, 1))


def build_dynamic_negatives(
    records: Sequence[RetrievalRecord],
    n: int,
    config: DHNMConfig,
    records_path: str | Path | None = None,
    *,
    rows: Sequence[int] | None = None,
) -> DynamicNegatives:
    """The trainer's factory: the pool file is ``config.pool_path`` or ``<records>.pool.jsonl``.
    When the task kept a subset of the file's records (``max_rows``), ``rows`` are their
    positions in the file, which pick their pools; without them each row's pool is found by its
    query (unambiguous only when no query repeats).

    ``config`` is the training config's ``dynamic_negatives`` section.
    """
    dhnm = config
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
        if len(rows) != len(records) or (rows and max(rows) >= len(pools)):
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
    return DynamicNegatives(records, n, pools, dhnm)
