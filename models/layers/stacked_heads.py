"""K copies of a global (pool + MLP) head evaluated in one batched call.

DMTG gives every task a head in every group branch (K·N heads). Calling them one by one is the
paper's stated bottleneck; here a task's K heads are one module whose weights are stacked along
a leading copy axis, so any subset of copies runs as two ``einsum`` calls.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class StackedMLPHead(nn.Module):
    """``copies`` independent heads: global average pool → [Linear → ReLU] → Linear."""

    def __init__(self, copies: int, in_channels: int, out_channels: int, hidden: int = 0) -> None:
        super().__init__()
        dims = [in_channels] + ([hidden] if hidden > 0 else []) + [out_channels]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation, per copy
            self.weights.append(nn.Parameter(torch.empty(copies, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(copies, fan_out).uniform_(-bound, bound)))

    def forward(self, pooled: Tensor, copies: Tensor | None = None) -> Tensor:
        """``pooled`` (C, B, in): copy c's input; ``copies`` selects which C copies run → (C, B, out)."""
        x = pooled
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            if copies is not None:
                w, b = w[copies], b[copies]
            x = torch.einsum("cbi,cio->cbo", x, w) + b[:, None, :]
            if layer < len(self.weights) - 1:
                x = torch.relu(x)
        return x

    def copy_as_head(self, k: int) -> "PooledMLPHead":
        """Copy ``k`` as a stand-alone head (what inference keeps)."""
        return PooledMLPHead([w[k].detach().clone() for w in self.weights], [b[k].detach().clone() for b in self.biases])


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
