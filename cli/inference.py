"""The commands that need only the runtime (numpy, onnx, onnxruntime): ``predict``, ``bench`` and
``flops``. Each imports what it uses when it runs, so the slim install (no torch) serves them."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_bench(args: argparse.Namespace) -> dict:
    from taskfold.runtime import benchmark, load
    from taskfold.runtime.errors import InputError

    try:
        sizes = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise InputError(f"--batch {args.batch!r}: expected comma-separated integers, e.g. 1,8") from None
    predictor = load(args.bundle, backend=args.backend, precision=args.precision, provider=args.provider,
                     threads=args.threads)
    tasks = _task_list(args.tasks)
    rows = benchmark(predictor, sizes, warmup=args.warmup, iters=args.iters, tasks=tasks)
    return {"bundle": args.bundle, "backend": args.backend, "precision": predictor.precision,
            "tasks": predictor.task_names(tasks), "macs": predictor.cost(tasks), "results": rows}


def _task_list(tasks: str | None) -> list[str] | None:
    """``--tasks seg,depth`` as a list (None: every task); names are checked by the predictor."""
    return None if tasks is None else [name.strip() for name in tasks.split(",")]


def cmd_predict(args: argparse.Namespace) -> dict:
    import numpy as np

    from taskfold.runtime import load
    from taskfold.runtime.errors import InputError
    from taskfold.runtime.inputs import normalize

    source = Path(args.input)
    if not source.is_file():
        raise InputError(f"input file not found: {source}")
    out = Path(args.output) if args.output else source.with_suffix(".out.npz")
    if out.suffix != ".npz":  # np.savez would append it; say where the file really is
        out = out.with_name(out.name + ".npz")
    if out.is_dir() or (out.exists() and not args.overwrite):
        raise InputError(f"{out} already exists (pass --overwrite to replace it, or -o for another file)")
    try:
        images = np.load(source, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise InputError(f"{source}: not a .npy array ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if not isinstance(images, np.ndarray):  # an .npz archive
        raise InputError(f"{source}: expected one .npy array, got an .npz archive")
    predictor = load(args.bundle, precision=args.precision, provider=args.provider)
    if args.normalize:
        images = normalize(images, predictor.input_spec)
    outputs = predictor(images, tasks=_task_list(args.tasks), allow_nonfinite=args.allow_nonfinite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as handle:  # a whole file or none: written aside, then renamed
        np.savez(handle, **outputs)
    tmp.replace(out)
    return {"output": str(out), "shapes": {task: list(value.shape) for task, value in outputs.items()}}


def cmd_flops(args: argparse.Namespace) -> dict:
    from taskfold.runtime import count_onnx
    from taskfold.runtime.bundle import open_bundle
    from taskfold.runtime.errors import BundleError
    from taskfold.runtime.precision import graph_file, resolve_precision

    path = Path(args.path)
    if path.is_dir():
        bundle = open_bundle(path)
        name = graph_file(bundle.manifest, resolve_precision(bundle.manifest, args.precision or "fp32"))
        model = bundle.graph(name).proto  # the verified bytes, not the file again
        bundle.verify_rest()
        path = path / name
    elif not path.is_file():
        raise BundleError(f"no such file or bundle: {path}")
    elif args.precision is not None:
        raise BundleError(f"--precision picks a graph of a bundle folder; {path} is one graph file")
    else:
        model = path
    cost = count_onnx(model)
    return {"path": str(path), "macs": cost.macs, "params": cost.params, "gmacs": cost.macs / 1e9,
            "macs_by_precision": cost.macs_by_precision,
            "per_output_macs": cost.per_output_macs, "per_op_type": cost.per_op_type}
