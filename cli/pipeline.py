"""``taskfold run``: train/search → compile → benchmark → report, in one call."""
from __future__ import annotations

import json
from pathlib import Path

from taskfold.trainer.config import Config


def bench_precisions(manifest: dict) -> list[str]:
    """The graphs worth timing here: all the bundle holds, but FP16 only where a GPU provider runs it
    (ONNX Runtime's CPU provider runs FP16 convolutions through casts to FP32)."""
    from taskfold.runtime.precision import held_precisions
    from taskfold.runtime.providers import execution_providers

    on_cpu = execution_providers("auto")[0] == "CPUExecutionProvider"
    return [p for p in held_precisions(manifest) if not (p == "fp16" and on_cpu)]


def run_pipeline(cfg: Config, run_dir: Path) -> dict:
    """Run every stage into ``run_dir``; returns a summary (paths, test metrics, cost, latency)."""
    from taskfold.compiler.compile_run import compile_run
    from taskfold.runtime import benchmark, load
    from taskfold.trainer.loop import train_stages
    from taskfold.trainer.report import write_report
    from taskfold.trainer.rundir import RunDir

    summary, run_dir = train_stages(cfg, run_dir)
    bundle = compile_run(run_dir)  # the recipe's compile.* (TensorRT, INT8, FP16, ...) in the run's config.yaml
    manifest = json.loads((bundle / "manifest.json").read_text())
    rows = []
    for precision in bench_precisions(manifest):
        predictor = load(bundle, precision=precision, threads=cfg.bench.threads)
        rows += benchmark(predictor, cfg.bench.batches, warmup=cfg.bench.warmup, iters=cfg.bench.iters)
    report = write_report(RunDir(run_dir), summary=summary, manifest=manifest, bench_rows=rows)
    return {"run_dir": str(run_dir), "bundle": str(bundle), "report": str(report),
            "test": summary["test"], "cost": manifest["cost"], "latency": rows}
