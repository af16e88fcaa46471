"""BMTAS resource loss: the expected MAdds of a branched encoder sampled from the supergraph.

Setting. T tasks route through an encoder of L layers; every layer has T candidate copies of its
block. Task t picks copy ``j`` at layer ``l`` with probability ``p[l, t, j] = softmax(alpha[l, t])[j]``,
independently per layer and per task. Two tasks share a computation at layer l only if their
choices coincide at every layer <= l, so the number of block copies that run at layer l is

    N_l = number of distinct prefixes (j_1^(t), ..., j_l^(t)) over the tasks t,

and the resource loss is ``E[MAdds] = sum_l c_l * E[N_l]`` (c_l: MAdds of one copy of block l).

Two estimators of ``E[N_l]`` are offered, selected by name from :data:`RESOURCE_ESTIMATORS`:

``exact`` (default)
    Inclusion-exclusion over task subsets. For any partition of the tasks into blocks,
    ``#blocks = sum_{U != {}, U inside one block} (-1)^{|U|+1}`` (each block contributes
    ``sum_{k>=1} (-1)^{k+1} C(n, k) = 1``). Taking expectations, and using that layers are
    independent,

        E[N_l] = sum_{U != {}} (-1)^{|U|+1} prod_{i<=l} s_i(U),
        s_i(U) = sum_j prod_{t in U} p[i, t, j],

    where ``prod_i s_i(U)`` is the probability that all tasks of U share their prefix. This is
    the formula in METHODS.md; it is verified against brute-force enumeration and Monte Carlo
    in ``tests/test_resource_loss.py``. 2^T terms, hence the limit of 16 tasks.

``paper_chain``
    The recursion of the BMTAS paper (Eq. 6) as its reference code implements it. Let G_l be
    the grouping induced by layer l alone (tasks that pick the same copy at layer l). The chain
    keeps, for every partition k other than all-singletons,
    ``P~_l(k) = P(G_l = k) * sum_{m coarser than or equal to k} P~_{l-1}(m)``, i.e. the
    probability that G_1, ..., G_l refine monotonically and end in k, and charges all
    remaining mass the full T copies. On a monotone sequence the charge |G_l| equals N_l; on
    any other it is T >= N_l. So from the second layer on it is an upper bound of E[N_l], not
    the expectation (at layer 1 both coincide). Bell(T) partitions, hence the limit of 8 tasks.

Both are differentiable with respect to ``alpha`` and compute in float64 internally: the
inclusion-exclusion sum cancels terms up to 2^T times larger than its result, and the paper's
Moebius inversion alternates in sign too; the result is cast back to ``alpha``'s dtype.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor

from taskfold.models.errors import ModelError
from taskfold.models.registry import Registry

MAX_TASKS_EXACT = 16
MAX_TASKS_PAPER_CHAIN = 8

Estimator = Callable[[Tensor], Tensor]
RESOURCE_ESTIMATORS: Registry[Estimator] = Registry("resource estimator")

_COMPUTE_DTYPE = torch.float64


def _check_probs(probs: Tensor) -> tuple[int, int]:
    """Return (L, T) for a well-formed ``(L, T, T)`` routing-probability tensor."""
    if probs.dim() != 3 or probs.shape[1] != probs.shape[2]:
        raise ModelError(
            f"routing probabilities must have shape (layers, tasks, tasks); got {tuple(probs.shape)}"
        )
    return probs.shape[0], probs.shape[1]


def _subset_products(probs: Tensor) -> Tensor:
    """``out[U, l, j] = prod_{t in U} probs[l, t, j]`` for every subset U of the given tasks.

    Built by doubling (the subsets without task t, then the same subsets times task t), so row
    U is indexed by bitmask and row 0, the empty product, is 1.
    """
    num_layers, num_tasks, num_ops = probs.shape
    products = probs.new_ones(1, num_layers, num_ops)
    for task in range(num_tasks):
        products = torch.cat([products, products * probs[:, task, :]], dim=0)
    return products


def subset_coincidence(probs: Tensor) -> Tensor:
    """``s[U, l]``: probability that all tasks of subset U pick the same copy at layer l.

    Subsets are indexed by bitmask (bit t set <=> task t in U); row 0 is the empty set, whose
    "product over no task" is 1 for every copy, so ``s[0, l] = T``. Meet in the middle: with U
    split into its low half A and high half B, ``s[U, l] = sum_j low[A, l, j] * high[B, l, j]``
    is one batched matrix product over layers. Only 2 * 2^(T/2) products per layer and copy are
    materialised instead of 2^T, so T = 16, L = 18 needs megabytes, not a gigabyte.
    """
    num_layers, num_tasks = _check_probs(probs)
    probs = probs.to(_COMPUTE_DTYPE)
    half = num_tasks // 2
    low, high = _subset_products(probs[:, :half]), _subset_products(probs[:, half:])
    # Row index of U = A + B * 2^half, i.e. B-major then A.
    return torch.einsum("alj,blj->bal", low, high).reshape(2**num_tasks, num_layers)


@functools.lru_cache(maxsize=None)
def _inclusion_exclusion_signs(num_tasks: int, device: torch.device) -> Tensor:
    """(-1)^{|U|+1} for every non-empty subset U, in bitmask order starting at U = 1."""
    masks = torch.arange(1, 2**num_tasks)
    sizes = ((masks[:, None] >> torch.arange(num_tasks)) & 1).sum(dim=1)
    return (1.0 - 2.0 * (sizes % 2 == 0).to(_COMPUTE_DTYPE)).to(device)


@RESOURCE_ESTIMATORS.register("exact")
def expected_num_ops_exact(probs: Tensor) -> Tensor:
    """Exact ``E[N_l]`` for every layer, shape ``(L,)``, by inclusion-exclusion over task subsets.

    ``probs`` is ``(L, T, T)``: ``probs[l, t]`` is task t's distribution over the T copies of layer l.
    """
    _, num_tasks = _check_probs(probs)
    if num_tasks > MAX_TASKS_EXACT:
        raise ModelError(
            f"exact resource estimator supports at most {MAX_TASKS_EXACT} tasks "
            f"(2^T subsets); got T={num_tasks}"
        )
    share_prefix = torch.cumprod(subset_coincidence(probs)[1:], dim=1)  # (2^T - 1, L)
    signs = _inclusion_exclusion_signs(num_tasks, share_prefix.device)
    return (signs @ share_prefix).to(probs.dtype)


def _partitions_of(mask: int) -> list[list[int]]:
    """All partitions of the tasks in ``mask`` (a bitmask) into blocks, each a bitmask.

    Tasks are added one at a time, either as a new block or into an existing one, so every
    partition is produced exactly once (Bell(|mask|) of them).
    """
    partitions: list[list[int]] = [[]]
    for bit in (1 << t for t in range(mask.bit_length()) if mask >> t & 1):
        partitions = [
            grown
            for blocks in partitions
            for grown in [blocks + [bit]]
            + [blocks[:i] + [b | bit] + blocks[i + 1 :] for i, b in enumerate(blocks)]
        ]
    return partitions


def set_partitions(num_tasks: int) -> list[tuple[int, ...]]:
    """All partitions of ``{0..T-1}``, each a sorted tuple of block bitmasks, in sorted order."""
    return sorted(tuple(sorted(blocks)) for blocks in _partitions_of((1 << num_tasks) - 1))


@functools.lru_cache(maxsize=None)
def _partition_lattice(
    num_tasks: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Index tensors for the partition lattice of T tasks, built once per T and device.

    Returns ``blocks`` (Bell, T) bitmasks padded with -1, ``num_blocks`` (Bell,), and the
    refinement pairs ``finer[e] <= coarser[e]`` (every block of ``finer`` lies in a block of
    ``coarser``) with the Moebius value ``mobius[e]`` of each pair: for every block b of
    ``coarser`` split into n_b blocks of ``finer``, a factor (-1)^(n_b - 1) (n_b - 1)!.
    """
    partitions = set_partitions(num_tasks)
    index = {blocks: i for i, blocks in enumerate(partitions)}
    blocks = torch.full((len(partitions), num_tasks), -1, dtype=torch.long)
    finer, coarser, mobius = [], [], []
    for m, coarse in enumerate(partitions):
        blocks[m, : len(coarse)] = torch.tensor(coarse)
        refinements: list[tuple[list[int], float]] = [([], 1.0)]
        for block in coarse:
            refinements = [
                (prefix + sub, weight * (-1) ** (len(sub) - 1) * math.factorial(len(sub) - 1))
                for prefix, weight in refinements
                for sub in _partitions_of(block)
            ]
        for fine, weight in refinements:
            finer.append(index[tuple(sorted(fine))])
            coarser.append(m)
            mobius.append(weight)
    lattice = (
        blocks,
        (blocks >= 0).sum(dim=1),
        torch.tensor(finer),
        torch.tensor(coarser),
        torch.tensor(mobius, dtype=_COMPUTE_DTYPE),
    )
    return tuple(t.to(device) for t in lattice)  # type: ignore[return-value]


@RESOURCE_ESTIMATORS.register("paper_chain")
def expected_num_ops_paper_chain(probs: Tensor) -> Tensor:
    """The BMTAS paper's chain over task groupings, shape ``(L,)``: an upper bound of ``E[N_l]``.

    ``P(G_l = k)`` is obtained by Moebius inversion of ``P(G_l coarser than or equal to k) =
    prod_{B in k} s_l(B)`` over the partition lattice (the reference code sums T^T explicit
    assignments instead; the value is the same). See the module docstring for what the chain
    computes and why it over-counts.
    """
    num_layers, num_tasks = _check_probs(probs)
    if num_tasks > MAX_TASKS_PAPER_CHAIN:
        raise ModelError(
            f"paper_chain resource estimator supports at most {MAX_TASKS_PAPER_CHAIN} tasks "
            f"(Bell(T) task groupings); got T={num_tasks}; use the 'exact' estimator"
        )
    blocks, num_blocks, finer, coarser, mobius = _partition_lattice(num_tasks, probs.device)
    coincide = subset_coincidence(probs)  # (2^T, L)
    # Padding (-1) must contribute a factor 1 to the product over blocks.
    padded = torch.cat([coincide, coincide.new_ones(1, num_layers)], dim=0)
    at_least = padded[blocks].prod(dim=1)  # (Bell, L): P(G_l coarser than or equal to k)
    exactly = torch.zeros_like(at_least).index_add(0, finer, mobius[:, None] * at_least[coarser])

    # The reference code charges T to all mass outside its tracked partitions, i.e.
    # E = T - sum_k (T - |k|) P~(k). The all-singletons entry of `chain` is harmless to keep:
    # it saves nothing and is an ancestor of no other partition.
    saved = (num_tasks - num_blocks).to(_COMPUTE_DTYPE)
    chain = exactly[:, 0]
    savings = [saved @ chain]
    for layer in range(1, num_layers):
        ancestors = torch.zeros_like(chain).index_add(0, finer, chain[coarser])
        chain = exactly[:, layer] * ancestors
        savings.append(saved @ chain)
    return (num_tasks - torch.stack(savings)).to(probs.dtype)


def expected_madds(alpha: Tensor, madds_per_layer: Tensor, estimator: str = "exact") -> Tensor:
    """Expected MAdds of the sampled branched encoder, ``sum_l c_l * E[N_l]`` (a scalar).

    ``alpha``: routing logits ``(L, T, T)`` (``alpha[l, t]`` scores task t's T candidate copies of
    layer l). ``madds_per_layer``: ``(L,)`` MAdds of one copy of each block, from the look-up
    table. ``estimator``: a name in :data:`RESOURCE_ESTIMATORS` (``exact`` or ``paper_chain``).
    """
    compute = RESOURCE_ESTIMATORS.get(estimator)
    num_layers, _ = _check_probs(alpha)
    if madds_per_layer.shape != (num_layers,):
        raise ModelError(
            f"madds_per_layer must have shape ({num_layers},) to match alpha's {num_layers} "
            f"layers; got {tuple(madds_per_layer.shape)}"
        )
    expected_ops = compute(torch.softmax(alpha, dim=-1))
    return (madds_per_layer.to(expected_ops) * expected_ops).sum()
