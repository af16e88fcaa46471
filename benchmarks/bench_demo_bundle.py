"""The demo bundle on ONNX Runtime (CPU) against (a) the same weights in PyTorch eager and (b) ONNX
Runtime on a plain ``torch.onnx.export`` of the unfolded training model, at batch 1 and 8.

    make demo                                   # once: trains runs/demo and compiles its bundle
    .venv/bin/python benchmarks/bench_demo_bundle.py [--run runs/demo] [--threads 2]

Prints median latencies measured in alternating rounds in one process (each ratio from its own
pairing), their ratios (targets:
bundle/eager ≤ 0.6, bundle/plain-export ≤ 1.0), and the bundle's achieved GFLOP/s next to this
machine's measured FP32 matrix-multiply peak.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak_gflops, paired_medians  # noqa: E402

from taskfold.compiler.compile_run import load_trained  # noqa: E402
from taskfold.runtime import load  # noqa: E402
from taskfold.trainer.rundir import RunDir  # noqa: E402


def plain_export(model: torch.nn.Module, path: Path, size: int) -> None:
    """What a user gets without taskfold's compiler: the training model exported as it is."""
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), input_names=["image"],
                      dynamic_axes={"image": {0: "batch"}}, dynamo=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a trained and compiled run directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    run = RunDir(args.run)
    if not (run.bundle_path / "manifest.json").is_file():
        sys.exit(f"{args.run}: no compiled bundle; run `make demo` (or `taskfold run`) first")
    torch.set_num_threads(args.threads)
    _, spec, model = load_trained(run)
    bundle = load(run.bundle_path, threads=args.threads)
    size = spec.image_size
    with tempfile.TemporaryDirectory() as tmp:
        plain_path = Path(tmp) / "plain.onnx"
        plain_export(model, plain_path, size)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        plain = ort.InferenceSession(str(plain_path), opts, providers=["CPUExecutionProvider"])
        rows = []
        for batch in (1, 8):
            x = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
            xt = torch.from_numpy(x)

            def eager() -> None:
                with torch.inference_mode():
                    model(xt)

            # Two pairings: ONNX Runtime against ONNX Runtime, then against PyTorch eager, so that
            # PyTorch's OpenMP threads (which spin after each eager call) never sit between the
            # two ONNX Runtime candidates.
            vs_plain = paired_medians({"bundle": lambda: bundle(x),
                                       "plain_export": lambda: plain.run(None, {"image": x})}, rounds=args.rounds)
            vs_eager = paired_medians({"bundle": lambda: bundle(x), "eager": eager}, rounds=args.rounds)
            gflops = 2 * bundle.cost["macs"] * batch / vs_plain["bundle"] / 1e9
            rows.append({"batch": batch, "bundle_ms": vs_plain["bundle"] * 1e3,
                         "plain_export_ms": vs_plain["plain_export"] * 1e3, "eager_ms": vs_eager["eager"] * 1e3,
                         "bundle_vs_eager": vs_eager["bundle"] / vs_eager["eager"],
                         "bundle_vs_plain_export": vs_plain["bundle"] / vs_plain["plain_export"],
                         "bundle_gflops": gflops})
    peak = matmul_peak_gflops()
    print(f"threads={args.threads}  bundle MACs={bundle.cost['macs'] / 1e6:.1f} M  "
          f"FP32 matmul peak={peak:.1f} GFLOP/s")
    print(f"{'batch':>5} {'bundle ms':>10} {'eager ms':>10} {'plain ms':>10} {'b/eager':>8} {'b/plain':>8} "
          f"{'GFLOP/s':>8} {'% peak':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['bundle_ms']:>10.3f} {r['eager_ms']:>10.3f} {r['plain_export_ms']:>10.3f} "
              f"{r['bundle_vs_eager']:>8.3f} {r['bundle_vs_plain_export']:>8.3f} {r['bundle_gflops']:>8.1f} "
              f"{100 * r['bundle_gflops'] / peak:>6.1f}%")
    print(json.dumps({"peak_gflops": peak, "rows": rows}))


if __name__ == "__main__":
    main()
