"""Peak resident memory (RSS) of ``taskfold run`` on the demo recipe, at 64 px and 128 px.

    .venv/bin/python benchmarks/bench_train_memory.py
    .venv/bin/python benchmarks/bench_train_memory.py --python /path/to/old/checkout/.venv/bin/python

Each measurement is one fresh process running the whole pipeline (train, compile, bench, report)
into a temporary run directory; its peak RSS is the kernel's ``ru_maxrss`` of that child, read by
a small wrapper process (so this script's own memory is never counted). One epoch is enough: the
peak is set by the rendered splits, the model and the first batches, not by the number of epochs.
``--python`` adds a second interpreter (another checkout's venv) measured the same way, in
alternating order, to compare two versions of taskfold side by side.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line  # noqa: E402

# Runs the CLI in a child and prints the child's peak RSS in KiB (Linux ru_maxrss unit).
WRAPPER = ("import resource, subprocess, sys; "
           "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
           "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
CLI = "from taskfold.cli.main import main; main()"


def peak_rss_mib(python: str, size: int, epochs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [python, "-c", CLI, "run", "-o", str(Path(tmp) / "run"), "--quiet",
               "--set", f"data.size={size}", "--set", f"train.epochs={epochs}"]
        out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, check=True)
    rc, kib = out.stdout.split()
    if rc != "0":
        raise SystemExit(f"{python}: taskfold run --set data.size={size} exited {rc}")
    return int(kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", help="a second interpreter (another checkout) to compare against")
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    candidates = {"this": sys.executable, **({"other": args.python} if args.python else {})}
    print(cpu_line())
    for size in (int(s) for s in args.sizes.split(",")):
        peaks: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(args.repeats):
            for name, python in candidates.items():
                peaks[name].append(peak_rss_mib(python, size, args.epochs))
        line = ", ".join(f"{name} {min(v):.0f}-{max(v):.0f} MiB" for name, v in peaks.items())
        ratio = f"; other/this {min(peaks['other']) / min(peaks['this']):.2f}x" if args.python else ""
        print(f"demo recipe at {size} px, {args.epochs} epoch(s), peak RSS over {args.repeats} runs: {line}{ratio}")


if __name__ == "__main__":
    main()
