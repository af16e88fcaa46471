"""``taskfold serve`` and ``taskfold export-triton``: the two ways a bundle goes into production.

Both need only the runtime (numpy, onnx, onnxruntime); ``serve`` also the ``serve`` extra
(Starlette, uvicorn), imported when the server starts.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

SERVE_HELP = """\
Serve bundles over HTTP with the KServe v2 / Triton inference protocol (JSON and binary
tensors), merging concurrent requests into batches. Every bundle is served under its manifest
name, version 1. SIGTERM or Ctrl-C lets requests in flight finish, then exits 0.

  curl localhost:8000/v2/models/demo            # metadata: inputs and outputs
  tritonclient.http.InferenceServerClient("localhost:8000").infer("demo", inputs)"""


def cmd_serve(args: argparse.Namespace) -> dict:
    from taskfold.runtime.serve import ServeOptions, serve

    options = ServeOptions(bundles=tuple(args.bundles), host=args.host, port=args.port, max_batch=args.max_batch,
                           max_queue_delay_us=args.max_queue_delay_us, workers=args.workers, threads=args.threads,
                           max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout,
                           log_level=args.log_level)

    def listening(url: str, names: list[str]) -> None:
        print(f"taskfold serve: {', '.join(names)} at {url}/v2/models/<name>", file=sys.stderr, flush=True)

    serve(options, on_listening=listening)
    return {"served": list(args.bundles)}


def cmd_export_triton(args: argparse.Namespace) -> dict:
    from taskfold.runtime.triton import export_triton

    written = export_triton(args.bundles, args.output, max_batch=args.max_batch,
                            max_queue_delay_us=args.max_queue_delay_us, instance_kind=args.instance_kind,
                            instances=args.instances, overwrite=args.overwrite)
    return {"repository": args.output, "models": [str(path) for path in written]}


def add_commands(command: Callable[..., argparse.ArgumentParser],
                 add_json: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``serve`` and ``export-triton`` with the CLI's own sub-command maker."""
    p = command("serve", "serve bundles over HTTP (KServe v2 / Triton protocol, dynamic batching)", SERVE_HELP)
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle folders")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0: any free port)")
    p.add_argument("--max-batch", type=int, default=16, help="most rows merged into one inference (default: 16)")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="how long a batch that is not full may wait for requests already arriving (never for "
                        "requests not yet sent: a lone request starts at once; default: 0, batch what is queued)")
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per process (default: CPUs/workers)")
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024,
                   help="larger request bodies get 413 (default: 64 MiB)")
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds per request (default: 30)")
    p.add_argument("--log-level", default="info", help="critical, error, warning, info (one line per request), debug")
    add_json(p)

    p = command("export-triton", "write bundles as an NVIDIA Triton model repository",
                "Write REPO/<name>/config.pbtxt and REPO/<name>/1/model.onnx for each bundle (and a TensorRT\n"
                "model when the bundle has an engine); run it with `tritonserver --model-repository REPO`.")
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle folders")
    p.add_argument("-o", "--output", required=True, metavar="REPO", help="model repository folder")
    p.add_argument("--max-batch", type=int, default=8, help="Triton max_batch_size (0: no batching; default: 8)")
    p.add_argument("--max-queue-delay-us", type=int, default=100, help="dynamic batching delay (default: 100)")
    p.add_argument("--instance-kind", choices=("cpu", "gpu"), default="cpu", help="instance_group kind")
    p.add_argument("--instances", type=int, default=1, help="instance_group count (default: 1)")
    p.add_argument("--overwrite", action="store_true", help="replace existing model folders of the same names")
    add_json(p)


COMMANDS = {"serve": cmd_serve, "export-triton": cmd_export_triton}
