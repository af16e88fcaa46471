"""K copies of a global (pool + MLP) head, evaluated by one call.

DMTG gives every task a head in every group branch (K·N heads), the paper's stated bottleneck
when heads are heavy. Here a task's K heads are one module: one call runs whichever copies the
step needs (a few ``addmm`` on pooled features, no module dispatch per head), the pooled input
is computed once per branch for all tasks, and copies the step does not need are not run.

Each copy owns its parameters (``copy_weights[c][layer]``, ``copy_biases[c][layer]``) rather than
sharing one stacked tensor: a copy that did not run in a step (skipped, or scored without
autograd under hard sampling) then has no gradient, and the optimiser leaves it alone, as PyTorch
does with any parameter whose ``grad`` is None. With heavy heads that is most of the step: the
optimiser's work grows with the parameters it updates, and MLP heads on pooled features have as
many parameters as MACs per image.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class StackedMLPHead(nn.Module):
    """``copies`` heads: global average pool → [Linear → ReLU] → Linear, all initialised alike (the
    paper copies a task's head K times so that it starts identical in every group)."""

    def __init__(self, copies: int, in_channels: int, out_channels: int, hidden: int = 0) -> None:
        super().__init__()
        dims = [in_channels] + ([hidden] if hidden > 0 else []) + [out_channels]
        weights, biases = [], []
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation
            weights.append(torch.empty(fan_in, fan_out).uniform_(-bound, bound))
            biases.append(torch.empty(fan_out).uniform_(-bound, bound))
        self.copy_weights = nn.ModuleList(
            nn.ParameterList(nn.Parameter(w.clone()) for w in weights) for _ in range(copies))
        self.copy_biases = nn.ModuleList(
            nn.ParameterList(nn.Parameter(b.clone()) for b in biases) for _ in range(copies))

    @property
    def num_layers(self) -> int:
        return len(self.copy_weights[0])

    def forward(self, pooled: Tensor, copies: list[int]) -> Tensor:
        """``pooled`` (C, B, in): the input of each of the C ``copies`` that run → (C, B, out).

        One ``addmm`` per copy and layer on its own weights: stacking the weights for a single
        batched matmul would copy every running copy's parameters each step, which costs more
        than the matmuls themselves once heads are heavy (B is a training batch, not a large M).
        """
        outputs = []
        for x, c in zip(pooled, copies):
            for layer, (w, b) in enumerate(zip(self.copy_weights[c], self.copy_biases[c])):
                x = torch.addmm(b, x, w)
                if layer < self.num_layers - 1:
                    x = torch.relu(x)
            outputs.append(x)
        return torch.stack(outputs)

    def copy_as_head(self, k: int) -> "PooledMLPHead":
        """Copy ``k`` as a stand-alone head (what inference keeps)."""
        return PooledMLPHead([w.detach().clone() for w in self.copy_weights[k]],
                             [b.detach().clone() for b in self.copy_biases[k]])


class PooledMLPHead(nn.Module):
    """One head cut out of a :class:`StackedMLPHead`: pool → [Linear → ReLU] → Linear."""

    def __init__(self, weights: list[Tensor], biases: list[Tensor]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (w, b) in enumerate(zip(weights, biases)):
            linear = nn.Linear(w.shape[0], w.shape[1])
            with torch.no_grad():
                linear.weight.copy_(w.t())
                linear.bias.copy_(b)
            layers.append(linear)
            if i < len(weights) - 1:
                layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.mlp(features[-1].mean(dim=(2, 3)))
