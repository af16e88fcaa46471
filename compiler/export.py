"""Export a PyTorch model to a checked, single-file ONNX graph with the bundle's I/O names.

Exporter choice (torch 2.14): the dynamo-based exporter (``dynamo=True`` with
``dynamic_shapes``). The TorchScript exporter is 6-30x faster on CPU, but its trace freezes the
batch size inside timm's ViT attention (``reshape(B, N, 3, heads, dim)``), so a ViT graph
exported at batch 1 fails at batch 3; the dynamo exporter keeps the batch symbolic for every
backbone. The example batch is 2, because torch.export specialises a size-1 dimension to a
constant. Export takes 2-8 s for the models taskfold trains.

Weights are stored inside the .onnx file unless they exceed 2 GB (protobuf's limit), which is
the bundle contract ("single file unless > 2 GB").
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence

import onnx
import torch
from torch import nn

from taskfold.compiler.errors import CompileError
from taskfold.models.modes import eval_mode

log = logging.getLogger(__name__)

INPUT_NAME = "image"


class _OrderedOutputs(nn.Module):
    """Turns ``forward(image) -> dict | Tensor`` into a tuple in ``output_names`` order.

    The exporter flattens a dict in its iteration order, which is the model's business; the
    bundle's output order must be the caller's.
    """

    def __init__(self, model: nn.Module, output_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.output_names = list(output_names)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image)
        if isinstance(out, torch.Tensor):
            return (out,)
        return tuple(out[name] for name in self.output_names)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: tuple[int, int, int, int],
    output_names: list[str],
    opset: int = 18,
) -> None:
    """Export ``model`` (in eval mode) to ``path`` and run ``onnx.checker`` (full check) on it.

    The graph has one input named ``image`` (float32, NCHW, ``input_shape`` with a dynamic
    batch axis) and one output per entry of ``output_names``, in that order, each with a
    dynamic batch axis. ``model.forward(image)`` returns ``dict[str, Tensor]`` keyed by those
    names, or a single Tensor when there is one name. Any failure raises ``CompileError``.
    """
    output_names = list(output_names)
    _check_outputs(model, input_shape, output_names)
    try:
        with eval_mode(model):
            _export(_OrderedOutputs(model, output_names), path, input_shape, output_names, opset)
    except CompileError:
        raise
    except Exception as exc:
        raise CompileError(f"ONNX export failed: {_one_line(exc)}") from exc
    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except Exception as exc:
        raise CompileError(f"exported ONNX graph is invalid: {_one_line(exc)}") from exc


def _check_outputs(model: nn.Module, input_shape: tuple[int, ...], output_names: list[str]) -> None:
    """Fail early, with a clear message, when the names do not match what forward returns."""
    if len(input_shape) != 4:
        raise CompileError(f"input_shape must be (N, C, H, W), got {tuple(input_shape)}")
    if not output_names or len(set(output_names)) != len(output_names):
        raise CompileError(f"output_names must be non-empty and unique, got {output_names}")
    if INPUT_NAME in output_names:
        raise CompileError(f"an output cannot be named {INPUT_NAME!r} (that is the input's name)")
    try:
        with eval_mode(model), torch.no_grad():
            out = model(_example_input(model, input_shape))
    except Exception as exc:
        raise CompileError(f"model forward failed on shape {tuple(input_shape)}: {_one_line(exc)}") from exc
    if isinstance(out, torch.Tensor):
        if len(output_names) != 1:
            raise CompileError(f"model returns one tensor but {len(output_names)} output names were given")
        return
    if not isinstance(out, dict):
        raise CompileError(f"model must return a Tensor or dict[str, Tensor], got {type(out).__name__}")
    missing = [n for n in output_names if n not in out]
    if missing:
        raise CompileError(f"model outputs {sorted(out)} lack {missing}")


def _export(
    module: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...],
    output_names: list[str], opset: int,
) -> None:
    """The exporter call itself, with its warnings collected instead of printed (to DEBUG)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            # batch 2: the dynamo exporter specialises a size-1 dimension to a constant
            module, (_example_input(module, (max(2, input_shape[0]), *input_shape[1:])),), os.fspath(path),
            dynamo=True, input_names=[INPUT_NAME], output_names=output_names,
            dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset,
            external_data=_weight_bytes(module) > _PROTOBUF_LIMIT, verbose=False,
        )
    for w in caught:
        log.debug("exporter %s: %s", w.category.__name__, (str(w.message).strip().splitlines() or [""])[0])


_PROTOBUF_LIMIT = 2 * 1024 ** 3 - 64 * 1024 ** 2  # leave room for the graph itself


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _example_input(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """A fixed random image batch on the model's device (values only steer the trace)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    return torch.randn(*input_shape, generator=gen).to(device)


def _one_line(exc: BaseException) -> str:
    """``Type: first line of message`` -- exporter errors can be pages long."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
