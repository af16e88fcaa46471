"""Loader throughput of the on-disk datasets at the recipes' resolutions: images per second a
training split delivers through the trainer's SplitLoader (augmentation on), with the default
worker count and with 0 workers.

    .venv/bin/python benchmarks/bench_loaders.py
    .venv/bin/python benchmarks/bench_loaders.py --datasets nyuv2,pascal_context --epochs 6
    .venv/bin/python benchmarks/bench_loaders.py --datasets celeba --handover

Each dataset is written in its real on-disk format (tests/dataset_fixtures.py, the same writers the
loader tests use) at its native resolution (NYUv2 288 px npy, Cityscapes 256 px npy, CelebA 218x178
jpg, Taskonomy 512 px png, PASCAL-Context 512 px jpg/png/mat), a few images each, then read at the
resolution of its recipe in configs/ for several epochs (each epoch decodes every file again and
draws a new augmentation); the files are repeated up to ``--per-epoch`` items per epoch. Rounds
alternate between the worker settings; median and range of images/s over rounds. The page cache
holds these few files, as it would a dataset that fits in RAM. ``--handover`` adds the default
workers handing every tensor over on its own (torch's default collate) next to the packed batches
SplitLoader uses.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset_fixtures as fixtures  # noqa: E402
from common import cpu_line, rotated  # noqa: E402

from taskfold.trainer.config import load_config  # noqa: E402
from taskfold.trainer.data import create_dataset  # noqa: E402
from taskfold.trainer.data.loader import (EpochBatches, SampleKey, SplitLoader, as_key, collate,  # noqa: E402
                                          default_workers)

# dataset -> (writer at native resolution, the recipe whose data.size and options are used)
DATASETS = {
    "nyuv2": (lambda root: fixtures.write_nyuv2(root, counts=(("train", 16), ("val", 2)), side=288),
              "aux_nas_nyuv2_seg_normals.yaml"),
    "cityscapes": (lambda root: fixtures.write_cityscapes(root, side=256), "aux_nas_cityscapes_seg_disparity.yaml"),
    "celeba": (lambda root: fixtures.write_celeba(root, n=6, shape=(218, 178)), "dmtg_celeba.yaml"),
    "taskonomy": (lambda root: fixtures.write_taskonomy(root, per_building=4, side=512), "dmtg_taskonomy.yaml"),
    "pascal_context": (lambda root: fixtures.write_pascal(root, side=512), "bmtas_pascal_context.yaml"),
}


class Repeated(Dataset):
    """Each file ``times`` times per epoch: epochs long enough for the workers' prefetching to
    matter (a worker's per-epoch hand-shake is paid once per epoch, as in training), from a few files."""

    def __init__(self, dataset, times: int) -> None:
        self.dataset, self.times = dataset, times

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, key):
        key = as_key(key)
        return self.dataset[SampleKey(key.index % len(self.dataset), key.seed)]


def images_per_second(dataset, workers: int, epochs: int, batch: int, packed: bool = True) -> float:
    """``packed=False``: workers hand over every tensor on its own (torch's way, before PackedBatch)."""
    loader = SplitLoader(dataset, EpochBatches(len(dataset), min(batch, len(dataset)), seed=0), workers=workers)
    if not packed:
        loader.loader.collate_fn = collate  # before the first epoch starts the workers
    for _ in loader.epoch(0):  # start the workers (persistent) before timing
        pass
    start, count = time.perf_counter(), 0
    for epoch in range(1, epochs + 1):
        for _, images, _ in loader.epoch(epoch):
            count += len(images)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--per-epoch", type=int, default=64,
                        help="items per epoch: the few files are repeated up to this many")
    parser.add_argument("--handover", action="store_true",
                        help="also time the default workers handing over every tensor on its own")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of this process (the 0-worker path; a worker always uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_line(), f"; torch threads in this process: {args.threads}")
    for name in args.datasets.split(","):
        write, recipe = DATASETS[name]
        cfg = load_config(ROOT / "configs" / recipe).data
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "data").mkdir()
            root = write(Path(tmp) / "data")
            files = create_dataset(name, "train", size=cfg.size, num_samples=None, root=str(root), **cfg.options)
            dataset = Repeated(files, max(1, args.per_epoch // len(files)))
            workers = default_workers(files)
            settings = {f"default workers ({workers})": (workers, True), "0 workers": (0, True)}
            if args.handover:
                settings[f"default workers ({workers}), per-tensor hand-over"] = (workers, False)
            rates: dict[str, list[float]] = {key: [] for key in settings}
            for r in range(args.rounds):
                for key in rotated(list(settings), r):
                    rates[key].append(images_per_second(dataset, settings[key][0], args.epochs, args.batch,
                                                        packed=settings[key][1]))
        cells = ", ".join(f"{key}: {statistics.median(v):.0f} img/s ({min(v):.0f}-{max(v):.0f})"
                          for key, v in rates.items())
        print(f"{name} at {cfg.size} px ({len(files)} files x {dataset.times} per epoch, recipe {recipe}): {cells}",
              flush=True)


if __name__ == "__main__":
    main()
