"""How every split is iterated: one torch DataLoader contract for in-memory and on-disk datasets.

**What a dataset implements** (a map-style ``torch.utils.data.Dataset``):

- ``info`` (:class:`DatasetInfo`) and ``__len__``;
- ``__getitem__(key)`` → ``(image, targets)``: a normalised float32 ``(3, H, W)`` image and a dict
  label key → tensor. ``key`` is a :class:`SampleKey` (index + the epoch's augmentation seed) or a
  plain ``int`` (no augmentation seed: seed 0). Every random choice an item makes (crop, scale,
  flip) comes from :func:`sample_rng` of its key, never from a global or per-worker generator, so
  the same ``train.seed`` gives the same augmented batches whatever the worker count;
- optionally ``__getitems__(keys)`` → one already-batched ``(images, targets)``: the fast path of
  in-memory datasets (one slice and one dtype conversion per batch instead of B items + a stack);
- optionally ``in_memory = True``: the default worker count is then 0 (a slice of tensors already
  in this process costs less than shipping it from a worker).

**Batches.** :class:`EpochBatches` (a batch sampler) plans each epoch from its own generator:
a permutation, the split into weight and architecture samples (Aux-NAS, BMTAS) and the interleaved
order the loop consumes them in; the epoch's augmentation seed is a function of (seed, epoch). Its ``state_dict()`` is everything a
resume must restore to continue the same stream. Under DDP, ``rank``/``world_size`` give each
process its contiguous share of every *global* batch (every rank walks the same plan, so
architecture/weight decisions agree across ranks), which is what ``DistributedSampler`` +
``set_epoch`` would do, without a second sampler.
"""
from __future__ import annotations

import math
import os
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from taskfold.trainer.data.idx import DataFormatError, DatasetUnavailable

WEIGHT, ARCH = "weight", "arch"


class SampleKey(NamedTuple):
    """Which sample, and the seed of the epoch it is drawn in (augmentation draws from both)."""

    index: int
    seed: int = 0


def as_key(key: int | SampleKey) -> SampleKey:
    return key if isinstance(key, SampleKey) else SampleKey(int(key), 0)


def sample_rng(key: int | SampleKey) -> np.random.Generator:
    """The only source of randomness for one item: a function of (epoch seed, index)."""
    key = as_key(key)
    return np.random.default_rng([key.seed, key.index])


def collate(data) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stack items into a batch; a batch that ``__getitems__`` already made passes through."""
    if isinstance(data, tuple):
        return data
    images = torch.stack([image for image, _ in data])
    targets = {key: torch.stack([t[key] for _, t in data]) for key in data[0][1]}
    return images, targets


IMAGES = ""  # the images' entry in a PackedBatch layout (no label key is empty)


class PackedBatch(NamedTuple):
    """A batch as one flat tensor per dtype: how worker processes hand batches over.

    A worker passes every tensor of a batch to the training process through a shared-memory
    segment and a file descriptor of its own; with CelebA's 41 labels per batch that hand-over,
    not the decoding, held one worker to a quarter of the in-process rate. ``layout`` holds
    ``(key, dtype, offset, shape)`` of each tensor (images under :data:`IMAGES`) in ``buffers``.
    """

    buffers: dict[torch.dtype, torch.Tensor]
    layout: list[tuple[str, torch.dtype, int, tuple[int, ...]]]


def _buffer(dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A flat tensor; in a worker, allocated in shared memory (where its batch must go anyway),
    as torch's default_collate does, instead of being copied there when it is sent."""
    if get_worker_info() is None:
        return torch.empty(numel, dtype=dtype)
    empty = torch.empty(0, dtype=dtype)
    return empty.new(empty._typed_storage()._new_shared(numel, device="cpu"))


def pack(data) -> PackedBatch:
    """:func:`collate` into one buffer per dtype (items are stacked straight into it)."""
    batched = isinstance(data, tuple)
    if batched:
        columns = {IMAGES: [data[0]], **{key: [value] for key, value in data[1].items()}}
    else:
        columns = {IMAGES: [image for image, _ in data], **{key: [t[key] for _, t in data] for key in data[0][1]}}
    sizes: dict[torch.dtype, int] = {}
    layout = []
    for key, parts in columns.items():
        shape = tuple(parts[0].shape) if batched else (len(parts), *parts[0].shape)
        dtype = parts[0].dtype
        layout.append((key, dtype, sizes.get(dtype, 0), shape))
        sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
    buffers = {dtype: _buffer(dtype, total) for dtype, total in sizes.items()}
    for (key, dtype, offset, shape), parts in zip(layout, columns.values()):
        out = buffers[dtype][offset:offset + math.prod(shape)].view(shape)
        if batched:
            out.copy_(parts[0])
        else:
            torch.stack(parts, out=out)
    return PackedBatch(buffers, layout)


def unpack(batch: PackedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(images, targets)``: views into the batch's buffers, no copy."""
    views = {key: batch.buffers[dtype][offset:offset + math.prod(shape)].view(shape)
             for key, dtype, offset, shape in batch.layout}
    return views.pop(IMAGES), views


def load_batch(dataset, keys) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch of ``keys`` (ints or SampleKeys) in this process, through the same path a worker uses."""
    keys = [as_key(k) for k in keys]
    if getattr(dataset, "__getitems__", None):
        return collate(dataset.__getitems__(keys))
    return collate([dataset[k] for k in keys])


def default_workers(dataset) -> int:
    """0 for in-memory datasets; otherwise one worker per core left after the training process
    (at least 1, at most 8: decoding a few hundred images/s per worker feeds one GPU)."""
    if getattr(dataset, "in_memory", False):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


def _chunks(indices: torch.Tensor, size: int) -> list[list[int]]:
    return [indices[start:start + size].tolist() for start in range(0, len(indices), size)]


class EpochBatches:
    """Batch sampler: plans each epoch's batches (shuffled or in order) and their kinds.

    ``plan(epoch)`` must be called before iterating an epoch; it returns the kind of every batch
    in order (:data:`WEIGHT` or :data:`ARCH`). Architecture batches are spread evenly between
    weight batches: before weight batch ``i`` come the architecture batches ``j`` with
    ``j < (i + 1) · A / W``.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 arch_fraction: float = 0.0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.shuffle, self.arch_fraction = shuffle, arch_fraction
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._batches: list[list[SampleKey]] = []

    @property
    def arch_samples(self) -> int:
        return int(round(self.num_samples * self.arch_fraction))

    @property
    def weight_batches(self) -> int:
        """Weight steps per epoch."""
        samples = self.num_samples - self.arch_samples
        batches = -(-samples // self.batch_size)
        if self._drops_short and 0 < samples % self.batch_size < self.world_size:
            batches -= 1  # see plan(): a last batch smaller than the number of ranks is left out
        return batches

    @property
    def _drops_short(self) -> bool:
        """Training under DDP: every rank must take every step, so each needs a row of every batch."""
        return self.shuffle and self.world_size > 1

    def plan(self, epoch: int, skip: int = 0) -> list[str]:
        """Draw epoch ``epoch``'s order (one ``randperm`` from the generator when shuffling); the
        first ``skip`` batches are left out (a resumed epoch: they were consumed before the stop)."""
        if self.shuffle:
            perm = torch.randperm(self.num_samples, generator=self.generator)
            # From (seed, epoch), not from the generator: its stream stays one randperm per epoch.
            seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        else:
            perm, seed = torch.arange(self.num_samples), 0
        n_arch = self.arch_samples
        weight, arch = _chunks(perm[n_arch:], self.batch_size), _chunks(perm[:n_arch], self.batch_size)
        ordered: list[tuple[str, list[int]]] = []
        done = 0
        for i, batch in enumerate(weight):
            while done < len(arch) and done < (i + 1) * len(arch) / len(weight):
                ordered.append((ARCH, arch[done]))
                done += 1
            ordered.append((WEIGHT, batch))
        if self._drops_short:  # a last batch with fewer samples than ranks: left out of the epoch
            ordered = [(kind, batch) for kind, batch in ordered if len(batch) >= self.world_size]
        elif self.world_size > 1:  # evaluation: a rank whose share of the last batch is empty skips it
            ordered = [(kind, batch) for kind, batch in ordered if self._shard(batch)]
        ordered = ordered[skip:]
        self._batches = [[SampleKey(index, seed) for index in self._shard(batch)] for _, batch in ordered]
        return [kind for kind, _ in ordered]

    def _shard(self, batch: list[int]) -> list[int]:
        """This rank's contiguous share of a global batch (all of it in one process)."""
        if self.world_size == 1:
            return batch
        per_rank = -(-len(batch) // self.world_size)
        return batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def state_dict(self) -> dict:
        """What a resume restores (together with the epoch number) to replay the same stream."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class SplitLoader:
    """A split's DataLoader and its batch plan: ``epoch(e)`` yields ``(kind, images, targets)``.

    ``workers=None``: :func:`default_workers`. Workers are persistent (started once, reused every
    epoch). The DataLoader gets a generator of its own so that starting an epoch never draws from
    torch's global RNG (model init, dropout and Gumbel samples stay as they would be without a
    loader); data randomness comes from sample keys alone. Workers hand batches over packed
    (:class:`PackedBatch`).
    """

    def __init__(self, dataset, batches: EpochBatches, *, workers: int | None = None,
                 pin_memory: bool = False) -> None:
        self.dataset, self.batches = dataset, batches
        self.workers = default_workers(dataset) if workers is None else workers
        self.loader = DataLoader(dataset, batch_sampler=batches, num_workers=self.workers,
                                 collate_fn=pack if self.workers > 0 else collate,
                                 pin_memory=pin_memory, persistent_workers=self.workers > 0,
                                 prefetch_factor=4 if self.workers > 0 else None,
                                 generator=torch.Generator().manual_seed(0))

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
        """The batches of epoch ``epoch`` in plan order, without its first ``skip``."""
        kinds = self.batches.plan(epoch, skip)
        try:
            for kind, batch in zip(kinds, self.loader):
                images, targets = unpack(batch) if isinstance(batch, PackedBatch) else batch
                yield kind, images, targets
        except (DatasetUnavailable, DataFormatError) as exc:
            # A worker's error arrives as "Caught X in DataLoader worker ...\n<traceback>\nX: message";
            # keep the one line that names the file.
            lines = str(exc).strip().splitlines()
            if len(lines) > 1:
                raise type(exc)(lines[-1].split(": ", 1)[-1]) from None
            raise
