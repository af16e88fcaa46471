"""Dynamic batching: concurrent requests for the same model and outputs become one ONNX Runtime call.

A batcher collects requests until it holds ``max_batch`` rows or the oldest has waited
``max_delay_s`` (Triton's ``max_queue_delay_microseconds``), runs them as one batch in the model's
executor thread (ONNX Runtime releases the GIL, so the event loop keeps accepting requests
meanwhile) and hands each request its own rows back. While a batch runs, new requests queue up
and form the next batch, so under load batches grow even with a zero delay. A request whose
caller gave up (timeout, disconnect) before its batch started is left out of it.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable

import numpy as np

RunBatch = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future
    queued_at: float


class DynamicBatcher:
    """Merges submitted image batches into calls of ``run`` of at most ``max_batch`` rows.

    A single submission larger than ``max_batch`` runs on its own, unsplit. ``on_batch(rows)``
    is called on the event loop after each call (for the batch-size histogram).
    """

    def __init__(self, run: RunBatch, executor: Executor, *, max_batch: int, max_delay_s: float,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1 or max_delay_s < 0:
            raise ValueError(f"need max_batch >= 1 and max_delay_s >= 0, got {max_batch}, {max_delay_s}")
        self._run = run
        self._executor = executor
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._on_batch = on_batch
        self._pending: deque[_Pending] = deque()
        self._rows = 0
        self._has_work: asyncio.Event | None = None
        self._full: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The outputs for ``images`` (its own rows of the batch it ran in)."""
        loop = asyncio.get_running_loop()
        if self._worker is None:  # made in the serving loop on first use
            self._has_work, self._full = asyncio.Event(), asyncio.Event()
            self._worker = loop.create_task(self._serve())
        item = _Pending(images, loop.create_future(), time.monotonic())
        self._pending.append(item)
        self._rows += len(images)
        self._has_work.set()
        if self._rows >= self.max_batch:
            self._full.set()
        return await item.future

    async def close(self) -> None:
        """Stop the batching task; requests still queued are cancelled."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for item in self._pending:
            item.future.cancel()

    async def _serve(self) -> None:
        assert self._has_work is not None and self._full is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._has_work.wait()
            if self.max_delay_s > 0 and self._rows < self.max_batch and self._pending:
                wait = self._pending[0].queued_at + self.max_delay_s - time.monotonic()
                if wait > 0:
                    try:
                        await asyncio.wait_for(self._full.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
            batch = self._take()
            if not batch:
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self._run_split, [b.images for b in batch])
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            if self._on_batch is not None:
                self._on_batch(sum(len(b.images) for b in batch))
            for item, result in zip(batch, outputs):
                if not item.future.done():
                    item.future.set_result(result)

    def _take(self) -> list[_Pending]:
        """Queued requests for one call: at least one, then as many as fit in ``max_batch`` rows."""
        batch: list[_Pending] = []
        rows = 0
        while self._pending:
            item = self._pending[0]
            if item.future.done():  # its caller gave up while it waited
                self._pending.popleft()
                self._rows -= len(item.images)
                continue
            if batch and rows + len(item.images) > self.max_batch:
                break
            self._pending.popleft()
            self._rows -= len(item.images)
            batch.append(item)
            rows += len(item.images)
        if not self._pending:
            self._has_work.clear()
        if self._rows < self.max_batch:
            self._full.clear()
        return batch

    def _run_split(self, parts: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Runs in the executor: one call over the concatenated parts, outputs cut back per part."""
        if len(parts) == 1:
            return [self._run(parts[0])]
        outputs = self._run(np.concatenate(parts))
        results, start = [], 0
        for part in parts:
            stop = start + len(part)
            results.append({name: value[start:stop] for name, value in outputs.items()})
            start = stop
        return results
