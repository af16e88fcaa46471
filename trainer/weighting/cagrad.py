"""CAGrad: Liu, Liu, Jin, Stone & Liu (NeurIPS 2021), "Conflict-Averse Gradient Descent".

The update d maximises the worst task's improvement ``min_i g_i . d`` within a ball around the
average gradient, ``|d - g0| <= c |g0|``. Its dual is a small problem over the simplex:

    w* = argmin_{w in simplex}  g_w . g0 + c |g0| |g_w|,   g_w = sum_i w_i g_i,

and ``d = g0 + (c |g0| / |g_w*|) g_w*``. Both terms only need the Gram matrix, so the dual is solved
on a T x T matrix (projected gradient with backtracking, float64). As in the authors' code, d is
divided by ``1 + c^2`` (``rescale``) and multiplied by T so the shared part is on the scale of the
summed loss the heads are trained on. Default ``c = 0.4``: the value the paper uses on NYUv2 and
Cityscapes (LibMTL's default is 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from taskfold.trainer.weighting.base import StepContext
from taskfold.trainer.weighting.common import GradientStrategy, OnOptions
from taskfold.trainer.weighting.grads import combined_backward, scale_losses
from taskfold.trainer.weighting.registry import WEIGHTINGS


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto ``{w >= 0, sum w = 1}`` (sort-based, Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    k = np.nonzero(u - cumulative / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - cumulative[k] / (k + 1), 0.0)


def solve_dual(gram: np.ndarray, c: float, iters: int = 2000, tol: float = 1e-12) -> np.ndarray:
    """``argmin_{w in simplex} w . (gram b) + c sqrt(b' gram b) sqrt(w' gram w)``, ``b = 1/T``."""
    n = gram.shape[0]
    b = np.full(n, 1.0 / n)
    scale = float(np.trace(gram)) / n
    if scale <= 0:
        return b
    gram = gram / scale                          # the minimiser does not depend on the scale
    a = gram @ b
    c0 = c * np.sqrt(max(b @ gram @ b, 0.0))

    def value(w: np.ndarray) -> float:
        return float(w @ a + c0 * np.sqrt(max(w @ gram @ w, 0.0)))

    w, step = b.copy(), 1.0
    for _ in range(iters):
        norm = np.sqrt(max(w @ gram @ w, 1e-30))
        slope = a + c0 * (gram @ w) / norm
        current = value(w)
        while True:
            candidate = project_to_simplex(w - step * slope)
            move = candidate - w
            if value(candidate) <= current + slope @ move + (move @ move) / (2 * step) or step < 1e-12:
                break
            step /= 2
        w = candidate
        if np.sqrt(move @ move) < tol:
            break
        step *= 2
    return w


def cagrad_coefficients(gram: torch.Tensor, c: float, rescale: bool) -> torch.Tensor:
    """``beta`` with ``sum_t beta_t g_t = T * (g0 + lambda g_w) / (1 + c^2 if rescale else 1)``."""
    g = gram.numpy()
    n = g.shape[0]
    w = solve_dual(g, c)
    b = np.full(n, 1.0 / n)
    gw_norm = np.sqrt(max(w @ g @ w, 0.0))
    lam = c * np.sqrt(max(b @ g @ b, 0.0)) / gw_norm if gw_norm > 0 else 0.0
    beta = (b + lam * w) * n
    if rescale:
        beta = beta / (1 + c ** 2)
    return torch.from_numpy(beta)


@WEIGHTINGS.register("cagrad")
class CAGrad(GradientStrategy):
    """Average gradient, bent towards the task that would gain least from it."""

    @dataclass
    class Options(OnOptions):
        c: float = 0.4
        rescale: bool = True

    def __init__(self, options: Options, tasks: list[str], task_weights: dict[str, float]) -> None:
        super().__init__(options, tasks, task_weights)
        self.c = options.c
        self.rescale = options.rescale

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        names = list(losses)
        beta = combined_backward(scale_losses(losses, self.task_weights), ctx, self.on,
                                 lambda gram: cagrad_coefficients(gram, self.c, self.rescale))
        return {} if beta is None else {f"weight/{t}": float(b) for t, b in zip(names, beta)}
