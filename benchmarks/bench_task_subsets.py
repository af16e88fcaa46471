"""Pay only for the tasks you ask for: one task of a tree that branches early, against all tasks.

A BMTAS-like tree (a small shared stem, then one heavy branch per task) is exported and bundled;
three candidates are timed in alternating rounds in one process, at batch 1 and 8 and at 1 and
2 intra-op threads:

- ``all``: ``predictor(x)``, every task;
- ``one/full-graph``: the full session asked to fetch only task 0's output (does ONNX Runtime
  skip the other branches by itself?);
- ``one/pruned``: ``predictor(x, tasks=["t0"])``, the pruned sub-graph.

    .venv/bin/python benchmarks/bench_task_subsets.py [--rounds 15]

Prints each candidate's median latency, its ratio to ``all``, and the MACs ratio
``cost(tasks=["t0"]) / cost()`` the pruned ratio should approach.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import paired_medians  # noqa: E402

from taskfold.runtime import count_onnx, load, write_manifest  # noqa: E402

TASKS, SIZE, WIDTH = 4, 64, 32


class EarlyBranchingTree(torch.nn.Module):
    """A one-conv shared stem and, per task, three 3x3 convs and a 1x1 dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU())
        self.branches = torch.nn.ModuleList(torch.nn.Sequential(
            torch.nn.Conv2d(16, WIDTH, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(WIDTH, WIDTH, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(WIDTH, WIDTH, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(WIDTH, 2, 1)) for _ in range(TASKS))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shared = self.stem(image)
        return tuple(branch(shared) for branch in self.branches)


def build_bundle(folder: Path) -> Path:
    torch.manual_seed(0)
    outputs = [f"t{i}_out" for i in range(TASKS)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(EarlyBranchingTree().eval(), (torch.zeros(1, 3, SIZE, SIZE),), str(folder / "model.onnx"),
                          dynamo=False, input_names=["image"], output_names=outputs,
                          dynamic_axes={name: {0: "N"} for name in ["image", *outputs]})
    cost = count_onnx(folder / "model.onnx")
    write_manifest(folder, {
        "name": "early-branching-tree", "method": "benchmark",
        "input": {"name": "image", "shape": [-1, 3, SIZE, SIZE], "dtype": "float32", "layout": "NCHW"},
        "tasks": [{"name": f"t{i}", "kind": "depth", "output": out, "shape": [-1, 2, SIZE, SIZE]}
                  for i, out in enumerate(outputs)],
        "cost": {"macs": cost.macs, "params": cost.params,
                 "per_task_macs": {f"t{i}": cost.per_output_macs[out] for i, out in enumerate(outputs)}},
        "files": ["model.onnx"],
    })
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            print(line)
        elif line.startswith("Flags"):  # the SIMD flags that decide ORT's kernels
            print("SIMD flags:", " ".join(f for f in line.split()[1:] if f.startswith(("avx", "fma", "f16c", "vnni"))))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_bundle(Path(tmp))
        for threads in (1, 2):
            predictor = load(bundle, threads=threads)
            macs_ratio = predictor.cost(tasks=["t0"]) / predictor.cost()
            for batch in (1, 8):
                images = np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
                medians = paired_medians({
                    "all": lambda: predictor(images),
                    "one/full-graph": lambda: predictor._backend.run(images, ["t0_out"]),
                    "one/pruned": lambda: predictor(images, tasks=["t0"]),
                }, rounds=args.rounds)
                row = "  ".join(f"{name} {sec * 1e3:7.2f} ms ({sec / medians['all']:.2f}x)" for name, sec in medians.items())
                print(f"threads={threads} batch={batch}  {row}  MACs ratio {macs_ratio:.2f}")


if __name__ == "__main__":
    main()
