"""CAGrad: Liu, Liu, Jin, Stone & Liu (NeurIPS 2021), "Conflict-Averse Gradient Descent".

The update d maximises the worst task's improvement ``min_i g_i . d`` within a ball around the
average gradient, ``|d - g0| <= c |g0|``. Its dual is a small problem over the simplex:

    w* = argmin_{w in simplex}  g_w . g0 + c |g0| |g_w|,   g_w = sum_i w_i g_i,

and ``d = g0 + (c |g0| / |g_w*|) g_w*``. Both terms only need the Gram matrix, so the dual is solved
on a T x T matrix, exactly, in float64 (:func:`solve_dual`; at most ``MAX_TASKS`` tasks). As in the
authors' code, d is divided by ``1 + c^2`` (``rescale``) and multiplied by T so the shared part is
on the scale of the summed loss the heads are trained on. Default ``c = 0.4``: the value the paper
uses on NYUv2 and Cityscapes (LibMTL's default is 0.5).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from taskfold.trainer.config import ConfigError
from taskfold.trainer.weighting.base import StepContext
from taskfold.trainer.weighting.common import GradientStrategy, OnOptions
from taskfold.trainer.weighting.grads import combined_backward, scale_losses
from taskfold.trainer.weighting.registry import WEIGHTINGS


SINGULAR = 1e-13   # relative eigenvalue below which a face's Gram block counts as singular
MAX_TASKS = 12     # solve_dual's fallback visits every face of the simplex: 2^T - 1 small systems


def dual_value(gram: np.ndarray, c: float, w: np.ndarray) -> float:
    """The dual objective ``w . (gram b) + c sqrt(b' gram b) sqrt(w' gram w)``, ``b = 1/T``."""
    b = np.full(gram.shape[0], 1.0 / gram.shape[0])
    return float(w @ gram @ b + c * np.sqrt(max(b @ gram @ b, 0.0)) * np.sqrt(max(w @ gram @ w, 0.0)))


def _face_solution(gram: np.ndarray, a: np.ndarray, c0: float, support: np.ndarray) -> np.ndarray | None:
    """On the affine hull of the face on ``support`` (``sum w = 1``, ``w = 0`` off it): the
    stationary point of the dual, negative entries included; None for a singular ``G_S``.

    Stationarity is ``a_S + c0 G_S w / n = mu 1`` with ``n = |g_w|``. For an invertible ``G_S``
    this gives ``w = (mu u - v) / s`` with ``u = G_S^-1 1``, ``v = G_S^-1 a_S`` and ``n = c0 / s``;
    ``w' G_S w = n^2`` turns into a quadratic in mu whose root with ``s > 0`` is
    ``mu = (q + sqrt(disc)) / p`` (``p = 1'u, q = 1'v, r = a_S'v``, ``disc = q^2 - p (r - c0^2)``,
    and then ``s = sqrt(disc)``). ``disc <= 0`` means no stationary point (None as well).
    """
    w = np.zeros(gram.shape[0])
    if len(support) == 1:
        w[support] = 1.0
        return w
    g, a_s = gram[np.ix_(support, support)], a[support]
    eigvals, eigvecs = np.linalg.eigh(g)
    if eigvals[0] <= SINGULAR * max(eigvals[-1], 1e-300):
        return None
    inverse = (eigvecs / eigvals) @ eigvecs.T
    u, v = inverse.sum(axis=1), inverse @ a_s
    p, q, r = u.sum(), v.sum(), a_s @ v
    disc = q * q - p * (r - c0 * c0)
    if disc <= 0:
        return None
    mu = (q + np.sqrt(disc)) / p
    w[support] = (mu * u - v) / np.sqrt(disc)
    return w


def face_point(gram: np.ndarray, a: np.ndarray, c0: float, support: np.ndarray) -> np.ndarray | None:
    """The point of the face on ``support`` where the dual can be smallest, or None.

    A minimiser inside the face is its stationary point (``_face_solution``, kept if it lies in the
    simplex). A singular ``G_S`` contributes only the point of its null space that sums to one:
    any other minimiser there can slide along a null direction (where the dual is constant) to a
    smaller face.
    """
    w = _face_solution(gram, a, c0, support)
    if w is None and len(support) > 1:
        eigvals, eigvecs = np.linalg.eigh(gram[np.ix_(support, support)])
        null = eigvecs[:, eigvals <= SINGULAR * max(eigvals[-1], 1e-300)]
        if null.shape[1] == 1 and abs(null[:, 0].sum()) > 1e-12:
            w = np.zeros(gram.shape[0])
            w[support] = null[:, 0] / null[:, 0].sum()
    if w is None or w.min() < -1e-12:
        return None
    w = np.maximum(w, 0.0)
    return w / w.sum()


def _meets_kkt(gram: np.ndarray, a: np.ndarray, c0: float, w: np.ndarray, tol: float = 1e-9) -> bool:
    """Whether ``w`` satisfies the dual's optimality conditions: the gradient ``a + c0 G w / |g_w|``
    equals one value mu on the support and is at least mu off it (sufficient: the dual is convex)."""
    norm = np.sqrt(max(w @ gram @ w, 0.0))
    if norm <= 0:
        return False
    slope = a + c0 * (gram @ w) / norm
    on = w > 0
    mu = slope[on].mean()
    slack = tol * max(1.0, float(np.abs(slope).max()))
    return bool(np.abs(slope[on] - mu).max() <= slack and (slope[~on] >= mu - slack).all())


def _active_set(gram: np.ndarray, a: np.ndarray, c0: float, c: float) -> np.ndarray | None:
    """The minimiser by a primal active-set walk, or None where the walk meets a degenerate face.

    From the best vertex: while the KKT conditions fail, add the index whose gradient is lowest
    and move towards the new face's stationary point, stopping where a weight reaches zero (that
    index leaves, and the walk heads for the smaller face's point). The value falls at every move,
    so no face repeats.
    """
    n = gram.shape[0]
    vertices = np.eye(n)
    w = vertices[min(range(n), key=lambda i: dual_value(gram, c, vertices[i]))]
    for _ in range(4 * n * n):
        if _meets_kkt(gram, a, c0, w):
            return w
        norm = np.sqrt(max(w @ gram @ w, 0.0))
        if norm <= 0:
            return None
        slope = a + c0 * (gram @ w) / norm
        support = set(np.flatnonzero(w > 0).tolist()) | {int(np.argmin(np.where(w > 0, np.inf, slope)))}
        while True:
            target = _face_solution(gram, a, c0, np.array(sorted(support)))
            if target is None:
                return None
            blocking = [(w[i] / (w[i] - target[i]) if w[i] > 0 else 0.0, i) for i in support if target[i] <= 0]
            if not blocking:
                w = target
                break
            step, leaving = min(blocking)
            w = np.maximum(w + step * (target - w), 0.0)
            w[leaving] = 0.0
            w /= w.sum()
            support.discard(leaving)
    return None


def solve_dual(gram: np.ndarray, c: float) -> np.ndarray:
    """``argmin_{w in simplex} w . (gram b) + c sqrt(b' gram b) sqrt(w' gram w)``, ``b = 1/T``, exactly.

    The dual is convex, so its minimiser is a stationary point on one face of the simplex, where
    it is found in closed form (``_face_solution``), and any point meeting the KKT conditions
    is it. An active-set walk finds the face in a few steps; where it meets a degenerate face, the
    smallest value over all ``2^T - 1`` faces' points is the answer. (An iterative solver stalls on
    Gram matrices whose entries differ by orders of magnitude, as task gradients often do.)
    """
    n = gram.shape[0]
    if n > MAX_TASKS:
        raise ValueError(f"cagrad: the exact dual solver handles at most {MAX_TASKS} tasks, got {n}")
    b = np.full(n, 1.0 / n)
    scale = float(np.trace(gram)) / n
    if scale <= 0:
        return b
    gram = gram / scale                          # the minimiser does not depend on the scale
    a = gram @ b
    c0 = c * np.sqrt(max(b @ gram @ b, 0.0))
    found = _active_set(gram, a, c0, c)
    if found is not None:
        return found
    faces = (np.array(s) for size in range(1, n + 1) for s in itertools.combinations(range(n), size))
    candidates = [w for w in (face_point(gram, a, c0, s) for s in faces) if w is not None]
    return min(candidates, key=lambda w: dual_value(gram, c, w))


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
        if len(tasks) > MAX_TASKS:
            raise ConfigError(f"weighting: cagrad's exact solver handles at most {MAX_TASKS} tasks, got {len(tasks)}")
        self.c = options.c
        self.rescale = options.rescale

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        names = list(losses)
        beta = combined_backward(scale_losses(losses, self.task_weights), ctx, self.on,
                                 lambda gram: cagrad_coefficients(gram, self.c, self.rescale))
        return {} if beta is None else {f"weight/{t}": float(b) for t, b in zip(names, beta)}
