"""Compile a run directory into a bundle: rebuild from arch.json, load weights, strip what the
method does not need at inference, then fold/export/validate/write via :func:`fill_bundle`
into a staged folder (:func:`~taskfold.compiler.staging.staged_bundle`).

Refused before any work: a run that never finished (no test record; ``force`` compiles its last
checkpoint anyway and the manifest says so), and — always — weights that hold NaN or inf."""
from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from taskfold.compiler.bundle import fill_bundle
from taskfold.compiler.errors import CompileError
from taskfold.compiler.int8 import quantize_int8, scheme_for
from taskfold.compiler.precision import FP16_FILE, PARITY_IMAGES, EvalData, PrecisionPlan, build_variants
from taskfold.compiler.accuracy import resolve_limits
from taskfold.compiler.staging import check_bundle_target, staged_bundle
from taskfold.compiler.tensorrt import build_engine_into, tensorrt_unavailable_reason
from taskfold.compiler.torch_trt import compile_torch_tensorrt, torch_tensorrt_unavailable_reason
from taskfold.compiler.strip import strip
from taskfold.models.nets import build_network
from taskfold.trainer.config import CompileConfig, Config, config_from_dict
from taskfold.trainer.data import create_dataset
from taskfold.trainer.data.loader import load_batch
from taskfold.trainer.report import PRECISION_HEADING, precision_section, replace_section
from taskfold.trainer.rundir import RunDir
from taskfold.trainer.runlock import folder_lock


CLASS_KINDS = ("segmentation", "classification")  # tasks whose channels are class scores


def held_out_images(cfg: Config, count: int) -> torch.Tensor:
    """``count`` images of the test split (built with that many samples): data never trained on."""
    d = cfg.data
    test = create_dataset(d.dataset, "test", size=d.size, num_samples=max(count, 1), seed=d.seed,
                          cache_dir=d.cache_dir, root=d.root, **d.options)
    return load_batch(test, range(min(count, len(test))))[0]


def _git_commit() -> str | None:
    """The commit of taskfold's own checkout; None for an installed copy (no .git beside it)."""
    if not (Path(__file__).resolve().parents[1] / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load_trained(run: RunDir):
    """(config, spec, model in eval mode with the last checkpoint's weights)."""
    cfg = run.load_config()
    spec = run.load_arch()
    try:
        model = build_network(spec)
    except (KeyError, TypeError, IndexError, AttributeError, RuntimeError, ValueError) as exc:
        if isinstance(exc, ValueError) and type(exc) is not ValueError:
            raise  # taskfold's own user errors (UnknownNameError, ModelError, ...) already say it well
        raise CompileError(f"run {run.path}: arch.json describes a network that cannot be built "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    run.load_weights(model)
    return cfg, spec, model.eval()


def compile_settings(cfg: Config, overrides: dict[str, Any]) -> CompileConfig:
    """The run's ``compile.*`` fields with ``overrides`` applied, validated like a recipe."""
    raw = cfg.to_dict()
    raw["compile"].update(overrides)
    return config_from_dict(raw).compile


def precision_data(cfg: Config, calib_images: int) -> EvalData:
    """The run's whole test split and tasks (to score each graph) and the first ``calib_images``
    images of its training split, preprocessed as in training (to calibrate INT8 ranges)."""
    from taskfold.trainer.components import build_tasks, eval_loader

    d = cfg.data
    test = create_dataset(d.dataset, "test", size=d.size, num_samples=d.test_size, seed=d.seed,
                          cache_dir=d.cache_dir, root=d.root, **d.options)
    train = create_dataset(d.dataset, "train", size=d.size, num_samples=min(calib_images, d.train_size),
                           seed=d.seed, cache_dir=d.cache_dir, root=d.root, **d.options)
    calibration = load_batch(train, range(len(train)))[0]
    return EvalData(test=eval_loader(test, workers=d.workers), tasks=build_tasks(cfg, test.info),
                    calibration=calibration.numpy().astype("float32", copy=False),
                    parity_images=load_batch(test, range(min(PARITY_IMAGES, len(test))))[0])


def nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN/inf, or None."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def compile_run(run_dir: str | Path, out_dir: str | Path | None = None, *, force: bool = False,
                overwrite: bool = False, **settings: Any) -> Path:
    """Compile ``run_dir`` into ``out_dir`` (default ``run_dir/bundle``); returns the bundle path.

    ``settings`` override the run's ``compile.*`` recipe fields for this compile, by their
    CompileConfig names (``tensorrt=True``, ``int8=True``, ``calib_images=64``,
    ``int8_max_drop=["seg.miou=0.01"]``, ``fp16=True``, ...). ``overwrite`` replaces an existing
    bundle there (once the new one verified); ``force`` strips even where the method's checks advise
    against it, compiles an unfinished run, and keeps a lower-precision graph that breaks the
    accuracy guard (the manifest then says so).
    """
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise CompileError(f"run directory not found: {run.path}")
    with folder_lock(run.path):
        return _compile_locked(run, Path(out_dir) if out_dir else run.bundle_path, force=force,
                               overwrite=overwrite, settings=settings)


def _compile_locked(run: RunDir, out: Path, *, force: bool, overwrite: bool, settings: dict[str, Any]) -> Path:
    check_bundle_target(out, overwrite=overwrite, run_dir=run.path)  # before the slow part
    test_metrics = run.test_metrics()
    if test_metrics is None and not force:
        raise CompileError(f"run {run.path} has no test record: training was killed or stopped before the end "
                           "(pass --force to compile its last checkpoint anyway)")
    cfg, spec, model = load_trained(run)
    bad = nonfinite_parameter(model)
    if bad is not None:
        raise CompileError(f"run {run.path}: the checkpoint holds NaN/inf (in {bad}); a non-finite model is "
                           "never compiled")
    options = compile_settings(cfg, settings)
    for wanted, why_not in ((options.tensorrt, tensorrt_unavailable_reason),
                            (options.torch_tensorrt, torch_tensorrt_unavailable_reason)):
        reason = why_not() if wanted else None  # fail before the (slow) export
        if reason is not None:
            raise CompileError(reason)
    plan = PrecisionPlan.from_settings(options, force=force)
    data = precision_data(cfg, options.calib_images) if plan.wanted else None
    if data is not None:
        resolve_limits(plan.max_drops, data.tasks)  # a misspelt task or metric fails now, not after export
    parity_inputs = held_out_images(cfg, cfg.compile.parity_samples)
    result = strip(model, force=force, reference_inputs=parity_inputs)
    by_name = {t.name: t for t in spec.tasks}
    tasks = [{"name": n, "kind": by_name[n].kind, "channels": by_name[n].out_channels,
              "output_kind": by_name[n].output,
              **({"classes": by_name[n].out_channels} if by_name[n].kind in CLASS_KINDS else {})}
             for n in result.outputs]
    info = cfg.data
    dataset_info = create_dataset(info.dataset, "val", size=info.size, num_samples=1, seed=info.seed,
                                  cache_dir=info.cache_dir, root=info.root, **info.options).info
    config_sha = hashlib.sha256(run.config_path.read_bytes()).hexdigest()
    image_shape = (3, spec.image_size, spec.image_size)

    def extras(folder: Path) -> dict[str, Any]:
        """Lower-precision graphs and GPU programs, written into the bundle before it is signed."""
        added = build_variants(folder, plan, data) if plan.wanted else {}
        if options.tensorrt:
            added.update(_engine(folder, options, data, image_shape))
        if options.torch_tensorrt:
            added.update(compile_torch_tensorrt(result.model, folder, image_shape=image_shape,
                                                output_names=result.outputs, fp16=options.fp16))
        return added

    provenance = {"config_sha256": config_sha, "git_commit": _git_commit(), "metrics": test_metrics}
    if test_metrics is None:
        provenance["unfinished"] = True  # --force on a run without a test record
    with staged_bundle(out, overwrite=overwrite, run_dir=run.path) as folder:
        fill_bundle(
            folder,
            model=result.model,
            name=cfg.name,
            method=spec.method,
            input_shape=(1, 3, spec.image_size, spec.image_size),
            mean=list(dataset_info.mean),
            std=list(dataset_info.std),
            tasks=tasks,
            parity_inputs=parity_inputs,
            parity_tol=cfg.compile.parity_tol,
            compile_info=result.info,
            provenance=provenance,
            variants=extras,
        )
    if plan.wanted and run.report_path.is_file():
        manifest = json.loads((out / "manifest.json").read_text())
        replace_section(run.report_path, PRECISION_HEADING, precision_section(manifest))
    return out


def _engine(folder: Path, options: CompileConfig, data: EvalData | None, image_shape: tuple[int, int, int]
            ) -> dict[str, Any]:
    """``model.plan`` from the graph of the asked precision: QDQ for INT8 (quantised with TensorRT's
    symmetric scheme, not kept), the FP16 graph for FP16, else ``model.onnx``."""
    if not options.int8:
        source = folder / (FP16_FILE if options.fp16 else "model.onnx")
        return build_engine_into(folder, source, image_shape=image_shape, precision="fp16" if options.fp16 else "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        qdq = Path(tmp) / "model.int8.tensorrt.onnx"
        quantize_int8(folder / "model.onnx", qdq, data.calibration, scheme_for("tensorrt"))
        return build_engine_into(folder, qdq, image_shape=image_shape, precision="int8")
