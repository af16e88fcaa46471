"""Primary-task accuracy of single, Aux-Head, Aux-G-Stage, Aux-G-Layer and Aux-NAS on synthscenes
(primary segmentation, auxiliary normals), several seeds, mean ± std, plus each Aux-NAS run's final
max alpha^P (what decides whether the auxiliary branch can be cut away).

    .venv/bin/python benchmarks/bench_aux_accuracy.py [--seeds 0 1 2] [--set train.epochs=4 ...]

The recipes are configs/{single_seg,aux_head_seg_normals,aux_g_stage_seg_normals,
aux_g_layer_seg_normals,aux_nas_seg_normals}.yaml; --set overrides apply to all of them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mean_std, train_recipe  # noqa: E402

RECIPES = {
    "single": "configs/single_seg.yaml",
    "aux_head": "configs/aux_head_seg_normals.yaml",
    "aux_g_stage": "configs/aux_g_stage_seg_normals.yaml",
    "aux_g_layer": "configs/aux_g_layer_seg_normals.yaml",
    "aux_nas": "configs/aux_nas_seg_normals.yaml",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(RECIPES))
    parser.add_argument("--out", default="runs/bench_aux")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            summary = train_recipe(RECIPES[method], [f"train.seed={seed}", *args.set],
                                   Path(args.out) / f"{method}_seed{seed}")
            row = {"seed": seed, "miou": summary["test"]["seg"]["miou"],
                   "pixel_acc": summary["test"]["seg"]["pixel_acc"],
                   "max_alpha_p": summary["decision"].get("max_alpha_p")}
            results[method].append(row)
            print(json.dumps({"method": method, **row}), flush=True)
    print(f"\nprimary task: segmentation (mIoU, test split), seeds {args.seeds}, overrides {args.set}")
    print(f"{'method':>12} {'mIoU':>18} {'pixel acc':>18} {'max alpha^P':>14}")
    for method, rows in results.items():
        alphas = [r["max_alpha_p"] for r in rows if r["max_alpha_p"] is not None]
        print(f"{method:>12} {mean_std([r['miou'] for r in rows]):>18} {mean_std([r['pixel_acc'] for r in rows]):>18} "
              f"{', '.join(f'{a:.2g}' for a in alphas) or '-':>14}")


if __name__ == "__main__":
    main()
