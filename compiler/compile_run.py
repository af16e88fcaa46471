"""Compile a run directory into a bundle: rebuild from arch.json, load weights, strip what the
method does not need at inference, then fold/export/validate/write via :func:`fill_bundle`
into a staged folder (:func:`~taskfold.compiler.staging.staged_bundle`).

Refused before any work: a run that never finished (no test record; ``force`` compiles its last
checkpoint anyway and the manifest says so), and — always — weights that hold NaN or inf."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import torch

from taskfold.compiler.bundle import fill_bundle
from taskfold.compiler.errors import CompileError
from taskfold.compiler.staging import check_bundle_target, staged_bundle
from taskfold.compiler.tensorrt import add_engine_to_bundle
from taskfold.compiler.strip import STRIPPERS
from taskfold.compiler import strip_aux, strip_branch, strip_group  # noqa: F401  (register the method strippers)
from taskfold.models.nets import build_network
from taskfold.runtime.cuda import cuda_unavailable_reason
from taskfold.trainer.config import Config
from taskfold.trainer.data import create_dataset
from taskfold.trainer.rundir import RunDir
from taskfold.trainer.runlock import folder_lock


CLASS_KINDS = ("segmentation", "classification")  # tasks whose channels are class scores


def held_out_images(cfg: Config, count: int) -> torch.Tensor:
    """``count`` images of the test split (built with that many samples): data never trained on."""
    d = cfg.data
    test = create_dataset(d.dataset, "test", size=d.size, num_samples=max(count, 1), seed=d.seed,
                          cache_dir=d.cache_dir, **d.options)
    return test.images[:count]


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


def nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN/inf, or None."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def compile_run(run_dir: str | Path, out_dir: str | Path | None = None, *, force: bool = False,
                tensorrt: bool = False, overwrite: bool = False) -> Path:
    """Compile ``run_dir`` into ``out_dir`` (default ``run_dir/bundle``); returns the bundle path.

    ``overwrite`` replaces an existing bundle there (once the new one verified); ``force`` strips
    even where the method's checks advise against it and compiles an unfinished run.
    """
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise CompileError(f"run directory not found: {run.path}")
    with folder_lock(run.path):
        return _compile_locked(run, Path(out_dir) if out_dir else run.bundle_path, force=force,
                               tensorrt=tensorrt, overwrite=overwrite)


def _compile_locked(run: RunDir, out: Path, *, force: bool, tensorrt: bool, overwrite: bool) -> Path:
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
    if tensorrt:  # fail before the (slow) export when the engine cannot be built here
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise CompileError(f"--tensorrt needs CUDA: {reason}")
    stripper = STRIPPERS.get(spec.method)
    parity_inputs = held_out_images(cfg, cfg.compile.parity_samples)
    result = stripper(model, spec, force=force, reference_inputs=parity_inputs, options=cfg.method_options)
    by_name = {t.name: t for t in spec.tasks}
    tasks = [{"name": n, "kind": by_name[n].kind, "channels": by_name[n].out_channels,
              "output_kind": by_name[n].output,
              **({"classes": by_name[n].out_channels} if by_name[n].kind in CLASS_KINDS else {})}
             for n in result.outputs]
    info = cfg.data
    dataset_info = create_dataset(info.dataset, "val", size=info.size, num_samples=1, seed=info.seed,
                                  cache_dir=info.cache_dir, **info.options).info
    config_sha = hashlib.sha256(run.config_path.read_bytes()).hexdigest()
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
        )
        if tensorrt:
            add_engine_to_bundle(folder)
    return out
