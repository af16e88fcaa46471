"""Compile a run directory into a bundle: rebuild from arch.json, load weights, strip what the
method does not need at inference, then fold/export/validate/write via :func:`write_bundle`."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import torch

from taskfold.compiler.bundle import write_bundle
from taskfold.compiler.errors import CompileError
from taskfold.compiler.tensorrt import add_engine_to_bundle
from taskfold.compiler.strip import STRIPPERS
from taskfold.compiler import strip_aux, strip_branch, strip_group  # noqa: F401  (register the method strippers)
from taskfold.models.nets import build_network
from taskfold.runtime.cuda import cuda_unavailable_reason
from taskfold.trainer.config import Config
from taskfold.trainer.data import create_dataset
from taskfold.trainer.data.loader import load_batch
from taskfold.trainer.rundir import RunDir


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
    model = build_network(spec)
    run.load_weights(model)
    return cfg, spec, model.eval()


def compile_run(run_dir: str | Path, out_dir: str | Path | None = None, *, force: bool = False,
                tensorrt: bool = False) -> Path:
    """Compile ``run_dir`` into ``out_dir`` (default ``run_dir/bundle``); returns the bundle path."""
    run = RunDir(run_dir)
    cfg, spec, model = load_trained(run)
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
                                  cache_dir=info.cache_dir, root=info.root, **info.options).info
    config_sha = hashlib.sha256(run.config_path.read_bytes()).hexdigest()
    test_metrics = run.test_metrics()
    bundle = write_bundle(
        Path(out_dir) if out_dir else run.bundle_path,
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
        provenance={"config_sha256": config_sha, "git_commit": _git_commit(), "metrics": test_metrics},
    )
    if tensorrt:
        add_engine_to_bundle(bundle)
    return bundle
