"""The demo recipe's training cost: one weight step of each candidate network, side by side.

    nice -n 5 .venv/bin/python benchmarks/bench_demo_recipe.py [--threads 1 2] [--rounds 5]
    nice -n 5 .venv/bin/python benchmarks/bench_demo_recipe.py --bundles OLD_BUNDLE NEW_BUNDLE

Issue 16 asked for a demo that predicts its 64-px maps from finer features than ResNet-10's 2×2
stride-32 map, in about the old demo's training time. Candidates (all the demo recipe, only the
named fields overridden): the old demo (ASPP on the last map), the new one (DPT on the stride-4..32
maps) and the two alternatives the issue named (ASPP with ``output_stride`` 16 or 8). Each
candidate's weight step (``loop.weight_step``: forward, losses, EW backward, AdamW) on one fixed
batch of ``--batch`` is timed in alternating rounds; prints each candidate's median, its ratio to
the old demo and the spread of the per-round ratios, at each thread count, with the CPU line.
With ``--bundles``: instead, the two compiled bundles' ONNX Runtime latency at batch 1 and 8, in
alternating rounds, and their MACs per image.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line, fixed_batch_step, paired_samples, print_ratios  # noqa: E402

DEMO = "cli/recipes/demo.yaml"
CANDIDATES = {
    "aspp (old demo)": ["model.dense_head=aspp"],
    "dpt (new demo)": ["model.dense_head=dpt"],
    "aspp, os16": ["model.dense_head=aspp", "model.options.output_stride=16"],
    "aspp, os8": ["model.dense_head=aspp", "model.options.output_stride=8"],
}


def step_times(args) -> None:
    from taskfold.trainer.config import load_config

    small = ["data.train_size=64", "data.val_size=4", "data.test_size=4", "train.progress=false",
             f"train.batch_size={args.batch}"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        steps = {name: fixed_batch_step(load_config(DEMO, small + overrides), Path(tempfile.mkdtemp()) / "run",
                                        args.batch)
                 for name, overrides in CANDIDATES.items()}
        samples = paired_samples(steps, rounds=args.rounds, per_round=1, warmup=1)
        print(f"\none weight step, batch {args.batch}, {threads} thread(s), {args.rounds} rounds")
        print_ratios(samples, "aspp (old demo)")


def bundle_latency(args) -> None:
    import numpy as np

    from taskfold.runtime import load

    old, new = args.bundles
    for threads in args.threads:
        bundles = {"old bundle": load(old, threads=threads), "new bundle": load(new, threads=threads)}
        if threads == args.threads[0]:
            for name, bundle in bundles.items():
                print(f"{name}: {bundle.cost['macs'] / 1e6:.1f} M MACs per image")
        size = bundles["old bundle"].input_spec["shape"][-1]
        for batch in (1, 8):
            images = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
            calls = {name: (lambda b=bundle: b(images)) for name, bundle in bundles.items()}
            samples = paired_samples(calls, rounds=args.rounds, per_round=20, warmup=5)
            print(f"\nbundle latency, batch {batch}, {threads} thread(s), {args.rounds} rounds of 20 calls")
            print_ratios(samples, "old bundle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bundles", nargs=2, metavar=("OLD", "NEW"))
    args = parser.parse_args()
    print(cpu_line())
    bundle_latency(args) if args.bundles else step_times(args)


if __name__ == "__main__":
    main()
