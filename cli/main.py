"""The ``taskfold`` command: argument parsing and one small function per subcommand.

User mistakes (bad config, missing file, wrong input shape, tampered bundle) print one line on
stderr and exit with code 2; they never show a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

EXIT_USER_ERROR = 2


# Exception types that mean "the user asked for something impossible" (→ exit 2), by module. A
# module that was never imported cannot have raised its error, so only loaded ones are looked up
# (this keeps `taskfold flops` and `bench` free of torch).
USER_ERRORS = {
    "taskfold.runtime.errors": ("BundleError", "InputError", "BackendUnavailable"),
    "taskfold.trainer.config": ("ConfigError",),
    "taskfold.models.errors": ("ModelError",),
    "taskfold.models.registry": ("UnknownNameError",),
    "taskfold.compiler.errors": ("CompileError",),
    "taskfold.trainer.data.idx": ("DatasetUnavailable", "DataFormatError"),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[module], name) for module, names in USER_ERRORS.items()
                 if module in sys.modules for name in names)


def demo_recipe() -> Path:
    return Path(str(resources.files("taskfold.cli") / "recipes" / "demo.yaml"))


def _load_config(path: str | None, overrides: list[str]):
    from taskfold.trainer.config import load_config

    return load_config(path or demo_recipe(), overrides)


def _prepare_run_dir(cfg, out: str | None, overwrite: bool) -> Path:
    import shutil

    from taskfold.trainer.config import ConfigError

    run_dir = Path(out) if out else Path("runs") / cfg.name
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"run directory {run_dir} already exists and is not empty "
                              "(pass --overwrite to replace it, or -o for another)")
        if not (run_dir / "config.yaml").is_file():  # never delete a folder that is not a run
            raise ConfigError(f"--overwrite: {run_dir} is not a taskfold run directory (no config.yaml); "
                              "refusing to delete it")
        shutil.rmtree(run_dir)
    return run_dir


def cmd_run(args: argparse.Namespace) -> dict:
    from taskfold.cli.pipeline import run_pipeline

    cfg = _load_config(args.config, args.set)
    _apply_quiet(cfg, args)
    return run_pipeline(cfg, _prepare_run_dir(cfg, args.output, args.overwrite))


def cmd_train(args: argparse.Namespace) -> dict:
    from taskfold.trainer.loop import train_stages

    cfg = _load_config(args.config, args.set)
    _apply_quiet(cfg, args)
    summary, final_dir = train_stages(cfg, _prepare_run_dir(cfg, args.output, args.overwrite))
    return {"run_dir": str(final_dir), "test": summary["test"]}


def cmd_compile(args: argparse.Namespace) -> dict:
    from taskfold.compiler.compile_run import compile_run

    bundle = compile_run(args.run_dir, args.output, force=args.force, tensorrt=args.tensorrt)
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {"bundle": str(bundle), "cost": manifest["cost"], "compile": manifest["compile"]}


def cmd_bench(args: argparse.Namespace) -> dict:
    from taskfold.runtime import benchmark, load
    from taskfold.runtime.errors import InputError

    try:
        sizes = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise InputError(f"--batch {args.batch!r}: expected comma-separated integers, e.g. 1,8") from None
    predictor = load(args.bundle, backend=args.backend, threads=args.threads)
    tasks = _task_list(args.tasks)
    rows = benchmark(predictor, sizes, warmup=args.warmup, iters=args.iters, tasks=tasks)
    return {"bundle": args.bundle, "backend": args.backend, "tasks": predictor.task_names(tasks),
            "macs": predictor.cost(tasks), "results": rows}


def _task_list(tasks: str | None) -> list[str] | None:
    """``--tasks seg,depth`` as a list (None: every task); names are checked by the predictor."""
    return None if tasks is None else [name.strip() for name in tasks.split(",")]


def cmd_predict(args: argparse.Namespace) -> dict:
    import numpy as np

    from taskfold.runtime import load
    from taskfold.runtime.errors import InputError

    source = Path(args.input)
    if not source.is_file():
        raise InputError(f"input file not found: {source}")
    try:
        images = np.load(source, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise InputError(f"{source}: not a .npy array ({exc})") from None
    outputs = load(args.bundle)(images, tasks=_task_list(args.tasks))
    out = Path(args.output) if args.output else source.with_suffix(".out.npz")
    if out.suffix != ".npz":  # np.savez would append it; say where the file really is
        out = out.with_name(out.name + ".npz")
    np.savez(out, **outputs)
    return {"output": str(out), "shapes": {task: list(value.shape) for task, value in outputs.items()}}


def cmd_flops(args: argparse.Namespace) -> dict:
    from taskfold.runtime import count_onnx, verify_bundle
    from taskfold.runtime.errors import BundleError

    path = Path(args.path)
    if path.is_dir():
        verify_bundle(path)
        path = path / "model.onnx"
    elif not path.is_file():
        raise BundleError(f"no such file or bundle: {path}")
    cost = count_onnx(path)
    return {"path": str(path), "macs": cost.macs, "params": cost.params, "gmacs": cost.macs / 1e9,
            "per_output_macs": cost.per_output_macs, "per_op_type": cost.per_op_type}


def _apply_quiet(cfg, args: argparse.Namespace) -> None:
    if args.json or args.quiet:
        cfg.train.progress = False


def _print_human(command: str, result: dict) -> None:
    if command == "flops":
        print(f"{result['path']}: {result['gmacs']:.4f} GMACs, {result['params'] / 1e6:.3f} M params")
        for name, macs in result["per_output_macs"].items():
            print(f"  output {name}: {macs / 1e6:.2f} MMACs")
    elif command == "bench":
        print(f"{'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'img/s':>9}  provider (threads)")
        for r in result["results"]:
            print(f"{r['batch']:>5} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} {r['p99_ms']:>9.3f} "
                  f"{r['mean_ms']:>9.3f} {r['throughput_ips']:>9.1f}  {r['provider']} ({r['threads']})")
    elif command == "predict":
        print(f"wrote {result['output']}: " + ", ".join(f"{t} {tuple(s)}" for t, s in result["shapes"].items()))
    else:
        for key in ("run_dir", "bundle", "report"):
            if key in result:
                print(f"{key}: {result[key]}")
        for task, metrics in result.get("test", {}).items():
            print(f"  {task}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if "cost" in result:
            print(f"cost: {result['cost']['macs'] / 1e6:.2f} MMACs, {result['cost']['params'] / 1e6:.3f} M params")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskfold", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add_common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    for name, help_text in (("run", "train → compile → bench → report in one command"),
                            ("train", "train or search one run")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", nargs="?" if name == "run" else None, help="YAML recipe (run: default demo)")
        p.add_argument("-o", "--output", help="run directory (default runs/<name>)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        add_common(p)

    p = sub.add_parser("compile", help="compile a run directory into a bundle")
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", help="bundle folder (default RUN_DIR/bundle)")
    p.add_argument("--force", action="store_true", help="strip even when checks advise against it")
    p.add_argument("--tensorrt", action="store_true", help="also build a TensorRT engine (needs CUDA)")
    add_common(p)

    p = sub.add_parser("bench", help="latency of a bundle")
    p.add_argument("bundle")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime | tensorrt")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: runtime's)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--tasks", help="comma-separated tasks to run (default all): only their sub-graph runs")
    add_common(p)

    p = sub.add_parser("predict", help="run a bundle on images stored as a .npy (N,3,H,W) float32 array")
    p.add_argument("bundle")
    p.add_argument("input", help=".npy file")
    p.add_argument("-o", "--output", help=".npz file for the outputs (default INPUT.out.npz)")
    p.add_argument("--tasks", help="comma-separated tasks to run (default all): only their sub-graph runs")
    add_common(p)

    p = sub.add_parser("flops", help="MACs and params of a bundle or any .onnx file")
    p.add_argument("path")
    add_common(p)
    return parser


COMMANDS = {"run": cmd_run, "train": cmd_train, "compile": cmd_compile, "bench": cmd_bench,
            "predict": cmd_predict, "flops": cmd_flops}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("taskfold: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user errors become one line; anything else re-raises
        if isinstance(exc, _user_errors()):
            print(f"taskfold {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise
    if args.json:
        print(json.dumps(result, default=float))
    else:
        _print_human(args.command, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
