"""Kill -9 and resume, N trials per method: is the resumed run bit-identical to an uninterrupted one?

    .venv/bin/python benchmarks/bench_resume.py                  # shared, aux_nas, dmtg, bmtas, pcgrad; 5 trials
    .venv/bin/python benchmarks/bench_resume.py --methods bmtas --trials 2

For each method: one uninterrupted `taskfold train` of a tiny synthscenes recipe (CPU, one
thread), then ``--trials`` times: start the same run, SIGKILL it once it has logged a random
number of weight steps (counted over all its stages: BMTAS's retrain and DMTG's fine-tune are
stages of their own, in RUN/retrain), ``taskfold train --resume`` it, and compare the last
stage's weights (every tensor, bit for bit) and every metrics.jsonl record except wall-clock
seconds. Prints one line per trial and a summary per method. Correctness, not speed: no timing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "data": {"dataset": "synthscenes", "size": 32, "train_size": 48, "val_size": 4, "test_size": 4, "seed": 0},
    "tasks": [{"name": "seg", "kind": "segmentation"}, {"name": "normals", "kind": "normals"}],
    "model": {"backbone": "resnet10", "head_channels": 8},
    "train": {"epochs": 2, "batch_size": 4, "lr": 0.002, "log_every": 1, "checkpoint_every": 2},
}
METHODS = {
    "shared": {"method": "shared"},
    "aux_nas": {"method": {"name": "aux_nas"}, "primary": "seg"},
    "dmtg": {"method": {"name": "dmtg", "num_groups": 2, "stem_blocks": 1, "hard": True, "finetune_epochs": 1}},
    "bmtas": {"method": {"name": "bmtas", "retrain_epochs": 1, "warmup_fraction": 0.1, "arch_fraction": 0.25,
                         "resource_lambda": 0.02}},
    "pcgrad": {"method": "shared", "weighting": "pcgrad"},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def taskfold(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "taskfold.cli", *args, "--quiet"], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stage_dirs(run: Path) -> list[Path]:
    """``run`` and its follow-up stages (RUN/retrain, RUN/retrain/retrain, ...) that exist."""
    stages = [run]
    while (stages[-1] / "retrain").is_dir():
        stages.append(stages[-1] / "retrain")
    return stages


def weight_steps(run: Path) -> int:
    """Weight steps logged so far by every stage of ``run`` (0 for a stage not started)."""
    total = 0
    for stage in stage_dirs(run):
        try:
            total += (stage / "metrics.jsonl").read_text().count('"type": "train"')
        except FileNotFoundError:
            pass
    return total


def last_stage(run: Path) -> Path:
    return stage_dirs(run)[-1]


def records(run: Path) -> list[list[dict]]:
    stages = []
    for stage in stage_dirs(run):
        rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
        stages.append([{k: v for k, v in row.items() if k != "seconds"} for row in rows])
    return stages


def identical(a: Path, b: Path) -> bool:
    wa = load_file(str(last_stage(a) / "checkpoints" / "last" / "model.safetensors"))
    wb = load_file(str(last_stage(b) / "checkpoints" / "last" / "model.safetensors"))
    same = wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)
    return same and records(a) == records(b)


def trial(recipe: Path, reference: Path, run: Path, step: int) -> str:
    proc = taskfold("train", str(recipe), "-o", str(run))
    while weight_steps(run) < step and proc.poll() is None:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    resumed = taskfold("train", "--resume", str(run))
    _, err = resumed.communicate()
    if resumed.returncode != 0:
        return f"resume failed: {err.strip().splitlines()[-1] if err.strip() else resumed.returncode}"
    return "identical" if identical(reference, run) else "DIFFERENT"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill steps (default: random)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods.split(","):
            recipe = Path(tmp) / f"{name}.yaml"
            recipe.write_text(yaml.safe_dump({"name": name, **BASE, **METHODS[name]}))
            reference = Path(tmp) / f"{name}-reference"
            proc = taskfold("train", str(recipe), "-o", str(reference))
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"{name}: reference run failed: {err.strip()}")
            total = weight_steps(reference)
            results = []
            for t in range(args.trials):
                step = rng.randint(3, total - 1)  # after the first checkpoint (step 2)
                results.append(trial(recipe, reference, Path(tmp) / f"{name}-{t}", step))
                print(f"{name}: trial {t + 1}, killed after {step}/{total} weight steps: {results[-1]}", flush=True)
            print(f"{name}: {results.count('identical')}/{args.trials} bit-identical", flush=True)


if __name__ == "__main__":
    main()
