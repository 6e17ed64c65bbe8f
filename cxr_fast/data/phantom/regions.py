"""Where the phantom drew each finding: one region file per image (`regions/<dicom_id>.png`).

A 16-bit grayscale PNG the size of the image; bit i of a pixel is set when the i-th finding
of `REGION_FINDINGS` (the painters' order, also written to `regions/legend.json`) changed that
pixel's density by at least REGION_MIN_DENSITY. An image without findings has an all-zero
file. Pneumonia is drawn as Consolidation, so both read the Consolidation bit. The heatmap
check (cxr_fast/explain/pointing.py) reads these to ask whether a model looked at the finding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_fast.data.phantom.drawing import PAINTERS, painter_for
from cxr_fast.io import atomic_path, write_json

REGIONS_FOLDER = "regions"
LEGEND_NAME = "legend.json"
REGION_FINDINGS: tuple[str, ...] = tuple(PAINTERS)


def region_path(root: Path, dicom_id: str) -> Path:
    return Path(root) / f"{dicom_id}.png"


def encode_regions(regions: dict[str, np.ndarray], size: int) -> np.ndarray:
    """The bit-packed (size, size) uint16 array of `regions` (finding -> bool mask)."""
    packed = np.zeros((size, size), dtype=np.uint16)
    for bit, name in enumerate(REGION_FINDINGS):
        if name in regions:
            packed |= regions[name].astype(np.uint16) << np.uint16(bit)
    return packed


def write_regions(path: str | os.PathLike, regions: dict[str, np.ndarray], size: int) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(encode_regions(regions, size)).save(tmp, format="PNG")


def write_legend(root: Path) -> None:
    write_json(Path(root) / LEGEND_NAME, {"bits": {str(bit): name for bit, name in enumerate(REGION_FINDINGS)}})


def finding_mask(path: str | os.PathLike, finding: str) -> np.ndarray | None:
    """The bool mask of `finding` (a CheXpert label or task slug) in one region file; None for a
    finding that draws nothing (No Finding) or a missing file."""
    painter = painter_for(finding)
    if painter is None or not Path(path).is_file():
        return None
    packed = np.asarray(Image.open(path)).astype(np.uint16)
    return (packed >> np.uint16(REGION_FINDINGS.index(painter))) & 1 == 1


def regions_root_of_shards(shards_dir: str | os.PathLike) -> Path | None:
    """The region folder of the phantom a shard folder was built from, if there is one: the
    sharding tool records its `--root` (the phantom's mimic-cxr-jpg folder) in meta.json."""
    try:
        root = json.loads((Path(shards_dir) / "meta.json").read_text())["arguments"]["root"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not root:
        return None
    candidate = Path(root).parent / REGIONS_FOLDER
    return candidate if (candidate / LEGEND_NAME).is_file() else None

