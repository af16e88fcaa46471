"""Lower-precision variants of a bundle's graph, each scored per task before it is kept.

``build_variants`` runs inside the bundle folder that ``write_bundle`` is building (before it is
signed and moved into place), so a refused variant leaves no bundle half-changed. It writes
``model.int8.onnx`` and/or ``model.fp16.onnx`` beside ``model.onnx``, evaluates every graph on the
run's test split with the tasks' own metrics, applies the accuracy guard and returns the
manifest's ``precisions`` section (file, scheme, metrics, deltas, what was kept in FP32) and
``default_precision``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from taskfold.compiler.accuracy import (
    MaxDrop, OnnxNetwork, evaluate_graph, guard_violations, metric_deltas, parse_max_drops, resolve_limits,
)
from taskfold.compiler.errors import CompileError
from taskfold.compiler.fp16 import convert_fp16
from taskfold.compiler.int8 import (
    Int8Scheme, count_fused_convs, head_nodes, quantize_int8, resolve_exclusions, scheme_for,
)
from taskfold.compiler.int8_saturation import check_saturation
from taskfold.runtime.cpu import cpu_kind
from taskfold.runtime.flops import count_onnx

log = logging.getLogger(__name__)

FP32_FILE, INT8_FILE, FP16_FILE = "model.onnx", "model.int8.onnx", "model.fp16.onnx"
SATURATION_IMAGES = 8  # images the saturation check runs (a numpy reference per conv: keep it small)
PARITY_IMAGES = 8  # test images on which each variant's outputs are compared with FP32's


@dataclass
class PrecisionPlan:
    """What to build, from ``compile.*`` (CompileConfig) and the compile command's flags."""

    int8: bool = False
    fp16: bool = False
    calib_images: int = 256
    int8_target: str = "auto"
    max_drops: list[MaxDrop] = field(default_factory=list)
    int8_exclude: list[str] = field(default_factory=list)
    int8_heads: str = "auto"
    fp16_io: bool = False
    default_precision: str = "fp32"
    force: bool = False

    @classmethod
    def from_settings(cls, settings, *, force: bool = False) -> "PrecisionPlan":
        """From a CompileConfig; malformed ``int8_max_drop`` entries raise CompileError now."""
        return cls(int8=settings.int8, fp16=settings.fp16, calib_images=settings.calib_images,
                   int8_target=settings.int8_target, max_drops=parse_max_drops(settings.int8_max_drop),
                   int8_exclude=list(settings.int8_exclude), int8_heads=settings.int8_heads,
                   fp16_io=settings.fp16_io, default_precision=settings.default_precision, force=force)

    @property
    def wanted(self) -> bool:
        return self.int8 or self.fp16


@dataclass
class EvalData:
    """What scoring and calibration need from the run: the test split, its tasks, training images."""

    test: Any  # a SplitLoader over the test split (what trainer.loop.evaluate walks)
    tasks: list
    calibration: np.ndarray
    parity_images: Any  # the first PARITY_IMAGES test images, for output differences


def build_variants(folder: Path, plan: PrecisionPlan, data: EvalData) -> dict[str, Any]:
    """Write the planned variants into ``folder`` (holding ``model.onnx``); returns manifest keys."""
    limits = resolve_limits(plan.max_drops, data.tasks)
    fp32 = evaluate_graph(folder / FP32_FILE, data.test, data.tasks)
    precisions: dict[str, Any] = {"fp32": {"file": FP32_FILE, "metrics": fp32}}
    if plan.int8:
        precisions["int8"] = _int8_variant(folder, plan, data, fp32, limits)
    if plan.fp16:
        precisions["fp16"] = _fp16_variant(folder, plan, data, fp32, limits)
    return {"precisions": precisions, "default_precision": plan.default_precision}


def _int8_variant(folder: Path, plan: PrecisionPlan, data: EvalData, fp32: dict, limits: list) -> dict[str, Any]:
    scheme = scheme_for(plan.int8_target)
    source = onnx.load(folder / FP32_FILE)
    excluded = resolve_exclusions(source, plan.int8_exclude)
    heads = head_nodes(source)
    kept_heads = plan.int8_heads == "fp32"
    path = folder / INT8_FILE
    metrics, violations = _quantise_and_score(path, scheme, excluded + (heads if kept_heads else []), data, fp32, limits)
    first_violations = violations
    if violations and plan.int8_heads == "auto" and heads:
        log.info("INT8 breaks the guard (%s); retrying with the %d head nodes in FP32", violations[0], len(heads))
        metrics, violations = _quantise_and_score(path, scheme, excluded + heads, data, fp32, limits)
        kept_heads = True
        if violations:
            violations = [f"{violations[0]} (also with the heads in FP32; all-INT8: {first_violations[0]})"]
    if violations and not plan.force:
        raise CompileError(f"INT8 graph refused: {violations[0]}; keep it with --force, or leave nodes in "
                           "FP32 with --int8-exclude")
    saturation = _saturation(path, scheme, data.calibration)
    if saturation.get("saturated") and not plan.force:
        worst = saturation["worst_node"]
        raise CompileError(f"INT8 graph refused: fused conv {worst} saturates on this CPU (off by "
                           f"{saturation['max_step_error']} quantisation steps); compile with --int8-target avx2 "
                           "(7-bit weights), or --force")
    fused, convs = count_fused_convs(path)
    cost = count_onnx(path)
    return {
        "file": INT8_FILE,
        "scheme": {**scheme.to_manifest(), "calibration_images": int(len(data.calibration)),
                   "calibration_split": "train"},
        "excluded": {"requested": list(plan.int8_exclude), "nodes": excluded,
                     "heads_fp32": heads if kept_heads else [],
                     "heads_policy": plan.int8_heads},
        "metrics": metrics,
        "delta": metric_deltas(fp32, metrics),
        "guard": {"limits": [f"{t}.{m}<={d.text()}" for t, m, d in limits], "violations": violations,
                  "forced": bool(violations) and plan.force,
                  "all_int8_violations": first_violations if kept_heads and plan.int8_heads == "auto" else []},
        "saturation": saturation,
        "fused_convs": {"int8": fused, "all": convs},
        "output_max_abs_diff": output_diffs(folder / FP32_FILE, path, data.parity_images),
        "macs_by_precision": cost.macs_by_precision,
    }


def _quantise_and_score(path: Path, scheme: Int8Scheme, exclude: list[str], data: EvalData, fp32: dict,
                        limits: list) -> tuple[dict, list[str]]:
    quantize_int8(path.with_name(FP32_FILE), path, data.calibration, scheme, exclude_nodes=exclude)
    metrics = evaluate_graph(path, data.test, data.tasks)
    return metrics, guard_violations(limits, data.tasks, fp32, metrics)


def _saturation(path: Path, scheme: Int8Scheme, images: np.ndarray) -> dict[str, Any]:
    """The check runs where the graph will run: a graph for another CPU kind is not judged here."""
    here = cpu_kind()
    if scheme.target != here:
        return {"skipped": f"built for {scheme.target}, this CPU is {here}"}
    return check_saturation(path, images[:SATURATION_IMAGES])


def _fp16_variant(folder: Path, plan: PrecisionPlan, data: EvalData, fp32: dict, limits: list) -> dict[str, Any]:
    path = folder / FP16_FILE
    convert_fp16(folder / FP32_FILE, path, fp16_io=plan.fp16_io)
    metrics = evaluate_graph(path, data.test, data.tasks)
    violations = guard_violations(limits, data.tasks, fp32, metrics)
    if violations and not plan.force:
        raise CompileError(f"FP16 graph refused: {violations[0]}; keep it with --force")
    return {"file": FP16_FILE, "io": "fp16" if plan.fp16_io else "fp32", "metrics": metrics,
            "output_max_abs_diff": output_diffs(folder / FP32_FILE, path, data.parity_images),
            "delta": metric_deltas(fp32, metrics), "guard": {"violations": violations, "forced": bool(violations)},
            "macs_by_precision": count_onnx(path).macs_by_precision}


def output_diffs(reference: Path, other: Path, images) -> dict[str, float]:
    """Max |other - reference| per output on ``images`` (float32 arithmetic on both results)."""
    want, got = OnnxNetwork(reference)(images), OnnxNetwork(other)(images)
    return {name: float((got[name] - value).abs().max()) for name, value in want.items()}
