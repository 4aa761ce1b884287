"""Dynamic micro-batching: concurrent requests share one forward pass.

Why: one request of a few sentences leaves most of a forward pass idle (per-call overhead,
small matrix products). Joining the requests that arrive together into one length-sorted batch
raises throughput under load without making a lone request wait.

How: requests are queued as :class:`_Job` (token ids + a future). One worker task takes the
first queued job, waits at most ``max_wait_ms`` for company, then drains the queue up to
``max_batch_inputs`` rows. Jobs are grouped by prompt length (pooling that excludes the prompt
needs one value per batch), run in a single inference thread (the model is not re-entrant and
the CPU is the bottleneck anyway), and each job's future gets exactly its own rows back, in
its own order. While a batch runs, new requests pile up and form the next batch: continuous
batching with no fixed tick.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from conan_embedding.encoding.engine import EmbeddingEngine


@dataclass
class _Job:
    ids: list[list[int]]
    prompt_length: int | None
    future: asyncio.Future = field(repr=False)


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    jobs: int = 0


class MicroBatcher:
    """Queue of tokenised requests served by one inference thread in joined batches."""

    def __init__(
        self, engine: EmbeddingEngine, *, max_batch_inputs: int = 256, max_wait_ms: float = 2.0
    ):
        if max_batch_inputs <= 0:
            raise ValueError("max_batch_inputs must be positive")
        self.engine = engine
        self.max_batch_inputs = max_batch_inputs
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conan-infer")

    async def start(self) -> None:
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run(), name="conan-micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        self._executor.shutdown(wait=True)

    async def embed(self, ids: Sequence[Sequence[int]], prompt_length: int | None) -> np.ndarray:
        """Full-width embeddings of one request's rows (possibly batched with other requests)."""
        if self._queue is None:
            await self.start()
        assert self._queue is not None
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job([list(r) for r in ids], prompt_length, future))
        return await future

    async def _collect(self) -> list[_Job]:
        assert self._queue is not None
        jobs = [await self._queue.get()]
        rows = len(jobs[0].ids)
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while rows < self.max_batch_inputs:
            if self._queue.empty():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                job = self._queue.get_nowait()
            jobs.append(job)
            rows += len(job.ids)
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            live = [job for job in jobs if not job.future.cancelled()]
            groups: dict[int | None, list[_Job]] = {}
            for job in live:
                groups.setdefault(job.prompt_length, []).append(job)
            for prompt_length, group in groups.items():
                rows = [row for job in group for row in job.ids]
                try:
                    vectors = await loop.run_in_executor(
                        self._executor, self.engine.embed_ids, rows, prompt_length
                    )
                except Exception as err:  # every caller of the batch learns of the failure
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(err)
                    continue
                self.stats.batches += 1
                self.stats.rows += len(rows)
                self.stats.jobs += len(group)
                self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
                start = 0
                for job in group:
                    if not job.future.done():
                        job.future.set_result(vectors[start : start + len(job.ids)])
                    start += len(job.ids)
