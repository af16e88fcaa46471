"""MAdds vs Δm of BMTAS at three resource weights, next to the single-task and shared baselines.

Runs the five synthscenes recipes end to end (train/search -> retrain -> compile) with the same
``--set`` overrides, then prints a Markdown table (bundle MACs, Δm on each task's main metric vs
the single-task models, nodes per encoder layer), checks the issue's expectations (a larger λ
never derives an architecture with more MAdds; λ = 0 ends (nearly) separate, with at least T - 1
nodes at the last layer; the largest λ fully shared), and writes the tree pictures and the
trade-off plot into ``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_bmtas_tradeoff.py --out /tmp/bmtas_bench --threads 1

(``--set`` overrides, e.g. ``--set train.seed=1 --set data.seed=1``, apply to all five recipes;
``method.*`` ones only to the searches.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from taskfold.cli.pipeline import run_pipeline
from taskfold.trainer.bmtas_report import TradeoffRow, plot_tradeoff, plot_tree, tradeoff_table
from taskfold.trainer.config import load_config
from taskfold.trainer.data import create_dataset
from taskfold.trainer.tasks import create_task, delta_m

ROOT = Path(__file__).resolve().parent.parent / "configs"
BASELINES = {"single": "synthscenes_dense_single", "shared": "synthscenes_dense_shared"}
SEARCHES = {"λ=0": "bmtas_synthscenes_lambda0", "λ small": "bmtas_synthscenes_lambda_small",
            "λ large": "bmtas_synthscenes_lambda_large"}
QUIET = ["train.progress=false", "bench.iters=2", "bench.warmup=1", "bench.batches=[1]"]


def run_recipe(recipe: str, out: Path, overrides: list[str]) -> dict:
    cfg = load_config(ROOT / f"{recipe}.yaml", QUIET + overrides)
    if cfg.method_name in ("single", "shared"):  # no retrain stage to shorten
        cfg = load_config(ROOT / f"{recipe}.yaml", QUIET + [o for o in overrides if not o.startswith("method.")])
    return run_pipeline(cfg, out / recipe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bmtas_bench"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override, e.g. train.epochs=2")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    results = {label: run_recipe(recipe, args.out, args.overrides) for label, recipe in {**BASELINES, **SEARCHES}.items()}
    cfg = load_config(ROOT / f"{BASELINES['single']}.yaml")
    info = create_dataset(cfg.data.dataset, "val", size=cfg.data.size, num_samples=1, seed=cfg.data.seed).info
    tasks = [create_task(t.name, t.kind, info, **t.options) for t in cfg.tasks]
    main_of = {t.name: t.main_metric for t in tasks}
    directions = {t.name: t.metrics for t in tasks}

    def main_metrics(test: dict) -> dict:
        return {name: {main_of[name]: metrics[main_of[name]]} for name, metrics in test.items()}

    reference = main_metrics(results["single"]["test"])
    rows, trees = [], {}
    for label, result in results.items():
        nodes = None
        if label in SEARCHES:
            decision = json.loads((Path(result["run_dir"]).parent / "arch.json").read_text())["decision"]
            trees[label] = decision["tree"]
            nodes = [len(grouping) for grouping in decision["tree"]]
            plot_tree(decision["tree"], args.out / f"tree_{SEARCHES[label]}.png", title=f"BMTAS {label}")
        rows.append(TradeoffRow(label, result["cost"]["macs"],
                                delta_m(main_metrics(result["test"]), reference, directions), nodes))
    print(tradeoff_table(rows))
    print()
    for label, tree in trees.items():
        print(f"{label}: {json.dumps(tree)}")
    plot_tradeoff(rows, args.out / "tradeoff.png")
    searched = [r for r in rows if r.branches_per_layer]
    monotone = all(a.macs >= b.macs for a, b in zip(searched, searched[1:]))
    num_tasks = len(tasks)
    separate = searched[0].branches_per_layer[-1] >= num_tasks - 1  # λ = 0: (nearly) separate branches
    shared = all(n == 1 for n in searched[-1].branches_per_layer)  # largest λ: one encoder for all
    print(f"\nlarger λ never gives more MAdds: {monotone}; λ = 0 (nearly) separate: {separate}; "
          f"largest λ fully shared: {shared}; plots in {args.out}")


if __name__ == "__main__":
    main()
