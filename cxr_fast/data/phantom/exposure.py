"""From drawn density to an 8-bit film: the planted hardness noise and the exposure (`expose`)."""

from __future__ import annotations

import numpy as np
from PIL import Image

# In a harder image every finding gets blotchy noise of this sd inside it (drawing.py lowers its contrast).
FINDING_NOISE_SD_WHEN_HARD = 0.15


def finding_noise(rng: np.random.Generator, drawn: np.ndarray) -> np.ndarray:
    """Blotchy noise (grain 1/16 of the image) confined to where findings were drawn.

    Coarse grain on purpose: pixel-level noise would average away when models downsample.
    """
    size = drawn.shape[0]
    coarse = rng.standard_normal((16, 16), dtype=np.float32) * np.float32(FINDING_NOISE_SD_WHEN_HARD)
    grain = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR))
    return grain * np.minimum(np.abs(drawn) * np.float32(1 / 0.12), 1.0)


def expose(rng: np.random.Generator, density: np.ndarray) -> np.ndarray:
    """Window, heel-effect gradient, gamma and quantum noise, then 8 bits."""
    size = density.shape[0]
    low, high = rng.uniform(-0.02, 0.06), rng.uniform(0.82, 1.0)
    gain = np.float32(255 / (high - low))
    gradient = (rng.uniform(-0.06, 0.06) * 255) * (np.arange(size, dtype=np.float32) / size - 0.5)
    noise_sd = rng.uniform(0.008, 0.03)
    gamma = rng.uniform(0.8, 1.25)
    scaled = rng.standard_normal((size, size), dtype=np.float32)
    scaled *= np.float32(noise_sd * 255)  # in place: this runs on every pixel of every image
    scaled += (density - np.float32(low)) * gain
    scaled += gradient[None, :] + np.float32(0.5)  # + 0.5: round, not truncate
    np.clip(scaled, 0, 255, out=scaled)
    curve = np.clip(np.rint(255 * (np.arange(256) / 255) ** gamma), 0, 255).astype(np.uint8)
    return curve[scaled.astype(np.uint8)]

