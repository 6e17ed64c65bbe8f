"""Grad-CAM heatmaps for any study arch (pytorch-grad-cam), CNN or token model.

Which layer: timm describes every model's feature stages (`model.feature_info`: module name,
channels, reduction). We explain the deepest stage whose map is at least MIN_GRID cells a
side at the model's input size: the last stage at study sizes (7 x 7 at 224 px, Grad-CAM's
usual layer), an earlier, 8 x 8 one for the demo's 64 px nets. Measured on the demo's models
(DECISIONS.md): at 4 x 4 a cell is a quarter of the image's width, its upsampled maximum lands
at the cell's centre, and edema_test_resnet's maximum fell inside the drawn edema on 12% of
positives against 21% by chance; at 8 x 8 on 65%.
Models that pool a class token (ViT, DeiT 3) read nothing from the patch tokens after the
last block's attention, so their gradient there is zero: for them the last block's input
norm is explained instead (pytorch-grad-cam's own recipe for ViTs).

Reshaping: a stage's output is NCHW (CNNs, MobileViT), NHWC (Swin) or tokens (B, N, C)
(ViT, DeiT 3, BEiT, Mixer, ResMLP, LeViT, EfficientFormer). Tokens are laid back on their
grid of ceil(H / reduction) x ceil(W / reduction) cells after dropping the prefix (class,
distillation) tokens in front; `Unexplainable` names a model whose output fits none of these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cxr_fast.errors import CxrError

MIN_GRID = 7


class Unexplainable(CxrError):
    """This model's layers cannot be laid out as a map (the message names the arch and why)."""


@dataclass(frozen=True)
class Layer:
    name: str            # module path inside the model
    channels: int
    grid: tuple[int, int]  # cells (rows, columns) at the explained input size


def _stages(model: torch.nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    if not info:
        raise Unexplainable(f"{type(model).__name__}: no feature_info (not a timm model?), no layer to explain")
    return [dict(entry) for entry in info]


def choose_layer(model: torch.nn.Module, size: int) -> Layer:
    """The layer to explain for a square input of `size` px (see the module docstring)."""
    stages = _stages(model)
    grids = [math.ceil(size / int(stage["reduction"])) for stage in stages]
    # Where no stage reaches MIN_GRID (LeViT at 64 px: 4, 2, 1 cells), the finest there is.
    fine = [i for i, grid in enumerate(grids) if grid >= min(MIN_GRID, max(grids))]
    # Stages of one grid (a ViT's blocks) are equally fine: the deepest of them is explained.
    index = fine[-1]
    name = stages[index]["module"]
    if getattr(model, "global_pool", None) == "token" and index == len(stages) - 1:
        blocks = getattr(model, "blocks", None)
        if blocks is not None and hasattr(blocks[-1], "norm1"):
            name = f"blocks.{len(blocks) - 1}.norm1"
    return Layer(name=name, channels=int(stages[index]["num_chs"]), grid=(grids[index], grids[index]))


def to_map(activation: torch.Tensor, layer: Layer) -> torch.Tensor:
    """A layer's output (or its gradient) as a (B, C, rows, columns) map."""
    rows, columns = layer.grid
    if activation.dim() == 4:
        if activation.shape[1] == layer.channels:
            return activation
        if activation.shape[-1] == layer.channels:  # NHWC (Swin)
            return activation.permute(0, 3, 1, 2)
    if activation.dim() == 3 and activation.shape[-1] == layer.channels:
        prefix = activation.shape[1] - rows * columns
        if prefix >= 0:
            tokens = activation[:, prefix:, :]
            return tokens.reshape(activation.shape[0], rows, columns, layer.channels).permute(0, 3, 1, 2)
    raise Unexplainable(f"layer {layer.name}: output of shape {tuple(activation.shape)} is not a map of "
                        f"{layer.channels} channels on a {rows} x {columns} grid")


class Explainer:
    """Grad-CAM of a one-logit model: `heatmaps(batch)` -> (B, H, W) float32 in [0, 1], the
    evidence for the positive class at each input pixel (each map scaled to its own max)."""

    def __init__(self, model: torch.nn.Module, size: int, arch: str = "") -> None:
        from pytorch_grad_cam import GradCAM

        self.arch = arch or type(model).__name__
        try:
            self.layer = choose_layer(model, size)
            target = model.get_submodule(self.layer.name)
        except (Unexplainable, AttributeError) as error:
            raise Unexplainable(f"{self.arch}: cannot be explained ({error})") from None
        self.cam = GradCAM(model=model, target_layers=[target], reshape_transform=lambda x: to_map(x, self.layer))

    def heatmaps(self, batch: torch.Tensor) -> np.ndarray:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        targets = [ClassifierOutputTarget(0)] * len(batch)
        try:
            maps = self.cam(input_tensor=batch, targets=targets)
        except Unexplainable as error:
            raise Unexplainable(f"{self.arch}: cannot be explained ({error})") from None
        return np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0)
