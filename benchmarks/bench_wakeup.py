"""What a thread pays for having slept: the server's per-request Python work, hot and after a pause.

    nice -n 5 .venv/bin/python benchmarks/bench_wakeup.py [--rounds 9] [--calls 200]

`taskfold serve`'s event loop sleeps while ONNX Runtime computes a lone request (and while no
request comes), then runs the request's Python path: decode the v2 body, check the images,
encode the outputs. bench_serve.py finds that path far slower inside the server than in a tight
loop. This script times the same path (the demo bundle's shapes: a 1x3x64x64 FP32 binary input,
seg/depth/normals outputs, binary) right after ``time.sleep(pause)`` for pauses of 0, 0.5 and 4
ms (4 ms: one batch-1 ONNX Runtime call of the demo bundle), in alternating rounds, one thread.
Only the work is timed, never the pause. If the ratio to "no pause" is far above 1, the machine
(CPU idle states, a VM's halted vCPU) charges for waking up, and any process that waits between
requests pays it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import binary_infer_request, cpu_line, rotated  # noqa: E402

from taskfold.runtime.inputs import check_images  # noqa: E402
from taskfold.runtime.serve.protocol import decode_request, encode_response  # noqa: E402

SPEC = {"name": "image", "shape": [None, 3, 64, 64], "dtype": "float32"}
OUTPUTS = {"seg": (1, 5, 64, 64), "depth": (1, 1, 64, 64), "normals": (1, 3, 64, 64)}


def request_path() -> Callable[[], None]:
    """One binary batch-1 request's Python work in the server, as a no-argument call."""
    image = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    body, header_length = binary_infer_request(image)
    outputs = {name: np.zeros(shape, np.float32) for name, shape in OUTPUTS.items()}

    def run() -> None:
        request = decode_request(body, header_length)
        images = check_images(request.inputs[0].array, SPEC)
        assert np.isfinite(images).all()
        encode_response("demo", "1", request, outputs)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per pause and round")
    args = parser.parse_args()
    pauses_ms = [0.0, 0.5, 4.0]
    work = request_path()
    for _ in range(50):
        work()
    per_round: dict[float, list[float]] = {p: [] for p in pauses_ms}
    for r in range(args.rounds):
        for pause in rotated(pauses_ms, r):
            times = []
            for _ in range(args.calls):
                if pause:
                    time.sleep(pause / 1e3)
                start = time.perf_counter()
                work()
                times.append(time.perf_counter() - start)
            per_round[pause].append(statistics.median(times))
    print(cpu_line())
    print(f"one thread; {args.rounds} alternating rounds x {args.calls} calls; median per call (per-round medians' range)")
    for pause, values in per_round.items():
        ratios = [v / b for v, b in zip(values, per_round[0.0])]
        print(f"  after a {pause:3.1f} ms pause: {statistics.median(values) * 1e6:6.0f} us "
              f"({min(values) * 1e6:.0f}-{max(values) * 1e6:.0f}); {statistics.median(ratios):5.2f}x no pause "
              f"({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
