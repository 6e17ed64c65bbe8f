"""A recipe's floor: model FLOPs per image over the device's peak, shown by `sweep --plan`.

The forward pass is counted once per (arch, image size) with `torch.utils.flop_counter` on the
meta device (shapes only: no memory, no arithmetic, ~1 s per arch); a training image costs the
forward plus a backward of twice its FLOPs (the usual estimate: gradients for the activations
and for the weights). The counter's own backward count is not used: for grouped convolutions
(ConvNeXt's depthwise 7x7) it counts 8.9x the forward, several times what the backward does.
"""

from __future__ import annotations

import functools

BACKWARD_PER_FORWARD = 2.0
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a part of the CUDA device name; the
# first match wins, so the specific names come before the family.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_flops(device_name: str | None) -> float | None:
    """The device's dense bf16 peak in FLOP/s, None for a CPU or a device not in the table."""
    if not device_name:
        return None
    return next((tflops * 1e12 for part, tflops in PEAK_BF16_TFLOPS if part in device_name), None)


@functools.lru_cache(maxsize=None)
def forward_flops(arch: str, image_size: int) -> int:
    """FLOPs of one image's forward pass through the arch at `image_size` px."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cxr_fast.models import build_model

    with torch.device("meta"):
        model = build_model(arch, pretrained=False, image_size=image_size).eval()
        image = torch.zeros(1, 1, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    return int(counter.get_total_flops())


def training_flops(arch: str, image_size: int) -> int:
    """FLOPs of one image's forward and backward pass."""
    return int(forward_flops(arch, image_size) * (1 + BACKWARD_PER_FORWARD))
