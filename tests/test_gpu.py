"""GPU-only paths: TensorRT engines. They run where CUDA and tensorrt exist and skip, with the
reason, everywhere else; on a CPU machine the CLI must say why it cannot build an engine."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from taskfold.runtime.cuda import cuda_unavailable_reason

NO_CUDA = cuda_unavailable_reason()


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(NO_CUDA is None, reason="CUDA is available here; the CPU-only refusal does not apply")
def test_tensorrt_compile_without_cuda_exits_2_with_the_reason(demo_run: Path):
    proc = subprocess.run([sys.executable, "-m", "taskfold.cli", "compile", str(demo_run), "-o",
                           str(demo_run / "trt_bundle"), "--tensorrt"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--tensorrt needs CUDA" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (demo_run / "trt_bundle").exists()


GPU_SKIP = (f"TensorRT needs CUDA: {NO_CUDA}" if NO_CUDA is not None
            else None if _has_tensorrt() else "the tensorrt package is not installed")


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
def test_tensorrt_engine_matches_onnxruntime(demo_run: Path, tmp_path: Path):
    from taskfold.compiler.compile_run import compile_run
    from taskfold.runtime import load

    bundle = compile_run(demo_run, tmp_path / "bundle", tensorrt=True)
    images = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    reference = load(bundle)(images)
    engine = load(bundle, backend="tensorrt")
    got = engine(images)
    for task, value in reference.items():
        assert np.abs(got[task] - value).max() < 1e-3, task
