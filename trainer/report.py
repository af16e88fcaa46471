"""report.md for a run: test metrics, the cost table (MACs, params, latency) and training curves.

:func:`write_report` takes plain dicts (metrics records, the bundle manifest, benchmark rows) so
any stage can add to it without importing the others; :func:`run_summary` reads back what it
needs from a run directory, and :func:`stage_lines` links the reports of a staged run (BMTAS
search → retrain, DMTG search → fine-tune) from its top (see ``cli/pipeline.py``).
"""
from __future__ import annotations

import os
from pathlib import Path

from taskfold.models.registry import Registry
from taskfold.trainer.config import ConfigError
from taskfold.trainer.rundir import RunDir
from taskfold.trainer.tasks import delta_m, norm_gain

# Extra report sections by method name: ``fn(run: RunDir, records) -> list[str]`` of markdown lines.
REPORT_SECTIONS: Registry = Registry("report section")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported on first use (light start-up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plural(count: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def line_style(points: int) -> dict:
    """Markers where a curve has too few points to be seen as a line (a single point is invisible)."""
    return {"marker": "o", "markersize": 4} if points <= 3 else {}


def plot_training_curves(records: list[dict], path: Path) -> Path:
    """Per-task training loss against step, and each task's main validation metric per epoch."""
    plt = pyplot()

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "epoch" and "val" in r]
    tasks = list(evals[0]["val"]) if evals else []
    fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(4.2 * (1 + len(tasks)), 3.4), squeeze=False)
    axes = axes[0]
    for task in (train[0]["losses"] if train else {}):
        axes[0].plot([r["step"] for r in train], [r["losses"][task] for r in train], label=task,
                     **line_style(len(train)))
    axes[0].set(xlabel="step", ylabel="training loss", yscale="log", title="training loss")
    axes[0].legend()
    for ax, task in zip(axes[1:], tasks):  # one panel per task: metrics live on different scales
        metric = next(iter(evals[0]["val"][task]))
        ax.plot([r["epoch"] + 1 for r in evals], [r["val"][task][metric] for r in evals], marker="o")
        ax.set(xlabel="epoch", title=f"validation {task} {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_series(records: list[dict], prefix: str, path: Path, title: str) -> Path | None:
    """Every logged ``prefix/<name>`` value against step (task weights, sigmas, alphas); None if none."""
    plt = pyplot()

    train = [r for r in records if r.get("type") == "train"]
    keys = sorted({k for r in train for k in r if k.startswith(prefix + "/")})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key in keys:
        points = [(r["step"], r[key]) for r in train if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=key[len(prefix) + 1:],
                **line_style(len(points)))
    ax.set(xlabel="step", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _metrics_table(test: dict[str, dict[str, float]], directions: dict[str, dict[str, bool]]) -> list[str]:
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in test.items():
        for metric, value in metrics.items():
            arrow = "↑" if directions.get(task, {}).get(metric, metric != "loss") else "↓"
            lines.append(f"| {task} | {metric} {arrow} | {value:.4f} |")
    return lines


def _cost_table(manifest: dict, bench_rows: list[dict]) -> list[str]:
    cost = manifest["cost"]
    lines = ["| quantity | value |", "|---|---|",
             f"| MACs per image | {cost['macs'] / 1e6:.2f} M |",
             f"| parameters | {cost['params'] / 1e6:.3f} M |"]
    for row in bench_rows:
        precision = f"{row['precision']}, " if "precision" in row else ""
        lines.append(f"| p50 latency, batch {row['batch']} ({precision}{row['provider']}, {row['threads']} threads) "
                     f"| {row['p50_ms']:.2f} ms ({row['throughput_ips']:.0f} img/s) |")
    return lines


PRECISION_HEADING = "## Lower precision: accuracy per task"


def precision_section(manifest: dict) -> list[str]:
    """Each task's test metrics for every graph the bundle holds and the change against FP32, with
    how the INT8 graph was made (scheme, calibration, what stayed FP32, guard, saturation)."""
    precisions = manifest.get("precisions", {})
    variants = [p for p in precisions if p != "fp32"]
    if not variants:
        return []
    head = "| task | metric | FP32 | " + " | ".join(f"{p.upper()} | Δ {p.upper()}" for p in variants) + " |"
    lines = [PRECISION_HEADING, "", "Test split, each task's own metrics, graphs run by ONNX Runtime on the CPU "
             f"(the bundle's default is {manifest.get('default_precision', 'fp32')}).", "",
             head, "|---|---|---|" + "---|---|" * len(variants)]
    for task, metrics in precisions["fp32"]["metrics"].items():
        for metric, value in metrics.items():
            if metric == "loss":
                continue
            cells = [f"{precisions[p]['metrics'][task][metric]:.4f} | {precisions[p]['delta'][task][metric]:+.4f}"
                     for p in variants]
            lines.append(f"| {task} | {metric} | {value:.4f} | " + " | ".join(cells) + " |")
    int8 = precisions.get("int8")
    if int8:
        scheme, excluded, guard = int8["scheme"], int8["excluded"], int8["guard"]
        kept = excluded["nodes"] + excluded["heads_fp32"]
        lines += ["", f"INT8: QDQ, {scheme['activations']} activations, {scheme['weights']} per-channel weights"
                  f"{', 7-bit (reduce_range)' if scheme['reduce_range'] else ''}, for {scheme['target']} "
                  f"({scheme['reason']}); calibrated on {scheme['calibration_images']} training images.",
                  f"- kept in FP32: {len(kept)} node(s)" + (f" ({len(excluded['heads_fp32'])} head nodes, "
                                                          f"policy {excluded['heads_policy']})" if excluded['heads_fp32'] else ""),
                  f"- guard ({', '.join(guard['limits'])}): "
                  + ("; ".join(guard["violations"]) + (" — kept with --force" if guard["forced"] else "")
                     if guard["violations"] else "passed"),
                  f"- fused integer convolutions on this CPU: {int8['fused_convs']['int8']} of {int8['fused_convs']['all']}",
                  "- saturation check: " + (int8["saturation"]["skipped"] if "skipped" in int8["saturation"] else
                                            f"largest error {int8['saturation']['max_step_error']} quantisation step(s) "
                                            f"over {int8['saturation']['convs_checked']} fused convs"),
                  "- MACs by precision: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in int8["macs_by_precision"].items())]
    return lines + [""]


def replace_section(path: Path, heading: str, lines: list[str]) -> None:
    """Put ``lines`` (a section starting with ``heading``) into the markdown file ``path`` in place of
    its current ``heading`` section, or at the end when it has none."""
    text = path.read_text().splitlines()
    start = next((i for i, line in enumerate(text) if line == heading), None)
    if start is None:
        text = text + [""] + lines
    else:
        end = next((i for i in range(start + 1, len(text)) if text[i].startswith("## ")), len(text))
        text = text[:start] + lines + text[end:]
    path.write_text("\n".join(text).rstrip("\n") + "\n")


def baseline_results(path: str, task_names: list[str]) -> dict[str, dict[str, float]]:
    """The test metrics of the finished run at ``path`` (``report.baseline``), which must have
    answered every one of ``task_names``; a ConfigError naming the field otherwise."""
    test = RunDir(path).test_metrics() if Path(path).is_dir() else None
    if test is None:
        raise ConfigError(f"report.baseline: {path} is not a finished run (no test metrics in its metrics.jsonl)")
    missing = [t for t in task_names if t not in test]
    if missing:
        raise ConfigError(f"report.baseline: the run at {path} has no results for task {missing[0]!r}")
    return test


def baseline_section(path: str, summary: dict) -> list[str]:
    """NormGain_L and NormGain_E (DMTG, eqs. 7–8) and Δm on each task's main metric against a
    baseline run: the multi-task gain the papers report, without a separate script."""
    test, main, directions = summary["test"], summary["main_metric"], summary["directions"]
    base = baseline_results(path, list(test))

    def errors(results: dict) -> dict[str, float]:  # lower is better: 1 - a ratio, or the error itself
        return {t: 1.0 - results[t][main[t]] if directions[t][main[t]] else results[t][main[t]] for t in test}

    mains = lambda results: {t: {main[t]: results[t][main[t]]} for t in test}  # noqa: E731
    return ["## Against the baseline run", "", f"Baseline: `{path}`.", "",
            "| quantity | value |", "|---|---|",
            f"| NormGain_L (test losses) | {norm_gain({t: test[t]['loss'] for t in test}, {t: base[t]['loss'] for t in test}):+.2f} % |",
            f"| NormGain_E (errors of the main metrics) | {norm_gain(errors(test), errors(base)):+.2f} % |",
            f"| Δm (main metrics) | {delta_m(mains(test), mains(base), directions):+.2f} % |", ""]


def write_report(run: RunDir, *, summary: dict, manifest: dict | None = None,
                 bench_rows: list[dict] | None = None, sections: list[str] | None = None,
                 preamble: list[str] | None = None) -> Path:
    """Write ``report.md`` (and ``training_curves.png``) into the run directory; ``preamble``
    lines go before the test metrics, ``sections`` at the end."""
    records = run.read_metrics()
    plot = plot_training_curves(records, run.path / "training_curves.png")
    cfg = run.load_config()
    lines = [f"# Run report: {cfg.name}", "",
             f"method `{cfg.method_name}`, backbone `{cfg.model.backbone}`, dataset `{cfg.data.dataset}` "
             f"({cfg.data.size}×{cfg.data.size}, {cfg.data.train_size} training images), "
             f"{plural(cfg.train.epochs, 'epoch')}, weighting `{cfg.weighting['name']}`.", "",
             *(preamble or []),
             "## Test metrics", "", *(_metrics_table(summary["test"], summary.get("directions", {}))
                                      if summary.get("test") else ["No test record: the run did not finish."]), ""]
    if manifest is not None:
        compile_info = manifest.get("compile", {})
        lines += ["## Inference cost (compiled bundle, ONNX Runtime)", "",
                  *_cost_table(manifest, bench_rows or []), "",
                  f"ONNX vs PyTorch max abs difference: {compile_info.get('onnx_parity_max_abs', float('nan')):.2e}; "
                  f"BatchNorm layers folded: {compile_info.get('bn_folded', 0)}.", ""]
        if compile_info.get("stripped"):
            lines += ["Removed for inference: " + "; ".join(compile_info["stripped"]) + ".", ""]
        for key, label in (("max_alpha_aux_to_primary", "largest alpha^P (auxiliary → primary)"),
                           ("strip_drift_max_abs", "output drift, inference network vs full training network")):
            if key in compile_info:
                lines.append(f"- {label}: {compile_info[key]:.3g}")
        lines += ["", *precision_section(manifest)]
    lines += ["## Training curves", "", f"![training curves]({plot.name})", ""]
    for prefix, title in (("weighting", "Loss weighting (learned weights, uncertainties)"),
                          ("arch", "Architecture parameters")):
        extra = plot_series(records, prefix, run.path / f"{prefix}.png", title)
        if extra is not None:
            lines += [f"## {title}", "", f"![{prefix}]({extra.name})", ""]
    if cfg.report.baseline is not None and summary.get("test"):
        lines += baseline_section(cfg.report.baseline, summary)
    method = run.load_arch().method if run.arch_path.is_file() else cfg.method_name
    if method in REPORT_SECTIONS:
        lines += REPORT_SECTIONS.get(method)(run, records)
    for section in sections or []:
        lines += [section, ""]
    run.report_path.write_text("\n".join(lines))
    return run.report_path


def run_summary(run: RunDir) -> dict:
    """What :func:`write_report` needs, read back from a run directory: the test metrics (None
    for an unfinished run) and each task's metric directions and main metric."""
    from taskfold.trainer.data import create_dataset
    from taskfold.trainer.tasks import create_task

    cfg = run.load_config()
    d = cfg.data
    info = create_dataset(d.dataset, "val", size=d.size, num_samples=1, seed=d.seed, cache_dir=d.cache_dir,
                          **d.options).info
    tasks = [create_task(t.name, t.kind, info, **t.options) for t in cfg.tasks]
    return {"test": run.test_metrics(), "directions": {t.name: t.metrics for t in tasks},
            "main_metric": {t.name: t.main_metric for t in tasks}}


def stage_lines(stages: list[RunDir], index: int, summaries: list[dict]) -> list[str]:
    """A staged run's map: each stage's report, linked relative to stage ``index``'s folder."""
    here = stages[index].path
    lines = ["## Stages", ""]
    for i, stage in enumerate(stages):
        label = "search" if i == 0 else f"stage {i + 1} (`{os.path.relpath(stage.path, stages[0].path)}`)"
        role = ", the final model (compiled)" if i == len(stages) - 1 else ""
        link = "this report" if i == index else f"[report]({os.path.relpath(stage.report_path, here)})"
        lines.append(f"{i + 1}. {label}{role}: {link}")
    lines.append("")
    final = summaries[-1]
    if index == 0 and final.get("test"):
        lines += ["Final model's test metrics:", "", *_metrics_table(final["test"], final["directions"]), ""]
    return lines
