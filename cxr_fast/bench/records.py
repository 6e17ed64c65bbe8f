"""The benchmark results as typed records, and their JSON form (the files in benchmarks/results/).

Every command returns one of these; `to_json` writes it, `from_json` reads it back (also the
files written before these records existed: same keys, absent optional ones allowed).
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from cxr_fast.errors import CxrError, one_line

Status = Literal["ok", "skipped", "failed"]
R = TypeVar("R")


def absent(default: Any = None) -> Any:
    """A field left out of the JSON while it holds `default` (results list only what was measured)."""
    return field(default=default, metadata={"omitted_when": default})


class Record:
    def to_json(self) -> dict:
        return _plain(self)

    @classmethod
    def from_json(cls: type[R], data: dict) -> R:
        return _build(cls, data)


@dataclass
class Rate(Record):
    """Repeated measurements: median, min, max, relative spread ((max - min) / median), all values."""

    median: float
    min: float
    max: float
    spread: float | None
    values: list[float]


@dataclass
class Throughput(Record):
    images_per_second: Rate


@dataclass
class Gpu(Record):
    name: str
    count: int
    memory_gib: float
    capability: str


@dataclass
class Machine(Record):
    machine: str
    hostname: str
    platform: str
    cpu: str
    cpu_count: int | None
    usable_cores: int
    torch_threads: int
    gpu: Gpu | None
    load_average: list[float] | None
    libraries: dict[str, Any]


# ---------------------------------------------------------------------- bench data


@dataclass
class DecodeCeiling(Record):
    decoder: str
    jpeg_kb_mean: float
    jpeg_px: str
    images_per_second_per_core: Rate
    cores: int
    ceiling_images_per_second: int
    reference_per_core: int
    source_images_per_second_per_core: Rate | None = absent()


@dataclass
class DataSettings(Record):
    images: int
    shard_images: int
    shards: str
    batch_size: int
    image_size: int
    load_size: int
    repeats: int
    device: str
    workers: int
    seconds_per_repeat: float


@dataclass
class LoaderResult(Record):
    description: str
    command: str
    status: Status = "ok"
    reason: str | None = absent()
    setup_seconds: float | None = absent()
    images_per_second: Rate | None = absent()
    batches_per_repeat: int | None = absent()


@dataclass
class StartupResult(Record):
    """The resident loader's start-up on the same shards: the decoded cache cold (decoded and
    written) and warm (mapped; the file in the page cache, as for every run after the first)."""
    images: int
    load_size: int
    cold_ms: Rate
    warm_ms: Rate
    speedup: float
    command: str


@dataclass
class DataResult(Record):
    command: str
    date: str
    machine: Machine
    settings: DataSettings
    decode_ceiling: DecodeCeiling | None
    loaders: dict[str, LoaderResult] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    startup: StartupResult | None = absent()
    kind: str = "data"

    def rate(self, loader: str) -> float | None:
        """Median images/s of one loader, None unless it was measured."""
        entry = self.loaders.get(loader)
        return entry.images_per_second.median if entry and entry.status == "ok" and entry.images_per_second else None


# ---------------------------------------------------------------------- bench train


@dataclass
class TrainSettings(Record):
    arch: str
    loader: str
    loader_used: str | None
    image_size: int
    batch_size: int
    steps: int
    warmup: int
    repeats: int
    compile: bool
    channels_last: bool
    precision: str
    mixed_precision: str
    device: str
    shards: str | None


@dataclass
class TrainResult(Record):
    """One `bench train` run; in the suite also a skipped or failed entry (command and reason only)."""

    command: str
    status: Status = absent("ok")
    reason: str | None = absent()
    date: str | None = absent()
    machine: Machine | None = absent()
    settings: TrainSettings | None = absent()
    setup_seconds: float | None = None
    synthetic: Throughput | None = absent()
    real: Throughput | None = absent()
    efficiency: float | None = absent()
    efficiency_of_medians: float | None = absent()
    max_memory_gib: float | None = absent()
    stopped: str | None = absent()  # stopped by a signal: the rates are those of the blocks timed before it
    kind: str = "train"

    @property
    def measured(self) -> bool:
        return self.status == "ok" and self.settings is not None and self.synthetic is not None


# ---------------------------------------------------------------------- bench suite


@dataclass
class Target(Record):
    target: str
    value: float | None
    met: bool | None
    shortfall: float | None


@dataclass
class SuiteResult(Record):
    command: str
    date: str
    machine: Machine
    data: DataResult
    train: list[TrainResult] = field(default_factory=list)
    wall_seconds: float = 0.0
    load_average_end: list[float] | None = None
    targets: list[Target] = field(default_factory=list)
    kind: str = "suite"


# ---------------------------------------------------------------------- bench resume


@dataclass
class RunRecord(Record):
    """One training process of the resume check."""

    seconds: float | None = None
    returncode: int | None = None
    output_tail: str = ""


@dataclass
class ResumeResult(Record):
    """Kill -9 a training run after a checkpoint, rerun it: did it resume, and (with an
    uninterrupted reference run) are the weights bit-identical?"""

    train_command: str
    device: str
    date: str
    command: str | None = absent()
    ok: bool = False
    reason: str | None = absent()
    killed: bool = False
    epochs: int = 0
    epoch_at_kill: int | None = None
    resumed_after_epoch: int | None = None
    logged_epochs: list[int] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    identical_weights: bool | None = absent()
    differing: list[str] = field(default_factory=list)
    first_run: RunRecord = field(default_factory=RunRecord)
    second_run: RunRecord = field(default_factory=RunRecord)
    uninterrupted_run: RunRecord | None = absent()
    kind: str = "resume"


# ---------------------------------------------------------------------- JSON


def read_record(cls: type[R], path: Path) -> R:
    """A results file read back as its record; a one-line error names the file otherwise."""
    try:
        return cls.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise CxrError(f"{path}: not a readable {cls.__name__} results file ({one_line(error)})") from error


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        out = {}
        for item in fields(value):
            content = getattr(value, item.name)
            if "omitted_when" in item.metadata and content == item.metadata["omitted_when"]:
                continue
            out[item.name] = _plain(content)
        return out
    if isinstance(value, dict):
        return {key: _plain(content) for key, content in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(content) for content in value]
    return value


def _build(cls: type, data: dict) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected an object, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {item.name for item in fields(cls)}
    return cls(**{name: _convert(hints[name], value) for name, value in data.items() if name in known})


def _convert(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        return _convert(options[0], value) if len(options) == 1 else value
    if origin is list:
        return [_convert(typing.get_args(hint)[0], item) for item in value]
    if origin is dict:
        return {key: _convert(typing.get_args(hint)[1], item) for key, item in value.items()}
    if isinstance(hint, type) and is_dataclass(hint):
        return _build(hint, value)
    return value
