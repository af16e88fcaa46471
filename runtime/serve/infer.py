"""``POST /v2/models/{name}[/versions/{v}]/infer`` as a bare ASGI app: the server's hot path.

Starlette routes to it (so 404/405 stay Starlette's), but it reads the body from ``receive`` and
answers with two ``send`` calls itself: no Request/Response objects, no per-request task. What a
batch-1 request costs beyond ONNX Runtime is measured in ``benchmarks/bench_serve.py``
(BENCHMARKS.md, serving section); this is what keeps that small.

Errors: a client's mistake is a 4xx with ``{"error": "<one line>"}`` (413 for a body over
``max_body_bytes``, 408 when the body is not in within ``request_timeout_s``, 503 when inference
is not done by then: the request is dropped from its batch if that has not started); a fault of
the server is a 500, logged with its traceback.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from typing import Any, Callable

import numpy as np

from taskfold.runtime.serve.models import VERSION, ServedModel
from taskfold.runtime.serve.protocol import InferRequest, ProtocolError, decode_request, encode_response

error_log = logging.getLogger("taskfold.serve")

# A JSON header above this many bytes is parsed off the event loop, so one large JSON request
# does not stall every other connection (binary requests have a small header).
_INLINE_JSON_BYTES = 1 << 16
_JSON = b"application/json"


class ClientGone(Exception):
    """The client closed the connection before its request body was in."""


def error_body(message: str) -> bytes:
    """``{"error": "<first line of message>"}``."""
    return json.dumps({"error": message.splitlines()[0] if message else "error"}).encode()


async def respond(send: Callable, status: int, body: bytes, content_type: bytes = _JSON,
                  headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class InferEndpoint:
    """The infer endpoint; ``lookup(name, version)`` finds the model (ProtocolError 404 if none)."""

    def __init__(self, lookup: Callable[[str, str | None], ServedModel], *,
                 max_body_bytes: int, request_timeout_s: float) -> None:
        self.lookup = lookup
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        start = time.perf_counter()
        params = scope["path_params"]
        try:
            model = self.lookup(params["model"], params.get("version"))
        except ProtocolError as exc:
            await respond(send, exc.status, error_body(str(exc)))
            return
        try:
            status, body, headers = await self._infer(model, scope, receive, start)
        except ClientGone:
            return
        except Exception:  # noqa: BLE001 - a fault of the server, not of the request
            error_log.exception("inference failed for model %r", model.name)
            model.metrics.failed(500)
            await respond(send, 500, error_body("internal server error during inference; see the server log"))
            return
        if status != 200:
            model.metrics.failed(status)
            await respond(send, status, body)
            return
        await respond(send, 200, body, *headers)

    async def _infer(self, model: ServedModel, scope: dict[str, Any], receive: Callable,
                     start: float) -> tuple[int, bytes, tuple]:
        """(status, body, (content type, extra headers)) of the answer."""
        headers = dict(scope["headers"])
        reading = True
        try:
            with model.arriving():  # from here until queued, a batch may wait for this request
                body = await asyncio.wait_for(self._read_body(headers, receive), self.request_timeout_s)
                reading = False
                decoded = await self._decode(headers, body)
                images, tasks = model.prepare(decoded)
                pending = model.enqueue(images, tasks)
            by_task = await asyncio.wait_for(pending, self._left(start))
            response, header_length = await self._encode(model, decoded, model.outputs(by_task, tasks), start)
        except ProtocolError as exc:
            return exc.status, error_body(str(exc)), ()
        except asyncio.TimeoutError:
            if reading:
                return 408, error_body(f"the request body did not arrive within {self.request_timeout_s:g} s "
                                       "(--request-timeout)"), ()
            return 503, error_body(f"inference did not finish within {self.request_timeout_s:g} s "
                                   "(--request-timeout)"), ()
        model.metrics.succeeded(time.perf_counter() - start, len(images))
        if header_length is None:
            return 200, response, (_JSON,)
        return 200, response, (b"application/octet-stream",
                               ((b"inference-header-content-length", str(header_length).encode()),))

    def _left(self, start: float) -> float:
        """Seconds left of this request's ``--request-timeout``."""
        return self.request_timeout_s - (time.perf_counter() - start)

    async def _read_body(self, headers: dict[bytes, bytes], receive: Callable) -> bytes:
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ProtocolError(f"request body of {int(declared)} bytes is over the limit of "
                                f"{self.max_body_bytes} (--max-body-bytes)", status=413)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ProtocolError(f"request body is over the limit of {self.max_body_bytes} bytes "
                                    "(--max-body-bytes)", status=413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _decode(self, headers: dict[bytes, bytes], body: bytes) -> InferRequest:
        raw = headers.get(b"inference-header-content-length")
        header_length = None if raw is None else raw.decode("latin-1")
        json_bytes = len(body) if raw is None else (int(raw) if raw.isdigit() else 0)
        if json_bytes > _INLINE_JSON_BYTES:
            return await asyncio.get_running_loop().run_in_executor(None, decode_request, body, header_length)
        return decode_request(body, header_length)

    async def _encode(self, model: ServedModel, decoded: InferRequest, outputs: dict[str, np.ndarray],
                      start: float) -> tuple[bytes, int | None]:
        """The response body and its JSON header's length (None: all JSON)."""
        encode = functools.partial(encode_response, model.name, VERSION, decoded, outputs)
        if all(decoded.wants_binary(name) for name in outputs):
            return encode()
        # JSON numbers for whole output maps: many milliseconds of CPU, off the loop
        return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, encode), self._left(start))
