"""Does any fused INT8 convolution saturate on this CPU? Checked conv by conv, on real inputs.

ONNX Runtime fuses each ``DQ → Conv → Q`` of a QDQ graph into an integer kernel. On x86 without
VNNI that kernel sums pairs of u8×s8 products in 16-bit lanes (``VPMADDUBSW``), which saturate
when the weights use the full int8 range; the result is silently wrong. So every fused conv's
quantised output, as ONNX Runtime computes it, is compared with the exact result of the same
quantised arithmetic on the same quantised input (float64 numpy: dequantise, convolve, add the
bias, requantise). Without saturation the two differ by rounding only (at most one quantisation
step); a saturating conv is off by many steps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

# Rounding (ORT requantises in float32, the reference in float64) moves a value by one step.
MAX_ROUNDING_STEPS = 1


@dataclass
class _QuantConv:
    """One ``DQ(x_q) → Conv(DQ(w_q), DQ(b_q)) → Q`` pattern of a QDQ graph."""

    name: str
    x_q: str
    x_scale: float
    x_zero: int
    weight: np.ndarray  # dequantised, float64
    bias: np.ndarray | None  # dequantised, float64
    y_q: str
    y_scale: float
    y_zero: int
    y_range: tuple[int, int]
    attrs: dict[str, Any]


def check_saturation(int8_path: str | os.PathLike, images: np.ndarray) -> dict[str, Any]:
    """Per fused conv, the largest difference (in quantisation steps of its output) between ONNX
    Runtime's integer kernel and exact quantised arithmetic, over ``images``.

    Returns ``{"convs_checked", "max_step_error", "worst_node", "saturated": [names]}``; a conv
    is saturated when it is off by more than ``MAX_ROUNDING_STEPS``.
    """
    model = onnx.load(os.fspath(int8_path))
    convs = _quantised_convs(model)
    if not convs:
        return {"convs_checked": 0, "max_step_error": 0, "worst_node": None, "saturated": []}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {output.name for output in probe.graph.output}
    for name in sorted({c.x_q for c in convs} | {c.y_q for c in convs} - present):
        probe.graph.output.add().name = name
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = [output.name for output in session.get_outputs()]
    values = dict(zip(wanted, session.run(wanted, {session.get_inputs()[0].name: images})))
    errors = {c.name: _step_error(c, values[c.x_q], values[c.y_q]) for c in convs}
    worst = max(errors, key=errors.get)
    return {"convs_checked": len(convs), "max_step_error": errors[worst], "worst_node": worst,
            "saturated": [name for name, steps in errors.items() if steps > MAX_ROUNDING_STEPS]}


def _step_error(conv: _QuantConv, x_q: np.ndarray, y_q: np.ndarray) -> int:
    x = (x_q.astype(np.float64) - conv.x_zero) * conv.x_scale
    y = conv2d(x, conv.weight, conv.bias, **conv.attrs)
    low, high = conv.y_range
    expected = np.clip(np.rint(y / conv.y_scale) + conv.y_zero, low, high)  # rint: half to even, as ONNX
    return int(np.abs(expected - y_q.astype(np.float64)).max())


def _quantised_convs(model: onnx.ModelProto) -> list[_QuantConv]:
    """Every Conv whose input and weight are dequantised and whose output only feeds a quantise."""
    graph = model.graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producer = {name: node for node in graph.node for name in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        x_dq, w_dq = (producer.get(node.input[i]) for i in (0, 1))
        users = consumers.get(node.output[0], [])
        if not (_is_dq(x_dq) and _is_dq(w_dq) and len(users) == 1 and users[0].op_type == "QuantizeLinear"):
            continue
        if w_dq.input[0] not in inits:
            continue
        quant = users[0]
        y_zero = inits[quant.input[2]] if len(quant.input) > 2 and quant.input[2] else np.uint8(0)
        info = np.iinfo(y_zero.dtype)
        found.append(_QuantConv(
            name=node.name, x_q=x_dq.input[0],
            x_scale=float(inits[x_dq.input[1]]), x_zero=int(_zero(x_dq, inits)),
            weight=_dequantised(w_dq, inits), bias=_bias(node, producer, inits),
            y_q=quant.output[0], y_scale=float(inits[quant.input[1]]), y_zero=int(y_zero),
            y_range=(int(info.min), int(info.max)), attrs=_conv_attrs(node),
        ))
    return found


def _is_dq(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "DequantizeLinear"


def _zero(dq: onnx.NodeProto, inits: dict[str, np.ndarray]) -> np.ndarray:
    return inits[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.int64)


def _dequantised(dq: onnx.NodeProto, inits: dict[str, np.ndarray]) -> np.ndarray:
    """A constant DequantizeLinear's output in float64 (per-tensor or along its ``axis``)."""
    q = inits[dq.input[0]].astype(np.float64)
    scale, zero = inits[dq.input[1]].astype(np.float64), _zero(dq, inits).astype(np.float64)
    if scale.ndim == 1 and q.ndim > 1:
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def _bias(node: onnx.NodeProto, producer: dict, inits: dict[str, np.ndarray]) -> np.ndarray | None:
    if len(node.input) < 3 or not node.input[2]:
        return None
    source = producer.get(node.input[2])
    if _is_dq(source) and source.input[0] in inits:
        return _dequantised(source, inits)
    return inits[node.input[2]].astype(np.float64)


def _conv_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if auto_pad not in (b"NOTSET", "NOTSET"):
        raise ValueError(f"{node.name}: auto_pad={auto_pad!r} is not supported by the saturation check")
    return {"strides": tuple(attrs.get("strides", (1, 1))), "dilations": tuple(attrs.get("dilations", (1, 1))),
            "pads": tuple(attrs.get("pads", (0, 0, 0, 0))), "group": int(attrs.get("group", 1))}


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, *, strides: tuple[int, int],
           dilations: tuple[int, int], pads: tuple[int, int, int, int], group: int) -> np.ndarray:
    """ONNX Conv (2-D, NCHW) in numpy: one matrix product per kernel tap, exact in float64."""
    n, c_in, _, _ = x.shape
    c_out, c_in_g, kh, kw = w.shape
    (sh, sw), (dh, dw), (top, left, bottom, right) = strides, dilations, pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    h_out = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    xg = x.reshape(n, group, c_in_g, *x.shape[2:])
    wg = w.reshape(group, c_out // group, c_in_g, kh, kw)
    out = np.zeros((n, group, c_out // group, h_out * w_out))
    for i in range(kh):
        for j in range(kw):
            tap = xg[:, :, :, i * dh: i * dh + sh * (h_out - 1) + 1: sh, j * dw: j * dw + sw * (w_out - 1) + 1: sw]
            out += wg[None, :, :, :, i, j] @ tap.reshape(n, group, c_in_g, h_out * w_out)
    out = out.reshape(n, c_out, h_out, w_out)
    return out if b is None else out + b.reshape(1, -1, 1, 1)

