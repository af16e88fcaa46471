"""Item time of the on-disk loaders, this tree against an older one, alternating in one process:
milliseconds per training item (decode + augmentation + resize, 0 workers) at the recipes'
resolutions, wall and CPU time (items per CPU-second: the per-core rate), and the ratio old / new
per round.

    git archive <old-commit> | tar -x -C /tmp/old_tree
    nice -n 5 .venv/bin/python benchmarks/bench_loaders_ab.py --old-tree /tmp/old_tree

The old tree is copied into a temporary folder as the package ``taskfold_before`` (its
``taskfold`` imports rewritten) so both versions run side by side on the same files; rounds
alternate which goes first. Fixtures and recipes are bench_loaders.py's. A ratio taken in
alternating rounds stays meaningful while other work shares the machine; absolute times do not.
"""
from __future__ import annotations

import argparse
import importlib
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loaders import DATASETS, ROOT  # noqa: E402
from common import cpu_line, rotated  # noqa: E402

from taskfold.trainer.config import load_config  # noqa: E402
from taskfold.trainer.data import create_dataset  # noqa: E402
from taskfold.trainer.data.loader import SampleKey  # noqa: E402


def import_as_before(tree: Path, into: Path):
    """``tree`` (a taskfold checkout) importable as ``taskfold_before``: its (create_dataset, SampleKey)."""
    package = into / "taskfold_before"
    shutil.copytree(tree, package, ignore=shutil.ignore_patterns(".git", ".venv", "tests", "benchmarks", "runs"))
    for source in package.rglob("*.py"):
        text = source.read_text()
        source.write_text(re.sub(r"\btaskfold\.", "taskfold_before.", re.sub(r"^(\s*)import taskfold\b",
                                                                           r"\1import taskfold_before", text,
                                                                           flags=re.M)))
    sys.path.insert(0, str(into))
    return (importlib.import_module("taskfold_before.trainer.data").create_dataset,
            importlib.import_module("taskfold_before.trainer.data.loader").SampleKey)


def ms_per_item(dataset, key_type, seeds: range) -> tuple[float, float]:
    """(wall, CPU) milliseconds per item: CPU time is what an item costs a core, whatever else runs."""
    wall, cpu = time.perf_counter(), time.process_time()
    for seed in seeds:
        for index in range(len(dataset)):
            dataset[key_type(index, seed)]
    items = len(seeds) * len(dataset)
    return (time.perf_counter() - wall) / items * 1e3, (time.process_time() - cpu) / items * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-tree", type=Path, required=True, help="a checkout of the older taskfold")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="augmented passes over the files per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(cpu_line(), "; 1 torch thread, 0 workers")
    with tempfile.TemporaryDirectory() as tmp:
        create_before, key_before = import_as_before(args.old_tree, Path(tmp) / "old")
        sides = {"old": (create_before, key_before), "new": (create_dataset, SampleKey)}
        for name in args.datasets.split(","):
            write, recipe = DATASETS[name]
            cfg = load_config(ROOT / "configs" / recipe).data
            (Path(tmp) / name).mkdir()
            root = str(write(Path(tmp) / name))
            loaders = {side: make(name, "train", size=cfg.size, num_samples=None, root=root, **cfg.options)
                       for side, (make, _) in sides.items()}
            times: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
            for r in range(args.rounds):
                for side in rotated(["old", "new"], r):
                    seeds = range(r * args.epochs, (r + 1) * args.epochs)
                    times[side].append(ms_per_item(loaders[side], sides[side][1], seeds))
            ratios = [old[0] / new[0] for old, new in zip(times["old"], times["new"])]
            cells = ", ".join(f"{side} {statistics.median(t[0] for t in v):.1f} ms/item "
                              f"(CPU {statistics.median(t[1] for t in v):.1f} ms: "
                              f"{1e3 / statistics.median(t[1] for t in v):.0f} items per CPU-second)"
                              for side, v in times.items())
            print(f"{name} at {cfg.size} px: {cells}; old/new wall {statistics.median(ratios):.2f}x "
                  f"(range {min(ratios):.2f}-{max(ratios):.2f})", flush=True)


if __name__ == "__main__":
    main()
