"""`taskfold serve` against the in-process runtime, side by side: batch-1 latency, throughput of 32
concurrent clients with and without dynamic batching, and the server's memory.

    make demo                                           # once: runs/demo/bundle
    .venv/bin/python benchmarks/bench_serve.py --bundle runs/demo/bundle

Two servers run at once on loopback (`--max-batch 8 --max-queue-delay-us D` and `--max-batch 1`),
each with ``--threads T`` ONNX Runtime threads, and the client side uses NVIDIA's tritonclient
(binary tensors, its default). Rounds alternate between the candidates:

1. latency: one batch-1 request at a time, through the server vs ``predictor(x)`` in this process;
   p50 over each round, and their difference;
2. throughput: 32 client threads sending batch-1 requests for a fixed time, to the batching server
   and to the non-batching one, against ``predictor(x8)`` (batch 8) in a loop in this process;
   images per second, median over rounds;
3. resident memory of each server process (VmRSS) with the bundle loaded, after the runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.http as http

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line  # noqa: E402

from taskfold.runtime import load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def start(bundle: str, log: Path, threads: int, *flags: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "taskfold.cli", "serve", bundle, "--port", "0", "--threads",
                             str(threads), "--log-level", "warning", *flags], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))
    while " at http://" not in log.read_text():
        if proc.poll() is not None:
            raise SystemExit(log.read_text())
        time.sleep(0.1)
    return proc, log.read_text().split(" at http://", 1)[1].split("/v2/models")[0]


def rss_mib(pid: int) -> float:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024


def one_request(client, model: str, image: np.ndarray) -> None:
    tensor = http.InferInput("image", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image)
    client.infer(model, [tensor])


def p50_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def clients_ips(address: str, model: str, image: np.ndarray, clients: int, seconds: float) -> float:
    """Images per second answered to ``clients`` threads sending batch-1 requests for ``seconds``."""
    done = [0] * clients
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        client = http.InferenceServerClient(address)
        while time.perf_counter() < stop:
            one_request(client, model, image)
            done[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="runs/demo/bundle")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--delay-us", type=int, default=2000)
    args = parser.parse_args()
    print(cpu_line(), f"; ORT threads per server/in-process: {args.threads}")
    predictor = load(args.bundle, threads=args.threads)
    model = predictor.manifest["name"]
    shape = [1 if d < 0 else d for d in predictor.input_spec["shape"]]
    image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    batch8 = np.repeat(image, 8, axis=0)
    with tempfile.TemporaryDirectory() as tmp:
        batching, url_b = start(args.bundle, Path(tmp) / "b.log", args.threads, "--max-batch", "8",
                                "--max-queue-delay-us", str(args.delay_us))
        single, url_s = start(args.bundle, Path(tmp) / "s.log", args.threads, "--max-batch", "1")
        try:
            client = http.InferenceServerClient(url_b)
            latency = {"server": [], "in-process": []}
            ips = {"batching": [], "no batching": [], "in-process b8": []}
            for r in range(args.rounds):
                latency["server"].append(p50_ms(lambda: one_request(client, model, image), 50))
                latency["in-process"].append(p50_ms(lambda: predictor(image), 50))
                order = [("batching", url_b), ("no batching", url_s)][:: 1 if r % 2 == 0 else -1]
                for name, url in order:
                    ips[name].append(clients_ips(url, model, image, args.clients, args.seconds))
                n, start_t = 0, time.perf_counter()
                while time.perf_counter() - start_t < args.seconds:
                    predictor(batch8)
                    n += 8
                ips["in-process b8"].append(n / (time.perf_counter() - start_t))
            memory = {"batching server": rss_mib(batching.pid), "no-batching server": rss_mib(single.pid)}
        finally:
            for proc in (batching, single):
                proc.terminate()
                proc.wait()
    diffs = [s - i for s, i in zip(latency["server"], latency["in-process"])]
    print(f"batch-1 p50: server {statistics.median(latency['server']):.2f} ms, in-process "
          f"{statistics.median(latency['in-process']):.2f} ms; server - in-process median {statistics.median(diffs):.2f} ms "
          f"(range {min(diffs):.2f}-{max(diffs):.2f})")
    med = {k: statistics.median(v) for k, v in ips.items()}
    ratio_b = [b / s for b, s in zip(ips["batching"], ips["no batching"])]
    ratio_i = [b / i for b, i in zip(ips["batching"], ips["in-process b8"])]
    print(f"{args.clients} clients x batch 1, images/s (median of {args.rounds} rounds): "
          + ", ".join(f"{k} {v:.0f}" for k, v in med.items()))
    print(f"batching / no batching: median {statistics.median(ratio_b):.2f}x (range {min(ratio_b):.2f}-{max(ratio_b):.2f}); "
          f"batching / in-process batch 8: median {statistics.median(ratio_i):.2f}x "
          f"(range {min(ratio_i):.2f}-{max(ratio_i):.2f})")
    print("resident memory: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in memory.items()))


if __name__ == "__main__":
    main()
