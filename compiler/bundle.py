"""Write a bundle: folded, exported, parity-checked ``model.onnx`` plus its ``manifest.json``.

This is the generic tail of every compile: the method-specific strip/prune hands over an
inference-ready ``nn.Module`` and everything from here on is the same for every method.
:func:`fill_bundle` writes into an empty folder; :func:`write_bundle` does so inside
:func:`~taskfold.compiler.staging.staged_bundle` (a hidden sibling, verified, then swapped in),
so a failed compile never leaves a half-written bundle where the runtime would look for one.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from taskfold.compiler.errors import CompileError
from taskfold.compiler.export import INPUT_NAME, export_onnx
from taskfold.compiler.fold import fold_batchnorm, remaining_batchnorms
from taskfold.compiler.parity import as_image_batch, check_parity
from taskfold.compiler.staging import staged_bundle
from taskfold.runtime.bundle import taskfold_version, write_manifest
from taskfold.runtime.outputs import output_values
from taskfold.runtime.flops import count_onnx

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
OPSET = 18


def write_bundle(out_dir: str | os.PathLike, *, overwrite: bool = False, **bundle: Any) -> Path:
    """Compile a model into the bundle folder ``out_dir`` (see :func:`fill_bundle` for the
    arguments); an existing bundle there is replaced only with ``overwrite``, and only once the
    new one has verified (:func:`~taskfold.compiler.staging.staged_bundle`). Returns ``out_dir``."""
    with staged_bundle(out_dir, overwrite=overwrite) as folder:
        fill_bundle(folder, **bundle)
    return Path(out_dir)


def fill_bundle(
    folder: Path,
    *,
    model: nn.Module,
    name: str,
    method: str,
    input_shape: tuple[int, int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
    tasks: list[dict[str, Any]],
    parity_inputs: np.ndarray | torch.Tensor,
    parity_tol: float = 1e-4,
    compile_info: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    variants: Callable[[Path], dict[str, Any]] | None = None,
) -> None:
    """Fold, export, parity-check and count ``model`` into the empty ``folder``, with its manifest.

    ``model.forward(image)`` returns a dict keyed by task name (or one Tensor for one task);
    each task becomes the ONNX output of the same name. ``input_shape`` is ``(N, C, H, W)``
    (N only sizes the trace: the batch axis is dynamic). ``tasks`` entries need ``name`` and
    ``kind``; other keys (``classes``, ...) are copied into the manifest, except ``output``,
    ``shape`` and ``values`` (what the output holds), which the compiler fills in. Parity is
    checked against the BN-folded model and against ``model`` itself (the reference a user
    cares about), at the batch size of ``parity_inputs`` and at a second one, which proves the
    batch axis really is dynamic.
    """
    _check_tasks(tasks)
    images = as_image_batch(parity_inputs)
    measured = _compile_into(folder, model, tuple(input_shape), tasks, images, parity_tol)
    write_manifest(folder, {
        "name": name,
        "taskfold_version": taskfold_version(),
        "method": method,
        "input": {"name": INPUT_NAME, "shape": [-1, *input_shape[1:]], "dtype": "float32",
                  "layout": "NCHW", "mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "tasks": measured["tasks"],
        "cost": measured["cost"],
        "compile": {**(compile_info or {}), **measured["compile"]},  # measured values win
        "provenance": provenance or {},
        **(variants(folder) if variants is not None else {}),  # written before the manifest signs them
    })


def _compile_into(
    folder: Path, model: nn.Module, input_shape: tuple[int, ...], tasks: list[dict[str, Any]],
    images: np.ndarray, tol: float,
) -> dict[str, Any]:
    """Fold, export, check and count into ``folder``; returns the manifest's tasks/cost/compile."""
    names = [t["name"] for t in tasks]
    path = folder / MODEL_FILE

    folded, n_folded = fold_batchnorm(model)
    start = time.perf_counter()
    export_onnx(folded, path, input_shape=input_shape, output_names=names, opset=OPSET)
    log.info("exported %s in %.2f s (%d BatchNorm folded)", path.name, time.perf_counter() - start, n_folded)

    folded_diffs = check_parity(folded, path, images, tol=tol)
    reference = check_parity(model, path, images, tol=tol)
    other_batch = images[:1] if len(images) > 1 else np.concatenate([images, images])
    reference_other = check_parity(model, path, other_batch, tol=tol)
    per_output = {n: max(reference[n], reference_other[n]) for n in names}

    graph = onnx.load(path, load_external_data=False).graph
    bn_nodes = sum(node.op_type == "BatchNormalization" for node in graph.node)
    if bn_nodes and not remaining_batchnorms(folded):
        raise CompileError(f"{bn_nodes} BatchNormalization node(s) left in the ONNX graph "
                           "although every BatchNorm module was folded")

    cost = count_onnx(path)
    shapes = _output_shapes(path, images[:1])
    return {
        "tasks": [{**t, "output": t["name"], "shape": [-1, *shapes[t["name"]][1:]],
                   "values": output_values(t["kind"])} for t in tasks],
        "cost": {"macs": int(cost.macs), "params": int(cost.params),
                 "per_task_macs": {n: int(cost.per_output_macs[n]) for n in names}},
        "compile": {
            "onnx_parity_max_abs": max(per_output.values()),
            "onnx_parity_per_output": per_output,
            "folded_parity_max_abs": max(folded_diffs.values()),
            "parity_tol": tol,
            "parity_samples": len(images),
            "bn_folded": n_folded,
            "bn_remaining": bn_nodes,
            "opset": OPSET,
        },
    }


def _output_shapes(path: Path, image: np.ndarray) -> dict[str, tuple[int, ...]]:
    """Each output's shape, read off one real ONNX Runtime run.

    The exported graph's declared output shapes are often symbolic (a Resize whose size is
    computed from the dynamic batch), so running it is the one reliable source.
    """
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {INPUT_NAME: image})
    return {o.name: value.shape for o, value in zip(session.get_outputs(), outputs)}


def _check_tasks(tasks: list[dict[str, Any]]) -> None:
    """Every task needs a unique ``name`` (it names the ONNX output) and a ``kind``."""
    if not tasks:
        raise CompileError("a bundle needs at least one task")
    for i, task in enumerate(tasks):
        missing = [k for k in ("name", "kind") if k not in task]
        if missing:
            raise CompileError(f"task #{i} lacks {', '.join(missing)}: {task}")
    names = [t["name"] for t in tasks]
    if len(set(names)) != len(names):
        raise CompileError(f"task names must be unique, got {names}")
