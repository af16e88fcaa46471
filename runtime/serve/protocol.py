"""The KServe v2 / Triton inference protocol's request and response bodies, JSON and binary.

A request body is a JSON header, optionally followed by raw tensor bytes (Triton's binary tensor
extension): ``Inference-Header-Content-Length`` gives the JSON part's length and each binary
input's ``parameters.binary_data_size`` its share of the rest, in the order the inputs are
listed. Binary inputs become numpy arrays over slices of the body (``numpy.frombuffer``: no
copy). Every malformed part raises :class:`ProtocolError` with one line naming it, which the
server answers with 400; nothing here knows about HTTP frameworks.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_LENGTH = "inference-header-content-length"

# v2 datatype <-> numpy dtype (little-endian, as the binary extension fixes). BYTES holds
# length-prefixed strings, which no taskfold bundle takes or gives, so it is refused by name.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
KNOWN_DATATYPES = (*DATATYPES, "BYTES", "BF16")
# What a JSON ``data`` list may hold for each kind of tensor: numbers for numbers (JSON writes 1.0 as
# 1), true/false for BOOL; never strings, nulls or nested objects.
_JSON_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}


class ProtocolError(ValueError):
    """A request the protocol cannot accept; ``status`` is the HTTP answer (400 unless said)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def datatype_of(dtype: np.dtype | str) -> str:
    """The v2 datatype name of a numpy dtype (``float32`` -> ``FP32``)."""
    want = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    for name, candidate in DATATYPES.items():
        if candidate == want:
            return name
    raise ProtocolError(f"numpy dtype {dtype} has no v2 datatype", status=500)


@dataclass
class InputTensor:
    name: str
    datatype: str
    array: np.ndarray


@dataclass
class InferRequest:
    """A decoded infer request: its inputs and which outputs to answer, each as binary or JSON."""

    inputs: list[InputTensor]
    outputs: list[str] | None  # None: every output of the model
    binary_outputs: dict[str, bool] = field(default_factory=dict)  # per asked output
    binary_default: bool = False  # for outputs not listed (request-level binary_data_output)
    id: str | None = None

    def wants_binary(self, output: str) -> bool:
        return self.binary_outputs.get(output, self.binary_default)


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError(f"{where}: 'parameters' must be an object")
    return params


def _flag(params: dict[str, Any], key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise ProtocolError(f"{where}: parameter {key!r} must be true or false, got {value!r}")
    return value


def _shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
        raise ProtocolError(f"{where}: 'shape' must be a list of integers, got {raw!r}")
    if any(d < 0 for d in raw):
        raise ProtocolError(f"{where}: 'shape' {raw} has a negative dimension")
    return tuple(raw)


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes | memoryview, memoryview]:
    """The JSON part and the binary part of a body, per ``Inference-Header-Content-Length``."""
    view = memoryview(body)
    if header_length is None:
        return body, view[len(body):]
    try:
        length = int(header_length)
    except ValueError:
        raise ProtocolError(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
    if not 0 < length <= len(body):
        raise ProtocolError(f"Inference-Header-Content-Length {length} does not fit a body of {len(body)} bytes")
    return view[:length], view[length:]


def _decode_input(raw: Any, index: int, binary: memoryview, offset: int) -> tuple[InputTensor, int]:
    """One input tensor; returns it and the offset of the next binary input."""
    if not isinstance(raw, dict):
        raise ProtocolError(f"inputs[{index}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str):
        raise ProtocolError(f"inputs[{index}] needs a 'name' (a string)")
    where = f"input {name!r}"
    datatype = raw.get("datatype")
    if datatype not in KNOWN_DATATYPES:
        raise ProtocolError(f"{where}: unknown datatype {datatype!r} (one of {', '.join(KNOWN_DATATYPES)})")
    if datatype not in DATATYPES:
        raise ProtocolError(f"{where}: datatype {datatype} is not supported by this server")
    dtype = DATATYPES[datatype]
    shape = _shape(raw.get("shape"), where)
    count = math.prod(shape)
    size = _parameters(raw, where).get("binary_data_size")
    if size is not None:
        if "data" in raw:
            raise ProtocolError(f"{where}: has both 'data' and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
        if size != count * dtype.itemsize:
            raise ProtocolError(f"{where}: binary_data_size {size} does not match shape {list(shape)} of "
                                f"{datatype} ({count * dtype.itemsize} bytes)")
        if offset + size > len(binary):
            raise ProtocolError(f"{where}: binary_data_size {size} runs past the end of the body "
                                f"({len(binary) - offset} bytes left)")
        array = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
        if not array.flags.aligned:  # the JSON header's length puts the bytes anywhere; kernels want alignment
            array = array.copy()
        return InputTensor(name, datatype, array), offset + size
    if "data" not in raw:
        raise ProtocolError(f"{where}: needs 'data' or parameters.binary_data_size")
    try:
        array = np.asarray(raw["data"])
    except ValueError:  # ragged nesting
        raise ProtocolError(f"{where}: 'data' must be a flat or evenly nested list of numbers") from None
    if array.size and array.dtype.kind not in _JSON_KINDS[dtype.kind]:
        raise ProtocolError(f"{where}: 'data' must hold {datatype} values, got {array.dtype.name} values")
    array = array.astype(dtype, copy=False)
    if array.size != count:
        raise ProtocolError(f"{where}: 'data' holds {array.size} values, shape {list(shape)} needs {count}")
    return InputTensor(name, datatype, array.reshape(shape)), offset


def _decode_outputs(raw: Any) -> tuple[list[str] | None, dict[str, bool]]:
    if raw is None:
        return None, {}
    if not isinstance(raw, list):
        raise ProtocolError("'outputs' must be a list of objects with a 'name'")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError(f"outputs[{index}] needs a 'name' (a string)")
        name = item["name"]
        if name in names:
            raise ProtocolError(f"output {name!r} is asked for twice")
        params = _parameters(item, f"output {name!r}")
        if "classification" in params:
            raise ProtocolError(f"output {name!r}: the classification extension is not supported")
        flag = _flag(params, "binary_data", f"output {name!r}")
        if flag is not None:
            binary[name] = flag
        names.append(name)
    if not names:
        raise ProtocolError("'outputs' is empty; leave it out to get every output")
    return names, binary


def decode_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Parse an infer request body; ``header_length`` is ``Inference-Header-Content-Length``."""
    header, binary = _split_body(body, header_length)
    try:
        doc = json.loads(bytes(header) if isinstance(header, memoryview) else header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the request is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ProtocolError("the request must be a JSON object")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    params = _parameters(doc, "request")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("'inputs' must be a non-empty list")
    inputs, offset = [], 0
    for index, raw in enumerate(raw_inputs):
        tensor, offset = _decode_input(raw, index, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise ProtocolError(f"the body has {len(binary) - offset} bytes after the binary inputs it declares")
    outputs, binary_outputs = _decode_outputs(doc.get("outputs"))
    return InferRequest(inputs=inputs, outputs=outputs, binary_outputs=binary_outputs,
                        binary_default=bool(_flag(params, "binary_data_output", "request")), id=request_id)


def encode_response(model: str, version: str, request: InferRequest,
                    outputs: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """The response body and, when it carries binary outputs, its JSON header's length.

    Binary outputs follow the JSON in the order they are listed; each array's bytes go into the
    body with a single copy (the final join).
    """
    tensors: list[dict[str, Any]] = []
    blobs: list[memoryview] = []
    for name, array in outputs.items():
        array = np.ascontiguousarray(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if request.wants_binary(name):
            entry["parameters"] = {"binary_data_size": array.nbytes}
            blobs.append(memoryview(array).cast("B"))
        else:
            entry["data"] = array.ravel().tolist()
        tensors.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors}
    if request.id is not None:
        doc["id"] = request.id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
