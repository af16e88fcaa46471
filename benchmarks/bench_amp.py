"""Mixed precision on the CPU: bf16 (and fp16) autocast vs fp32 step time, and the final metrics.

    nice -n 10 .venv/bin/python benchmarks/bench_amp.py step [--threads 1 2] [--rounds 7]
    nice -n 10 .venv/bin/python benchmarks/bench_amp.py metric [--set data.train_size=320 ...]

step: one weight step (forward in autocast, the task losses, EW's backward, AdamW) of the demo
recipe's network (shared resnet10, 64 px, 3 dense tasks) on one fixed batch of ``--batch``,
for each of fp32, bf16, fp16 (with its GradScaler) and fp32 + channels_last, timed in
alternating rounds; prints each candidate's median, its ratio to fp32 and the spread (min–max)
of the per-round ratios, at each thread count, with the CPU model and its relevant flags.
metric: the demo recipe trained with train.amp none and bf16 (same seed, same overrides),
and the test metrics of both side by side.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line, fixed_batch_step, paired_samples, print_ratios, train_recipe  # noqa: E402

DEMO = "cli/recipes/demo.yaml"
CANDIDATES = {"fp32": [], "bf16": ["train.amp=bf16"], "fp16": ["train.amp=fp16"],
              "fp32+channels_last": ["train.channels_last=true"]}
def step(args) -> None:
    from taskfold.trainer.config import load_config

    print(cpu_line())
    small = ["data.train_size=64", "data.val_size=4", "data.test_size=4", "train.progress=false",
             f"train.batch_size={args.batch}"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        steps = {}
        for name, overrides in CANDIDATES.items():
            steps[name] = fixed_batch_step(load_config(DEMO, small + overrides), Path(tempfile.mkdtemp()) / name,
                                           args.batch)
        samples = paired_samples(steps, rounds=args.rounds, per_round=1, warmup=2)
        print(f"\none weight step, demo network, batch {args.batch}, {threads} thread(s), {args.rounds} rounds")
        print_ratios(samples, "fp32")


def metric(args) -> None:
    print(cpu_line())
    results = {}
    for amp in ("none", "bf16"):
        summary = train_recipe(DEMO, [*args.set, f"train.amp={amp}"], Path(args.out) / amp)
        results[amp] = summary["test"]
    print(f"\ndemo recipe, overrides {args.set}: test metrics, fp32 vs bf16 autocast")
    for task, metrics in results["none"].items():
        for key, value in metrics.items():
            other = results["bf16"][task][key]
            print(f"{task:>8}.{key:<14} fp32 {value:9.4f}  bf16 {other:9.4f}  diff {other - value:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    s = sub.add_parser("step")
    s.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    s.add_argument("--rounds", type=int, default=7)
    s.add_argument("--batch", type=int, default=32)
    m = sub.add_parser("metric")
    m.add_argument("--set", action="append", default=[])
    m.add_argument("--out", default="runs/bench_amp")
    args = parser.parse_args()
    step(args) if args.part == "step" else metric(args)


if __name__ == "__main__":
    main()
