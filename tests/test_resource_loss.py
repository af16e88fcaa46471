"""BMTAS resource loss: both estimators against values computed another way.

References used here: enumeration of every routing (vectorised), an exact layer-by-layer
enumeration of per-layer assignments (same numbers, reaches T=4, L=3), Monte Carlo sampling
for T=6, and a direct transcription of the paper's recursion (explicit T^T assignments per
grouping, explicit ancestor sets).
"""
from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from taskfold.models.bmtas_resource import (
    MAX_TASKS_EXACT,
    RESOURCE_ESTIMATORS,
    expected_madds,
    expected_num_ops_exact,
    expected_num_ops_paper_chain,
    set_partitions,
)
from taskfold.models.errors import ModelError
from taskfold.models.registry import UnknownNameError

Partition = tuple[tuple[int, ...], ...]


def random_probs(num_layers: int, num_tasks: int, seed: int, scale: float = 1.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    alpha = scale * torch.randn(num_layers, num_tasks, num_tasks, generator=gen, dtype=torch.float64)
    return alpha.softmax(dim=-1)


def distinct_prefixes(choices: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """N_l for a batch of routings ``choices`` (R, L, T) -> (R, L), by counting distinct codes."""
    counts = []
    code = torch.zeros(choices.shape[0], num_tasks, dtype=torch.long)
    for layer in range(choices.shape[1]):
        code = code * num_tasks + choices[:, layer]
        ordered = code.sort(dim=1).values
        counts.append(1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1))
    return torch.stack(counts, dim=1).to(torch.float64)


def enumerate_all_routings(probs: torch.Tensor) -> torch.Tensor:
    """E[N_l] by summing over all T^(L*T) routings."""
    num_layers, num_tasks, _ = probs.shape
    grid = torch.cartesian_prod(*[torch.arange(num_tasks)] * (num_layers * num_tasks))
    choices = grid.view(-1, num_layers, num_tasks)
    layers, tasks = torch.arange(num_layers)[:, None], torch.arange(num_tasks)
    weight = probs[layers, tasks, choices].flatten(1).prod(dim=1)
    return weight @ distinct_prefixes(choices, num_tasks)


def grouping(assignment: tuple[int, ...]) -> Partition:
    groups: dict[int, list[int]] = {}
    for task, op in enumerate(assignment):
        groups.setdefault(op, []).append(task)
    return tuple(sorted(tuple(g) for g in groups.values()))


def refines(fine: Partition, coarse: Partition) -> bool:
    return all(any(set(b) <= set(c) for c in coarse) for b in fine)


def meet(a: Partition, b: Partition) -> Partition:
    parts = (tuple(sorted(set(x) & set(y))) for x in a for y in b)
    return tuple(sorted(p for p in parts if p))


def enumerate_layerwise(probs: torch.Tensor) -> tuple[list[float], list[float]]:
    """Exact E[N_l] and the paper's charge, enumerating each layer's T^T assignments.

    State: (prefix grouping, previous layer's grouping, groupings refined monotonically so far).
    The paper's charge is |G_l| on a monotone sequence and T otherwise.
    """
    num_layers, num_tasks, _ = probs.shape
    everyone: Partition = (tuple(range(num_tasks)),)
    states = {(everyone, everyone, True): 1.0}
    exact, paper = [], []
    for layer in range(num_layers):
        grown: dict[tuple[Partition, Partition, bool], float] = {}
        for assignment in itertools.product(range(num_tasks), repeat=num_tasks):
            p = math.prod(float(probs[layer, t, j]) for t, j in enumerate(assignment))
            g = grouping(assignment)
            for (prefix, previous, monotone), q in states.items():
                key = (meet(prefix, g), g, monotone and refines(g, previous))
                grown[key] = grown.get(key, 0.0) + p * q
        states = grown
        exact.append(sum(q * len(prefix) for (prefix, _, _), q in states.items()))
        paper.append(sum(q * (len(g) if mono else num_tasks) for (_, g, mono), q in states.items()))
    return exact, paper


def paper_recursion_transcribed(probs: torch.Tensor) -> list[float]:
    """The paper's Eq. 6 as the reference code evaluates it, loop by loop."""
    num_layers, num_tasks, _ = probs.shape
    tracked = [p for p in {grouping(a) for a in itertools.product(range(num_tasks), repeat=num_tasks)}
               if len(p) < num_tasks]
    previous: dict[Partition, float] = {}
    out = []
    for layer in range(num_layers):
        conditional = dict.fromkeys(tracked, 0.0)
        for assignment in itertools.product(range(num_tasks), repeat=num_tasks):
            if (g := grouping(assignment)) in conditional:
                conditional[g] += math.prod(float(probs[layer, t, j]) for t, j in enumerate(assignment))
        current = {
            k: conditional[k] * (sum(previous[m] for m in tracked if refines(k, m)) if layer else 1.0)
            for k in tracked
        }
        rest = 1.0 - sum(current.values())
        out.append(sum(len(k) * p for k, p in current.items()) + num_tasks * rest)
        previous = current
    return out


@pytest.mark.parametrize("num_tasks,num_layers", [(1, 3), (2, 3), (3, 2), (3, 3), (4, 2)])
def test_exact_matches_enumeration_of_all_routings(num_tasks: int, num_layers: int) -> None:
    probs = random_probs(num_layers, num_tasks, seed=num_tasks * 10 + num_layers)
    expected = enumerate_all_routings(probs)
    torch.testing.assert_close(expected_num_ops_exact(probs), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("num_tasks,num_layers,seed", [(3, 3, 0), (4, 3, 1), (4, 3, 2)])
def test_both_estimators_match_layerwise_enumeration(num_tasks: int, num_layers: int, seed: int) -> None:
    probs = random_probs(num_layers, num_tasks, seed=seed)
    exact, paper = enumerate_layerwise(probs)
    as_tensor = functools.partial(torch.tensor, dtype=torch.float64)
    torch.testing.assert_close(expected_num_ops_exact(probs), as_tensor(exact), rtol=0, atol=1e-9)
    torch.testing.assert_close(expected_num_ops_paper_chain(probs), as_tensor(paper), rtol=0, atol=1e-9)


@pytest.mark.parametrize("num_tasks,seed", [(3, 5), (4, 6)])
def test_paper_chain_reproduces_the_reference_recursion(num_tasks: int, seed: int) -> None:
    probs = random_probs(4, num_tasks, seed=seed)
    reference = torch.tensor(paper_recursion_transcribed(probs), dtype=torch.float64)
    torch.testing.assert_close(expected_num_ops_paper_chain(probs), reference, rtol=0, atol=1e-9)


def test_exact_agrees_with_monte_carlo_for_six_tasks() -> None:
    num_layers, num_tasks, samples = 4, 6, 100_000
    probs = random_probs(num_layers, num_tasks, seed=7, scale=1.0)
    gen = torch.Generator().manual_seed(8)
    draws = torch.multinomial(probs.reshape(-1, num_tasks), samples, replacement=True, generator=gen)
    choices = draws.view(num_layers, num_tasks, samples).permute(2, 0, 1)
    counts = distinct_prefixes(choices, num_tasks)
    mean, stderr = counts.mean(dim=0), counts.std(dim=0) / samples**0.5
    exact = expected_num_ops_exact(probs)
    assert torch.all((exact - mean).abs() < 4 * stderr), (exact, mean, stderr)
    # The paper's charge is an upper bound that the sampled counts clearly undercut.
    assert torch.all(expected_num_ops_paper_chain(probs)[1:] > mean[1:] + 4 * stderr[1:])


@pytest.mark.parametrize("estimator", RESOURCE_ESTIMATORS.names())
def test_gradient_matches_finite_differences(estimator: str) -> None:
    gen = torch.Generator().manual_seed(3)
    alpha = torch.randn(3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    madds = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: expected_madds(a, madds, estimator), (alpha,))


def test_paper_chain_is_an_upper_bound_tight_only_at_the_first_layer() -> None:
    strictly_above = 0
    for num_tasks in range(2, 7):
        for seed in range(4):
            probs = random_probs(5, num_tasks, seed=seed, scale=[0.0, 0.5, 2.0, 4.0][seed])
            exact, paper = expected_num_ops_exact(probs), expected_num_ops_paper_chain(probs)
            assert torch.all(paper >= exact - 1e-12)
            assert abs(paper[0] - exact[0]) < 1e-12  # layer 1 has no history to get wrong
            if num_tasks == 2:  # the only non-monotone sequence ends in 2 groups: charge is right
                torch.testing.assert_close(paper, exact, rtol=0, atol=1e-12)
            strictly_above += bool(paper[1] > exact[1] + 1e-6)
    assert strictly_above >= 12


def test_uniform_init_three_tasks_two_layers_by_hand() -> None:
    # Layer 1: P(all share) = 1/9, P(one pair) = 6/9 (3 pairs x 2/9), P(all apart) = 2/9.
    # E[N_1] = 1/9 + 2*6/9 + 3*2/9 = 19/9. Exact at layer 2: sum over subsets with
    # P(pair shares prefix) = 1/9, P(triple shares) = 1/81: 3 - 3/9 + 1/81 = 217/81.
    probs = torch.full((2, 3, 3), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(expected_num_ops_exact(probs),
                               torch.tensor([19 / 9, 217 / 81], dtype=torch.float64))
    assert expected_num_ops_paper_chain(probs)[1] > 217 / 81 + 0.03


@pytest.mark.parametrize("num_tasks", [13, 16])
def test_uniform_routing_matches_the_occupancy_formula_up_to_the_limit(num_tasks: int) -> None:
    # With uniform choices the T prefixes of layer l are T draws from T^l equally likely
    # values, so E[N_l] = n (1 - (1 - 1/n)^T) with n = T^l (expected number of occupied bins).
    probs = torch.full((3, num_tasks, num_tasks), 1 / num_tasks, dtype=torch.float64)
    bins = torch.tensor([float(num_tasks) ** l for l in (1, 2, 3)], dtype=torch.float64)
    occupied = bins * (1 - (1 - 1 / bins) ** num_tasks)
    torch.testing.assert_close(expected_num_ops_exact(probs), occupied, rtol=0, atol=1e-9)


def one_hot_logits(ops: list[list[int]], num_tasks: int, scale: float = 1e3) -> torch.Tensor:
    """Logits with task t at layer l certain to pick ``ops[l][t]`` (softmax gives exact 0/1)."""
    index = torch.tensor(ops)[:, :, None]
    alpha = torch.zeros(len(ops), num_tasks, num_tasks, dtype=torch.float64)
    return alpha.scatter(2, index, scale).requires_grad_()


@pytest.mark.parametrize("estimator", RESOURCE_ESTIMATORS.names())
@pytest.mark.parametrize(
    "ops,exact,paper",
    [
        ([[0, 0, 0, 0]] * 3, [1, 1, 1], [1, 1, 1]),  # fully shared encoder
        ([[0, 1, 2, 3]] * 3, [4, 4, 4], [4, 4, 4]),  # single-task networks
        # A tree {0123} -> {01}{23} -> {01}{2}{3} whose layer groupings refine monotonically.
        ([[0, 0, 0, 0], [1, 1, 2, 2], [1, 1, 2, 3]], [1, 2, 3], [1, 2, 3]),
        # The same tree, but layer 3 alone groups {012}{3}: not a refinement of {01}{23}, so the
        # paper's chain charges all 4 copies although only 3 run.
        ([[0, 0, 0, 0], [1, 1, 2, 2], [0, 0, 0, 3]], [1, 2, 3], [1, 2, 4]),
    ],
)
def test_deterministic_routings_count_the_tree(
    estimator: str, ops: list[list[int]], exact: list[int], paper: list[int]
) -> None:
    expected = exact if estimator == "exact" else paper
    alpha = one_hot_logits(ops, num_tasks=4)
    probs = alpha.softmax(dim=-1)
    counts = RESOURCE_ESTIMATORS.get(estimator)(probs)
    torch.testing.assert_close(counts, torch.tensor(expected, dtype=torch.float64))
    madds = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    loss = expected_madds(alpha, madds, estimator)
    loss.backward()
    assert loss.item() == pytest.approx(float(madds @ torch.tensor(expected, dtype=torch.float64)))
    assert torch.isfinite(alpha.grad).all()


def test_float32_alpha_gives_float32_loss_close_to_float64() -> None:
    alpha = torch.randn(6, 8, 8, generator=torch.Generator().manual_seed(4))
    madds = torch.rand(6)
    loss32 = expected_madds(alpha, madds)
    loss64 = expected_madds(alpha.double(), madds.double())
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(loss64.item(), rel=1e-6)


def test_set_partitions_counts_are_bell_numbers() -> None:
    assert [len(set_partitions(n)) for n in range(1, 8)] == [1, 2, 5, 15, 52, 203, 877]
    assert len(set(set_partitions(5))) == 52


def test_limits_and_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ModelError, match=r"^exact resource estimator supports at most 16 tasks "
                                         r"\(2\^T subsets\); got T=20$"):
        expected_num_ops_exact(torch.full((1, 20, 20), 0.05))
    assert MAX_TASKS_EXACT == 16
    with pytest.raises(ModelError, match="paper_chain resource estimator supports at most 8 tasks"):
        expected_madds(torch.zeros(2, 9, 9), torch.ones(2), "paper_chain")
    with pytest.raises(UnknownNameError, match="did you mean 'paper_chain'"):
        expected_madds(torch.zeros(2, 3, 3), torch.ones(2), "paper-chain")
    with pytest.raises(ModelError, match=r"madds_per_layer must have shape \(2,\)"):
        expected_madds(torch.zeros(2, 3, 3), torch.ones(3))
    with pytest.raises(ModelError, match=r"shape \(layers, tasks, tasks\)"):
        expected_madds(torch.zeros(2, 3, 4), torch.ones(2))
