"""``serve(options)``: load and check every bundle, bind the socket, run uvicorn until SIGTERM.

Everything a user can get wrong (a tampered bundle, two bundles with one name, a port in use,
a bad option) is found before the first request: the bundles are loaded, hash-checked and run
once in this process, and the socket is bound here, so each failure is one line and exit 2.
SIGTERM or SIGINT stops accepting connections, lets requests in flight finish (at most
``request_timeout_s``) and returns normally. With ``workers > 1`` uvicorn's supervisor starts
that many processes on the one socket, each loading the bundles itself, with the CPUs split
between them (``threads``).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from taskfold.runtime.backend_ort import available_cpus
from taskfold.runtime.extras import require_extra
from taskfold.runtime.predictor import load
from taskfold.runtime.serve.models import ServedModel

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# The event loop thread holds the GIL while it serves; the ONNX Runtime thread needs it for the
# Python around each call. At CPython's default switch interval (5 ms) it can wait that long for
# it, every call: 3-6 ms idle between calls under 32 clients (BENCHMARKS.md, serving). 0.2 ms
# bounds that wait; the loop thread pays a few more GIL hand-overs.
GIL_SWITCH_INTERVAL_S = 2e-4


class ServeError(ValueError):
    """Serving cannot start as asked (bad option, duplicate model name, address in use)."""


@dataclass(frozen=True)
class ServeOptions:
    """What ``taskfold serve`` was asked for (picklable: worker processes rebuild the app from it)."""

    bundles: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16  # measured best of 8, 16, 32 on the demo bundle (BENCHMARKS.md, issue 13)
    max_queue_delay_us: int = 0
    workers: int = 1
    threads: int | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    request_timeout_s: float = 30.0
    log_level: str = "info"

    def check(self) -> None:
        problems = [text for bad, text in (
            (not self.bundles, "give at least one bundle"),
            (not 0 <= self.port <= 65535, f"--port {self.port} is not a TCP port (0-65535)"),
            (self.max_batch < 1, f"--max-batch must be >= 1, got {self.max_batch}"),
            (self.max_queue_delay_us < 0, f"--max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}"),
            (self.workers < 1, f"--workers must be >= 1, got {self.workers}"),
            (self.threads is not None and self.threads < 1, f"--threads must be >= 1, got {self.threads}"),
            (self.max_body_bytes < 1, f"--max-body-bytes must be >= 1, got {self.max_body_bytes}"),
            (not self.request_timeout_s > 0, f"--request-timeout must be > 0 seconds, got {self.request_timeout_s}"),
            (self.log_level not in LOG_LEVELS, f"--log-level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}"),
        ) if bad]
        if problems:
            raise ServeError("; ".join(problems))

    @property
    def intra_op_threads(self) -> int:
        """ONNX Runtime threads per process: the CPUs shared out between the workers unless set."""
        return self.threads or max(1, available_cpus() // self.workers)


def load_models(options: ServeOptions) -> list[ServedModel]:
    """Every bundle loaded (sha256-checked), checked for unique names, and run once.

    ONNX Runtime's idle intra-op threads sleep instead of spinning: they share the cores with the
    event loop, and spinning ones starved it (BENCHMARKS.md, serving: 2 threads on 2 cores).
    """
    models = [ServedModel(load(bundle, threads=options.intra_op_threads, spin_wait=False),
                          max_batch=options.max_batch, max_delay_s=options.max_queue_delay_us / 1e6)
              for bundle in options.bundles]
    names = [model.name for model in models]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ServeError(f"more than one bundle is named {', '.join(map(repr, twice))} (the manifest 'name' "
                         "is the model name; serve them from separate servers or rename one)")
    for model in models:
        model.warm_up()
    return models


def build_app(options: ServeOptions, models: list[ServedModel] | None = None) -> Any:
    """The ASGI app serving ``models`` (loaded from ``options`` when not given: worker processes)."""
    from taskfold.runtime.serve.app import InferenceServer

    return InferenceServer(models if models is not None else load_models(options),
                           max_body_bytes=options.max_body_bytes, request_timeout_s=options.request_timeout_s).app


def _worker_app(options: ServeOptions) -> Any:
    """The app of one worker process (``--workers N``), with the GIL switch interval :func:`serve` sets."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    return build_app(options)


def serve(options: ServeOptions, *, on_listening: Callable[[str, list[str]], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return. ``on_listening(url, model names)`` is
    called once the socket is bound (with ``port=0``, the url holds the port the system chose)."""
    require_extra("serve", "taskfold serve")
    options.check()
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    models = load_models(options)
    sock = _bind(options.host, options.port)
    if options.workers == 1:
        app, factory = build_app(options, models), False
    else:  # each worker loads its own copy; this process only supervises
        app, factory = functools.partial(_worker_app, options), True
    config = uvicorn.Config(app, factory=factory, workers=options.workers, log_level=options.log_level,
                            log_config=_log_config(options.log_level), access_log=False, lifespan="on",
                            timeout_graceful_shutdown=math.ceil(options.request_timeout_s) + 1)
    host, port = sock.getsockname()[:2]
    if on_listening is not None:
        on_listening(f"http://{f'[{host}]' if ':' in host else host}:{port}", [model.name for model in models])
    if options.workers > 1:
        del models
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        with _drain_on_signals():
            if options.workers == 1:
                uvicorn.Server(config).run(sockets=[sock])
            else:
                Multiprocess(config, sockets=[sock]).run()
    finally:
        sys.setswitchinterval(switch_interval)
        sock.close()


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port``, or one line saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(2048)  # connections queue from now on: "listening" is printed before uvicorn accepts
    sock.set_inheritable(True)
    return sock


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging set-up plus ours: the access log and errors of ``taskfold.serve``."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["taskfold.serve"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


@contextlib.contextmanager
def _drain_on_signals() -> Iterator[None]:
    """SIGTERM/SIGINT end the server gracefully and the process normally (exit 0).

    uvicorn drains on these signals and then re-raises the signal to the handler that was there
    before it; by default that kills the process (SIGTERM) or raises KeyboardInterrupt (SIGINT).
    A quiet handler underneath makes a drained shutdown an ordinary return.
    """
    quiet = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in quiet.items():
            signal.signal(sig, handler)
