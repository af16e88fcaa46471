"""Aux-NAS inference and training cost, measured side by side in one process.

    .venv/bin/python benchmarks/bench_aux_speed.py [--threads 2] [--size 64] [--backbone resnet10]

1. stripped Aux-NAS bundle vs the single-task bundle (same backbone and head) on ONNX Runtime:
   median ratio, target within 1.03;
2. stripped bundle vs ONNX Runtime on a plain export of the full training network (K = 1), i.e.
   what the authors' evaluation path costs (it keeps the auxiliary branch): target ≤ 0.55;
3. per-step training time (weight step + alpha step, as the search alternates) with K = 2
   auxiliary tasks vs K = 1: target ≤ 1.5× (the paper reports 1.65×).

Weights are random (cost does not depend on them); alpha^P is set as after a converged search.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import paired_medians  # noqa: E402

from taskfold.compiler.bundle import write_bundle  # noqa: E402
from taskfold.compiler.export import export_onnx  # noqa: E402
from taskfold.compiler.strip import strip  # noqa: E402
from taskfold.models.arch import ArchSpec, TaskHead  # noqa: E402
from taskfold.models.nets import build_network  # noqa: E402
from taskfold.runtime import load  # noqa: E402
from taskfold.trainer.methods import create_method  # noqa: E402
from taskfold.trainer.methods.base import Progress  # noqa: E402
from taskfold.trainer.methods.plain import per_task_losses  # noqa: E402
from taskfold.trainer.tasks import create_task  # noqa: E402
from taskfold.trainer.data import DatasetInfo  # noqa: E402

SEG, NORMALS, DEPTH = (TaskHead("seg", "segmentation", "dense", 5), TaskHead("normals", "normals", "dense", 3),
                       TaskHead("depth", "depth", "dense", 1))


def spec(method: str, tasks: list[TaskHead], args) -> ArchSpec:
    return ArchSpec(method=method, backbone=args.backbone, image_size=args.size, tasks=tasks,
                    head_channels=32, primary=["seg"])


def converged(model):
    with torch.no_grad():
        for key, logit in model.alpha_logits.items():
            logit.fill_(-30.0 if key.startswith("b0_") else 0.0)
    return model.eval()


def bundle(model, out: Path, name: str, size: int, outputs: list[str]):
    tasks = [{"name": n, "kind": "segmentation"} for n in outputs]
    return write_bundle(out / name, model=model, name=name, method="bench", input_shape=(1, 3, size, size),
                        mean=[0.0] * 3, std=[1.0] * 3, tasks=tasks, parity_inputs=torch.randn(2, 3, size, size))


def inference(args, tmp: Path) -> list[dict]:
    full = converged(build_network(spec("aux_nas", [SEG, NORMALS], args)))
    x = torch.randn(2, 3, args.size, args.size)
    stripped = strip(full, reference_inputs=x).model
    single = build_network(spec("single", [SEG], args)).eval()
    stripped_p = load(bundle(stripped, tmp, "stripped", args.size, ["seg"]), threads=args.threads)
    single_p = load(bundle(single, tmp, "single", args.size, ["seg"]), threads=args.threads)
    export_onnx(full, tmp / "full.onnx", input_shape=(1, 3, args.size, args.size), output_names=["seg", "normals"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    full_s = ort.InferenceSession(str(tmp / "full.onnx"), opts, providers=["CPUExecutionProvider"])
    rows = []
    for batch in (1, 8):
        images = np.random.default_rng(0).normal(size=(batch, 3, args.size, args.size)).astype(np.float32)
        med = paired_medians({"stripped": lambda: stripped_p(images), "single": lambda: single_p(images),
                              "full_training_net": lambda: full_s.run(None, {"image": images})}, rounds=args.rounds)
        rows.append({"batch": batch, **{f"{k}_ms": v * 1e3 for k, v in med.items()},
                     "stripped_vs_single": med["stripped"] / med["single"],
                     "stripped_vs_full": med["stripped"] / med["full_training_net"]})
    return rows


def training_step_time(args) -> dict:
    info = DatasetInfo(image_size=(args.size, args.size), mean=(0, 0, 0), std=(1, 1, 1),
                       labels={"segmentation": {"classes": 5}, "normals": {}, "depth": {}})
    images = torch.randn(args.batch, 3, args.size, args.size)
    targets = {"segmentation": torch.randint(0, 5, (args.batch, args.size, args.size)),
               "normals": torch.nn.functional.normalize(torch.randn(args.batch, 3, args.size, args.size), dim=1),
               "depth": torch.rand(args.batch, 1, args.size, args.size) + 0.5}
    steps = {}
    for label, heads in (("K=1", [SEG, NORMALS]), ("K=2", [SEG, NORMALS, DEPTH])):
        tasks = [create_task(h.name, h.kind, info) for h in heads]
        method = create_method({"name": "aux_nas"})
        model = method.build(spec("aux_nas", heads, args), backbone_weights=None).train()
        optimizer = torch.optim.AdamW(method.param_groups(model)[0]["params"], lr=1e-3)
        progress = Progress(0, 1, 0, 1)

        def step(model=model, method=method, tasks=tasks, optimizer=optimizer, progress=progress):
            method.arch_step(model, images, targets, tasks, progress)
            losses = per_task_losses(model(images), targets, tasks)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()

        steps[label] = step
    med = paired_medians(steps, rounds=args.rounds // 2 + 1, per_round=1, warmup=1)
    return {"K1_step_ms": med["K=1"] * 1e3, "K2_step_ms": med["K=2"] * 1e3, "K2_vs_K1": med["K=2"] / med["K=1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="training batch size")
    parser.add_argument("--backbone", default="resnet10")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = inference(args, Path(tmp))
    train = training_step_time(args)
    print(f"backbone={args.backbone} size={args.size} threads={args.threads}")
    print(f"{'batch':>5} {'stripped ms':>12} {'single ms':>10} {'full ms':>9} {'stripped/single':>16} {'stripped/full':>14}")
    for r in rows:
        print(f"{r['batch']:>5} {r['stripped_ms']:>12.3f} {r['single_ms']:>10.3f} {r['full_training_net_ms']:>9.3f} "
              f"{r['stripped_vs_single']:>16.3f} {r['stripped_vs_full']:>14.3f}")
    print(f"training step (batch {args.batch}): K=1 {train['K1_step_ms']:.1f} ms, K=2 {train['K2_step_ms']:.1f} ms, "
          f"ratio {train['K2_vs_K1']:.3f}")
    print(json.dumps({"inference": rows, "training": train}))


if __name__ == "__main__":
    main()
