"""Recipes: `{task}_{arch}` -> one frozen, typed, validated training config.

Settings compose, later wins:
    Config defaults  <-  recipes/defaults.yaml  <-  the arch's settings (cxr_fast/models.py)
      <-  recipes/tasks.yaml[task]  <-  recipes/<recipe>.yaml  <-  `key=value` arguments
An unknown key, a value of the wrong type or out of range, or an unknown recipe is a
one-line CxrError naming it. Each setting is declared once, below, with its type (a
`Literal` lists its allowed values), its range (`setting(..., at_least=...)`) and what it means.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from cxr_fast.errors import CxrError, one_line
from cxr_fast.models import ARCHS, get_arch
from cxr_fast.tasks import TASKS, task_name

RECIPES_DIR = Path(os.environ.get("CXR_FAST_RECIPES", Path(__file__).resolve().parents[1] / "recipes"))


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric setting; `also` are special values outside it (0: automatic)."""

    above: float | None = None
    at_least: float | None = None
    at_most: float | None = None
    also: tuple[float, ...] = ()

    def allows(self, value: float) -> bool:
        if value in self.also:
            return True
        return ((self.above is None or value > self.above) and (self.at_least is None or value >= self.at_least)
                and (self.at_most is None or value <= self.at_most))

    def describe(self) -> str:
        if self.above is not None and self.at_most is not None:
            text = f"in ({self.above:g}, {self.at_most:g}]"
        elif self.at_least is not None and self.at_most is not None:
            text = f"in [{self.at_least:g}, {self.at_most:g}]"
        else:
            text = f"> {self.above:g}" if self.above is not None else f">= {self.at_least:g}"
        return text + "".join(f" (or {value:g})" for value in self.also)


def setting(default: Any, *, above: float | None = None, at_least: float | None = None,
            at_most: float | None = None, also: tuple[float, ...] = ()) -> Any:
    """A field with a default and its allowed range, which `validate` enforces."""
    return field(default=default, metadata={"bounds": Bounds(above, at_least, at_most, also)})


@dataclass(frozen=True, kw_only=True)
class Augmentation:
    """Training augmentation (the same semantics in both loaders) and the evaluation crop.

    The loaders' `AugmentSettings` is this plus the image size, so these defaults exist once.
    """

    crop_scale_min: float = setting(0.6, above=0, at_most=1)
    """Random resized crop: the crop's share of the image area is drawn from [crop_scale_min, 1]."""
    crop_ratio: float = setting(1.15, at_least=1)
    """Random resized crop: the aspect ratio is drawn from [1/crop_ratio, crop_ratio]."""
    rotate_degrees: float = setting(7.0, at_least=0)
    """Rotation drawn from [-rotate_degrees, rotate_degrees] (the `affine` kernel only)."""
    brightness: float = setting(0.1, at_least=0)
    """Additive brightness jitter, in [0, 1] intensity units."""
    contrast: float = setting(0.1, at_least=0)
    """Multiplicative contrast jitter around each image's mean: 1 +- contrast."""
    hflip: bool = False
    """Random horizontal flip; off because a flip moves the heart to the other side."""
    eval_crop: float = setting(0.875, above=0, at_most=1)
    """Evaluation: resize to image_size / eval_crop, then centre-crop image_size ("resize 256, crop 224")."""


@dataclass(frozen=True, kw_only=True)
class Config(Augmentation):
    """Everything one training run depends on, resolved from the recipe layers."""

    recipe: str
    """`{task}_{arch}`; sets `task` and `arch`, which are not settings."""
    task: str
    arch: str
    # ------------------------------------------------------------------ data
    shards: str = "shards/phantom,shards/phantom-448"
    """Folder(s) of shards and manifest.parquet (tools/shard_dataset.py writes them): one cohort
    at several sizes, comma-separated; a run reads the smallest stored at >= its load size."""
    loader: Literal["auto", "resident", "host", "dali"] = "auto"
    """`resident`: decoded images kept on the device; `host`: kept in host memory (the mapped
    decoded cache), each batch copied to the device; `dali`: streamed from the shards; `auto`:
    the first that fits (device budget, then host memory, then DALI), else a refusal before
    any decoding. Several processes use the main process's choice."""
    decoded_cache: Literal["on", "off", "verify"] = "on"
    """`on`: a split is decoded once into `<shards>/decoded/<load>px-<digest>.u8` and every later
    run maps it (size, header and a few block checksums checked on each open); `verify`: also
    checks every block's checksum (a full read of the file); `off`: decode for this run only."""
    image_size: int = setting(0, at_least=32, also=(0,))
    """Model input side in px; 0: the arch's native size. Below 32 px nothing is left to learn."""
    batch_size: int = setting(0, at_least=0)
    """Per-device batch size; 0: the arch's default."""
    device_memory_budget: float = setting(0.5, above=0, at_most=1)
    """`loader=auto`: the share of device memory the resident loader may use, of what is left once
    the model is on the device and its gradients, AdamW state (3 x the parameter bytes) and one
    batch's activations (measured on CUDA, estimated on a CPU) are set aside."""
    decode_threads: int = setting(0, at_least=0)
    """JPEG decoding threads; 0: this process's share of its cores, capped (loading/workers.py)."""
    # ------------------------------------------------------------------ optimisation
    epochs: int = setting(500, above=0)
    """Epochs of balanced sampling (the majority downsampled to the minority each epoch)."""
    lr: float = setting(1e-4, above=0)
    """Peak learning rate (AdamW), reached after warm-up; see `lr_scaling` for several processes."""
    lr_scaling: Literal["none", "linear"] = "none"
    """How `lr` follows the number of processes. `none` (the study): `lr` as given, whatever the
    process count, although the global batch is batch_size x processes x grad_accum.
    `linear`: lr x number of processes (the linear scaling rule for a larger global batch)."""
    weight_decay: float = setting(0.05, at_least=0)
    """AdamW weight decay."""
    warmup_epochs: float = setting(1.0, at_least=0)
    """Linear warm-up length, in epochs."""
    min_lr_ratio: float = setting(0.01, at_least=0, at_most=1)
    """Cosine decay floor as a share of `lr`."""
    grad_accum: int = setting(1, above=0)
    """Batches per optimiser step."""
    clip_grad: float = setting(1.0, at_least=0)
    """Gradient norm clipping; 0: no clipping."""
    early_stopping: int = setting(0, at_least=0)
    """Patience: validations without a better validation balanced accuracy; 0: off."""
    val_every: int = setting(1, above=0)
    """Epochs between validations (1, the study's protocol: every epoch). The final epoch is
    always validated; a larger value trades the resolution of best-epoch selection (and of
    early stopping, which counts validations) for time (`sweep --plan` shows the effect)."""
    max_steps_per_epoch: int = setting(0, at_least=0)
    """Cap on steps per epoch (benchmarks and smoke tests); 0: the whole balanced epoch."""
    # ------------------------------------------------------------------ numerics and speed
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Autocast dtype; `auto`: bf16 where supported, else fp32."""
    channels_last: bool = True
    """Memory format of the model and batches on CUDA."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile; `auto`: on for CUDA."""
    deterministic: bool = False
    """Deterministic kernels (slower): a resumed run matches an uninterrupted one bit for bit."""
    seed: int = setting(0, at_least=0)
    """Seeds the model initialisation, the epoch lists and the augmentation draws."""
    # ------------------------------------------------------------------ model
    pretrained: bool = True
    """Start from the arch's pretrained weights (Hugging Face hub)."""
    pretrained_file: str = ""
    """Local .safetensors/.pth weights to start from instead of the hub."""
    # ------------------------------------------------------------------ outputs
    weights_dir: str = "weights"
    """Checkpoints and best weights go to `weights_dir/<recipe>/`."""
    runs_dir: str = "runs"
    """Metrics logs go to `runs_dir/<recipe>/`."""
    logger: Literal["wandb", "none"] = "wandb"
    """`wandb` logs offline without a login; `none`: metrics.jsonl only."""
    wandb_project: str = "cxr_fast"
    """W&B project name."""
    checkpoint_every: int = setting(0, at_least=0)
    """Epochs between resume checkpoints (`last.pt`, weights + AdamW: ~3.6 GB for beit_large);
    the final epoch and an early stop are always saved. 0: automatic, skip a save while less
    than 20 x the previous save's duration has passed since it (saving stays under ~5% of the
    run). A resume redoes the epochs after the last save."""
    log_every: int = setting(50, above=0)
    """Steps between progress updates (the only host syncs)."""
    restart: bool = False
    """A saved run of the recipe with other settings is discarded and training starts over
    (instead of being refused); a saved run with the same settings resumes as usual."""

    @property
    def resolved_image_size(self) -> int:
        return self.image_size or get_arch(self.arch).image_size

    @property
    def resolved_batch_size(self) -> int:
        return self.batch_size or get_arch(self.arch).batch_size

    def with_arch_defaults(self) -> "Config":
        """The settings the run uses: `image_size` and `batch_size` 0 (the arch's) filled in."""
        return dataclasses.replace(self, image_size=self.resolved_image_size, batch_size=self.resolved_batch_size)

    @property
    def resolved_load_size(self) -> int:
        """Side each image is loaded at (the evaluation resize before its centre crop): what
        the shard folder read must store at least."""
        return load_size(self.resolved_image_size, self.eval_crop)

    @property
    def weights_path(self) -> Path:
        return Path(self.weights_dir) / self.recipe

    @property
    def run_path(self) -> Path:
        return Path(self.runs_dir) / self.recipe

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {key: values[key] for key in (*_IDENTITY, *values)}  # the recipe first, for readers


_FIELDS = {field.name: field for field in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)
_IDENTITY = ("recipe", "task", "arch")


def load_size(image_size: int, eval_crop: float) -> int:
    """Side of the square an image is loaded at: image_size / eval_crop ("resize 256, crop 224")."""
    return max(image_size, round(image_size / eval_crop))


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
    raise CxrError(f"unknown recipe {recipe!r}; `python -m cxr_fast.train --list` lists the study's, "
                   f"`--list PATTERN` searches every recipe, the CPU-sized test_* ones too (e.g. --list '*test*')")


def recipe_from_legacy(label_index: str, arch: str) -> str:
    """The original CLI: `<label_index> <arch>` (e.g. `0 resnet50`)."""
    return recipe_name(task_name(label_index), get_arch(arch).slug)


def load_config(recipe: str, overrides: Mapping[str, Any] | list[str] = (), *, recipes_dir: Path | None = None) -> Config:
    task, arch = split_recipe(recipe)
    folder = Path(recipes_dir or RECIPES_DIR)
    if (folder / "archs.yaml").exists():
        raise CxrError(f"{folder / 'archs.yaml'}: per-arch settings live in cxr_fast/models.py (Arch.settings); "
                       "put per-recipe changes in <recipe>.yaml")
    layers: list[tuple[str, Mapping[str, Any]]] = [
        (str(folder / "defaults.yaml"), _read_yaml(folder / "defaults.yaml")),
        (f"cxr_fast/models.py[{arch}]", get_arch(arch).settings),
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
    kind = _base_type(_TYPES[key])
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


def _base_type(kind: Any) -> type:
    """`Literal["a", "b"]` -> str; other types as they are."""
    return type(typing.get_args(kind)[0]) if typing.get_origin(kind) is Literal else kind


def validate(config: Config) -> Config:
    """Every value within its field's allowed values, range and finite: else one line naming the key."""
    for key, spec in _FIELDS.items():
        value, kind = getattr(config, key), _TYPES[key]
        if typing.get_origin(kind) is Literal and value not in typing.get_args(kind):
            raise CxrError(f"setting {key!r} must be one of {', '.join(typing.get_args(kind))}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise CxrError(f"setting {key!r} must be a finite number, got {value!r}")
        bounds = spec.metadata.get("bounds")
        if bounds is not None and not bounds.allows(value):
            raise CxrError(f"setting {key!r} must be {bounds.describe()}, got {value!r}")
    return config
