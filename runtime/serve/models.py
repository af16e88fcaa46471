"""A bundle as the v2 protocol sees it: metadata, request checks, and one batcher per output set.

Output names are the graph's outputs (the manifest's ``tasks[].output``); a request that names
some of them runs the predictor with ``tasks=`` those tasks, i.e. a pruned graph computing only
them. Requests for different output sets are batched separately (merging them would make every
request pay for the union). Each model has one executor thread: one ONNX Runtime call at a
time, which uses every intra-op thread, while the next batch forms on the event loop. The model
counts the requests it is receiving (read, decoded, not yet queued): its batchers wait for
those, and only those, to fill a batch.
"""
from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np

from taskfold.runtime.errors import InputError
from taskfold.runtime.inputs import check_images
from taskfold.runtime.predictor import Predictor
from taskfold.runtime.serve.batching import DynamicBatcher
from taskfold.runtime.serve.metrics import ModelMetrics
from taskfold.runtime.serve.protocol import InferRequest, ProtocolError, datatype_of

VERSION = "1"
PLATFORM = "onnxruntime_onnx"


class ServedModel:
    """One loaded bundle behind the server, under its manifest ``name``, version ``1``."""

    def __init__(self, predictor: Predictor, *, max_batch: int, max_delay_s: float) -> None:
        self.predictor = predictor
        self.name: str = predictor.manifest["name"]
        self.spec = predictor.input_spec
        self.datatype = datatype_of(self.spec.get("dtype", "float32"))
        self.output_tasks = {task["output"]: task["name"] for task in predictor.tasks}
        self._task_outputs = {name: output for output, name in self.output_tasks.items()}
        self.metrics = ModelMetrics()
        self._max_batch, self._max_delay_s = max_batch, max_delay_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{self.name}")
        self._batchers: dict[tuple[str, ...] | None, DynamicBatcher] = {}
        self._arriving = 0

    def metadata(self) -> dict[str, Any]:
        """The v2 model metadata: inputs and outputs with name, datatype and shape (-1 = any)."""
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": PLATFORM,
            "inputs": [{"name": self.spec["name"], "datatype": self.datatype, "shape": list(self.spec["shape"])}],
            "outputs": [{"name": task["output"], "datatype": datatype_of(task.get("dtype", "float32")),
                         "shape": list(task["shape"])} for task in self.predictor.tasks],
        }

    def check_version(self, version: str | None) -> None:
        if version is not None and version != VERSION:
            raise ProtocolError(f"model {self.name!r} has no version {version!r} (versions: {VERSION})", status=404)

    def prepare(self, request: InferRequest) -> tuple[np.ndarray, tuple[str, ...] | None]:
        """The image batch and the tasks to run (None: all), after checking the request against the model."""
        want = self.spec["name"]
        names = [tensor.name for tensor in request.inputs]
        if names != [want]:
            raise ProtocolError(f"model {self.name!r} takes one input {want!r}, got {', '.join(map(repr, names))}")
        tensor = request.inputs[0]
        if tensor.datatype != self.datatype:
            raise ProtocolError(f"input {want!r}: datatype {tensor.datatype} does not match the model's {self.datatype}")
        try:  # non-finite values are checked below, with a message for HTTP clients (one scan)
            images = check_images(tensor.array, self.spec, allow_nonfinite=True)
        except InputError as exc:
            raise ProtocolError(f"input {want!r}: {exc}") from None
        if not np.isfinite(images).all():
            bad = int(np.count_nonzero(~np.isfinite(images)))
            raise ProtocolError(f"input {want!r}: holds {bad} NaN/inf value(s)")
        if request.outputs is None:
            return images, None
        unknown = [name for name in request.outputs if name not in self.output_tasks]
        if unknown:
            raise ProtocolError(f"model {self.name!r} has no output(s) {', '.join(map(repr, unknown))}; "
                                f"it has {', '.join(self.output_tasks)}")
        return images, tuple(self.output_tasks[name] for name in request.outputs)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Counts a request from "received" until it is enqueued (or refused): a batch that is not
        full waits for such requests (up to the queue delay), never for requests not yet sent."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            for batcher in self._batchers.values():
                batcher.wake()

    def enqueue(self, images: np.ndarray, tasks: tuple[str, ...] | None) -> asyncio.Future:
        """Queue ``images`` with concurrent requests for the same tasks; the future gets
        ``{task name: array}`` for them (:meth:`outputs` names them by output)."""
        key = None if tasks is None or len(tasks) == len(self.output_tasks) else tuple(sorted(tasks))
        batcher = self._batchers.get(key)
        if batcher is None:
            run_tasks = None if key is None else list(key)
            # prepare() refused non-finite inputs already; the predictor need not scan them again.
            batcher = DynamicBatcher(lambda x: self.predictor(x, tasks=run_tasks, allow_nonfinite=True), self._executor,
                                     max_batch=self._max_batch, max_delay_s=self._max_delay_s,
                                     arriving=lambda: self._arriving > 0, on_batch=self.metrics.executed)
            self._batchers[key] = batcher
        return batcher.enqueue(images)

    def outputs(self, by_task: dict[str, np.ndarray], tasks: tuple[str, ...] | None) -> dict[str, np.ndarray]:
        """``{output name: array}`` in the order asked (every output when ``tasks`` is None)."""
        return {self._task_outputs[name]: by_task[name] for name in tasks or self._task_outputs}

    def warm_up(self) -> None:
        """One call on zeros, so the first request does not pay for ONNX Runtime's first-run set-up."""
        shape = [1 if d is None or d < 0 else d for d in self.spec["shape"]]
        self.predictor(np.zeros(shape, dtype=self.spec.get("dtype", "float32")))

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
        self._executor.shutdown(wait=True)
