"""Where a run trains: ``train.device`` resolved to a torch device, and moving a batch there.

One code path: a CPU run is a CUDA run with another device. The recipe field is checked for its
form when the config is read (:func:`device_field_problem`) and for the hardware when a run is set
up (:func:`resolve_device`), before any data or network is built: asking for CUDA on a machine
without it is one line naming what is missing (exit 2 from the CLI), never a traceback mid-run.
"""
from __future__ import annotations

import torch

from taskfold.trainer.config import ConfigError, device_field_problem


def _cuda_missing() -> str | None:
    """Why CUDA cannot be used by this process (None when it can)."""
    from taskfold.runtime.cuda import cuda_unavailable_reason

    if torch.version.cuda is None:
        return f"this PyTorch build has no CUDA support (torch {torch.__version__})"
    if not torch.cuda.is_available():
        return cuda_unavailable_reason() or "torch.cuda.is_available() is false"
    return None


def resolve_device(value: str) -> torch.device:
    """The device ``train.device`` names on this machine; ``auto`` is CUDA when available.

    Raises :class:`ConfigError` (one line) when CUDA, or the numbered device, is not there.
    """
    problem = device_field_problem(value)
    if problem is not None:
        raise ConfigError(problem)
    if value == "cpu" or (value == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if value == "auto":
        return torch.device("cuda", torch.cuda.current_device())
    missing = _cuda_missing()
    if missing is not None:
        raise ConfigError(f"train.device: {value} requested but {missing}; use train.device: cpu or auto")
    device = torch.device(value)
    index = 0 if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"train.device: {value} requested but only {count} CUDA device(s) are visible "
                          f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def describe(device: torch.device) -> dict[str, str]:
    """What the run directory records about the device it trained on."""
    info = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    return info


def to_device(images: torch.Tensor, targets: dict[str, torch.Tensor], device: torch.device,
              channels_last: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A batch on ``device`` (asynchronous from pinned memory); the same tensors when already there.

    ``channels_last``: the images in NHWC memory order, as a channels_last network expects them.
    """
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, {k: v.to(device, non_blocking=non_blocking) for k, v in targets.items()}


def move_parameters(params: list[torch.nn.Parameter], device: torch.device) -> None:
    """Move parameters that live outside the network (a weighting strategy's own) in place, as
    ``Module.to`` does, so the objects a strategy and its optimiser group hold stay the same."""
    for p in params:
        p.data = p.data.to(device)
