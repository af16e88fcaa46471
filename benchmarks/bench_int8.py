"""INT8 bundle graphs against FP32, side by side: latency at batch 1 and 8 (1 and 2 threads), the
quantisation schemes the compiler chooses between, and each task's metric change.

    make demo                                                  # once: trains runs/demo
    .venv/bin/python benchmarks/bench_int8.py --run runs/demo
    .venv/bin/python benchmarks/bench_int8.py --run runs/compute_r50 --batches 1,8

Compiles RUN with ``--int8`` into ``RUN/bundle_int8`` (the compiler's own choices: scheme for this
CPU, 256 calibration images, accuracy guard, saturation check). Then, in one process:

1. the bundle: ``load(precision="fp32")`` against ``load(precision="int8")``, in alternating rounds;
   the ratio int8/fp32 of each round's times, median and range over the rounds;
2. the schemes (each quantised from the same FP32 graph with the same calibration): uint8
   activations + int8 weights with ``reduce_range`` (the ``avx2`` scheme), the same with full-range
   weights (``vnni``), and signed int8 activations (``arm``; ONNX Runtime's default), each timed
   against FP32 at the largest batch, with how many convolutions ORT fused into integer kernels and
   the saturation check's largest error on this CPU;
3. each task's test metrics, FP32 and INT8, from the manifest the compiler wrote.

Prints the CPU model and its SIMD flags (lscpu) first: the right scheme depends on them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line, paired_samples  # noqa: E402

from taskfold.compiler.compile_run import compile_run, held_out_images, precision_data  # noqa: E402
from taskfold.compiler.int8 import SCHEMES, count_fused_convs, quantize_int8  # noqa: E402
from taskfold.compiler.int8_saturation import check_saturation  # noqa: E402
from taskfold.runtime import load  # noqa: E402
from taskfold.trainer.rundir import RunDir  # noqa: E402

def ratio_row(fp32, int8, images: np.ndarray, rounds: int, per_round: int) -> tuple[float, float, float, float]:
    """(median fp32 ms, median int8 ms, median of per-round int8/fp32 ratios, max-min of those ratios)."""
    samples = paired_samples({"fp32": lambda: fp32(images), "int8": lambda: int8(images)}, rounds=rounds,
                             per_round=per_round)
    ratios = [b / a for a, b in zip(samples["fp32"], samples["int8"])]
    return (statistics.median(samples["fp32"]) * 1e3, statistics.median(samples["int8"]) * 1e3,
            statistics.median(ratios), max(ratios) - min(ratios))


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a trained run directory")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--force", action="store_true",
                        help="keep the INT8 graph even if the accuracy guard refuses it (a briefly trained "
                             "latency-only run such as runs/compute_r50)")
    args = parser.parse_args()
    run = RunDir(args.run)
    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    bundle = run.path / "bundle_int8"
    compile_run(run.path, bundle, int8=True, calib_images=args.calib_images, force=args.force, overwrite=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    int8 = manifest["precisions"]["int8"]
    cfg = run.load_config()
    images = held_out_images(cfg, max(batches)).numpy()
    print(cpu_line())
    print(f"run {args.run}: {manifest['cost']['macs'] / 1e6:.1f} MMACs/image, scheme {int8['scheme']['target']} "
          f"({int8['scheme']['activations']} activations, reduce_range={int8['scheme']['reduce_range']}), "
          f"{int8['fused_convs']['int8']}/{int8['fused_convs']['all']} convs fused, "
          f"saturation max error {int8['saturation'].get('max_step_error')} step(s)")

    print("\n1. bundle latency, load(precision=int8) vs load(precision=fp32), alternating rounds")
    print(f"{'threads':>7} {'batch':>5} {'fp32 ms':>9} {'int8 ms':>9} {'int8/fp32':>10} {'range':>7} {'speed-up':>8}")
    for t in threads:
        fp32_p, int8_p = load(bundle, precision="fp32", threads=t), load(bundle, precision="int8", threads=t)
        for b in batches:
            f, i, ratio, spread = ratio_row(fp32_p, int8_p, images[:b], args.rounds, args.per_round)
            print(f"{t:>7} {b:>5} {f:>9.2f} {i:>9.2f} {ratio:>10.3f} {spread:>7.3f} {1 / ratio:>7.2f}x")

    print(f"\n2. quantisation schemes at batch {max(batches)}, {max(threads)} threads (ORT sessions, same calibration)")
    calibration = precision_data(cfg, args.calib_images).calibration
    x = {"image": images[:max(batches)]}
    print(f"{'scheme':>8} {'act':>5} {'reduce_range':>12} {'fused':>7} {'sat. steps':>10} {'int8/fp32':>10} {'range':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        fp32_s = session(bundle / "model.onnx", max(threads))
        for name in ("avx2", "vnni", "arm"):
            path = Path(tmp) / f"{name}.onnx"
            quantize_int8(bundle / "model.onnx", path, calibration, SCHEMES[name])
            fused, convs = count_fused_convs(path)
            steps = check_saturation(path, calibration[:8])["max_step_error"]
            q = session(path, max(threads))
            _, _, ratio, spread = ratio_row(lambda im: fp32_s.run(None, x), lambda im: q.run(None, x), x["image"],
                                            args.rounds, args.per_round)
            scheme = SCHEMES[name]
            print(f"{name:>8} {scheme.activations:>5} {str(scheme.reduce_range):>12} {fused:>3}/{convs:<3} "
                  f"{steps:>10} {ratio:>10.3f} {spread:>7.3f}")

    print("\n3. test metrics per task (FP32 graph, INT8 graph, change)")
    for task, metrics in manifest["precisions"]["fp32"]["metrics"].items():
        cells = [f"{m} {v:.4f} -> {int8['metrics'][task][m]:.4f} ({int8['delta'][task][m]:+.4f})"
                 for m, v in metrics.items() if m != "loss"]
        print(f"  {task}: " + "; ".join(cells))
    print(json.dumps({"guard": int8["guard"], "excluded": int8["excluded"]["heads_fp32"][:3]}))


if __name__ == "__main__":
    main()
