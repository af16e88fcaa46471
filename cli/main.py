"""The ``taskfold`` command: argument parsing and one small function per subcommand.

User mistakes (bad config, missing file, wrong input shape, tampered bundle, a run directory in
use by another process) print one line on stderr and exit with code 2; never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from pathlib import Path

from taskfold.cli import serving
from taskfold.cli.inference import cmd_bench, cmd_flops, cmd_predict
from taskfold.runtime.extras import require_extra

EXIT_USER_ERROR = 2


# Exception types that mean "the user asked for something impossible" (→ exit 2), by module. A
# module that was never imported cannot have raised its error, so only loaded ones are looked up
# (this keeps `taskfold flops` and `bench` free of torch).
USER_ERRORS = {
    "taskfold.runtime.errors": ("BundleError", "InputError", "BackendUnavailable", "MissingExtra"),
    "taskfold.runtime.serve.server": ("ServeError",),
    "taskfold.trainer.config": ("ConfigError",),
    "taskfold.trainer.runlock": ("RunInUse",),
    "taskfold.trainer.loop": ("NonFiniteLoss",),
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


def _run_dir(cfg, out: str | None) -> Path:
    return Path(out) if out else Path("runs") / cfg.name


def _resume_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` of a resumed run (plus --quiet/--json as train.progress=false); refuses what
    --resume cannot be combined with."""
    from taskfold.trainer.config import ConfigError

    for given, flag in ((args.config, "a CONFIG"), (args.output, "-o"), (args.overwrite, "--overwrite")):
        if given:
            raise ConfigError(f"--resume continues RUN_DIR with its own config: {flag} cannot be given with it")
    return [*args.set, *(["train.progress=false"] if args.json or args.quiet else [])]


def cmd_run(args: argparse.Namespace) -> dict:
    require_extra("train", "taskfold run")
    from taskfold.cli.pipeline import run_pipeline
    from taskfold.trainer.run_target import new_run_dir

    _join_process_group()
    if args.resume:
        return run_pipeline(None, Path(args.resume), resume=_resume_overrides(args))
    cfg = _load_config(args.config, args.set)
    _apply_quiet(cfg, args)
    with new_run_dir(_run_dir(cfg, args.output), overwrite=args.overwrite) as target:
        return run_pipeline(cfg, target.path, started=target.started)


def _join_process_group() -> None:
    """Under torchrun (or ``--nproc``), become one rank of a DDP run (see trainer/distributed.py)."""
    from taskfold.trainer import distributed

    distributed.init_from_env()


def _launch_ranks(args: argparse.Namespace, argv: list[str]) -> int:
    """``--nproc N``: check the recipe here (one line, exit 2), then start N ranks of this command."""
    require_extra("train", f"taskfold {args.command} --nproc")
    from taskfold.trainer.distributed import launch

    if args.config is not None and not args.resume:
        _load_config(args.config, args.set)
    rest, skip = [], False
    for item in argv:  # the ranks run this command without --nproc
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            rest.append(item)
    return launch(args.nproc, rest)


def cmd_train(args: argparse.Namespace) -> dict:
    require_extra("train", "taskfold train")
    from taskfold.trainer.loop import train_stages
    from taskfold.trainer.resume import resume_stages
    from taskfold.trainer.run_target import new_run_dir

    _join_process_group()
    if args.resume:
        summary, final_dir = resume_stages(args.resume, _resume_overrides(args))
        return {"run_dir": str(final_dir), "test": summary["test"]}
    if args.config is None:
        from taskfold.trainer.config import ConfigError

        raise ConfigError("train: give a CONFIG (a YAML recipe) or --resume RUN_DIR")
    cfg = _load_config(args.config, args.set)
    _apply_quiet(cfg, args)
    with new_run_dir(_run_dir(cfg, args.output), overwrite=args.overwrite) as target:
        summary, final_dir = train_stages(cfg, target.path, started=target.started)
    return {"run_dir": str(final_dir), "test": summary["test"]}


# `taskfold compile` flags that override the run's compile.* recipe fields (flag dest = field name)
COMPILE_FLAGS = ("tensorrt", "torch_tensorrt", "int8", "calib_images", "int8_target", "int8_max_drop",
                 "int8_exclude", "int8_heads", "fp16", "fp16_io", "default_precision")


def cmd_compile(args: argparse.Namespace) -> dict:
    require_extra("train", "taskfold compile")
    from taskfold.compiler.compile_run import compile_run

    overrides = {name: getattr(args, name) for name in COMPILE_FLAGS if getattr(args, name) is not None}
    bundle = compile_run(args.run_dir, args.output, force=args.force, overwrite=args.overwrite, **overrides)
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {"bundle": str(bundle), "cost": manifest["cost"], "compile": manifest["compile"],
            "precisions": manifest.get("precisions", {}), "default_precision": manifest.get("default_precision", "fp32")}


def cmd_report(args: argparse.Namespace) -> dict:
    require_extra("train", "taskfold report")
    from taskfold.cli.pipeline import write_run_reports

    return {"report": str(write_run_reports(args.run_dir))}


def _apply_quiet(cfg, args: argparse.Namespace) -> None:
    if args.json or args.quiet:
        cfg.train.progress = False


def _print_human(command: str, result: dict) -> None:
    if command == "flops":
        print(f"{result['path']}: {result['gmacs']:.4f} GMACs, {result['params'] / 1e6:.3f} M params")
        print("  " + ", ".join(f"{p.upper()} {m / 1e6:.2f} MMACs" for p, m in result["macs_by_precision"].items()))
        for name, macs in result["per_output_macs"].items():
            print(f"  output {name}: {macs / 1e6:.2f} MMACs")
    elif command == "bench":
        print(f"{result['precision']} graph")
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
        for precision, entry in result.get("precisions", {}).items():
            if "delta" in entry:  # a variant: its largest change of each task's metrics against FP32
                changes = ", ".join(f"{task} {metric} {delta:+.4f}" for task, metrics in entry["delta"].items()
                                    for metric, delta in metrics.items() if metric != "loss")
                print(f"{precision}: {entry['file']} ({changes})")


def add_compile_flags(p: argparse.ArgumentParser) -> None:
    """Flags that override the run's compile.* recipe fields (absent: the recipe's value)."""
    on = {"action": "store_true", "default": None}
    p.add_argument("--tensorrt", **on, help="also build a TensorRT engine (needs CUDA); with --fp16/--int8 "
                   "from the FP16/QDQ graph")
    p.add_argument("--torch-tensorrt", **on, help="also compile a torch-tensorrt program model.trt.ep (needs CUDA)")
    p.add_argument("--int8", **on, help="add model.int8.onnx: ORT static quantisation (QDQ, per-channel)")
    p.add_argument("--calib-images", type=int, help="training images that calibrate INT8 (default 256)")
    p.add_argument("--int8-target", choices=("auto", "avx2", "vnni", "arm", "tensorrt"),
                   help="CPU the INT8 graph is for (default auto: this one)")
    p.add_argument("--int8-max-drop", action="append", metavar="[TASK.]METRIC=VALUE",
                   help="largest accepted drop, absolute or N%% (default: 1%% of each task's main metric)")
    p.add_argument("--int8-exclude", action="append", metavar="OP_TYPE|NODE", help="keep these nodes in FP32")
    p.add_argument("--int8-heads", choices=("auto", "int8", "fp32"),
                   help="auto: heads in FP32 if INT8 heads break the guard (default)")
    p.add_argument("--fp16", **on, help="add model.fp16.onnx (FP32 inputs/outputs, casts at the edges)")
    p.add_argument("--fp16-io", **on, help="FP16 inputs and outputs for the FP16 graph")
    p.add_argument("--default-precision", choices=("fp32", "int8", "fp16"),
                   help="the graph load() runs when not told (default fp32)")


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("fp32", "int8", "fp16"),
                   help="which graph of the bundle (default: the bundle's default, fp32 unless compiled otherwise)")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda", "tensorrt"),
                   help="onnxruntime execution provider (default auto: CUDA when usable, else CPU)")


DESCRIPTION = """\
Train multi-task vision models (with architecture search), compile what was found into the
leanest ONNX graph, and run it without PyTorch.

Start with `taskfold run` (trains the embedded demo recipe into runs/demo, compiles it,
benchmarks it and writes runs/demo/report.md), then `taskfold predict runs/demo/bundle x.npy`."""

EPILOG = """\
Mistakes (a bad config field, a missing file, a tampered bundle, an input of the wrong shape)
print one line on stderr and exit with code 2. `--json` prints one JSON object on stdout."""


def _predict_epilog() -> str:
    from taskfold.runtime.outputs import OUTPUT_VALUES

    kinds = "\n".join(f"  {kind:<15} {text}" for kind, text in OUTPUT_VALUES.items())
    return ("Input: a float32 (N, 3, H, W) array of images normalised like the training data, i.e.\n"
            "(pixel/255 - mean) / std per channel with the manifest's input.mean and input.std; pass\n"
            "--normalize to give 0-1 images instead. NaN/inf pixels are refused unless --allow-nonfinite.\n\n"
            "Output: one array per task in an .npz file; what each holds, by task kind\n"
            "(the manifest's tasks[].values says it too):\n" + kinds)


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="taskfold", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=formatter)
    from taskfold.runtime.bundle import taskfold_version

    parser.add_argument("--version", action="version", version=f"taskfold {taskfold_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str = "", epilog: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description or summary, epilog=epilog or None,
                              formatter_class=formatter)

    def add_json(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")

    for name, summary, description in (
            ("run", "train, compile, benchmark and report in one command",
             "Train (or search) a recipe into a run directory, retrain where the method asks for it, compile\n"
             "the result into RUN/bundle, benchmark it and write RUN/report.md. Without CONFIG: the demo recipe."),
            ("train", "train or search one recipe (no compile)",
             "Train (or search) a recipe into a run directory, with any follow-up stage (BMTAS retrain,\n"
             "DMTG fine-tune) in RUN/retrain; compile it later with `taskfold compile`.")):
        p = command(name, summary, description)
        p.add_argument("config", nargs="?", metavar="CONFIG",
                       help="YAML recipe, e.g. configs/demo.yaml" + (" (default: the demo recipe)" if name == "run" else ""))
        p.add_argument("-o", "--output", metavar="DIR", help="run directory (default: runs/<name from the recipe>)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set train.epochs=3 or --set tasks.0.weight=2 (repeatable)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing run directory; the old run is deleted only once the new one has "
                            "started cleanly")
        p.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a killed or stopped run from its last checkpoint (--set may change only "
                            "train.epochs, logging, checkpointing, bench, report and compile fields)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--nproc", type=_positive_int, default=1, metavar="N",
                       help="train with N data-parallel processes on this machine (DDP; the same as "
                            "`torchrun --nproc_per_node=N -m taskfold.cli " + name + " ...`); train.batch_size is "
                            "the global batch")
        add_json(p)

    p = command("compile", "compile a run directory into a bundle (ONNX + manifest)",
                "Strip what inference does not need, fold BatchNorm, export ONNX, check it against PyTorch on\n"
                "held-out images and write a bundle folder (model.onnx, manifest.json, manifest.json.sha256).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `taskfold run` or `train`")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="bundle folder (default: RUN_DIR/bundle); must be new, empty, or a bundle with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing bundle there, once the new one has been verified")
    p.add_argument("--force", action="store_true",
                   help="compile a run that has no test record (unfinished; the manifest says so), strip even "
                        "where the method's checks advise against it, and keep an INT8/FP16 graph the accuracy "
                        "guard refuses")
    add_compile_flags(p)
    add_json(p)

    p = command("bench", "measure the latency and throughput of a bundle")
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle folder")
    p.add_argument("--batch", default="1,8", metavar="SIZES", help="comma-separated batch sizes (default: 1,8)")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime (default), tensorrt or torch")
    add_runtime_flags(p)
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: every CPU available)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before measuring (default: 5)")
    p.add_argument("--iters", type=int, default=30, help="timed calls per batch size (default: 30)")
    p.add_argument("--tasks", metavar="NAMES",
                   help="comma-separated tasks to run (default: all); only their sub-graph runs")
    add_json(p)

    p = command("predict", "run a bundle on images stored as a .npy array",
                "Run a bundle on a .npy array of images and write every task's output to an .npz file.",
                _predict_epilog())
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle folder")
    p.add_argument("input", metavar="IMAGES", help=".npy file holding an (N, 3, H, W) array")
    p.add_argument("-o", "--output", metavar="FILE", help=".npz file for the outputs (default: IMAGES.out.npz); "
                                                          "missing folders are created")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    p.add_argument("--normalize", action="store_true",
                   help="IMAGES are 0-1 images: normalise them with the manifest's mean/std first")
    p.add_argument("--allow-nonfinite", action="store_true", help="run even if IMAGES hold NaN or inf")
    p.add_argument("--tasks", metavar="NAMES",
                   help="comma-separated tasks to run (default: all); only their sub-graph runs")
    add_runtime_flags(p)
    add_json(p)

    p = command("flops", "count the MACs and parameters of a bundle or any .onnx file")
    p.add_argument("path", metavar="PATH", help="a bundle folder or an .onnx file")
    p.add_argument("--precision", choices=("fp32", "int8", "fp16"), help="which graph of a bundle (default fp32)")
    add_json(p)

    p = command("report", "rebuild report.md and its plots from a run directory",
                "Rewrite RUN_DIR/report.md (and the report of every stage, linked from it) with its plots,\n"
                "from the run's metrics, arch.json and bundle; the latency table needs a `taskfold run`.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    add_json(p)
    serving.add_commands(command, add_json)
    return parser


COMMANDS = {"run": cmd_run, "train": cmd_train, "compile": cmd_compile, "bench": cmd_bench,
            "predict": cmd_predict, "flops": cmd_flops, "report": cmd_report, **serving.COMMANDS}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _other_rank() -> bool:
    """A DDP rank other than 0 (prints nothing: rank 0 speaks for the run)."""
    module = sys.modules.get("taskfold.trainer.distributed")
    return module is not None and not module.is_main()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "nproc", 1) > 1 and "WORLD_SIZE" not in os.environ:
            return _launch_ranks(args, argv)
        result = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("taskfold: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user errors become one line; anything else re-raises
        if isinstance(exc, _user_errors()):
            print(f"taskfold {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise
    if _other_rank():
        return 0
    if args.json:
        print(json.dumps(result, default=float))
    else:
        _print_human(args.command, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
