"""``taskfold run``: train/search → compile → benchmark → report, in one call; ``taskfold report``."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from taskfold.trainer.config import Config


def bench_precisions(manifest: dict) -> list[str]:
    """The graphs worth timing here: all the bundle holds, but FP16 only where a GPU provider runs it
    (ONNX Runtime's CPU provider runs FP16 convolutions through casts to FP32)."""
    from taskfold.runtime.precision import held_precisions
    from taskfold.runtime.providers import execution_providers

    on_cpu = execution_providers("auto")[0] == "CPUExecutionProvider"
    return [p for p in held_precisions(manifest) if not (p == "fp16" and on_cpu)]


def run_pipeline(cfg: Config | None, run_dir: Path, *, started: Callable[[], None] | None = None,
                 resume: list[str] | None = None) -> dict:
    """Run every stage into ``run_dir``; returns a summary (paths, test metrics, cost, latency).

    ``started``: called once training has started cleanly (see ``train_stages``). ``resume``: the
    ``--set`` overrides of a resumed run (``cfg`` is then the run's own): training continues from
    the last checkpoint, or, when it had finished and only the compile was cut short, goes
    straight on to compiling."""
    from taskfold.compiler.compile_run import compile_run
    from taskfold.runtime import benchmark, load
    from taskfold.trainer import distributed
    from taskfold.trainer.loop import train_stages
    from taskfold.trainer.resume import resume_stages
    from taskfold.trainer.rundir import RunDir

    top = run_dir
    if cfg is not None:
        _check_compile_targets(cfg)  # before training: the compile at the end would refuse
    if resume is None:
        summary, run_dir = train_stages(cfg, run_dir, started=started)
    else:
        summary, run_dir = resume_stages(run_dir, resume, finished_ok=True)
        cfg = RunDir(top).load_config()
        if summary is None and RunDir(run_dir).bundle_path.is_dir():
            from taskfold.trainer.config import ConfigError

            raise ConfigError(f"cannot resume: run {top} is finished (trained, tested and compiled)")
        summary = summary or {"test": RunDir(run_dir).test_metrics()}
    if not distributed.is_main():  # DDP: rank 0 alone compiles, benchmarks and reports
        return {"run_dir": str(run_dir), "test": summary["test"]}
    bundle = compile_run(run_dir)  # the recipe's compile.* (TensorRT, INT8, FP16, ...) in the run's config.yaml
    manifest = json.loads((bundle / "manifest.json").read_text())
    rows = []
    for precision in bench_precisions(manifest):
        predictor = load(bundle, precision=precision, threads=cfg.bench.threads)
        rows += benchmark(predictor, cfg.bench.batches, warmup=cfg.bench.warmup, iters=cfg.bench.iters)
    RunDir(run_dir).save_bench(rows)
    report = write_run_reports(top)
    return {"run_dir": str(run_dir), "bundle": str(bundle), "report": str(report),
            "test": summary["test"], "cost": manifest["cost"], "latency": rows}


def _check_compile_targets(cfg: Config) -> None:
    """The recipe's compile stage is checked before training starts: a GPU compile target on a
    machine that cannot build it, or a malformed ``compile.int8_max_drop`` entry, would only fail
    after training."""
    from taskfold.compiler.errors import CompileError
    from taskfold.compiler.precision import PrecisionPlan
    from taskfold.compiler.tensorrt import tensorrt_unavailable_reason
    from taskfold.compiler.torch_trt import torch_tensorrt_unavailable_reason

    problems = []
    for wanted, why_not in ((cfg.compile.tensorrt, tensorrt_unavailable_reason),
                            (cfg.compile.torch_tensorrt, torch_tensorrt_unavailable_reason)):
        reason = why_not() if wanted else None
        if reason is not None:
            problems.append(f"{reason} (the recipe's compile stage would fail after training; "
                            "set compile.tensorrt: false or run on a CUDA machine)")
    try:
        PrecisionPlan.from_settings(cfg.compile)
    except CompileError as exc:
        problems.append(str(exc))
    if problems:
        raise CompileError("; ".join(problems))


def _bundle_manifest(run) -> dict | None:
    """The manifest of a run's bundle (checked against its hash), None when there is none."""
    from taskfold.runtime.bundle import read_manifest
    from taskfold.runtime.errors import BundleError

    if not run.bundle_path.is_dir():
        return None
    try:
        return read_manifest(run.bundle_path)
    except BundleError:
        return None


def write_run_reports(run_dir: str | os.PathLike) -> Path:
    """(Re)write report.md and the plots of a run and of each of its stages from the files in the
    run directory (metrics.jsonl, arch.json, the bundle's manifest, bench.json); returns the top
    report, which links the stage reports when there are several."""
    from taskfold.trainer.config import ConfigError
    from taskfold.trainer.report import run_summary, stage_lines, write_report
    from taskfold.trainer.rundir import RunDir
    from taskfold.trainer.runlock import folder_lock

    top = RunDir(run_dir)
    if not top.config_path.is_file():
        raise ConfigError(f"{top.path} is not a taskfold run directory (no config.yaml)")
    with folder_lock(top.path):
        stages = top.stages()
        summaries = [run_summary(stage) for stage in stages]
        for index, (stage, summary) in enumerate(zip(stages, summaries)):
            preamble = stage_lines(stages, index, summaries) if len(stages) > 1 else []
            write_report(stage, summary=summary, manifest=_bundle_manifest(stage), bench_rows=stage.read_bench(),
                         preamble=preamble)
    return top.report_path
