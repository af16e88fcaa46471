"""The dynamic batcher on its own (a real event loop and executor thread, no HTTP): when a batch
starts and why, which rows each request gets back, and requests that gave up. What is checked is
the record of every ONNX Runtime-sized call (rows, requests, reason), never a duration."""
from __future__ import annotations

import asyncio
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable

import numpy as np

from taskfold.runtime.serve.batching import FULL, MAX_DELAY, NONE_ARRIVING, BatchRecord, DynamicBatcher

HOUR_S = 3600.0  # a queue delay no test could sit out: a batch that waited for it would hang the test


def _rows(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32).reshape(n, 1)


class Harness:
    """A batcher over ``run = {"y": 10 * x}`` whose calls can be held until released."""

    def __init__(self, *, max_batch: int, max_delay_s: float, arriving: bool = False) -> None:
        self.records: list[BatchRecord] = []
        self.calls: list[int] = []  # rows per call, in the executor thread
        self.arriving = arriving
        self.gate = threading.Event()
        self.gate.set()
        self.executor = ThreadPoolExecutor(1)
        self.batcher = DynamicBatcher(self._run, self.executor, max_batch=max_batch, max_delay_s=max_delay_s,
                                      arriving=lambda: self.arriving, on_batch=self.records.append)

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.gate.wait(timeout=60)
        self.calls.append(len(x))
        return {"y": 10 * x}

    def reasons(self) -> list[str]:
        return [record.reason for record in self.records]


def in_event_loop(test: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """Runs the async test in a fresh event loop (a minute at most: a batch that waits forever fails)."""
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(asyncio.wait_for(test(), 60))

    return run


@in_event_loop
async def test_a_lone_request_starts_at_once_whatever_the_queue_delay():
    h = Harness(max_batch=8, max_delay_s=HOUR_S)
    for start in (0, 5):  # one after the other: never two in the queue
        out = await h.batcher.enqueue(_rows(start, 2))
        np.testing.assert_array_equal(out["y"], 10 * _rows(start, 2))
    assert h.reasons() == [NONE_ARRIVING, NONE_ARRIVING] and h.calls == [2, 2]


@in_event_loop
async def test_a_batch_waits_for_arriving_requests_and_starts_when_full():
    h = Harness(max_batch=4, max_delay_s=HOUR_S, arriving=True)
    first = h.batcher.enqueue(_rows(0, 1))
    second = h.batcher.enqueue(_rows(1, 2))
    await asyncio.sleep(0.01)
    assert not first.done() and h.calls == []  # still waiting: more are arriving, not full
    third = h.batcher.enqueue(_rows(3, 1))  # 4 rows: full
    outs = await asyncio.gather(first, second, third)
    for out, (start, n) in zip(outs, [(0, 1), (1, 2), (3, 1)]):
        np.testing.assert_array_equal(out["y"], 10 * _rows(start, n))  # each gets its own rows
    assert h.calls == [4] and h.reasons() == [FULL] and h.records[0].requests == 3


@in_event_loop
async def test_a_waiting_batch_starts_when_nothing_more_is_arriving():
    h = Harness(max_batch=8, max_delay_s=HOUR_S, arriving=True)
    pending = [h.batcher.enqueue(_rows(i, 1)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert h.calls == []
    h.arriving = False  # the server saw the last arriving request queued or refused
    h.batcher.wake()
    await asyncio.gather(*pending)
    assert h.calls == [3] and h.reasons() == [NONE_ARRIVING]


@in_event_loop
async def test_the_queue_delay_bounds_the_wait_and_zero_means_no_wait():
    h = Harness(max_batch=8, max_delay_s=0.001, arriving=True)  # arriving forever: only the delay ends it
    await asyncio.gather(*(h.batcher.enqueue(_rows(i, 1)) for i in range(2)))
    assert h.calls == [2] and h.reasons() == [MAX_DELAY]
    h0 = Harness(max_batch=8, max_delay_s=0.0, arriving=True)
    await h0.batcher.enqueue(_rows(0, 1))
    assert h0.reasons() == [MAX_DELAY]


@in_event_loop
async def test_requests_queue_while_a_call_runs_and_full_batches_are_handed_over_early():
    h = Harness(max_batch=2, max_delay_s=0.0)
    h.gate.clear()  # hold the first call in the executor
    pending = [h.batcher.enqueue(_rows(0, 1))]
    await asyncio.sleep(0.01)
    pending += [h.batcher.enqueue(_rows(i, 1)) for i in range(1, 6)]
    # With the event loop blocked from here on, the executor can only go on to a second call
    # if the full batch was handed to it while the first one ran.
    h.gate.set()
    deadline = time.monotonic() + 30
    while len(h.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert h.calls[:2] == [1, 2]
    await asyncio.gather(*pending)
    # 1 alone, then the 5 queued meanwhile in calls of at most 2 rows, in order.
    assert h.calls == [1, 2, 2, 1] and [r.rows for r in h.records] == h.calls
    assert h.reasons() == [NONE_ARRIVING, FULL, FULL, NONE_ARRIVING]
    for i, future in enumerate(pending):
        np.testing.assert_array_equal(future.result()["y"], 10 * _rows(i, 1))


@in_event_loop
async def test_a_request_whose_caller_gave_up_is_left_out_and_a_failure_reaches_every_request():
    h = Harness(max_batch=4, max_delay_s=HOUR_S, arriving=True)
    gone = h.batcher.enqueue(_rows(0, 1))
    kept = h.batcher.enqueue(_rows(1, 1))
    gone.cancel()
    h.arriving = False
    h.batcher.wake()
    np.testing.assert_array_equal((await kept)["y"], 10 * _rows(1, 1))
    assert h.calls == [1]

    def broken(x: np.ndarray) -> dict[str, np.ndarray]:
        raise RuntimeError("ORT failed")

    bad = DynamicBatcher(broken, h.executor, max_batch=2, max_delay_s=HOUR_S, arriving=lambda: True)
    results = await asyncio.gather(bad.enqueue(_rows(0, 1)), bad.enqueue(_rows(1, 1)), return_exceptions=True)
    assert [str(r) for r in results] == ["ORT failed", "ORT failed"]
