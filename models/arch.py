"""ArchSpec: the serialisable description of a network that a run built or a search found.

It is everything the compiler needs to rebuild the network from ``arch.json`` without the
training config: the method, the backbone, the tasks' heads and the method's decision (alpha
values, group assignment, branching tree). Weights travel separately, as safetensors.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


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
    dense_head: str | None = None  # null: chosen from the backbone's feature metadata (default_head)
    backbone_options: dict = field(default_factory=dict)
    primary: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    decision: dict = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ArchSpec":
        raw = dict(raw)
        raw["tasks"] = [TaskHead(**t) for t in raw["tasks"]]
        return cls(**raw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ArchSpec":
        return cls.from_dict(json.loads(Path(path).read_text()))
