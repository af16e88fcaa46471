"""Run configuration: YAML recipes validated into typed dataclasses.

Every field has a default or a clear error naming it. Validation collects *every* problem in the
file and raises one :class:`ConfigError` whose message lists them all (torchtune's habit), so a
user fixes a recipe in one pass. Component options (``method``, ``weighting``, task and dataset
options) are free-form dicts here and are validated by the component that receives them, with
:func:`build_options`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names every bad field."""


# Components chosen by name; `method: shared` is short for `method: {name: shared}`.
_NAMED_DEFAULTS = {"method": {"name": "shared"}, "weighting": {"name": "ew"}}


@dataclass
class DataConfig:
    dataset: str = "synthscenes"
    root: str | None = None  # folder of an on-disk dataset (nyuv2, cityscapes, celeba, ...)
    size: int = 64
    # samples per split; null = the whole split of an on-disk dataset (at most N: its first N)
    train_size: int | None = 2000
    val_size: int | None = 200
    test_size: int | None = 200
    seed: int = 0
    cache_dir: str | None = None
    workers: int | None = None  # DataLoader worker processes; null = 0 in-memory, else cores - 1 (<= 8)
    options: dict = field(default_factory=dict)


@dataclass
class TaskConfig:
    name: str = ""
    kind: str = ""
    weight: float = 1.0
    options: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    weights: str | None = None
    head_channels: int = 64
    options: dict = field(default_factory=dict)


Amp = Literal["none", "bf16", "fp16"]  # torch.autocast dtype of train.amp (fp16 adds a GradScaler)
AMP_CHOICES = typing.get_args(Amp)


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    eval_every: int = 1
    log_every: int = 10
    checkpoint_every: int = 200  # weight steps between resumable checkpoints (also one per epoch); 0: per epoch only
    on_nonfinite: Literal["stop", "skip_step"] = "stop"  # a NaN/inf loss: one line and exit 2, or drop the step
    seed: int = 0
    progress: bool = True
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    amp: Amp = "none"
    channels_last: bool = False  # NHWC memory order for the network and its input images (CNNs)
    sync_bn: bool = False  # DDP: BatchNorm batch statistics over the global batch (all ranks), not per rank


@dataclass
class CompileConfig:
    parity_tol: float = 1e-4
    parity_samples: int = 8
    tensorrt: bool = False
    # lower-precision variants next to model.onnx (compiler/precision.py), each scored per task
    int8: bool = False
    calib_images: int = 256  # training-split images that calibrate the INT8 ranges
    int8_target: Literal["auto", "avx2", "vnni", "arm", "tensorrt"] = "auto"  # auto: this CPU
    int8_max_drop: list[str] = field(default_factory=list)  # ["seg.miou=0.01", "mean=2%"]; [] = 1 % of each main metric
    int8_exclude: list[str] = field(default_factory=list)  # op types or node names kept in FP32
    int8_heads: Literal["auto", "int8", "fp32"] = "auto"  # auto: FP32 heads if INT8 ones break the guard
    fp16: bool = False
    fp16_io: bool = False  # FP16 graph inputs/outputs too (default: FP32 with casts at the edges)
    default_precision: Literal["fp32", "int8", "fp16"] = "fp32"  # what load() runs when the caller does not say
    torch_tensorrt: bool = False


@dataclass
class BenchConfig:
    batches: list[int] = field(default_factory=lambda: [1, 8])
    warmup: int = 5
    iters: int = 30
    threads: int | None = None


@dataclass
class ReportConfig:
    # a finished run of the same tasks (e.g. naive MTL) that report.md compares against
    baseline: str | None = None


@dataclass
class Config:
    name: str = "run"
    method: dict = field(default_factory=lambda: dict(_NAMED_DEFAULTS["method"]))
    weighting: dict = field(default_factory=lambda: dict(_NAMED_DEFAULTS["weighting"]))
    primary: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def method_name(self) -> str:
        return self.method["name"]

    @property
    def method_options(self) -> dict:
        return {k: v for k, v in self.method.items() if k != "name"}

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Generic conversion of plain YAML values into typed dataclasses, collecting every problem.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:  # a closed set of choices, e.g. train.amp: Literal["none", "bf16", "fp16"]
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        problems.append(f"{where}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return choices[0]
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {type(value).__name__}")
            return tp()
        return _build(tp, value, where, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return []
        return [_convert(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if isinstance(value, str) and where in _NAMED_DEFAULTS:
            return {"name": value}  # `method: shared` is short for `method: {name: shared}`
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return {}
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: expected true/false, got {value!r}")
        return False
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{where}: expected a number, got {value!r}")
        return 0.0
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{where}: expected an integer, got {value!r}")
        return 0
    if tp is str:
        if isinstance(value, str):
            return value
        problems.append(f"{where}: expected a string, got {value!r}")
        return ""
    return value


def _build(cls: type, raw: dict, where: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown field {path!r}{hint}")
            continue
        kwargs[key] = _convert(value, hints[key], path, problems)
    return cls(**kwargs)


def build_options(cls: type, raw: dict, where: str) -> Any:
    """Validate a component's option dict against its options dataclass; raise one ConfigError."""
    problems: list[str] = []
    obj = _build(cls, raw, where, problems)
    if problems:
        raise ConfigError("; ".join(problems))
    return obj


# ----------------------------------------------------------------------------------------------


class RecipeLoader(yaml.SafeLoader):
    """YAML as recipes mean it: only true/false are booleans (YAML 1.2). PyYAML's YAML 1.1 also
    reads on/off/yes/no as booleans, which turns the weighting option ``on: features`` into the
    key ``True``."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def _apply_override(raw: dict, assignment: str) -> None:
    """``a.b=c`` sets raw['a']['b'] = yaml-parsed c; list items by index (``tasks.0.weight=2``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.load(text, RecipeLoader) if text else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: {text!r} is not a valid YAML value") from None
    node: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])!r} is not a mapping")
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {part!r} is not an index of that list")
            node = node[int(part)]
        else:
            if node.get(part) is None:
                node[part] = dict(_NAMED_DEFAULTS.get(part, {})) if node is raw else {}
            elif isinstance(node[part], str) and part in _NAMED_DEFAULTS:
                node[part] = {"name": node[part]}
            node = node[part]
    last = parts[-1]
    if not isinstance(node, (dict, list)):
        raise ConfigError(f"--set {key}: {'.'.join(parts[:-1])!r} is not a mapping")
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: {last!r} is not an index of that list")
        node[int(last)] = value
    else:
        node[last] = value


def _check_name(name: str, problems: list[str]) -> None:
    """A run name is a plain folder name under runs/; ``-o`` is how a run goes elsewhere."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("~") or "\0" in name:
        problems.append(f"name: {name!r} must be a plain name (no path separators, '..' or '~'); "
                        "use -o DIR to put the run somewhere else")


def _check(cfg: Config, problems: list[str]) -> None:
    _check_name(cfg.name, problems)
    if not cfg.tasks:
        problems.append("tasks: at least one task is required")
    seen: set[str] = set()
    for i, task in enumerate(cfg.tasks):
        if not task.name:
            problems.append(f"tasks[{i}].name: required")
        if not task.kind:
            problems.append(f"tasks[{i}].kind: required")
        if task.name in seen:
            problems.append(f"tasks[{i}].name: task {task.name!r} is named twice")
        seen.add(task.name)
    if cfg.primary is not None and cfg.primary not in seen:
        problems.append(f"primary: {cfg.primary!r} is not one of the tasks ({', '.join(cfg.task_names)})")
    for name in ("method", "weighting"):
        value = getattr(cfg, name)
        if not isinstance(value.get("name"), str):
            problems.append(f"{name}.name: required (a string)")
    positive = {
        "data.size": cfg.data.size, "data.train_size": cfg.data.train_size,
        "train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
        "train.log_every": cfg.train.log_every, "train.eval_every": cfg.train.eval_every,
        "compile.parity_samples": cfg.compile.parity_samples,
        "model.head_channels": cfg.model.head_channels,
    }
    for path, value in positive.items():
        if isinstance(value, int) and value < 1:
            problems.append(f"{path}: must be >= 1, got {value}")
    if cfg.train.checkpoint_every < 0:
        problems.append(f"train.checkpoint_every: must be >= 0 (0: once per epoch), got {cfg.train.checkpoint_every}")
    if cfg.data.workers is not None and cfg.data.workers < 0:
        problems.append(f"data.workers: must be >= 0 (or null for the default), got {cfg.data.workers}")
    if not (cfg.train.lr > 0 and math.isfinite(cfg.train.lr)):  # NaN fails every comparison
        problems.append(f"train.lr: must be a finite number > 0, got {cfg.train.lr}")
    problem = device_field_problem(cfg.train.device)
    if problem is not None:
        problems.append(problem)
    _check_compile(cfg.compile, problems)
    b = cfg.bench
    if b.iters < 1 or b.warmup < 0 or (b.threads is not None and b.threads < 1):
        problems.append(f"bench: need iters >= 1, warmup >= 0 and threads >= 1 (or null), got iters={b.iters}, "
                        f"warmup={b.warmup}, threads={b.threads}")
    if not (cfg.compile.parity_tol >= 0 and math.isfinite(cfg.compile.parity_tol)):
        problems.append(f"compile.parity_tol: must be a finite number >= 0, got {cfg.compile.parity_tol}")
    if any(b < 1 for b in cfg.bench.batches):
        problems.append(f"bench.batches: every batch size must be >= 1, got {cfg.bench.batches}")


DEVICE_FORM = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_field_problem(value: str) -> str | None:
    """Why ``train.device`` is malformed (None for auto, cpu, cuda, cuda:N). Only the form: whether
    this machine has the device is asked when a run is set up (trainer/device.py), so a run trained
    on a GPU can still be compiled and reported from its config.yaml on a CPU machine."""
    if DEVICE_FORM.fullmatch(value):
        return None
    return f"train.device: expected auto, cpu, cuda or cuda:N, got {value!r}"


def _check_compile(c: CompileConfig, problems: list[str]) -> None:
    if c.calib_images < 1:
        problems.append(f"compile.calib_images: must be >= 1, got {c.calib_images}")
    if c.default_precision != "fp32" and not getattr(c, c.default_precision):
        problems.append(f"compile.default_precision: {c.default_precision} needs compile.{c.default_precision}: true")


def config_from_dict(raw: dict, overrides: list[str] | None = None) -> Config:
    """Validate a plain dict (as read from YAML) plus ``--set`` overrides into a :class:`Config`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy, plain types only
    for assignment in overrides or []:
        _apply_override(raw, assignment)
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    if not problems:
        _check(cfg, problems)
    if problems:
        raise ConfigError("config: " + "; ".join(problems))
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe and validate it; every problem is reported in one ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a YAML recipe is UTF-8 text)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.load(text, RecipeLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    return config_from_dict(raw, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
