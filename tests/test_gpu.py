"""GPU-only paths: TensorRT engines, the CUDA provider, torch-tensorrt. They run where CUDA and the
GPU packages exist and skip, with the reason, everywhere else; on a CPU machine the compiler must
say why it cannot build an engine or a program."""
from __future__ import annotations

import json
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


@pytest.mark.slow  # a subprocess CLI run; the same refusal in-process: test_cuda_requested_without_cuda_is_one_line_and_exit_2
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


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


CUDA_EP_SKIP = (f"the CUDA provider needs CUDA: {NO_CUDA}" if NO_CUDA is not None
                else None if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()
                else "this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)")
TORCH_TRT_SKIP = (f"torch-tensorrt needs CUDA: {NO_CUDA}" if NO_CUDA is not None
                  else None if _has("torch_tensorrt") else "the torch-tensorrt package is not installed")


@pytest.mark.skipif(NO_CUDA is None, reason="CUDA is available here; the CPU-only refusal does not apply")
def test_torch_tensorrt_compile_without_cuda_says_why_before_exporting(demo_run: Path, tmp_path: Path):
    from taskfold.compiler.compile_run import compile_run
    from taskfold.compiler.errors import CompileError

    with pytest.raises(CompileError, match=r"^--torch-tensorrt needs CUDA: no CUDA device is visible"):
        compile_run(demo_run, tmp_path / "bundle", torch_tensorrt=True)
    assert not (tmp_path / "bundle").exists()


def test_torch_backend_without_a_program_says_how_to_build_one(demo_bundle: Path):
    from taskfold.runtime import BundleError, load

    with pytest.raises(BundleError, match="no torch-tensorrt program .*--torch-tensorrt"):
        load(demo_bundle, backend="torch")


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_EP_SKIP is not None, reason=CUDA_EP_SKIP or "")
def test_cuda_provider_runs_fp32_and_fp16_graphs_close_to_the_cpu(demo_run: Path, tmp_path: Path):
    from taskfold.compiler.compile_run import compile_run
    from taskfold.runtime import load

    bundle = compile_run(demo_run, tmp_path / "bundle", fp16=True, int8_max_drop=["normals.mean=5"])
    images = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    reference = load(bundle, provider="cpu")(images)
    for precision, tol in (("fp32", 1e-3), ("fp16", 1e-2)):
        gpu = load(bundle, provider="cuda", precision=precision)
        assert gpu.provider == "CUDAExecutionProvider"
        got = gpu(images)
        for task, value in reference.items():
            assert np.abs(got[task] - value).max() <= tol * max(1.0, np.abs(value).max()), (precision, task)
    assert load(bundle).provider == "CUDAExecutionProvider"  # auto picks CUDA where it can run


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_engine_from_the_fp16_or_qdq_graph(demo_run: Path, tmp_path: Path, precision: str):
    from taskfold.compiler.compile_run import compile_run
    from taskfold.runtime import load

    bundle = compile_run(demo_run, tmp_path / "bundle", tensorrt=True, force=True, calib_images=32,
                         **{precision: True})
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["tensorrt"]["precision"] == precision and "model.plan" in manifest["files"]
    images = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    reference = load(bundle, precision=precision, provider="cpu")(images)
    got = load(bundle, backend="tensorrt", precision=precision)(images)
    for task, value in reference.items():
        assert np.abs(got[task] - value).max() <= 0.05 * max(1.0, np.abs(value).max()), task


@pytest.mark.gpu
@pytest.mark.skipif(TORCH_TRT_SKIP is not None, reason=TORCH_TRT_SKIP or "")
def test_torch_tensorrt_program_runs_with_backend_torch(demo_run: Path, tmp_path: Path):
    from taskfold.compiler.compile_run import compile_run
    from taskfold.runtime import load

    bundle = compile_run(demo_run, tmp_path / "bundle", torch_tensorrt=True)
    images = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    reference = load(bundle, provider="cpu")(images)
    predictor = load(bundle, backend="torch")
    assert predictor.provider.startswith("torch-tensorrt")
    got = predictor(images)
    for task, value in reference.items():
        assert np.abs(got[task] - value).max() < 1e-2, task
