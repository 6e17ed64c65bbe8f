"""Do the heatmaps point at the finding? Scored against the phantom's drawn regions.

Per image with a drawn region (a positive of the task): `hit` = the heatmap's maximum lies
inside the region; `mass` = the share of the heatmap's total inside it; `share` = the region's
share of the image, which is what both are worth by chance (a heatmap that knows nothing puts
its maximum, and its mass, anywhere). A flat heatmap (no maximum) scores its chance value.
"""

from __future__ import annotations

import numpy as np


def image_scores(heatmap: np.ndarray, region: np.ndarray) -> tuple[float, float, float]:
    """(hit, mass inside, region share) of one heatmap against one bool region of its shape."""
    if heatmap.shape != region.shape:
        raise ValueError(f"heatmap {heatmap.shape} and region {region.shape} differ in shape")
    share = float(region.mean())
    total = float(heatmap.sum())
    if not np.isfinite(total) or total <= 0 or float(heatmap.max()) == float(heatmap.min()):
        return share, share, share
    hit = float(region.flat[int(np.argmax(heatmap))])
    return hit, float(heatmap[region].sum()) / total, share


def pointing_score(heatmaps: list[np.ndarray], regions: list[np.ndarray]) -> dict[str, float]:
    """The mean scores over images whose region is not empty: pointing hit rate against its
    chance (the mean region share), and heatmap mass inside against the same chance."""
    scores = np.array([image_scores(h, r) for h, r in zip(heatmaps, regions) if r.any()], dtype=float).reshape(-1, 3)
    n = len(scores)
    hit, mass, share = scores.mean(axis=0) if n else (np.nan, np.nan, np.nan)
    return {"n_images": n, "hit_rate": float(hit), "mass_inside": float(mass), "chance": float(share)}


def crop_window(array: np.ndarray, size: int) -> np.ndarray:
    """The centred size x size window of a square array: the part of the stored square the model saw."""
    side = array.shape[-1]
    top = (array.shape[-2] - size) // 2
    left = (side - size) // 2
    return array[..., top:top + size, left:left + size]


# "Clearly better than chance": the maximum inside the finding this much more often than the
# region's share, and this many times the share of heatmap mass inside it.
HIT_MARGIN = 0.25
MASS_RATIO = 1.25


def beats_chance(score: dict[str, float]) -> bool:
    return (score["hit_rate"] >= score["chance"] + HIT_MARGIN and score["mass_inside"] >= MASS_RATIO * score["chance"])
