"""The HTTP endpoints of the v2 protocol as a Starlette app (imported only by ``taskfold serve``).

Every answer to a client's mistake is a 4xx with ``{"error": "<one line>"}``; a 500 means a fault
of the server, logged with its traceback. The infer endpoint, the one that must be fast, is a bare
ASGI app (:mod:`taskfold.runtime.serve.infer`) behind Starlette's router. One access-log line per
request, with its latency, goes to the ``taskfold.serve.access`` logger at INFO.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import time
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from taskfold.runtime.serve.infer import InferEndpoint, error_body
from taskfold.runtime.serve.metrics import CONTENT_TYPE, render
from taskfold.runtime.serve.models import VERSION, ServedModel
from taskfold.runtime.serve.protocol import ProtocolError

access_log = logging.getLogger("taskfold.serve.access")


def _error(status: int, message: str) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json")


def _server_version() -> str:
    try:
        return importlib.metadata.version("taskfold")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class InferenceServer:
    """The endpoints over a set of served models; ``app`` is the ASGI application."""

    def __init__(self, models: list[ServedModel], *, max_body_bytes: int, request_timeout_s: float) -> None:
        self.models = {model.name: model for model in models}
        self.version = _server_version()
        infer = InferEndpoint(self._lookup, max_body_bytes=max_body_bytes,
                              request_timeout_s=request_timeout_s)
        routes = [
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/models/{model}", self.model_metadata, methods=["GET"]),
            Route("/v2/models/{model}/versions/{version}", self.model_metadata, methods=["GET"]),
            Route("/v2/models/{model}/ready", self.model_ready, methods=["GET"]),
            Route("/v2/models/{model}/versions/{version}/ready", self.model_ready, methods=["GET"]),
            Route("/v2/models/{model}/infer", infer, methods=["POST"]),
            Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
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

    def _lookup(self, name: str, version: str | None) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise ProtocolError(f"unknown model {name!r}; this server has {', '.join(self.models)}", status=404)
        model.check_version(version)
        return model

    def _model(self, request: Request) -> ServedModel:
        return self._lookup(request.path_params["model"], request.path_params.get("version"))

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
