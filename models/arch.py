"""ArchSpec: the serialisable description of a network that a run built or a search found.

It is everything the compiler needs to rebuild the network from ``arch.json`` without the
training config: the method, the backbone, the tasks' heads, the method's options and its decision
(alpha values, group assignment, branching tree). Weights travel separately, as safetensors.

``format`` (:data:`ARCH_FORMAT`): 2 stores ``options`` **resolved**, every field of the method's
options dataclass with the value the run used, so a later change of a default never changes how
an existing run is rebuilt. Format 1 (an ``arch.json`` without a ``format`` field, written before
it) stored the options as the recipe wrote them; it still loads, and the fields it lacks take
today's defaults, as they always did.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

ARCH_FORMAT = 2


@dataclass
class TaskHead:
    """One task as the network sees it: what its head outputs."""

    name: str
    kind: str
    output: str  # "dense" (B, C, H, W) or "global" (B, C)
    out_channels: int


@dataclass
class ArchSpec:
    method: str
    backbone: str
    image_size: int
    tasks: list[TaskHead]
    head_channels: int = 64
    backbone_options: dict = field(default_factory=dict)
    primary: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    decision: dict = field(default_factory=dict)
    format: int = ARCH_FORMAT

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ArchSpec":
        raw = {"format": 1, **raw}  # written before arch.json had a format
        if not isinstance(raw["format"], int) or not 1 <= raw["format"] <= ARCH_FORMAT:
            raise ValueError(f"format {raw['format']!r} is not one this taskfold reads (1..{ARCH_FORMAT}); "
                             "a newer taskfold wrote it")
        raw["tasks"] = [TaskHead(**t) for t in raw["tasks"]]
        return cls(**raw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ArchSpec":
        return cls.from_dict(json.loads(Path(path).read_text()))
