"""One number for a multi-task model: Δm against single-task models, NormGain against naive MTL.

Both normalise each task's change by the reference value, so a task whose metric or loss is large
in absolute terms does not drown the others (the reason the papers use them instead of sums).
Both are percentages and both are "higher is better".
"""
from __future__ import annotations

import math


def _relative(value: float, reference: float, where: str) -> float:
    if reference == 0 or not math.isfinite(reference):
        raise ValueError(f"{where}: the reference value is {reference}; "
                         "a relative change needs a finite non-zero one")
    return (value - reference) / reference


def delta_m(results: dict[str, dict[str, float]], baselines: dict[str, dict[str, float]],
            directions: dict[str, dict[str, bool]]) -> float:
    """Δm in %: ``1/T Σ_i (-1)^{l_i} (M_m,i - M_b,i) / M_b,i`` with l_i = 1 when lower is better.

    Maninis et al. (2019), as used by BMTAS (eq. 7) and IAL (ΔMTL, eq. 11). The sum runs over
    every (task, metric) pair in ``results`` — T counts metrics, not tasks — so choose the metrics
    to pass: the papers' tables use one or a few per task (e.g. mIoU, RMSE, mean angle error).
    ``baselines`` holds the single-task models' values, ``directions`` each metric's "higher is
    better" (a task's ``metrics``). Positive: the multi-task model is better on average.
    """
    terms = []
    for task, metrics in results.items():
        for metric, value in metrics.items():
            where = f"delta_m: {task}/{metric}"
            try:
                reference = baselines[task][metric]
                higher_is_better = directions[task][metric]
            except KeyError:
                raise ValueError(f"{where}: no baseline value or direction for this metric") from None
            sign = 1.0 if higher_is_better else -1.0
            terms.append(sign * _relative(value, reference, where))
    if not terms:
        raise ValueError("delta_m: no metrics given")
    return 100.0 * sum(terms) / len(terms)


def norm_gain(method: dict[str, float], naive_mtl: dict[str, float]) -> float:
    """NormGain in %: ``1/N Σ_n (E_naive,n - E_method,n) / E_naive,n`` (DMTG, eqs. 7 and 8).

    ``method`` and ``naive_mtl`` map each task to a lower-is-better quantity: its loss
    (NormGain_L) or its error (NormGain_E) — of the model under test and of the naive shared-
    encoder model. Positive: the method reduces the tasks' losses/errors on average.
    """
    if not method:
        raise ValueError("norm_gain: no tasks given")
    gains = []
    for task, value in method.items():
        if task not in naive_mtl:
            raise ValueError(f"norm_gain: no naive-MTL value for task {task!r}")
        gains.append(-_relative(value, naive_mtl[task], f"norm_gain: {task}"))
    return 100.0 * sum(gains) / len(gains)
