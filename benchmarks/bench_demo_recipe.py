"""The demo recipe's training cost: one weight step of each candidate network, side by side.

    nice -n 5 .venv/bin/python benchmarks/bench_demo_recipe.py [--threads 1 2] [--rounds 5]

Issue 16 asked for a demo that predicts its 64-px maps from finer features than ResNet-10's 2×2
stride-32 map, in about the old demo's training time. Candidates (all the demo recipe, only the
named fields overridden): the old demo (ASPP on the last map), the new one (DPT on the stride-4..32
maps) and the two alternatives the issue named (ASPP with ``output_stride`` 16 or 8). Each
candidate's weight step (``loop.weight_step``: forward, losses, EW backward, AdamW) on one fixed
batch of ``--batch`` is timed in alternating rounds; prints each candidate's median, its ratio to
the old demo and the spread of the per-round ratios, at each thread count, with the CPU line.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    from taskfold.trainer.config import load_config

    print(cpu_line())
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


if __name__ == "__main__":
    main()
