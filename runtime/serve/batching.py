"""Dynamic batching: concurrent requests for the same model and outputs become one ONNX Runtime call.

A batcher holds queued requests while its model's executor thread is busy and starts the next
call as soon as that thread is free, with as many queued rows as fit in ``max_batch``. A batch
that is not full waits for more only while other requests for the model are *arriving*
(received by the server, still being read or decoded: they can join within microseconds), and
at most ``max_delay_s`` after its oldest request was queued (Triton's
``max_queue_delay_microseconds``). A lone request therefore starts at once: waiting for requests
that do not exist yet would add the whole delay to its latency. Under load batches grow anyway,
because requests queue up while the previous batch runs.

The batch runs in the executor thread (ONNX Runtime releases the GIL, so the event loop keeps
serving meanwhile), which hands the results straight back to the loop with
``call_soon_threadsafe``: no task switch between "results ready" and "each request has its rows".
A request whose caller gave up (timeout, disconnect) before its batch started is left out of it.
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

# Why a batch started (the ``reason`` label of taskfold_batch_dispatch_total).
FULL = "full"  # it holds max_batch rows
NONE_ARRIVING = "none_arriving"  # not full, but no other request for the model is on its way
MAX_DELAY = "max_delay"  # not full, and its oldest request has waited max_queue_delay


@dataclass(frozen=True)
class BatchRecord:
    """One ONNX Runtime call as the metrics see it."""

    rows: int
    requests: int
    reason: str
    queued_s: float  # summed over its requests: time from queued to the call starting
    compute_s: float  # the call itself, in the executor thread


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future
    queued_at: float


class DynamicBatcher:
    """Merges enqueued image batches into calls of ``run`` of at most ``max_batch`` rows.

    ``arriving()`` says whether other requests that may join are on their way (the server counts
    requests between "received" and "enqueued"); call :meth:`wake` when that count drops, so a
    batch that waited for them starts. A single submission larger than ``max_batch`` runs on its
    own, unsplit. ``on_batch(record)`` is called on the event loop after each call.
    """

    def __init__(self, run: RunBatch, executor: Executor, *, max_batch: int, max_delay_s: float,
                 arriving: Callable[[], bool] = lambda: False,
                 on_batch: Callable[[BatchRecord], None] | None = None) -> None:
        if max_batch < 1 or max_delay_s < 0:
            raise ValueError(f"need max_batch >= 1 and max_delay_s >= 0, got {max_batch}, {max_delay_s}")
        self._run = run
        self._executor = executor
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._arriving = arriving
        self._on_batch = on_batch
        self._pending: deque[_Pending] = deque()
        self._rows = 0
        self._in_executor = 0  # batches handed to the executor and not finished: at most 2
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def enqueue(self, images: np.ndarray) -> asyncio.Future:
        """Queue ``images``; the future gets their own rows of the outputs of the call they run in.

        Must be called on the event loop. Cancelling the future before its batch starts takes the
        images out of the batch.
        """
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        item = _Pending(images, self._loop.create_future(), time.monotonic())
        self._pending.append(item)
        self._rows += len(images)
        self._dispatch()
        return item.future

    def wake(self) -> None:
        """Re-check a waiting batch: the requests it waited for may have stopped arriving."""
        if self._pending and not self._in_executor:
            self._dispatch()

    async def close(self) -> None:
        """Stop batching; requests still queued are cancelled (a call under way finishes)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            self._pending.popleft().future.cancel()
        self._rows = 0

    def _dispatch(self, *, delay_over: bool = False) -> None:
        """Start a call if the executor is free and the queue should not wait any longer.

        A full batch is also handed over while one call runs, so the executor thread goes
        straight on to it: no round trip through the event loop between two calls under load.
        """
        if not self._pending or self._in_executor >= 2:
            return
        if self._rows >= self.max_batch:
            reason = FULL
        elif self._in_executor:
            return
        elif not self._arriving():
            reason = NONE_ARRIVING
        elif delay_over or self.max_delay_s == 0:
            reason = MAX_DELAY
        else:
            left = self._pending[0].queued_at + self.max_delay_s - time.monotonic()
            if left > 0:
                if self._timer is None:
                    self._timer = self._loop.call_later(left, self._delay_over)
                return
            reason = MAX_DELAY
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self._take()
        if batch:
            self._start(batch, reason)

    def _delay_over(self) -> None:
        self._timer = None
        self._dispatch(delay_over=True)

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
        return batch

    def _start(self, batch: list[_Pending], reason: str) -> None:
        """Run ``batch`` in the executor; its results come back through :meth:`_finished`."""
        loop, started = self._loop, time.monotonic()
        parts = [item.images for item in batch]
        queued_s = sum(started - item.queued_at for item in batch)

        def work() -> None:  # in the executor thread
            begin = time.perf_counter()
            try:
                results, error = self._run_split(parts), None
            except Exception as exc:  # noqa: BLE001 - every request of the batch gets the failure
                results, error = None, exc
            record = BatchRecord(sum(len(p) for p in parts), len(parts), reason, queued_s,
                                 time.perf_counter() - begin)
            try:
                loop.call_soon_threadsafe(self._finished, batch, results, error, record)
            except RuntimeError:  # the loop closed while the call ran: nobody is waiting any more
                pass

        self._in_executor += 1
        try:
            self._executor.submit(work)
        except RuntimeError as exc:  # the executor was shut down (server stopping)
            self._in_executor -= 1
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)

    def _finished(self, batch: list[_Pending], results: list[dict[str, np.ndarray]] | None,
                  error: Exception | None, record: BatchRecord) -> None:
        self._in_executor -= 1
        for index, item in enumerate(batch):
            if item.future.done():
                continue
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(results[index])
        if error is None and self._on_batch is not None:
            self._on_batch(record)
        self._dispatch()

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
