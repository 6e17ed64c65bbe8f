"""Recipes: `{task}_{arch}` -> one frozen, typed, validated training config.

Settings compose, later wins:
    Config defaults  <-  recipes/defaults.yaml  <-  recipes/archs.yaml[arch]
      <-  recipes/tasks.yaml[task]  <-  recipes/<recipe>.yaml  <-  `key=value` arguments
An unknown key, a value of the wrong type or an unknown recipe is a CxrError naming it.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from cxr_fast.errors import CxrError, one_line
from cxr_fast.models import ARCHS, get_arch
from cxr_fast.tasks import TASKS, task_name

RECIPES_DIR = Path(os.environ.get("CXR_FAST_RECIPES", Path(__file__).resolve().parents[1] / "recipes"))


@dataclass(frozen=True)
class Config:
    recipe: str
    task: str
    arch: str
    # data
    shards: str = "shards/phantom"
    loader: str = "auto"              # auto | resident | dali
    image_size: int = 0               # 0: the arch's native size
    batch_size: int = 0               # 0: the arch's default
    device_memory_budget: float = 0.5  # share of device memory `auto` lets the resident loader use
    decode_threads: int = 0           # 0: all cores
    # augmentation (the same semantics in both loaders)
    crop_scale_min: float = 0.6       # random resized crop: area share in [min, 1]
    crop_ratio: float = 1.15          # aspect ratio within [1/r, r]
    rotate_degrees: float = 7.0
    brightness: float = 0.1
    contrast: float = 0.1
    hflip: bool = False               # off: a flip moves the heart to the other side
    eval_crop: float = 0.875          # eval: resize to image_size / eval_crop, centre crop
    # optimisation
    epochs: int = 500
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    grad_accum: int = 1
    clip_grad: float = 1.0            # 0: no clipping
    early_stopping: int = 0           # patience in epochs without a better val balanced accuracy; 0: off
    max_steps_per_epoch: int = 0      # 0: the whole balanced epoch (benchmarks and smoke tests cap it)
    # numerics and speed
    precision: str = "auto"           # auto | bf16 | fp16 | fp32
    channels_last: bool = True
    compile: str = "auto"             # auto (on for CUDA) | on | off
    deterministic: bool = False
    seed: int = 0
    # model
    pretrained: bool = True
    pretrained_file: str = ""
    # outputs
    weights_dir: str = "weights"
    runs_dir: str = "runs"
    logger: str = "wandb"             # wandb (offline without a login) | none
    wandb_project: str = "cxr_fast"
    log_every: int = 50               # steps between progress updates (the only host syncs)

    @property
    def resolved_image_size(self) -> int:
        return self.image_size or get_arch(self.arch).image_size

    @property
    def resolved_batch_size(self) -> int:
        return self.batch_size or get_arch(self.arch).batch_size

    @property
    def weights_path(self) -> Path:
        return Path(self.weights_dir) / self.recipe

    @property
    def run_path(self) -> Path:
        return Path(self.runs_dir) / self.recipe

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "loader": ("auto", "resident", "dali"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "compile": ("auto", "on", "off"),
    "logger": ("wandb", "none"),
}
_FIELDS = {field.name: field for field in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)
_IDENTITY = ("recipe", "task", "arch")


def recipe_name(task: str, arch: str) -> str:
    return f"{task}_{arch}"


def all_recipes(*, study_only: bool = False) -> list[str]:
    return [recipe_name(task, slug) for slug, arch in ARCHS.items() if arch.study or not study_only for task in TASKS]


def split_recipe(recipe: str) -> tuple[str, str]:
    """`effusion_convnext_large` -> (`effusion`, `convnext_large`); tasks never share a prefix."""
    for task in sorted(TASKS, key=len, reverse=True):
        prefix = f"{task}_"
        if recipe.startswith(prefix) and recipe[len(prefix):] in ARCHS:
            return task, recipe[len(prefix):]
    raise CxrError(f"unknown recipe {recipe!r}; `python -m cxr_fast.train --list` lists them")


def recipe_from_legacy(label_index: str, arch: str) -> str:
    """The original CLI: `<label_index> <arch>` (e.g. `0 resnet50`)."""
    return recipe_name(task_name(label_index), get_arch(arch).slug)


def load_config(recipe: str, overrides: Mapping[str, Any] | list[str] = (), *, recipes_dir: Path | None = None) -> Config:
    task, arch = split_recipe(recipe)
    folder = Path(recipes_dir or RECIPES_DIR)
    layers: list[tuple[str, Mapping[str, Any]]] = [
        (str(folder / "defaults.yaml"), _read_yaml(folder / "defaults.yaml")),
        (f"{folder / 'archs.yaml'}[{arch}]", _read_yaml(folder / "archs.yaml").get(arch) or {}),
        (f"{folder / 'tasks.yaml'}[{task}]", _read_yaml(folder / "tasks.yaml").get(task) or {}),
        (str(folder / f"{recipe}.yaml"), _read_yaml(folder / f"{recipe}.yaml")),
        ("command line", parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)),
    ]
    values: dict[str, Any] = {}
    for origin, layer in layers:
        for key, value in layer.items():
            values[key] = _coerce(key, value, origin)
    return validate(Config(recipe=recipe, task=task, arch=arch, **values))


def parse_overrides(items: list[str]) -> dict[str, str]:
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CxrError(f"argument {item!r}: expected key=value")
        parsed[key.strip().replace("-", "_")] = value.strip()
    return parsed


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise CxrError(f"{path}: not valid YAML ({one_line(error)})") from error
    if not isinstance(data, dict):
        raise CxrError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data



def _coerce(key: str, value: Any, origin: str) -> Any:
    if key in _IDENTITY:
        raise CxrError(f"{origin}: {key!r} is set by the recipe name, not a setting")
    if key not in _FIELDS:
        raise CxrError(f"{origin}: unknown setting {key!r}")
    kind = _TYPES[key]
    try:
        if kind is bool:
            return _to_bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise CxrError(f"{origin}: setting {key!r} expects {kind.__name__}, got {value!r}") from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def validate(config: Config) -> Config:
    for key, allowed in CHOICES.items():
        if getattr(config, key) not in allowed:
            raise CxrError(f"setting {key!r} must be one of {', '.join(allowed)}, got {getattr(config, key)!r}")
    positive = ("epochs", "lr", "grad_accum", "log_every")
    for key in positive:
        if getattr(config, key) <= 0:
            raise CxrError(f"setting {key!r} must be > 0, got {getattr(config, key)!r}")
    non_negative = ("image_size", "batch_size", "weight_decay", "warmup_epochs", "clip_grad", "early_stopping",
                    "max_steps_per_epoch", "rotate_degrees", "brightness", "contrast", "decode_threads")
    for key in non_negative:
        if getattr(config, key) < 0:
            raise CxrError(f"setting {key!r} must be >= 0, got {getattr(config, key)!r}")
    if not 0 < config.crop_scale_min <= 1:
        raise CxrError(f"setting 'crop_scale_min' must be in (0, 1], got {config.crop_scale_min}")
    if not 0 < config.eval_crop <= 1:
        raise CxrError(f"setting 'eval_crop' must be in (0, 1], got {config.eval_crop}")
    if config.crop_ratio < 1:
        raise CxrError(f"setting 'crop_ratio' must be >= 1, got {config.crop_ratio}")
    if not 0 < config.device_memory_budget <= 1:
        raise CxrError(f"setting 'device_memory_budget' must be in (0, 1], got {config.device_memory_budget}")
    return config
