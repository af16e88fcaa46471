"""What a recipe is built from before the loop runs: every component checked at once
(:func:`check_components`, before any data is read), then the datasets, loaders, tasks, the
ArchSpec that arch.json records, and the weight optimiser. :func:`taskfold.trainer.loop.setup`
puts them together into a run.
"""
from __future__ import annotations

import dataclasses

import torch

from taskfold.models.arch import ArchSpec, TaskHead
from taskfold.models.backbones import BACKBONES
from taskfold.models.registry import UnknownNameError
from taskfold.trainer import distributed
from taskfold.trainer.config import Config, ConfigError
from taskfold.trainer.data import create_dataset, dataset_options
from taskfold.trainer.data.loader import EpochBatches, SplitLoader
from taskfold.trainer.methods import Method, create_method
from taskfold.trainer.report import baseline_results
from taskfold.trainer.tasks import check_task_options, create_task
from taskfold.trainer.weighting import create_weighting


def build_datasets(cfg: Config) -> dict:
    d = cfg.data
    sizes = {"train": d.train_size, "val": d.val_size, "test": d.test_size}
    return {split: create_dataset(d.dataset, split, size=d.size, num_samples=n, seed=d.seed,
                                  cache_dir=d.cache_dir, root=d.root, **d.options)
            for split, n in sizes.items()}


EVAL_BATCH_SIZE = 64


def build_loaders(cfg: Config, datasets: dict, *, arch_fraction: float = 0.0,
                  pin_memory: bool = False) -> dict[str, SplitLoader]:
    """The train split shuffled from ``train.seed`` (split into weight/architecture batches), the
    others in order; ``pin_memory`` when batches go to a CUDA device. In a DDP run each rank reads
    its share of every batch (``train.batch_size`` is the global batch)."""
    ranks = {"rank": distributed.rank(), "world_size": distributed.world_size()}
    plans = {"train": EpochBatches(len(datasets["train"]), cfg.train.batch_size, seed=cfg.train.seed,
                                   arch_fraction=arch_fraction, **ranks)}
    loaders = {"train": SplitLoader(datasets["train"], plans["train"], workers=cfg.data.workers,
                                    pin_memory=pin_memory)}
    for split in ("val", "test"):
        loaders[split] = eval_loader(datasets[split], workers=cfg.data.workers, pin_memory=pin_memory, **ranks)
    return loaders


def eval_loader(dataset, *, workers: int | None = None, pin_memory: bool = False, rank: int = 0,
                world_size: int = 1) -> SplitLoader:
    """A split read once in order, in batches of EVAL_BATCH_SIZE (what :func:`evaluate` walks);
    under DDP, this rank's share of each batch."""
    return SplitLoader(dataset, EpochBatches(len(dataset), EVAL_BATCH_SIZE, shuffle=False, rank=rank,
                                             world_size=world_size),
                       workers=workers, pin_memory=pin_memory)


def build_tasks(cfg: Config, info) -> list:
    tasks = []
    for t in cfg.tasks:
        tasks.append(create_task(t.name, t.kind, info, weight=t.weight, **t.options))
    return tasks


def build_spec(cfg: Config, tasks: list, method: Method) -> ArchSpec:
    """What arch.json records: the network's description with the method's options resolved
    (every field, defaults included: see models/arch.py)."""
    return ArchSpec(
        method=cfg.method_name,
        backbone=cfg.model.backbone,
        image_size=cfg.data.size,
        tasks=[TaskHead(t.name, t.kind, t.output, t.out_channels) for t in tasks],
        head_channels=cfg.model.head_channels,
        dense_head=cfg.model.dense_head,
        backbone_options=dict(cfg.model.options),
        primary=[cfg.primary] if cfg.primary else [t.name for t in tasks],
        options=dataclasses.asdict(method.options),
    )


def make_optimizer(cfg: Config, params: list[dict]) -> torch.optim.Optimizer:
    """The weight optimiser of ``cfg.train`` (see :func:`create_optimizer`)."""
    t = cfg.train
    for group in params:  # a method may scale train.lr per group (BMTAS divides shared blocks' lr)
        if "lr_scale" in group:
            group["lr"] = t.lr * group.pop("lr_scale")
    return create_optimizer(t.optimizer, params, lr=t.lr, weight_decay=t.weight_decay)


def create_optimizer(name: str, params: list[dict], *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``adam``, ``adamw`` or ``sgd`` (momentum 0.9). Adam and AdamW use the fused kernel (one pass
    over each parameter, on the CPU too): their per-parameter update otherwise costs a chain of
    elementwise ops, which dominates a step when a network has many parameters per MAC (DMTG's
    K·N MLP heads: a third of the step at N = 40, see benchmarks/bench_dmtg.py)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ConfigError(f"train.optimizer: unknown optimizer {name!r}; available: adam, adamw, sgd")


def check_components(cfg: Config) -> tuple[Method, object]:
    """Build every component a recipe names that needs no data (method, weighting, each task's
    options, the backbone's name, the dataset and its options, the report baseline) and report every problem in one
    ConfigError, before any data is rendered or read; returns the method and the weighting."""
    names = [t.name for t in cfg.tasks]
    built: dict[str, object] = {}
    checks = {
        "method": lambda: create_method(cfg.method),
        "weighting": lambda: create_weighting(cfg.weighting, tasks=names, task_weights={t.name: t.weight for t in cfg.tasks},
                                              primary=[cfg.primary] if cfg.primary else names),
        "backbone": lambda: BACKBONES.get(cfg.model.backbone),
        "dataset": lambda: dataset_options(cfg.data.dataset, cfg.data.options, cfg.data.size),
        **{f"task {t.name}": (lambda t=t: check_task_options(t.name, t.kind, t.options)) for t in cfg.tasks},
        "baseline": lambda: cfg.report.baseline is not None and baseline_results(cfg.report.baseline, names),
    }
    problems = []
    for name, check in checks.items():
        try:
            built[name] = check()
        except (ConfigError, UnknownNameError) as exc:
            problems.append(str(exc).removeprefix("config: "))
    if problems:
        raise ConfigError("; ".join(problems))
    return built["method"], built["weighting"]
