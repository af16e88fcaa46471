"""``export_triton``: bundles as an NVIDIA Triton Inference Server model repository.

For each bundle ``REPO/<name>/config.pbtxt`` + ``REPO/<name>/1/model.onnx`` (platform
``onnxruntime_onnx``), and, when the bundle holds a TensorRT engine, ``REPO/<name>_tensorrt/``
with ``1/model.plan`` (platform ``tensorrt_plan``, GPU instances). With ``max_batch > 0`` the
batch axis is Triton's (``dims`` leave it out) and ``dynamic_batching`` is on; ``max_batch = 0``
writes the full shapes and no batching. The bundle's manifest is copied next to the config
(``taskfold_manifest.json``: tasks, mean/std, provenance), which Triton ignores.

Each model folder is written aside and renamed into place, only after the bundle's files were
verified; an existing folder is replaced only with ``overwrite`` and only if it is a Triton
model folder (it holds a ``config.pbtxt``).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from taskfold.runtime.bundle import sha256_file, verify_bundle
from taskfold.runtime.errors import BundleError, InputError

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
INSTANCE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
MANIFEST_COPY = "taskfold_manifest.json"


@dataclass(frozen=True)
class TritonModel:
    """One model folder to write: its name, platform, file and config values."""

    name: str
    platform: str
    source: Path
    filename: str
    max_batch: int
    kind: str


def _triton_type(dtype: str, where: str) -> str:
    if dtype not in TRITON_TYPES:
        raise BundleError(f"{where}: dtype {dtype!r} has no Triton data type")
    return TRITON_TYPES[dtype]


def _dims(shape: Sequence[int], batched: bool) -> list[int]:
    """Triton dims: without the batch axis when Triton batches, -1 for any other free axis."""
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in shape]
    return dims[1:] if batched else dims


def _tensor(name: str, dtype: str, dims: list[int]) -> str:
    return (f'  {{\n    name: "{name}"\n    data_type: {dtype}\n'
            f'    dims: [ {", ".join(str(d) for d in dims)} ]\n  }}')


def config_pbtxt(manifest: dict[str, Any], model: TritonModel, *, instances: int, max_queue_delay_us: int) -> str:
    """The ``config.pbtxt`` text of ``model`` for a bundle's ``manifest``."""
    batched = model.max_batch > 0
    spec = manifest["input"]
    inputs = [_tensor(spec["name"], _triton_type(spec.get("dtype", "float32"), "input"),
                      _dims(spec["shape"], batched))]
    outputs = [_tensor(task["output"], _triton_type(task.get("dtype", "float32"), f"task {task['name']}"),
                       _dims(task["shape"], batched)) for task in manifest["tasks"]]
    lines = [f'name: "{model.name}"', f'platform: "{model.platform}"', f"max_batch_size: {model.max_batch}",
             "input [\n" + ",\n".join(inputs) + "\n]", "output [\n" + ",\n".join(outputs) + "\n]"]
    if batched:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {model.kind}\n  }}\n]")
    lines.append("version_policy: { latest: { num_versions: 1 } }")
    return "\n".join(lines) + "\n"


def _models(bundle: Path, manifest: dict[str, Any], *, max_batch: int, kind: str) -> list[TritonModel]:
    name = manifest["name"]
    models = [TritonModel(name, "onnxruntime_onnx", bundle / "model.onnx", "model.onnx", max_batch, kind)]
    if "model.plan" in manifest["files"]:  # an engine's batch profile caps what Triton may send it
        engine_max = int(manifest.get("tensorrt", {}).get("max_batch", max_batch) or max_batch)
        models.append(TritonModel(f"{name}_tensorrt", "tensorrt_plan", bundle / "model.plan", "model.plan",
                                  min(max_batch, engine_max) if max_batch else 0, INSTANCE_KINDS["gpu"]))
    return models


def export_triton(
    bundles: Sequence[str | os.PathLike[str]],
    repo: str | os.PathLike[str],
    *,
    max_batch: int = 8,
    max_queue_delay_us: int = 100,
    instance_kind: str = "cpu",
    instances: int = 1,
    overwrite: bool = False,
) -> list[Path]:
    """Write every bundle into the model repository ``repo``; returns the model folders written."""
    if max_batch < 0 or max_queue_delay_us < 0 or instances < 1:
        raise InputError(f"need max_batch >= 0, max_queue_delay_us >= 0 and instances >= 1, got "
                         f"{max_batch}, {max_queue_delay_us}, {instances}")
    if instance_kind not in INSTANCE_KINDS:
        raise InputError(f"instance kind {instance_kind!r} is not one of {', '.join(INSTANCE_KINDS)}")
    if not bundles:
        raise InputError("give at least one bundle")
    root = Path(repo)
    if root.exists() and not root.is_dir():
        raise InputError(f"{root} exists and is not a folder")
    plans = []
    for bundle in bundles:
        folder = Path(bundle)
        manifest = verify_bundle(folder)
        for model in _models(folder, manifest, max_batch=max_batch, kind=INSTANCE_KINDS[instance_kind]):
            plans.append((manifest, model))
    names = [model.name for _, model in plans]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InputError(f"more than one bundle is named {', '.join(map(repr, twice))}; Triton needs one folder each")
    for _, model in plans:
        target = root / model.name
        if target.exists() and not overwrite:
            raise InputError(f"{target} already exists (pass --overwrite to replace it)")
        if target.exists() and not (target / "config.pbtxt").is_file():
            raise InputError(f"{target} is not a Triton model folder (no config.pbtxt); refusing to replace it")
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for manifest, model in plans:
        text = config_pbtxt(manifest, model, instances=instances, max_queue_delay_us=max_queue_delay_us)
        written.append(_write_model(root, model, text, manifest))
    return written


def _write_model(root: Path, model: TritonModel, config: str, manifest: dict[str, Any]) -> Path:
    """Build ``root/<name>`` aside, then rename it into place (replacing an old one last)."""
    target = root / model.name
    tmp = root / f".{model.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        (tmp / "1").mkdir(parents=True)
        shutil.copyfile(model.source, tmp / "1" / model.filename)
        if f"sha256:{sha256_file(tmp / '1' / model.filename)}" != manifest["files"][model.filename]:
            raise BundleError(f"{model.source} changed while it was being exported (its sha256 no longer matches)")
        (tmp / "config.pbtxt").write_text(config, encoding="utf-8")
        (tmp / MANIFEST_COPY).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            old = root / f".{model.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
