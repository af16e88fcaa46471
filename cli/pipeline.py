"""``taskfold run``: train/search → compile → benchmark → report, in one call."""
from __future__ import annotations

import json
from pathlib import Path

from taskfold.trainer.config import Config


def run_pipeline(cfg: Config, run_dir: Path) -> dict:
    """Run every stage into ``run_dir``; returns a summary (paths, test metrics, cost, latency)."""
    from taskfold.compiler.compile_run import compile_run
    from taskfold.runtime import benchmark, load
    from taskfold.trainer.loop import train_stages
    from taskfold.trainer.report import write_report
    from taskfold.trainer.rundir import RunDir

    summary, run_dir = train_stages(cfg, run_dir)
    bundle = compile_run(run_dir, tensorrt=cfg.compile.tensorrt)
    predictor = load(bundle, threads=cfg.bench.threads)
    rows = benchmark(predictor, cfg.bench.batches, warmup=cfg.bench.warmup, iters=cfg.bench.iters)
    manifest = json.loads((bundle / "manifest.json").read_text())
    report = write_report(RunDir(run_dir), summary=summary, manifest=manifest, bench_rows=rows)
    return {"run_dir": str(run_dir), "bundle": str(bundle), "report": str(report),
            "test": summary["test"], "cost": manifest["cost"], "latency": rows}
