"""Batched on-device augmentation: uint8 [B,1,L,L] in, normalised float [B,1,S,S] out.

Training: random resized crop (area share in [crop_scale_min, 1], aspect ratio within
[1/crop_ratio, crop_ratio]), small rotation, brightness/contrast jitter, no horizontal
flip by default (it would put the heart on the right). Evaluation: centre crop of S from the
stored L = S / eval_crop square, i.e. the classic "resize 256, crop 224".

Random parameters are drawn on the CPU from a generator seeded by (seed, epoch, batch), so
they do not depend on the device or on where a run was resumed. Two kernels share them:
- `affine` (GPU default): crop + rotation in one affine_grid/grid_sample;
- `crop` (CPU default): integer crops gathered by index, then one bilinear resize, no
  rotation. grid_sample on a CPU costs more than decoding the JPEG in the first place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

import torch
import torch.nn.functional as F

from cxr_fast.recipes import Augmentation, Config, load_size

# ImageNet statistics averaged over RGB: pretrained stems summed to one channel expect them.
MEAN = 0.449
STD = 0.226


@dataclass(frozen=True, kw_only=True)
class AugmentSettings(Augmentation):
    """A config's augmentation settings (defaults and meaning: `Augmentation`) at one image size."""

    image_size: int
    """Side of the model input, px."""

    @property
    def load_size(self) -> int:
        """Side of the square each image is stored at on the device."""
        return load_size(self.image_size, self.eval_crop)

    @classmethod
    def from_config(cls, config: Config) -> "AugmentSettings":
        shared = {spec.name: getattr(config, spec.name) for spec in dataclasses.fields(Augmentation)}
        return cls(image_size=config.resolved_image_size, **shared)


@dataclass(frozen=True)
class BatchParams:
    """Per-sample random draws for one batch, as fractions of the stored image."""
    crop_h: torch.Tensor      # crop height / L
    crop_w: torch.Tensor      # crop width / L
    top: torch.Tensor         # crop top / L (0 .. 1 - crop_h)
    left: torch.Tensor
    angle: torch.Tensor       # radians
    brightness: torch.Tensor  # additive, in [0, 1] intensity units
    contrast: torch.Tensor    # multiplicative
    flip: torch.Tensor        # bool

    def to(self, device: torch.device) -> "BatchParams":
        """All parameters onto `device` in one copy (one small transfer per batch, not ten)."""
        if device.type == "cpu":
            return self
        names = [field.name for field in dataclasses.fields(self)]
        stacked = torch.stack([getattr(self, name).to(torch.float64) for name in names])
        moved = stacked.pin_memory().to(device, non_blocking=True)
        return BatchParams(**{name: moved[i].bool() if name == "flip" else moved[i] for i, name in enumerate(names)})


def batch_generator(seed: int, epoch: int, batch: int, rank: int = 0) -> torch.Generator:
    """The generator of one batch's draws: a pure function of (seed, epoch, batch, rank), so
    resumed runs repeat them and every process of a distributed run draws its own."""
    state = np.random.SeedSequence([seed, epoch, batch, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def draw_params(settings: AugmentSettings, batch_size: int, generator: torch.Generator) -> BatchParams:
    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch_size, generator=generator, dtype=torch.float64)

    area = uniform(settings.crop_scale_min, 1.0)
    log_ratio = uniform(-math.log(settings.crop_ratio), math.log(settings.crop_ratio))
    ratio = torch.exp(log_ratio)
    crop_w = torch.sqrt(area * ratio).clamp(max=1.0)
    crop_h = torch.sqrt(area / ratio).clamp(max=1.0)
    return BatchParams(
        crop_h=crop_h, crop_w=crop_w,
        top=uniform(0, 1) * (1 - crop_h), left=uniform(0, 1) * (1 - crop_w),
        angle=uniform(-1, 1) * math.radians(settings.rotate_degrees),
        brightness=uniform(-settings.brightness, settings.brightness),
        contrast=1 + uniform(-settings.contrast, settings.contrast),
        flip=(torch.rand(batch_size, generator=generator) < 0.5) & settings.hflip,
    )


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0,1] float -> model input (float32; autocast picks the compute dtype)."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    return images.sub_(MEAN).div_(STD)


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top:top + size, left:left + size]


def eval_transform(images: torch.Tensor, settings: AugmentSettings) -> torch.Tensor:
    return normalize(centre_crop(images, settings.image_size).contiguous())


def train_transform(images: torch.Tensor, settings: AugmentSettings, params: BatchParams, *, mode: str) -> torch.Tensor:
    if mode == "affine":
        params = params.to(images.device)
        out = _affine_crop(images, settings, params)
    elif mode == "crop":
        out = _integer_crop(images, settings, params)  # reads crop positions on the host
        params = params.to(images.device)
    else:
        raise ValueError(f"unknown augmentation mode {mode!r}")
    return _jitter(out, params)


def default_mode(device: torch.device) -> str:
    return "affine" if device.type == "cuda" else "crop"


def _on(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tensor.to(device=like.device, dtype=torch.float32)


def _affine_crop(images: torch.Tensor, settings: AugmentSettings, params: BatchParams) -> torch.Tensor:
    size = settings.image_size
    batch = images.shape[0]
    # Output pixel (x, y) in [-1, 1] maps to input centre + R(angle) * scale * (x, y).
    scale_x, scale_y = _on(params.crop_w, images), _on(params.crop_h, images)
    centre_x = _on(params.left + params.crop_w / 2, images) * 2 - 1
    centre_y = _on(params.top + params.crop_h / 2, images) * 2 - 1
    cos, sin = torch.cos(_on(params.angle, images)), torch.sin(_on(params.angle, images))
    flip = 1 - 2 * _on(params.flip, images)
    theta = torch.stack([
        torch.stack([cos * scale_x * flip, -sin * scale_y, centre_x], dim=1),
        torch.stack([sin * scale_x * flip, cos * scale_y, centre_y], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [batch, 1, size, size], align_corners=False)
    return F.grid_sample(images.float().div_(255), grid, mode="bilinear", padding_mode="border", align_corners=False)


def _integer_crop(images: torch.Tensor, settings: AugmentSettings, params: BatchParams) -> torch.Tensor:
    # One crop size per batch (its first draw) so the batch resizes in one call; positions
    # and jitter stay per sample. Per-sample slices copy ~10x faster than a fancy-index gather.
    load = images.shape[-1]
    crop_h = max(1, round(float(params.crop_h[0]) * load))
    crop_w = max(1, round(float(params.crop_w[0]) * load))
    top = (params.top / (1 - params.crop_h).clamp(min=1e-9) * (load - crop_h)).round().long().tolist()
    left = (params.left / (1 - params.crop_w).clamp(min=1e-9) * (load - crop_w)).round().long().tolist()
    crops = torch.stack([images[i, :, t:t + crop_h, l:l + crop_w] for i, (t, l) in enumerate(zip(top, left))])
    flip = params.flip.to(images.device)
    if bool(flip.any()):
        crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
    crops = crops.float().div_(255)
    return F.interpolate(crops, size=(settings.image_size, settings.image_size), mode="bilinear", align_corners=False)


def _jitter(images: torch.Tensor, params: BatchParams) -> torch.Tensor:
    """Contrast around each image's mean, brightness, clamp to [0, 1], normalise: in place,
    as few passes over the batch as possible (this is the CPU kernel's main memory cost)."""
    contrast = _on(params.contrast, images)[:, None, None, None]
    brightness = _on(params.brightness, images)[:, None, None, None]
    mean = images.mean(dim=(-2, -1), keepdim=True)
    shift = mean * (1 - contrast) + brightness
    return images.mul_(contrast).add_(shift).clamp_(0, 1).sub_(MEAN).div_(STD)
