"""CAGrad's exact dual solver: its optimality and its cost per training step.

    nice -n 10 .venv/bin/python benchmarks/bench_cagrad_dual.py [--problems 300] [--rounds 15]

Optimality: on random Gram matrices (2-7 tasks, gradients in 2-12 dimensions with a shared
component, norms spread over 10^-2..10^1.5, c in {0.2, 0.4, 0.9}) the largest KKT residual of
``solve_dual``'s answer relative to the dual's gradient, and how often the active-set walk met a
singular face and the exhaustive fallback answered, and how many faces' T_S x T_S systems one
call solved. Cost: ``solve_dual`` on 2, 4, 8 and 12 tasks
(well conditioned, and with one task ~10^4 x smaller), timed in alternating rounds (single
process; numpy on T x T matrices), median and interquartile range.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line, paired_samples  # noqa: E402

from taskfold.trainer.weighting import cagrad  # noqa: E402


def kkt_residual(gram: np.ndarray, c: float, w: np.ndarray) -> float:
    """max(|slope_i - mu| on the support, max(0, mu - slope_j) off it) / max |slope|."""
    n = len(gram)
    b = np.full(n, 1 / n)
    slope = gram @ b + c * np.sqrt(b @ gram @ b) * gram @ w / np.sqrt(w @ gram @ w)
    mu = slope[np.argmax(w)]
    on = w > 0
    worst = max(np.abs(slope[on] - mu).max(), np.maximum(mu - slope[~on], 0).max(initial=0.0))
    return float(worst / np.abs(slope).max())


def random_gram(rng: np.random.Generator, tasks: int, dim: int) -> np.ndarray:
    norms = 10 ** rng.uniform(-2, 1.5, tasks)
    g = rng.standard_normal((tasks, dim)) + rng.uniform(-2, 2) * rng.standard_normal(dim)
    g = g / np.linalg.norm(g, axis=1, keepdims=True) * norms[:, None]
    return g @ g.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(cpu_line())
    rng = np.random.default_rng(0)
    residuals, fallbacks, solves = [], 0, []
    face_solution = cagrad._face_solution
    count = [0]

    def counted(*a):
        count[0] += 1
        return face_solution(*a)

    cagrad._face_solution = counted       # how many faces' systems one solve_dual call solves
    for _ in range(args.problems):
        tasks = int(rng.integers(2, 8))
        gram = random_gram(rng, tasks, int(rng.integers(2, 13)))
        gram = gram / (np.trace(gram) / tasks)
        c = float(rng.choice([0.2, 0.4, 0.9]))
        b = np.full(tasks, 1 / tasks)
        a, c0 = gram @ b, c * np.sqrt(b @ gram @ b)
        fallbacks += cagrad._active_set(gram, a, c0, c) is None
        count[0] = 0
        w = cagrad.solve_dual(gram, c)
        solves.append((tasks, count[0]))
        if w @ gram @ w > 0:
            residuals.append(kkt_residual(gram, c, w))
    print(f"optimality over {args.problems} problems: max relative KKT residual {max(residuals):.1e} "
          f"({len(residuals)} with g_w != 0); exhaustive fallback used {fallbacks} times")
    for tasks in sorted({t for t, _ in solves}):
        counts = [k for t, k in solves if t == tasks]
        print(f"  T={tasks}: face systems solved per call median {statistics.median(counts):g}, max {max(counts)} "
              f"(of {2 ** tasks - 1} faces)")
    cagrad._face_solution = face_solution
    candidates = {}
    for tasks in (2, 4, 8, 12):
        for kind in ("well", "one-small"):
            norms = np.ones(tasks) * 10
            if kind == "one-small":
                norms[0] = 1e-3
            g = rng.standard_normal((tasks, 50))
            g = g / np.linalg.norm(g, axis=1, keepdims=True) * norms[:, None]
            gram = g @ g.T
            candidates[f"T={tasks:<2} {kind}"] = lambda gram=gram: cagrad.solve_dual(gram, 0.4)
    samples = paired_samples(candidates, rounds=args.rounds, per_round=20)
    print("solve_dual per call, alternating rounds: median [q1, q3]")
    for name, values in samples.items():
        q1, _, q3 = statistics.quantiles(values, n=4)
        print(f"  {name}: {statistics.median(values) * 1e3:.3f} ms [{q1 * 1e3:.3f}, {q3 * 1e3:.3f}]")


if __name__ == "__main__":
    main()
