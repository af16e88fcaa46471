"""The HTTP endpoints of the v2 protocol as a Starlette app (imported only by ``taskfold serve``).

Every answer to a client's mistake is a 4xx with ``{"error": "<one line>"}``; a 500 means a fault
of the server, logged with its traceback. Request bodies are read up to ``max_body_bytes`` (413
beyond), and reading plus inference must finish within ``request_timeout_s`` (408 while the body
is still arriving, 503 once inference was under way: the request is dropped from its batch if
that has not started). One access-log line per request, with its
latency, goes to the ``taskfold.serve.access`` logger at INFO.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import logging
import time
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from taskfold.runtime.serve.metrics import CONTENT_TYPE, render
from taskfold.runtime.serve.models import VERSION, ServedModel
from taskfold.runtime.serve.protocol import HEADER_LENGTH, ProtocolError, decode_request, encode_response

access_log = logging.getLogger("taskfold.serve.access")
error_log = logging.getLogger("taskfold.serve")

# A JSON header above this many bytes is parsed off the event loop, so one large JSON request
# does not stall every other connection (binary requests have a small header).
_INLINE_JSON_BYTES = 1 << 16


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message.splitlines()[0] if message else "error"}, status_code=status)


def _server_version() -> str:
    try:
        return importlib.metadata.version("taskfold")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class InferenceServer:
    """The endpoints over a set of served models; ``app`` is the ASGI application."""

    def __init__(self, models: list[ServedModel], *, max_body_bytes: int, request_timeout_s: float) -> None:
        self.models = {model.name: model for model in models}
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.version = _server_version()
        routes = [
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/models/{model}", self.model_metadata, methods=["GET"]),
            Route("/v2/models/{model}/versions/{version}", self.model_metadata, methods=["GET"]),
            Route("/v2/models/{model}/ready", self.model_ready, methods=["GET"]),
            Route("/v2/models/{model}/versions/{version}/ready", self.model_ready, methods=["GET"]),
            Route("/v2/models/{model}/infer", self.infer, methods=["POST"]),
            Route("/v2/models/{model}/versions/{version}/infer", self.infer, methods=["POST"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        starlette = Starlette(routes=routes, lifespan=self._lifespan,
                              exception_handlers={HTTPException: self._http_error, Exception: self._internal_error})
        self.app = AccessLog(starlette)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette):
        yield
        for model in self.models.values():
            await model.close()

    # -- errors ------------------------------------------------------------------------------
    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return _error(404, f"no endpoint {request.url.path}")
        if exc.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path}")
        return _error(exc.status_code, str(exc.detail))

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        return _error(500, f"internal server error ({type(exc).__name__}); see the server log")

    def _model(self, request: Request) -> ServedModel:
        name = request.path_params["model"]
        model = self.models.get(name)
        if model is None:
            raise ProtocolError(f"unknown model {name!r}; this server has {', '.join(self.models)}", status=404)
        model.check_version(request.path_params.get("version"))
        return model

    # -- endpoints ---------------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        return Response(status_code=200)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "taskfold", "version": self.version, "extensions": ["binary_tensor_data"]})

    async def model_metadata(self, request: Request) -> Response:
        try:
            return JSONResponse(self._model(request).metadata())
        except ProtocolError as exc:
            return _error(exc.status, str(exc))

    async def model_ready(self, request: Request) -> Response:
        try:
            self._model(request)
        except ProtocolError as exc:
            return _error(exc.status, str(exc))
        return Response(status_code=200)

    async def metrics(self, request: Request) -> Response:
        text = render({name: model.metrics for name, model in self.models.items()}, VERSION)
        return Response(text, media_type=CONTENT_TYPE)

    async def infer(self, request: Request) -> Response:
        start = time.perf_counter()
        try:
            model = self._model(request)
        except ProtocolError as exc:
            return _error(exc.status, str(exc))
        try:
            body = await asyncio.wait_for(self._read_body(request), self.request_timeout_s)
        except ProtocolError as exc:
            model.metrics.failed(exc.status)
            return _error(exc.status, str(exc))
        except asyncio.TimeoutError:
            model.metrics.failed(408)
            return _error(408, f"the request body did not arrive within {self.request_timeout_s:g} s "
                               "(--request-timeout)")
        left = self.request_timeout_s - (time.perf_counter() - start)
        try:
            response, header_length, images = await asyncio.wait_for(self._infer(model, request, body), left)
        except ProtocolError as exc:
            model.metrics.failed(exc.status)
            return _error(exc.status, str(exc))
        except asyncio.TimeoutError:
            model.metrics.failed(503)
            return _error(503, f"inference did not finish within {self.request_timeout_s:g} s (--request-timeout)")
        except Exception:  # noqa: BLE001 - a fault of the server, not of the request
            error_log.exception("inference failed for model %r", model.name)
            model.metrics.failed(500)
            return _error(500, "internal server error during inference; see the server log")
        model.metrics.succeeded(time.perf_counter() - start, images)
        if header_length is None:
            return Response(response, media_type="application/json")
        return Response(response, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_length)})

    async def _infer(self, model: ServedModel, request: Request, body: bytes) -> tuple[bytes, int | None, int]:
        """Decode, check, infer (batched), encode: the response body, its JSON length, the images."""
        loop = asyncio.get_running_loop()
        header_length = request.headers.get(HEADER_LENGTH)
        json_bytes = len(body) if header_length is None else _int_or_zero(header_length)
        if json_bytes > _INLINE_JSON_BYTES:
            decoded = await loop.run_in_executor(None, decode_request, body, header_length)
        else:
            decoded = decode_request(body, header_length)
        images, tasks = model.prepare(decoded)
        outputs = await model.infer(images, tasks)
        encode = functools.partial(encode_response, model.name, VERSION, decoded, outputs)
        if all(decoded.wants_binary(name) for name in outputs):
            response, length = encode()
        else:  # JSON numbers for whole output maps: many milliseconds of CPU, off the loop
            response, length = await loop.run_in_executor(None, encode)
        return response, length, len(images)

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ProtocolError(f"request body of {int(declared)} bytes is over the limit of "
                                f"{self.max_body_bytes} (--max-body-bytes)", status=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ProtocolError(f"request body is over the limit of {self.max_body_bytes} bytes "
                                    "(--max-body-bytes)", status=413)
            chunks.append(chunk)
        return b"".join(chunks)


def _int_or_zero(text: str) -> int:
    return int(text) if text.isdigit() else 0


class AccessLog:
    """ASGI wrapper: one line per request (client, method, path, status, milliseconds) at INFO."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not access_log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            client = scope.get("client") or ("-", 0)
            access_log.info('%s:%s "%s %s HTTP/%s" %d %.2f ms', client[0], client[1], scope["method"],
                            scope["path"], scope.get("http_version", "1.1"), status,
                            (time.perf_counter() - start) * 1e3)
