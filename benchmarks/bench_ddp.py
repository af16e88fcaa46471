"""Data-parallel training on this machine: 2 gloo processes against 1 process, same recipe.

    .venv/bin/python benchmarks/bench_ddp.py                      # demo recipe, 512 images, 3 rounds
    .venv/bin/python benchmarks/bench_ddp.py --rounds 5 --set data.size=96

Each candidate is a real ``taskfold train`` of the demo recipe (shared + EW, ResNet-10, global
batch 32) for 2 epochs; its throughput is the training images of the last epoch divided by that
epoch's ``seconds`` in metrics.jsonl (the training loop only: no start-up, rendering or
evaluation). Candidates, in alternating rounds (the order rotates every round):

- ``1 process x 2 threads``: what one process gets from the machine;
- ``1 process x 1 thread``: one rank's compute alone (the cost per image of a rank);
- ``2 processes x 1 thread``: ``taskfold train --nproc 2`` (gloo, each rank half of every batch,
  one gradient all-reduce per step).

Reported: median images/s over rounds with the range, and each candidate's ratio to
``1 process x 2 threads``; and what one step's gradient all-reduce costs on its own (2 gloo
processes on loopback, a float32 buffer the size of the demo network's parameters, median of 20).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line, rotated  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = {"1 process x 2 threads": (1, 2), "1 process x 1 thread": (1, 1), "2 processes x 1 thread": (2, 1)}


def throughput(nproc: int, threads: int, overrides: list[str], workdir: Path) -> float:
    """Images/s of the last training epoch of one ``taskfold train`` run."""
    run = Path(tempfile.mkdtemp(dir=workdir)) / "run"
    sets = [arg for item in ["train.epochs=2", "train.progress=false", *overrides] for arg in ("--set", item)]
    cmd = [sys.executable, "-m", "taskfold.cli", "train", str(ROOT / "cli" / "recipes" / "demo.yaml"), "-o", str(run),
           *sets, "--quiet", "--nproc", str(nproc)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    config = (run / "config.yaml").read_text()
    train_size = int(next(line.split(":")[1] for line in config.splitlines() if line.strip().startswith("train_size")))
    last = [r for r in records if r["type"] == "epoch"][-1]
    return train_size / last["seconds"]


def _allreduce_worker(rank: int, numel: int, port: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    buffer = torch.ones(numel)
    times = []
    for _ in range(25):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        times.append(time.perf_counter() - start)
    if rank == 0:
        out.put(statistics.median(times[5:]))
    dist.destroy_process_group()


def allreduce_ms(numel: int) -> float:
    """Median seconds of one all-reduce of ``numel`` float32 between 2 gloo processes, in ms."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, numel, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    result = out.get(timeout=300)
    for p in procs:
        p.join()
    return result * 1000


def demo_parameters() -> int:
    from taskfold.trainer.config import load_config
    from taskfold.trainer.components import build_spec, build_tasks
    from taskfold.trainer.data import create_dataset
    from taskfold.trainer.methods import create_method

    cfg = load_config(ROOT / "cli" / "recipes" / "demo.yaml")
    method = create_method(cfg.method)
    info = create_dataset(cfg.data.dataset, "train", size=cfg.data.size, num_samples=2, seed=0).info
    return sum(p.numel() for p in method.build(build_spec(cfg, build_tasks(cfg, info), method),
                                                backbone_weights=None).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="recipe override (default data.train_size=512)")
    args = parser.parse_args()
    overrides = ["data.train_size=512", "data.val_size=64", "data.test_size=64", *args.set]
    print(cpu_line())
    print(f"load average at start: {os.getloadavg()}")
    results: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    names = list(CANDIDATES)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in rotated(names, r):
                nproc, threads = CANDIDATES[name]
                results[name].append(throughput(nproc, threads, overrides, Path(tmp)))
                print(f"round {r + 1}: {name}: {results[name][-1]:.1f} images/s", flush=True)
    base = results[names[0]]
    numel = demo_parameters()
    print(f"\ngradient all-reduce alone: {numel / 1e6:.2f} M float32 ({numel * 4 / 2**20:.1f} MiB) between 2 gloo "
          f"processes: {allreduce_ms(numel):.1f} ms median")
    print(f"recipe: demo {' '.join(overrides)}; {args.rounds} rounds; load average at end: {os.getloadavg()}")
    print("| candidate | images/s (median, range) | ratio to 1 process x 2 threads (median, range) |")
    print("|---|---|---|")
    for name, values in results.items():
        ratios = [v / b for v, b in zip(values, base)]
        print(f"| {name} | {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}) | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
