"""`taskfold serve` against the in-process runtime, side by side: batch-1 latency, throughput of 32
concurrent clients with and without dynamic batching, and the server's memory.

    .venv/bin/python benchmarks/bench_serve.py --bundle runs/demo_serve/bundle --threads 1,2

For each ONNX Runtime thread count T (``--threads``, per server process and in-process), servers
run at once on loopback: ``--max-batch B --max-queue-delay-us D`` ("batching B", for each B of
``--max-batch``) and ``--max-batch 1`` ("no batching"), plus, with ``--workers W``, a batching
server of W processes with T/W threads each. Two clients: NVIDIA's tritonclient (binary tensors, its default; what the
issue asks to work) and a minimal one (http.client, one keep-alive connection, the request body
built once), which shows what the server adds without the client library's own cost. Rounds
alternate between the candidates (the order rotates each round); medians and ranges over rounds:

The in-process reference runs ONNX Runtime as the server does (T threads, ``spin_wait=False``);
with T > 1 the same with ONNX Runtime's default spinning threads is shown too.

1. latency: one batch-1 request at a time, through the first batching server with each client vs
   ``predictor(x)`` in this process; p50 of each round and its difference to in-process. The
   server's own /metrics split the mean request into its time inside the server (handler, of
   which ONNX Runtime and queue) and outside it (loopback HTTP and the client). The "HTTP floor",
   a bare ASGI app on the same uvicorn answering the server's own response without any work,
   shows what the HTTP stack and each client cost by themselves;
2. throughput: 32 client threads sending batch-1 requests for a fixed time, against
   ``predictor(x8)`` (batch 8) in a loop in this process; images per second. In-process batch 1
   shows what batching can gain at most on this model (batch 8 / batch 1 in one process). The
   batching server's batch-size histogram and why its batches started (/metrics) follow;
3. resident memory of each server process (VmRSS) with the bundle loaded, after the runs.
"""
from __future__ import annotations

import argparse
import http.client
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tritonclient.http as triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import binary_infer_request, cpu_line, rotated  # noqa: E402

from taskfold.runtime import load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Server:
    """A ``taskfold serve`` process on a free port."""

    def __init__(self, bundle: str, log: Path, *flags: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "taskfold.cli", "serve", bundle, "--port", "0",
                                      "--log-level", "warning", *flags], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=log.open("w"))
        while " at http://" not in log.read_text():
            if self.proc.poll() is not None:
                raise SystemExit(log.read_text())
            time.sleep(0.1)
        self.address = log.read_text().split(" at http://", 1)[1].split("/v2/models")[0]
        self.workers = int(flags[flags.index("--workers") + 1]) if "--workers" in flags else 1

    def metrics(self) -> dict[str, float]:
        """The demo model's samples from /metrics, keyed by name and labels (one process's, with workers)."""
        host, port = self.address.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
        connection.close()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def rss_mib(self) -> float:
        """Resident memory of the serving process(es) (with workers: the supervisor and its children)."""
        pids = [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        total = 0
        for pid in pids:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            total += int(fields["VmRSS"].split()[0])
        return total / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def triton_client(address: str, model: str, image: np.ndarray) -> Callable[[], None]:
    """One batch-1 request per call with tritonclient (binary input, binary outputs: its defaults)."""
    client = triton.InferenceServerClient(address)

    def call() -> None:
        tensor = triton.InferInput("image", list(image.shape), "FP32")
        tensor.set_data_from_numpy(image)
        client.infer(model, [tensor])

    return call


def raw_client(address: str, model: str, image: np.ndarray) -> Callable[[], None]:
    """One batch-1 request per call over one keep-alive connection, the body built once."""
    body, header_length = binary_infer_request(image)
    headers = {"Inference-Header-Content-Length": header_length}
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    path = f"/v2/models/{model}/infer"

    def call() -> None:
        try:
            connection.request("POST", path, body, headers)
            response = connection.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            connection.close()  # uvicorn closed the idle keep-alive connection (5 s): open a new one
            connection.request("POST", path, body, headers)
            response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise SystemExit(f"server answered {response.status}: {data[:200]!r}")

    return call


CLIENTS = {"tritonclient": triton_client, "raw http": raw_client}


def _floor_app(answer: bytes, headers: list[tuple[bytes, bytes]]) -> Callable:
    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return app


def _serve_floor(answer: bytes, headers: list[tuple[bytes, bytes]], ports) -> None:
    """In a child process: uvicorn as ``taskfold serve`` runs it, answering every request with ``answer``."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    ports.put(sock.getsockname()[1])
    uvicorn.Server(uvicorn.Config(_floor_app(answer, headers), loop="uvloop", http="httptools", lifespan="off",
                                  log_level="warning")).run(sockets=[sock])


def start_floor(address: str, model: str, image: np.ndarray) -> tuple[multiprocessing.Process, str]:
    """The HTTP floor: a bare ASGI app on the same uvicorn (uvloop, httptools) that answers the
    server's own response to ``image``, bytes for bytes, without decoding or inferring anything.
    What a client measures against it is what the HTTP stack and the client cost on their own."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body, header_length = binary_infer_request(image)  # as both clients ask
    connection.request("POST", f"/v2/models/{model}/infer", body, {"Inference-Header-Content-Length": header_length})
    response = connection.getresponse()
    answer = response.read()
    headers = [(k.lower().encode(), v.encode()) for k, v in response.getheaders()
               if k.lower() in ("content-type", "content-length", "inference-header-content-length")]
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    process = context.Process(target=_serve_floor, args=(answer, headers, ports), daemon=True)
    process.start()
    return process, f"127.0.0.1:{ports.get(timeout=120)}"


def timed_ms(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """p50 and mean milliseconds of ``n`` calls of ``fn``."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, statistics.mean(times) * 1e3


def clients_ips(make: Callable[[], Callable[[], None]], clients: int, seconds: float,
                elapsed: list[float]) -> float:
    """Images per second answered to ``clients`` threads, each sending batch-1 requests for ``seconds``
    (the run's wall time is appended to ``elapsed``)."""
    calls = [make() for _ in range(clients)]
    done = [0] * clients
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            calls[i]()
            done[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed.append(time.perf_counter() - start)
    return sum(done) / elapsed[-1]


def spread(values: list[float], fmt: str = ".2f") -> str:
    return f"{statistics.median(values):{fmt}} (range {min(values):{fmt}}-{max(values):{fmt}})"


def load_average() -> str:
    return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def server_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean ms per request inside the server between two /metrics scrapes: handler, ORT, queue."""
    def delta(prefix: str) -> float:
        return sum(after[k] - before.get(k, 0.0) for k in after if k.startswith(prefix))

    requests = delta("taskfold_request_duration_seconds_count")
    return {"handler": delta("taskfold_request_duration_seconds_sum") / requests * 1e3,
            "onnxruntime": delta("taskfold_compute_duration_seconds_total") / requests * 1e3,
            "queue": delta("taskfold_queue_duration_seconds_total") / requests * 1e3}


def batch_stats(before: dict[str, float], after: dict[str, float], wall_s: float) -> str:
    """Batch sizes, why batches started, and how busy ONNX Runtime was, between two /metrics scrapes."""
    def delta(prefix: str, label: str) -> dict[str, float]:
        return {k.split(f'{label}="')[1].split('"')[0]: after[k] - before.get(k, 0.0) for k in after
                if k.startswith(prefix)}

    cumulative = delta("taskfold_batch_size_bucket", "le")
    calls, histogram, below = cumulative["+Inf"], [], 0.0
    for bound, count in cumulative.items():
        if count - below:
            histogram.append(f"<={bound}: {(count - below) / calls:.0%}")
        below = count
    reasons = delta("taskfold_batch_dispatch_total", "reason")
    busy = sum(after[k] - before.get(k, 0.0) for k in after if k.startswith("taskfold_compute_duration"))
    return (f"{calls:.0f} ONNX Runtime calls, batch sizes {', '.join(histogram)}; started because "
            + ", ".join(f"{k} {v:.0f}" for k, v in reasons.items()) + f"; ONNX Runtime busy {busy / wall_s:.0%} "
            "of the wall time")


def measure(args: argparse.Namespace, threads: int, tmp: Path) -> None:
    print(f"\n== ONNX Runtime threads {threads} (per server process and in-process); {load_average()}")
    predictor = load(args.bundle, threads=threads, spin_wait=False)  # as the server runs it
    spinning = load(args.bundle, threads=threads) if threads > 1 else None
    model = predictor.manifest["name"]
    shape = [1 if d < 0 else d for d in predictor.input_spec["shape"]]
    image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    batch8 = np.repeat(image, 8, axis=0)
    flags = ("--threads", str(threads), "--max-queue-delay-us", str(args.delay_us))
    sizes = [int(b) for b in args.max_batch.split(",")]
    servers = {f"batching {b}": Server(args.bundle, tmp / f"b{b}-{threads}.log", *flags, "--max-batch", str(b))
               for b in sizes}
    servers["no batching"] = Server(args.bundle, tmp / f"s{threads}.log", *flags, "--max-batch", "1")
    if args.workers > 1:
        servers[f"batching {sizes[0]}, {args.workers} workers"] = Server(
            args.bundle, tmp / f"w{threads}.log", "--workers", str(args.workers), "--threads",
            str(max(1, threads // args.workers)), "--max-queue-delay-us", str(args.delay_us), "--max-batch", str(sizes[0]))
    try:
        batching = servers[f"batching {sizes[0]}"]
        # 1. latency
        calls = {"in-process": lambda: predictor(image)}
        if spinning is not None:
            calls["in-process, spinning threads"] = lambda: spinning(image)
        calls.update({f"server, {name}": make(batching.address, model, image) for name, make in CLIENTS.items()})
        floor, floor_address = start_floor(batching.address, model, image)
        calls.update({f"HTTP floor, {name}": make(floor_address, model, image) for name, make in CLIENTS.items()})
        for fn in calls.values():  # warm connections and caches
            for _ in range(10):
                fn()
        latency: dict[str, list[float]] = {name: [] for name in calls}
        mean: dict[str, list[float]] = {name: [] for name in calls}
        split: dict[str, list[dict[str, float]]] = {name: [] for name in calls if name.startswith("server")}
        for r in range(args.latency_rounds):
            for name in rotated(list(calls), r):
                before = batching.metrics() if name in split else None
                p50, average = timed_ms(calls[name], args.requests)
                latency[name].append(p50)
                mean[name].append(average)
                if before is not None:
                    split[name].append(server_split(before, batching.metrics()))
        floor.terminate()
        print("batch-1 p50, " + "; ".join(f"{name}: {spread(latency[name])} ms" for name in calls
                                         if name.startswith("in-process")))
        print("  HTTP floor (uvicorn answering a canned response, no work): " + "; ".join(
            f"{name.split(', ')[1]} {spread(latency[name])} ms" for name in calls if name.startswith("HTTP floor")))
        for name in split:
            diffs = [s - i for s, i in zip(latency[name], latency["in-process"])]
            inside = {k: statistics.median(d[k] for d in split[name]) for k in split[name][0]}
            transport = statistics.median(m - d["handler"] for m, d in zip(mean[name], split[name]))
            client = name.split(", ")[1]
            beyond = [d - f for d, f in zip(diffs, latency[f"HTTP floor, {client}"])]
            print(f"  {name}: p50 {spread(latency[name])} ms; minus in-process {spread(diffs)} ms, of which beyond "
                  f"the HTTP floor {spread(beyond)} ms | means per "
                  f"request: inside the server {inside['handler']:.2f} ms (ONNX Runtime {inside['onnxruntime']:.2f}, "
                  f"queued {inside['queue']:.3f}, the rest {inside['handler'] - inside['onnxruntime'] - inside['queue']:.2f}); "
                  f"outside it (loopback HTTP + client) {transport:.2f} ms")
        # 2. throughput
        candidates: dict[str, Callable[[], float]] = {}
        walls: dict[str, list[float]] = {name: [] for name in servers}
        for name, server in servers.items():
            for client, make in CLIENTS.items():
                if client == "raw http" and name == "no batching":
                    continue
                candidates[f"{name}, {client}"] = (lambda s=server, m=make, w=walls[name]: clients_ips(
                    lambda: m(s.address, model, image), args.clients, args.seconds, w))

        def in_process(run: Callable[[np.ndarray], object], batch: np.ndarray) -> float:
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                run(batch)
                n += len(batch)
            return n / (time.perf_counter() - start)

        candidates["in-process batch 8"] = lambda: in_process(predictor, batch8)
        candidates["in-process batch 1"] = lambda: in_process(predictor, image)  # what batching can gain at most
        if spinning is not None:
            candidates["in-process batch 8, spinning threads"] = lambda: in_process(spinning, batch8)
        single = [name for name in servers if "workers" not in name and name != "no batching"]
        before = {name: servers[name].metrics() for name in single}
        ips: dict[str, list[float]] = {name: [] for name in candidates}
        for r in range(args.rounds):
            for name in rotated(list(candidates), r):
                ips[name].append(candidates[name]())
        print(f"{args.clients} clients x batch 1, images/s (median and range over {args.rounds} rounds of "
              f"{args.seconds:g} s):")
        b8 = ips["in-process batch 8"]
        for name, values in ips.items():
            line = f"  {name}: {spread(values, '.0f')}"
            if not name.startswith("in-process batch 8"):
                line += f"; / in-process batch 8: {spread([v / b for v, b in zip(values, b8)])}"
            if name.startswith("batching") and name.endswith("tritonclient"):
                base = ips["no batching, tritonclient"]
                line += f"; / no batching: {spread([v / b for v, b in zip(values, base)])}"
            print(line)
        for name in single:
            print(f"  {name}, throughput runs: {batch_stats(before[name], servers[name].metrics(), sum(walls[name]))}")
        # 3. memory
        print("resident memory: " + ", ".join(f"{name} {server.rss_mib():.0f} MiB" for name, server in servers.items()))
    finally:
        for server in servers.values():
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="runs/demo/bundle")
    parser.add_argument("--threads", default="1,2", help="ONNX Runtime thread counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=100, help="requests per latency round")
    parser.add_argument("--latency-rounds", type=int, default=9)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--delay-us", type=int, default=2000)
    parser.add_argument("--max-batch", default="8,16", help="a batching server for each, comma-separated")
    parser.add_argument("--workers", type=int, default=1, help="also a batching server of this many processes")
    args = parser.parse_args()
    print(cpu_line())
    print(f"ONNX Runtime threads: {args.threads}; {load_average()}")
    with tempfile.TemporaryDirectory() as tmp:
        for threads in (int(t) for t in args.threads.split(",")):
            measure(args, threads, Path(tmp))


if __name__ == "__main__":
    main()
