"""DMTG on the composites: do learned groups follow the objects, and what do they gain over
naive MTL next to random grouping with the same K? Plus per-step training time from N = 9 to
N = 40 tasks at K = 5.

    make data-composites                          # once: Fashion-MNIST + MNIST files
    .venv/bin/python benchmarks/bench_dmtg.py quality [--seeds 0 1 2] [--groups 3] [--set k=v ...]
    .venv/bin/python benchmarks/bench_dmtg.py timing  [--threads 2]

quality: for each seed, trains DMTG (learned groups), DMTG with random groups and naive MTL on
configs/dmtg_composites_k{K}.yaml; prints the groups, their purity (share of tasks whose group's
majority object is their own object; 1.0 = groups split exactly by object), and NormGain_E /
NormGain_L of both groupings against naive MTL (errors = 1 − top-1; losses = test losses).

timing: median per-step training time of GroupNet (K = 5, stacked heads) with N = 9 vs N = 40
classification tasks on random data, with the heads' share of the training network's MACs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mean_std, train_recipe  # noqa: E402

from taskfold.trainer.tasks import norm_gain  # noqa: E402


def purity(groups: list[list[str]]) -> float:
    """Share of tasks that sit in a group whose majority object is their own object."""
    object_of = lambda task: task.split("_")[0]  # noqa: E731  fashion_* / digit_*
    agree = sum(Counter(object_of(t) for t in g).most_common(1)[0][1] for g in groups)
    return agree / sum(len(g) for g in groups)


def quality(args) -> None:
    recipe = f"configs/dmtg_composites_k{args.groups}.yaml"
    rows = []
    for seed in args.seeds:
        common = [f"train.seed={seed}", f"data.seed={seed}", *args.set]
        out = Path(args.out) / f"seed{seed}"
        learned = train_recipe(recipe, common, out / "learned")
        random = train_recipe(recipe, common + ["method.assignment=random", f"method.assignment_seed={seed}"],
                              out / "random")
        naive = train_recipe("configs/mtl_composites.yaml", common, out / "mtl")
        row = {"seed": seed, "groups": learned["decision"]["groups"], "purity": purity(learned["decision"]["groups"]),
               "random_groups": random["decision"]["groups"]}
        for name, run in (("learned", learned), ("random", random)):
            row[f"{name}_normgain_e"] = norm_gain({t: 1 - m["top1"] for t, m in run["test"].items()},
                                                  {t: 1 - m["top1"] for t, m in naive["test"].items()})
            row[f"{name}_normgain_l"] = norm_gain({t: m["loss"] for t, m in run["test"].items()},
                                                  {t: m["loss"] for t, m in naive["test"].items()})
        rows.append(row)
        print(json.dumps(row))
    print(f"K={args.groups}, seeds {args.seeds}")
    print(f"purity (learned): {[round(r['purity'], 3) for r in rows]}; split exactly by object in "
          f"{sum(r['purity'] == 1.0 for r in rows)} of {len(rows)} seeds")
    for name in ("learned", "random"):
        print(f"{name:>8}: NormGain_E {mean_std([r[f'{name}_normgain_e'] for r in rows])} %, "
              f"NormGain_L {mean_std([r[f'{name}_normgain_l'] for r in rows])} %")


def step_time(num_tasks: int, args) -> tuple[float, float]:
    """(median seconds per training step, heads' share of the training network's MACs)."""
    from taskfold.models.arch import ArchSpec, TaskHead
    from taskfold.models.nets import build_network
    from taskfold.trainer.methods import create_method

    options = {"num_groups": 5, "stem_blocks": 1, "head_hidden": args.hidden, "hard": args.hard,
               "skip_below": args.skip_below}
    tasks = [TaskHead(f"t{i}", "classification", "global", 10) for i in range(num_tasks)]
    spec = ArchSpec(method="dmtg", backbone=args.backbone, image_size=args.size, tasks=tasks, options=options)
    model = build_network(spec).train()
    method = create_method({"name": "dmtg", **options})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(args.batch, 3, args.size, args.size)
    targets = {"classification": torch.randint(0, 10, (args.batch,))}
    heads = [_ClassificationTask(t.name) for t in tasks]
    times = []
    for i in range(args.steps + 2):
        start = time.perf_counter()
        losses = method.task_losses(model, model(images), targets, heads)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    head_macs = sum(w.numel() for head in model.heads.values() for w in head.weights)  # K·N heads, per image
    backbone = _backbone_macs(model, args)
    return sorted(times)[len(times) // 2], head_macs / (head_macs + backbone)


class _ClassificationTask:
    def __init__(self, name: str) -> None:
        self.name, self.target = name, "classification"

    def loss(self, pred, target):
        return torch.nn.functional.cross_entropy(pred, target)


def _backbone_macs(model, args) -> int:
    """Conv MACs of the stem and all K branches (what the training network runs besides heads)."""
    total = 0

    def hook(mod, _inp, out):
        nonlocal total
        total += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    convs = [m for m in [*model.stem.modules(), *model.branches.modules()] if isinstance(m, torch.nn.Conv2d)]
    handles = [m.register_forward_hook(hook) for m in convs]
    model.eval()
    with torch.no_grad():
        x, feats = model._stem(torch.zeros(1, 3, args.size, args.size))
        for k in range(model.num_groups):
            model._branch(k, x, feats)
    for h in handles:
        h.remove()
    model.train()
    return total


def timing(args) -> None:
    torch.set_num_threads(args.threads)
    small, small_share = step_time(9, args)
    large, large_share = step_time(40, args)
    print(f"K=5, backbone {args.backbone} at {args.size}px, head hidden {args.hidden}, hard={args.hard}, "
          f"skip_below={args.skip_below}, batch {args.batch}, threads {args.threads}")
    print(f"N=9 : {small * 1e3:.1f} ms/step, heads {100 * small_share:.1f}% of training-network MACs")
    print(f"N=40: {large * 1e3:.1f} ms/step, heads {100 * large_share:.1f}% of training-network MACs")
    print(f"ratio N=40 / N=9: {large / small:.3f} (target ≤ 1.3; the paper's figures give 1.7)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--groups", type=int, default=3)
    q.add_argument("--out", default="runs/bench_dmtg")
    q.add_argument("--set", action="append", default=[])
    t = sub.add_parser("timing")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--backbone", default="resnet10")
    t.add_argument("--size", type=int, default=32)
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--hard", action="store_true")
    t.add_argument("--skip-below", type=float, default=1e-3)
    args = parser.parse_args()
    quality(args) if args.part == "quality" else timing(args)


if __name__ == "__main__":
    main()
