"""Weighting strategies on synthscenes (primary segmentation, auxiliary normals): primary metric
over several seeds (mean ± std) and each strategy's per-step time overhead relative to EW.

    .venv/bin/python benchmarks/bench_weighting.py accuracy [--seeds 0 1 2] [--set train.epochs=4 ...]
    .venv/bin/python benchmarks/bench_weighting.py overhead [--threads 2]

accuracy: shared + {EW, UW, PCGrad, GCS, IAL} and Aux-NAS + {EW, IAL}.
overhead: median time of one training step (forward, the strategy's backward, optimiser step) of
the shared network with each registered strategy, measured in alternating rounds, / EW's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fixed_batch_step, mean_std, paired_medians, train_recipe  # noqa: E402

COMBOS = [("shared", s) for s in ("ew", "uw", "pcgrad", "gcs", "ial")] + [("aux_nas", s) for s in ("ew", "ial")]
RECIPE = {"shared": "configs/aux_head_seg_normals.yaml", "aux_nas": "configs/aux_nas_seg_normals.yaml"}


def accuracy(args) -> None:
    results: dict[tuple[str, str], list[float]] = {c: [] for c in COMBOS}
    for seed in args.seeds:
        for method, strategy in COMBOS:
            summary = train_recipe(RECIPE[method], [f"train.seed={seed}", f"weighting.name={strategy}", *args.set],
                                   Path(args.out) / f"{method}_{strategy}_seed{seed}")
            results[(method, strategy)].append(summary["test"]["seg"]["miou"])
            print(json.dumps({"method": method, "weighting": strategy, "seed": seed,
                              "miou": summary["test"]["seg"]["miou"]}), flush=True)
    print(f"\nprimary segmentation mIoU (test), seeds {args.seeds}, overrides {args.set}")
    for (method, strategy), values in results.items():
        print(f"{method:>8} + {strategy:<7} {mean_std(values)}")


def overhead(args) -> None:
    from taskfold.trainer.config import load_config
    from taskfold.trainer.weighting import WEIGHTINGS

    torch.set_num_threads(args.threads)
    steps = {}
    for strategy in WEIGHTINGS.names():
        cfg = load_config(RECIPE["shared"], [f"weighting.name={strategy}", "data.train_size=32", "data.val_size=4",
                                             "data.test_size=4", "train.progress=false"])
        steps[strategy] = fixed_batch_step(cfg, Path(args.out) / f"overhead_{strategy}", args.batch)
    med = paired_medians(steps, rounds=args.rounds, per_round=1, warmup=2)
    print(f"per-step time, shared network (resnet10, 64 px), batch {args.batch}, threads {args.threads}")
    for strategy, seconds in med.items():
        print(f"{strategy:>10}: {seconds * 1e3:8.1f} ms  ({seconds / med['ew']:.2f}× EW)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--out", default="runs/bench_weighting")
    a.add_argument("--set", action="append", default=[])
    o = sub.add_parser("overhead")
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--batch", type=int, default=16)
    o.add_argument("--rounds", type=int, default=7)
    o.add_argument("--out", default="runs/bench_weighting")
    args = parser.parse_args()
    accuracy(args) if args.part == "accuracy" else overhead(args)


if __name__ == "__main__":
    main()
