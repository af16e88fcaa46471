"""Time forward + backward of the BMTAS resource loss, one architecture step's worth.

The exact estimator is run at the sizes a search uses (T = 12 tasks, L = 18 blocks: a
MobileNetV2-sized encoder; target <= 50 ms on a 2-core CPU) and beyond, up to its 16-task
limit; the paper's chain is shown at T = 4..6, where its Bell(T) partitions are still few.

    .venv/bin/python benchmarks/bench_resource_loss.py [--threads 1] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from taskfold.models.bmtas_resource import expected_madds, set_partitions


def time_step(estimator: str, num_tasks: int, num_layers: int, repeats: int) -> float:
    """Median seconds of one forward + backward after two warm-up steps (caches, allocator)."""
    alpha = torch.zeros(num_layers, num_tasks, num_tasks, requires_grad=True)
    madds = torch.rand(num_layers, generator=torch.Generator().manual_seed(0)) * 1e8
    times = []
    for step in range(repeats + 2):
        start = time.perf_counter()
        expected_madds(alpha, madds, estimator).backward()
        if step >= 2:
            times.append(time.perf_counter() - start)
        alpha.grad = None
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--layers", type=int, default=18)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases = [("exact", t) for t in (4, 5, 6, 8, 12, 14, 16)] + [("paper_chain", t) for t in (4, 5, 6)]
    print(f"torch {torch.__version__}, {args.threads} thread(s), L = {args.layers}, "
          f"median of {args.repeats} forward+backward steps")
    print(f"{'estimator':<12} {'T':>3} {'terms':>7} {'ms':>9} {'vs exact T=12':>14}")
    results = {case: time_step(*case, args.layers, args.repeats) for case in cases}
    reference = results[("exact", 12)]
    for (estimator, num_tasks), seconds in results.items():
        terms = 2**num_tasks - 1 if estimator == "exact" else len(set_partitions(num_tasks))
        ratio = seconds / reference
        print(f"{estimator:<12} {num_tasks:>3} {terms:>7} {seconds * 1e3:>9.3f} {ratio:>13.2f}x")
    for num_tasks in (4, 5, 6):
        ratio = results[("paper_chain", num_tasks)] / results[("exact", num_tasks)]
        print(f"paper_chain / exact at T={num_tasks}: {ratio:.1f}x")
    verdict = "meets" if reference <= 0.050 else "MISSES"
    print(f"exact T=12, L={args.layers}: {reference * 1e3:.2f} ms ({verdict} the 50 ms target)")


if __name__ == "__main__":
    main()
