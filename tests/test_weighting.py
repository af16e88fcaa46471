"""Weighting strategies against independent, hand-written versions of their formulas.

The toy problem: a shared vector W (2-D), a shared feature z = 1 * W, and one scalar head h_t per
task with ``L_t = h_t * (c_t . z) + k_t``. At h_t = 1 the task gradient on W (and on z) is exactly
c_t, so each strategy's W.grad can be checked against the paper's formula applied by hand to c_t,
and each head's grad must be ``weight * (c_t . W)`` (its own task only).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from taskfold.trainer.config import ConfigError
from taskfold.trainer.weighting import WEIGHTINGS, StepContext, create_weighting
from taskfold.trainer.weighting.cagrad import MAX_TASKS, dual_value, face_point, solve_dual

torch.set_num_threads(1)

W0 = (1.0, 2.0)


class Toy:
    """Shared W, z = 1 * W, heads h_t = 1, ``L_t = h_t (c_t . z) + k_t``."""

    def __init__(self, grads: dict[str, tuple[float, float]], offsets: dict[str, float] | None = None,
                 primary: str | None = None) -> None:
        self.c = {t: np.array(g) for t, g in grads.items()}
        self.W = nn.Parameter(torch.tensor(W0))
        self.heads = {t: nn.Parameter(torch.tensor(1.0)) for t in grads}
        self.z = self.W * 1.0
        offsets = offsets or {}
        self.losses = {t: self.heads[t] * (torch.tensor(g) @ self.z) + offsets.get(t, 0.0) for t, g in grads.items()}
        self.primary = [primary] if primary else list(grads)

    def ctx(self, on: str = "params") -> StepContext:
        if on == "none":
            return StepContext(shared_params=[], primary=self.primary)
        return StepContext(shared_params=[self.W], shared_features=[self.z] if on == "features" else [],
                           primary=self.primary)

    def head_grad(self, t: str) -> float:
        """d L_t / d h_t = c_t . W."""
        return float(self.c[t] @ np.array(W0))

    def loss_value(self, t: str) -> float:
        return float(self.losses[t].detach())


def run(name: str, toy: Toy, on: str = "params", **options) -> tuple[object, dict]:
    opts = dict(options)
    if on in ("params", "features") and name in ("pcgrad", "pcgrad_aux", "cagrad", "gcs", "gradnorm", "ial"):
        opts["on"] = on
    strategy = create_weighting({"name": name, **opts}, tasks=list(toy.c), primary=toy.primary)
    logs = strategy.backward(toy.losses, toy.ctx(on))
    return strategy, logs


def w_grad(toy: Toy) -> np.ndarray:
    return toy.W.grad.detach().numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------- PCGrad


@pytest.mark.parametrize("on", ["params", "features"])
def test_pcgrad_projects_two_conflicting_gradients(on):
    toy = Toy({"a": (1.0, 0.0), "b": (-1.0, 1.0)})
    run("pcgrad", toy, on)
    ga, gb = toy.c["a"], toy.c["b"]
    pa = ga - (ga @ gb) / (gb @ gb) * gb          # (1,0) + 1/2 (-1,1) = (0.5, 0.5)
    pb = gb - (gb @ ga) / (ga @ ga) * ga          # (-1,1) + (1,0)     = (0, 1)
    np.testing.assert_allclose(pa + pb, [0.5, 1.5], atol=1e-12)
    np.testing.assert_allclose(w_grad(toy), pa + pb, atol=1e-6)
    for t in "ab":
        assert float(toy.heads[t].grad) == pytest.approx(toy.head_grad(t))


def test_pcgrad_leaves_agreeing_gradients_alone():
    toy = Toy({"a": (1.0, 0.0), "b": (1.0, 3.0), "c": (0.5, -0.1)})
    _, logs = run("pcgrad", toy)
    np.testing.assert_allclose(w_grad(toy), [2.5, 2.9], atol=1e-6)
    assert logs["conflicts"] == 0


def test_pcgrad_three_tasks_result_has_no_conflict_left_with_any_task():
    toy = Toy({"a": (1.0, 0.2), "b": (-0.8, 1.0), "c": (0.1, -1.0)})
    run("pcgrad", toy, seed=3)
    # the visiting order is random (seeded): the result must be one of the sums that a plain replay
    # of Algorithm 1 on the vectors gives for some choice of orders
    g = [toy.c[t] for t in "abc"]
    candidates = []
    orders = list(itertools.permutations(range(3)))
    for combo in itertools.product(orders, repeat=3):
        total = np.zeros(2)
        for i in range(3):
            gi = g[i].copy()
            for j in combo[i]:
                if j != i and gi @ g[j] < 0:
                    gi = gi - (gi @ g[j]) / (g[j] @ g[j]) * g[j]
            total += gi
        candidates.append(total)
    assert min(np.abs(c - w_grad(toy)).max() for c in candidates) < 1e-5


# ---------------------------------------------------------------------------------------------- PCGrad-Aux


@pytest.mark.parametrize("on", ["params", "features"])
def test_pcgrad_aux_projects_only_the_auxiliary_gradient(on):
    toy = Toy({"p": (1.0, 0.0), "a": (-1.0, 1.0), "b": (0.0, 2.0)}, primary="p")
    run("pcgrad_aux", toy, on)
    gp, ga, gb = toy.c["p"], toy.c["a"], toy.c["b"]
    expected = gp + (ga - (ga @ gp) / (gp @ gp) * gp) + gb    # (1,0) + (0,1) + (0,2)
    np.testing.assert_allclose(w_grad(toy), expected, atol=1e-6)
    np.testing.assert_allclose(expected, [1.0, 3.0])


def test_pcgrad_aux_never_changes_the_primary_component():
    # the primary conflicts with the auxiliary; plain PCGrad would bend the primary, PCGrad-Aux must not
    toy = Toy({"p": (2.0, 1.0), "a": (-3.0, 0.5)}, primary="p")
    run("pcgrad_aux", toy)
    gp, ga = toy.c["p"], toy.c["a"]
    aux_part = w_grad(toy) - gp
    np.testing.assert_allclose(aux_part @ gp, 0.0, atol=1e-5)   # what was added is orthogonal to g_p
    np.testing.assert_allclose(aux_part, ga - (ga @ gp) / (gp @ gp) * gp, atol=1e-6)


def test_primary_is_required():
    with pytest.raises(ConfigError):
        create_weighting({"name": "pcgrad_aux"}, tasks=["a", "b"], primary=["a", "b"])


# ---------------------------------------------------------------------------------------------- CAGrad


def cagrad_two_task_closed_form(g1: np.ndarray, g2: np.ndarray, c: float) -> np.ndarray:
    """min over x in [0,1] of F(x) = g_x.g0 + c|g0||g_x|, g_x = g2 + x(g1 - g2), in closed form.

    F'(x) = v.g0 + c0 (q + x r)/|g_x| = 0 with v = g1 - g2, q = g2.v, r = v.v, s = g2.g2 gives
    (q + x r) / |g_x| = k := -v.g0 / c0; squaring: r(r - k^2) x^2 + 2q(r - k^2) x + q^2 - k^2 s = 0.
    """
    g0 = (g1 + g2) / 2
    c0 = c * np.linalg.norm(g0)
    v = g1 - g2
    q, r, s = g2 @ v, v @ v, g2 @ g2
    k = -(v @ g0) / c0
    A, B, C = r * (r - k * k), 2 * q * (r - k * k), q * q - k * k * s
    disc = B * B - 4 * A * C
    roots = [(-B + sgn * math.sqrt(disc)) / (2 * A) for sgn in (1, -1)] if disc >= 0 and A != 0 else []
    stationary = [x for x in roots if 0 < x < 1 and np.sign(q + x * r) == np.sign(k)]
    F = lambda t: (g2 + t * v) @ g0 + c0 * np.linalg.norm(g2 + t * v)  # noqa: E731
    x = min(stationary + [0.0, 1.0], key=F)     # convex in x: a stationary point, else an end
    gx = g2 + x * v
    d = g0 + c0 / np.linalg.norm(gx) * gx
    # sanity of the closed form itself: no grid point does better
    assert F(x) <= min(F(t) for t in np.linspace(0, 1, 2001)) + 1e-12
    return 2 * d / (1 + c * c)          # x T (sum-loss scale), / (1 + c^2) (rescale)


@pytest.mark.parametrize("on", ["params", "features"])
@pytest.mark.parametrize("c", [0.4, 0.9])
@pytest.mark.parametrize("gb", [(-0.6, 1.2), (-0.5, 2.0)], ids=["interior", "vertex"])
def test_cagrad_two_tasks_matches_closed_form(on, c, gb):
    toy = Toy({"a": (1.0, 0.0), "b": gb})
    run("cagrad", toy, on, c=c)
    expected = cagrad_two_task_closed_form(toy.c["a"], toy.c["b"], c)
    np.testing.assert_allclose(w_grad(toy), expected, rtol=1e-5, atol=1e-6)
    for t in "ab":
        assert float(toy.heads[t].grad) == pytest.approx(toy.head_grad(t))


def test_cagrad_equal_norms_gives_scaled_average():
    # symmetric case: by symmetry w = (1/2, 1/2), g_w = g0, d = (1 + c) g0
    toy = Toy({"a": (1.0, 0.0), "b": (0.0, 1.0)})
    run("cagrad", toy, c=0.5, rescale=False)
    np.testing.assert_allclose(w_grad(toy), 2 * 1.5 * np.array([0.5, 0.5]), atol=1e-6)


def test_cagrad_three_tasks_dual_is_minimised():
    # no closed form for T = 3: compare the dual value reached with a dense grid over the simplex
    toy = Toy({"a": (1.0, 0.3), "b": (-2.0, 1.5), "c": (0.2, -0.9)})
    _, logs = run("cagrad", toy, c=0.4, rescale=False)
    G = np.stack([toy.c[t] for t in "abc"])
    g0 = G.mean(0)
    c0 = 0.4 * np.linalg.norm(g0)
    x, y = np.meshgrid(np.linspace(0, 1, 301), np.linspace(0, 1, 301))
    keep = x + y <= 1
    W = np.stack([x[keep], y[keep], 1 - x[keep] - y[keep]], axis=1)
    F = W @ G @ g0 + c0 * np.linalg.norm(W @ G, axis=1)
    beta = np.array([logs[f"weight/{t}"] for t in "abc"])
    w = (beta / 3 - 1 / 3) / (beta / 3 - 1 / 3).sum()        # beta = T (1/T + lambda w)
    assert w @ G @ g0 + c0 * np.linalg.norm(w @ G) <= F.min() + 1e-9
    np.testing.assert_allclose(w_grad(toy), beta @ G, rtol=1e-5, atol=1e-6)


def gram_of(norms: list[float], seed: int, dim: int = 40) -> np.ndarray:
    """Gram matrix of random gradients with the given norms (mixed signs, so tasks conflict)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((len(norms), dim))
    g = g / np.linalg.norm(g, axis=1, keepdims=True) * np.array(norms)[:, None]
    return g @ g.T


CONDITIONED = {      # norms, dimension; "ill": norms ~1000x apart, the case issue 16 reported
    "well": ([1.0, 1.3, 0.8, 1.1], 40),
    "ill": ([12.0, 19.0, 0.011, 0.037], 40),
    "ill-2d": ([12.0, 19.0, 0.011, 0.037], 2),   # the projected-gradient loop stopped 0.5 % off here
    "ill-3d": ([12.0, 19.0, 0.011, 0.037], 3),
    "ill-3": ([20.0, 0.02, 0.015], 40),
    "rank-3": ([12.0, 19.0, 0.011, 0.037, 5.0, 0.2], 3),   # 6 tasks in 3-D: singular faces
}


@pytest.mark.parametrize("case", list(CONDITIONED))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("c", [0.4, 0.9])
def test_cagrad_dual_solution_meets_kkt(case, seed, c):
    # convex problem: w is its minimiser iff the KKT conditions hold (gradient of the dual equal to
    # mu on the support, >= mu off it), checked on the scale-free Gram matrix to 1e-6
    norms, dim = CONDITIONED[case]
    gram = gram_of(norms, seed, dim)
    gram = gram / (np.trace(gram) / len(gram))
    w = solve_dual(gram, c)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0, abs=1e-12)
    b = np.full(len(gram), 1 / len(gram))
    slope = gram @ b + c * np.sqrt(b @ gram @ b) * gram @ w / np.sqrt(w @ gram @ w)
    mu = slope[np.argmax(w)]
    tol = 1e-6 * np.abs(slope).max()
    np.testing.assert_allclose(slope[w > 0], mu, atol=tol)
    assert (slope[w == 0] >= mu - tol).all()


@pytest.mark.parametrize("case", ["well", "ill", "ill-2d"])
def test_cagrad_dual_beats_every_point_of_a_fine_simplex_grid(case):
    # brute force: no point of a 1/120 grid over the 4-task simplex (~300k points) has a lower value
    norms, dim = CONDITIONED[case]
    gram = gram_of(norms, 1, dim)
    steps = 120
    grid = np.array([(i, j, k, steps - i - j - k) for i in range(steps + 1) for j in range(steps + 1 - i)
                     for k in range(steps + 1 - i - j)], dtype=float) / steps
    b = np.full(4, 0.25)
    values = grid @ gram @ b + 0.4 * np.sqrt(b @ gram @ b) * np.sqrt(np.einsum("ni,ij,nj->n", grid, gram, grid))
    exact = dual_value(gram, 0.4, solve_dual(gram, 0.4))
    assert exact <= values.min() + 1e-9 * abs(values.min())
    assert values.min() - exact < 1e-2 * (values.max() - values.min())   # and the grid comes close


def test_cagrad_dual_handles_a_task_without_gradient_and_collinear_tasks():
    g = np.array([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0], [-1.0, 0.5]])
    gram = g @ g.T
    w = solve_dual(gram, 0.5)
    grid = [np.array(p) / 20 for p in itertools.product(range(21), repeat=4) if sum(p) == 20]
    assert dual_value(gram, 0.5, w) <= min(dual_value(gram, 0.5, p) for p in grid) + 1e-12


def test_cagrad_active_set_walk_agrees_with_every_face():
    # the walk against the exhaustive answer (every face's exact point, the smallest value)
    rng = np.random.default_rng(7)
    for _ in range(30):
        norms = list(10 ** rng.uniform(-2, 1.5, int(rng.integers(2, 7))))
        gram = gram_of(norms, int(rng.integers(1000)), int(rng.integers(2, 10)))
        gram = gram / (np.trace(gram) / len(gram))
        faces = [np.array(f) for k in range(1, len(gram) + 1) for f in itertools.combinations(range(len(gram)), k)]
        b = np.full(len(gram), 1 / len(gram))
        a, c0 = gram @ b, 0.4 * np.sqrt(b @ gram @ b)
        points = [w for w in (face_point(gram, a, c0, f) for f in faces) if w is not None]
        best = min(dual_value(gram, 0.4, w) for w in points)
        assert dual_value(gram, 0.4, solve_dual(gram, 0.4)) <= best + 1e-12 * max(1.0, abs(best))


def test_cagrad_refuses_more_tasks_than_the_exact_solver_handles():
    tasks = [f"t{i}" for i in range(MAX_TASKS + 1)]
    with pytest.raises(ConfigError, match="at most"):
        create_weighting({"name": "cagrad"}, tasks=tasks, primary=tasks[:1])


# ---------------------------------------------------------------------------------------------- GCS


@pytest.mark.parametrize("on", ["params", "features"])
def test_gcs_drops_negative_and_keeps_positive_auxiliary(on):
    toy = Toy({"p": (1.0, 0.0), "neg": (-1.0, 1.0), "pos": (1.0, 1.0)}, primary="p")
    _, logs = run("gcs", toy, on)
    np.testing.assert_allclose(w_grad(toy), toy.c["p"] + toy.c["pos"], atol=1e-6)
    assert logs["cos/neg"] == pytest.approx(-1 / math.sqrt(2))
    for t in ("p", "neg", "pos"):   # the dropped task's head still learns its own task
        assert float(toy.heads[t].grad) == pytest.approx(toy.head_grad(t))


def test_gcs_weighted_variant_scales_by_cosine():
    toy = Toy({"p": (1.0, 0.0), "a": (1.0, 1.0)}, primary="p")
    run("gcs", toy, weighted=True)
    np.testing.assert_allclose(w_grad(toy), [1 + 1 / math.sqrt(2), 1 / math.sqrt(2)], atol=1e-6)


# ---------------------------------------------------------------------------------------------- IAL


@pytest.mark.parametrize("on", ["params", "features"])
@pytest.mark.parametrize("g, sigma, f", [
    ("relu", 0.4, 0.6), ("relu", 1.5, 0.0), ("relu", 0.01, 0.99),
    ("sigmoid", 0.4, 1 / (1 + math.exp(-0.6))), ("sigmoid", 1.5, 1 / (1 + math.exp(0.5))),
    ("identity", 1.5, -0.5),
])
def test_ial_norm_matching_and_uncertainty_weight(on, g, sigma, f):
    toy = Toy({"p": (3.0, 0.0), "a": (0.0, 0.5)}, offsets={"p": 1.0, "a": 2.0}, primary="p")
    strategy = create_weighting({"name": "ial", "g": g, "on": on}, tasks=["p", "a"], primary=["p"])
    with torch.no_grad():
        strategy.log_sigma.copy_(torch.tensor([math.log(0.8), math.log(sigma)]))
    strategy.backward(toy.losses, toy.ctx(on))
    gp, ga = toy.c["p"], toy.c["a"]
    expected = gp + f * (np.linalg.norm(gp) / np.linalg.norm(ga)) * ga     # (3, 0) + f * 6 * (0, .5)
    np.testing.assert_allclose(w_grad(toy), expected, rtol=1e-5, atol=1e-6)
    # decoder stage: heads get 1/(2 sigma^2) of their own gradient, log sigma gets 1 - L/sigma^2
    for t, s in (("p", 0.8), ("a", sigma)):
        assert float(toy.heads[t].grad) == pytest.approx(toy.head_grad(t) / (2 * s * s), rel=1e-5)
    expected_log_sigma = [1 - toy.loss_value(t) / s ** 2 for t, s in (("p", 0.8), ("a", sigma))]
    np.testing.assert_allclose(strategy.log_sigma.grad.numpy(), expected_log_sigma, rtol=1e-5)


def test_ial_back_propagates_the_feature_gradient_into_the_encoder():
    # z = A x; the encoder gradient must be outer(grad_z, x) with grad_z the IAL combination
    torch.manual_seed(0)
    x = torch.tensor([0.5, -1.0, 2.0])
    A = nn.Parameter(torch.randn(2, 3))
    z = A @ x
    heads = {t: nn.Parameter(torch.randn(2)) for t in "pa"}
    losses = {t: (heads[t] @ z - 1.0) ** 2 for t in "pa"}
    strategy = create_weighting({"name": "ial", "g": "sigmoid"}, tasks=["p", "a"], primary=["p"])
    strategy.backward(losses, StepContext(shared_params=[A], shared_features=[z], primary=["p"]))
    zv = (A @ x).detach().numpy()
    dz = {t: 2 * (heads[t].detach().numpy() @ zv - 1.0) * heads[t].detach().numpy() for t in "pa"}
    f = 1 / (1 + math.exp(0.0))        # sigma = 1 at init: sigmoid(1 - 1)
    gz = dz["p"] + f * np.linalg.norm(dz["p"]) / np.linalg.norm(dz["a"]) * dz["a"]
    np.testing.assert_allclose(A.grad.numpy(), np.outer(gz, x.numpy()), rtol=1e-5, atol=1e-6)
    for t in "pa":   # decoders: 1/(2 sigma^2) = 1/2 of their own gradient, nothing else
        np.testing.assert_allclose(heads[t].grad.numpy(), 0.5 * 2 * (heads[t].detach().numpy() @ zv - 1) * zv,
                                   rtol=1e-5)


# ---------------------------------------------------------------------------------------------- UW, DWA


def test_uw_gradients_match_the_analytic_derivatives():
    toy = Toy({"a": (1.0, 0.0), "b": (-1.0, 1.0)}, offsets={"a": 2.0, "b": 5.0})
    strategy = create_weighting({"name": "uw"}, tasks=["a", "b"], primary=["a", "b"])
    s = torch.tensor([0.3, -0.2])
    with torch.no_grad():
        strategy.log_sigma.copy_(s)
    strategy.backward(toy.losses, toy.ctx())
    sigma2 = np.exp(2 * s.numpy().astype(np.float64))
    L = np.array([toy.loss_value("a"), toy.loss_value("b")])
    # d/ds [L e^{-2s}/2 + s] = 1 - L e^{-2s}
    np.testing.assert_allclose(strategy.log_sigma.grad.numpy(), 1 - L / sigma2, rtol=1e-5)
    np.testing.assert_allclose(w_grad(toy), toy.c["a"] / (2 * sigma2[0]) + toy.c["b"] / (2 * sigma2[1]), rtol=1e-5)
    assert float(toy.heads["b"].grad) == pytest.approx(toy.head_grad("b") / (2 * sigma2[1]), rel=1e-5)


def test_dwa_softmax_of_loss_ratios_over_three_epochs():
    strategy = create_weighting({"name": "dwa", "temperature": 2.0}, tasks=["a", "b"], primary=["a", "b"])
    history = [{"a": 4.0, "b": 2.0}, {"a": 2.0, "b": 1.5}]
    for epoch in range(3):
        toy = Toy({"a": (1.0, 0.0), "b": (0.0, 1.0)})
        logs = strategy.backward(toy.losses, toy.ctx("none"))
        if epoch < 2:
            expected = {"a": 1.0, "b": 1.0}
            strategy.end_epoch(history[epoch])
        else:
            ra, rb = 2.0 / 4.0, 1.5 / 2.0
            ea, eb = math.exp(ra / 2), math.exp(rb / 2)
            expected = {"a": 2 * ea / (ea + eb), "b": 2 * eb / (ea + eb)}
        assert logs["weight/a"] == pytest.approx(expected["a"])
        np.testing.assert_allclose(w_grad(toy), [expected["a"], expected["b"]], rtol=1e-6)
    assert expected["b"] > expected["a"]        # the task whose loss fell less gets more weight


# ---------------------------------------------------------------------------------------------- GradNorm


def test_gradnorm_lowers_the_weight_of_the_task_with_the_larger_gradient():
    strategy = create_weighting({"name": "gradnorm", "alpha": 1.5}, tasks=["a", "b"], primary=["a", "b"])
    toy = Toy({"a": (4.0, 0.0), "b": (0.0, 1.0)}, offsets={"a": 3.0, "b": 3.0})
    strategy.backward(toy.losses, toy.ctx())
    # step 0: loss ratios are 1, G = (4, 1), target = mean(G) = 2.5: dL_grad/dw = sign(G - 2.5) |g|
    np.testing.assert_allclose(strategy.weights.grad.numpy(), [4.0, -1.0])
    np.testing.assert_allclose(w_grad(toy), toy.c["a"] + toy.c["b"], atol=1e-6)   # weights still 1

    # after an update the weights are renormalised to sum to T, and loss ratios enter with alpha
    with torch.no_grad():
        strategy.weights.copy_(torch.tensor([3.0, 1.0]))
    strategy.weights.grad = None
    toy2 = Toy({"a": (4.0, 0.0), "b": (0.0, 1.0)}, offsets={"a": 0.0, "b": 1.0})  # L = (4, 3) vs L(0) = (7, 5)
    strategy.backward(toy2.losses, toy2.ctx())
    w = np.array([1.5, 0.5])
    np.testing.assert_allclose(strategy.weights.detach().numpy(), w)
    ratios = np.array([4 / 7, 3 / 5])
    G = w * np.array([4.0, 1.0])
    target = G.mean() * (ratios / ratios.mean()) ** 1.5
    np.testing.assert_allclose(strategy.weights.grad.numpy(), np.sign(G - target) * [4.0, 1.0])
    np.testing.assert_allclose(w_grad(toy2), w[0] * toy2.c["a"] + w[1] * toy2.c["b"], rtol=1e-6)
    assert float(toy2.heads["a"].grad) == pytest.approx(w[0] * toy2.head_grad("a"))


# ---------------------------------------------------------------------------------------------- all strategies

GRADIENT_METHODS = ["pcgrad", "pcgrad_aux", "cagrad", "gcs", "gradnorm", "ial"]


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_nothing_shared_is_the_plain_sum(name):
    toy = Toy({"p": (1.0, 0.0), "a": (-1.0, 1.0)}, primary="p")
    strategy = create_weighting({"name": name}, tasks=["p", "a"], primary=["p"])
    strategy.backward(toy.losses, toy.ctx("none"))
    weight = 0.5 if name == "ial" else 1.0          # IAL's decoder stage: 1/(2 sigma^2), sigma = 1
    np.testing.assert_allclose(w_grad(toy), weight * (toy.c["p"] + toy.c["a"]), atol=1e-6)


@pytest.mark.parametrize("name", ["pcgrad", "ial"])
def test_features_requested_but_missing_is_refused(name):
    toy = Toy({"p": (1.0, 0.0), "a": (-1.0, 1.0)}, primary="p")
    strategy = create_weighting({"name": name, "on": "features"}, tasks=["p", "a"], primary=["p"])
    with pytest.raises(ConfigError, match="on: params"):
        strategy.backward(toy.losses, toy.ctx("params"))


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="weighting.g"):
        create_weighting({"name": "ial", "g": "tanh"}, tasks=["p", "a"], primary=["p"])
    with pytest.raises(ConfigError, match="weighting.on"):
        create_weighting({"name": "cagrad", "on": "layer"}, tasks=["p", "a"], primary=["p"])
    with pytest.raises(ConfigError, match="weighting.c"):
        create_weighting({"name": "cagrad", "c": "big"}, tasks=["p", "a"], primary=["p"])


class TwoHeadMLP(nn.Module):
    """Encoder of two blocks (both outputs exposed, the second fed by the first) and two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.block2 = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleDict({"p": nn.Linear(16, 1), "a": nn.Linear(16, 1)})
        self.shared_features: list[torch.Tensor] = []

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.block1.parameters(), *self.block2.parameters()]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f1 = self.block1(x)
        f2 = self.block2(f1)
        self.shared_features = [f1, f2]
        both = torch.cat([f1, f2], dim=1)
        return {t: head(both).squeeze(1) for t, head in self.heads.items()}


def _mlp_step(model: TwoHeadMLP, x: torch.Tensor, y: dict[str, torch.Tensor]):
    out = model(x)
    losses = {t: ((out[t] - y[t]) ** 2).mean() for t in out}
    ctx = StepContext(shared_params=model.shared_parameters(), shared_features=model.shared_features,
                      primary=["p"])
    return losses, ctx


def test_chained_features_are_not_counted_twice():
    # two parallel task gradients: every method's combination is the plain sum (beta = 1)
    torch.manual_seed(0)
    model = TwoHeadMLP()
    with torch.no_grad():
        model.heads["a"].weight.copy_(model.heads["p"].weight)
        model.heads["a"].bias.copy_(model.heads["p"].bias)
    x = torch.randn(16, 4)
    y = {"p": torch.full((16,), 3.0), "a": torch.full((16,), 3.0)}
    losses, ctx = _mlp_step(model, x, y)
    sum(losses.values()).backward(retain_graph=True)
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    strategy = create_weighting({"name": "pcgrad", "on": "features"}, tasks=["p", "a"], primary=["p"])
    assert strategy.backward(losses, ctx)["conflicts"] == 0
    for ref, p in zip(reference, model.parameters()):
        torch.testing.assert_close(p.grad, ref)


def test_a_branch_feeding_z_and_its_own_head_gets_both_gradients():
    # AuxNet-like: the auxiliary branch u = B x feeds its head directly and the primary z = A x + u
    x = torch.tensor([1.0, -2.0])
    A, B = nn.Parameter(torch.tensor([0.5, 0.25])), nn.Parameter(torch.tensor([-1.0, 0.5]))
    u = B * x
    z = A * x + u
    losses = {"p": torch.tensor([1.0, 0.0]) @ z, "a": torch.tensor([-2.0, 1.0]) @ z + torch.tensor([0.0, 3.0]) @ u}
    strategy = create_weighting({"name": "gcs", "on": "features"}, tasks=["p", "a"], primary=["p"])
    strategy.backward(losses, StepContext(shared_params=[A], shared_features=[z], primary=["p"]))
    gz = np.array([1.0, 0.0])                  # cos((1,0), (-2,1)) < 0: the auxiliary is dropped at z
    xn = x.numpy()
    np.testing.assert_allclose(A.grad.numpy(), gz * xn)
    np.testing.assert_allclose(B.grad.numpy(), gz * xn + np.array([0.0, 3.0]) * xn)   # through z + around z


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_three_steps_reduce_the_total_loss(name):
    torch.manual_seed(0)
    model = TwoHeadMLP()
    strategy = create_weighting({"name": name}, tasks=["p", "a"], primary=["p"])
    optimizer = torch.optim.SGD([*model.parameters(), *strategy.parameters()], lr=0.05)
    x = torch.randn(32, 4)
    y = {"p": x[:, 0] - x[:, 1], "a": x[:, 2] + 0.5 * x[:, 0]}
    totals = []
    for _ in range(4):
        losses, ctx = _mlp_step(model, x, y)
        totals.append(float(sum(losses.values()).detach()))
        optimizer.zero_grad(set_to_none=True)
        logs = strategy.backward(losses, ctx)
        assert all(isinstance(v, float) for v in logs.values())
        assert all(p.grad is not None for p in model.parameters())
        optimizer.step()
    assert totals[-1] < totals[0]
