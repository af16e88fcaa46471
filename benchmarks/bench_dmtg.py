"""DMTG on the composites: do learned groups follow the objects, and what do they gain over
naive MTL next to random grouping with the same K? Plus per-step training time from N = 9 to
N = 40 tasks at K = 5.

    make data-composites                          # once: Fashion-MNIST + MNIST files
    .venv/bin/python benchmarks/bench_dmtg.py quality [--seeds 0 1 2] [--groups 3] [--pretrain 0] [--finetune 3]
                                                      [--search-only] [--set k=v ...]
    .venv/bin/python benchmarks/bench_dmtg.py timing  [--threads 2]

quality: for each seed, optionally trains naive MTL for ``--pretrain`` epochs (DMTG then starts from
its weights, as in the paper; default 0: from scratch), then DMTG (learned groups) and DMTG with random groups of the same K on
configs/dmtg_composites_k{K}.yaml, each followed by ``--finetune`` epochs of the pruned model, the
split by object (one group per object, frozen from the start: does the data reward the grouping
the purity check looks for?) and naive MTL, both for the same total number of epochs; prints the groups, their purity (share of tasks
whose group's majority object is their own object; 1.0 = groups split exactly by object), and
NormGain_E / NormGain_L of the three groupings against that naive MTL (errors = 1 − top-1; losses =
test losses; a task that naive MTL answers without a single error is left out of NormGain_E,
where a relative change to 0 is undefined, and named).

timing: per-step training time of GroupNet (K = 5, stacked heads, fused AdamW) with N = 9 vs
N = 40 classification tasks on random data, with uniform group logits (the start of a search)
or, with ``--settled GAP``, logits that favour one group per task by GAP (late in a search, when
soft samples put weights below ``skip_below`` on the other heads), timed side by side in alternating rounds, with the
heads' share of the MACs of the naive MTL network (the paper's definition) and of the training
network.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mean_std, paired_medians, train_recipe  # noqa: E402

from taskfold.trainer.config import load_config  # noqa: E402
from taskfold.trainer.tasks import norm_gain  # noqa: E402


def object_of(task: str) -> str:
    """The object a composites task is about: ``fashion_class`` -> ``fashion``."""
    return task.split("_")[0]


def purity(groups: list[list[str]], *, identity_only: bool = False) -> float:
    """Share of tasks that sit in a group whose majority object is their own object. With
    ``identity_only`` the position tasks (``*_quadrant``) are left out: they ask where an object is,
    not what it is, and need the same features whichever object they are about."""
    kept = [[t for t in g if not (identity_only and t.endswith("_quadrant"))] for g in groups]
    kept = [g for g in kept if g]
    agree = sum(Counter(object_of(t) for t in g).most_common(1)[0][1] for g in kept)
    return agree / sum(len(g) for g in kept)


def quality(args) -> None:
    """Per seed: DMTG (learned groups) and DMTG with random groups (same K), from scratch or from
    naive MTL trained for ``pretrain`` epochs (the paper's starting point), each searched for
    ``train.epochs`` and fine-tuned for ``finetune`` epochs, and the split by object, against naive
    MTL trained for the same total number of epochs. ``search_only``: the learned groups alone."""
    recipe = f"configs/dmtg_composites_k{args.groups}.yaml"
    rows = []
    for seed in args.seeds:
        common = [f"train.seed={seed}", f"data.seed={seed}", *args.set]
        out = Path(args.out) / f"seed{seed}"
        search = load_config(recipe, common)
        search_epochs = search.train.epochs
        if args.search_only:  # the grouping alone: no fine-tune, no baselines
            found = train_recipe(recipe, common + ["method.finetune_epochs=0"], out / "search")
            groups = found["decision"]["groups"]
            rows.append({"purity": purity(groups), "identity_purity": purity(groups, identity_only=True)})
            print(json.dumps({"seed": seed, "groups": groups, **rows[-1]}))
            continue
        dmtg = common + [f"method.finetune_epochs={args.finetune}"]
        if args.pretrain:
            pretrained = out / "mtl_pretrain"
            train_recipe("configs/mtl_composites.yaml", common + [f"train.epochs={args.pretrain}"], pretrained)
            dmtg += [f"method.init_from={pretrained}", "method.head_hidden=0"]  # linear heads: they load too
        learned = train_recipe(recipe, dmtg, out / "learned")
        random = train_recipe(recipe, dmtg + ["method.assignment=random", f"method.assignment_seed={seed}"],
                              out / "random")
        objects = list(dict.fromkeys(object_of(t.name) for t in search.tasks))
        by_object = [objects.index(object_of(t.name)) for t in search.tasks]
        split = train_recipe(recipe, dmtg + ["method.assignment=fixed", f"method.groups={by_object}",
                                             f"train.epochs={search_epochs + args.finetune}"], out / "object")
        total = args.pretrain + search_epochs + args.finetune
        naive = train_recipe("configs/mtl_composites.yaml", common + [f"train.epochs={total}"], out / "mtl")
        row = {"seed": seed, "groups": learned["decision"]["groups"], "purity": purity(learned["decision"]["groups"]),
               "identity_purity": purity(learned["decision"]["groups"], identity_only=True),
               "random_groups": random["decision"]["groups"],
               "top1": {name: {t: m["top1"] for t, m in run["test"].items()}
                        for name, run in (("learned", learned), ("random", random), ("object", split), ("mtl", naive))}}
        naive_errors = {t: 1 - m["top1"] for t, m in naive["test"].items()}
        row["normgain_e_without"] = [t for t, e in naive_errors.items() if e == 0]  # relative change undefined
        for name, run in (("learned", learned), ("random", random), ("object", split)):
            row[f"{name}_normgain_e"] = norm_gain({t: 1 - m["top1"] for t, m in run["test"].items()
                                                   if t not in row["normgain_e_without"]}, naive_errors)
            row[f"{name}_normgain_l"] = norm_gain({t: m["loss"] for t, m in run["test"].items()},
                                                  {t: m["loss"] for t, m in naive["test"].items()})
        rows.append(row)
        print(json.dumps(row))
    print(f"K={args.groups}, seeds {args.seeds}, " + ("search only" if args.search_only else
          f"naive MTL pretrain {args.pretrain} epochs, fine-tune {args.finetune}"))
    print(f"purity (learned): {[round(r['purity'], 3) for r in rows]}; split exactly by object in "
          f"{sum(r['purity'] == 1.0 for r in rows)} of {len(rows)} seeds")
    print(f"identity tasks only (no *_quadrant): {[round(r['identity_purity'], 3) for r in rows]}; split exactly "
          f"by object in {sum(r['identity_purity'] == 1.0 for r in rows)} of {len(rows)} seeds")
    for name in () if args.search_only else ("learned", "random", "object"):
        print(f"{name:>8}: NormGain_E {mean_std([r[f'{name}_normgain_e'] for r in rows])} %, "
              f"NormGain_L {mean_std([r[f'{name}_normgain_l'] for r in rows])} %")


def training_step(num_tasks: int, args):
    """One DMTG training step (forward, mixed task losses, backward, optimiser step) of GroupNet
    with K = 5 and ``num_tasks`` classification tasks on random data, built from the same parts
    the trainer uses (network, method, task, optimiser); returns (step, network)."""
    from taskfold.models.arch import ArchSpec, TaskHead
    from taskfold.models.nets import build_network
    from taskfold.trainer.data.base import DatasetInfo
    from taskfold.trainer.components import create_optimizer
    from taskfold.trainer.methods import create_method
    from taskfold.trainer.tasks import create_task

    options = {"num_groups": 5, "stem_blocks": 1, "head_hidden": args.hidden, "hard": args.hard,
               "skip_below": args.skip_below}
    info = DatasetInfo((args.size, args.size), (0.0,) * 3, (1.0,) * 3, {"label": {"classes": 10}})
    tasks = [create_task(f"t{i}", "classification", info, target="label") for i in range(num_tasks)]
    spec = ArchSpec(method="dmtg", backbone=args.backbone, image_size=args.size,
                    tasks=[TaskHead(t.name, t.kind, t.output, t.out_channels) for t in tasks], options=options)
    model = build_network(spec).train()
    if args.settled:  # late in a search: every task's logits favour one group by ``settled``
        with torch.no_grad():
            groups = torch.randint(0, 5, (num_tasks,), generator=torch.Generator().manual_seed(0))
            model.group_logits.copy_(torch.nn.functional.one_hot(groups, 5) * args.settled)
    method = create_method({"name": "dmtg", **options})
    optimizer = create_optimizer("adamw", method.param_groups(model), lr=1e-3, weight_decay=1e-4)
    images = torch.randn(args.batch, 3, args.size, args.size)
    targets = {"label": torch.randint(0, 10, (args.batch,))}

    def step() -> None:
        losses = method.task_losses(model, model(images), targets, tasks)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    return step, model


def macs_shares(model, num_tasks: int, args) -> dict[str, float]:
    """MACs per image of (a) the naive MTL network of these tasks — one encoder, N heads — with
    the heads' share of it (the paper's "Heads FLOPs Portion", DMTG Table A1), and (b) the heads'
    share of the DMTG training network, which runs K branches and all K·N heads."""
    head = sum(w.numel() for w in next(iter(model.heads.values())).copy_weights[0])  # in·hidden + hidden·out
    stem, branch = _conv_macs(model, args)
    naive = stem + branch + num_tasks * head
    training = model.num_groups * num_tasks * head
    return {"naive_macs": naive, "naive_share": num_tasks * head / naive,
            "training_share": training / (stem + model.num_groups * branch + training)}


def _conv_macs(model, args) -> tuple[int, int]:
    """Conv MACs of the shared stem and of one group branch, counted with forward hooks."""
    counts = {"stem": 0, "branch": 0}
    part = "stem"

    def hook(mod, _inp, out):
        counts[part] += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    convs = [m for m in [*model.stem.modules(), *model.branches[0].modules()] if isinstance(m, torch.nn.Conv2d)]
    handles = [m.register_forward_hook(hook) for m in convs]
    model.eval()
    with torch.no_grad():
        x, feats = model._stem(torch.zeros(1, 3, args.size, args.size))
        part = "branch"
        model._branch(0, x, feats)
    for h in handles:
        h.remove()
    model.train()
    return counts["stem"], counts["branch"]


def timing(args) -> None:
    """N = 9 and N = 40 timed side by side in alternating rounds (the machine is shared)."""
    steps, shares = {}, {}
    for n in (9, 40):
        steps[n], model = training_step(n, args)
        shares[n] = macs_shares(model, n, args)
    medians = paired_medians({f"N={n}": steps[n] for n in steps}, rounds=args.rounds, per_round=2, warmup=args.warmup)
    print(f"K=5, backbone {args.backbone} at {args.size}px, head hidden {args.hidden}, hard={args.hard}, "
          f"skip_below={args.skip_below}, settled logit gap {args.settled}, batch {args.batch}, "
          f"threads {args.threads}, fused AdamW")
    for n in steps:
        print(f"N={n:<2}: {medians[f'N={n}'] * 1e3:.1f} ms/step; heads {100 * shares[n]['naive_share']:.1f}% of the "
              f"naive MTL network's MACs, {100 * shares[n]['training_share']:.1f}% of the training network's")
    print(f"ratio N=40 / N=9: {medians['N=40'] / medians['N=9']:.3f} (target ≤ 1.3; the paper's figures give 1.7)")
    print(f"for scale: the naive MTL network's own MACs grow {shares[40]['naive_macs'] / shares[9]['naive_macs']:.3f}x "
          f"from N=9 to N=40")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--groups", type=int, default=3)
    q.add_argument("--out", default="runs/bench_dmtg")
    q.add_argument("--pretrain", type=int, default=0,
                   help="epochs of naive MTL that DMTG starts from (the paper's start; 0: from scratch)")
    q.add_argument("--finetune", type=int, default=3, help="epochs of fine-tuning the pruned model")
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--search-only", action="store_true",
                   help="only the search and its groups' purity (no fine-tune, no baselines): for sweeps of its options")
    q.add_argument("--set", action="append", default=[])
    t = sub.add_parser("timing")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--backbone", default="resnet10")
    t.add_argument("--size", type=int, default=32)
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--rounds", type=int, default=7)
    t.add_argument("--warmup", type=int, default=25, help="steps before timing: with hard sampling every head must "
                   "have been chosen once, so that the optimiser has created its state (a one-off cost)")
    t.add_argument("--hard", action="store_true")
    t.add_argument("--settled", type=float, default=0.0,
                   help="logit gap of a settled assignment (0: uniform logits, the start of a search)")
    t.add_argument("--skip-below", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quality(args) if args.part == "quality" else timing(args)


if __name__ == "__main__":
    main()
