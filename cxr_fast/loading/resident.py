"""The `resident` loader: a split as one uint8 tensor on the training device.

The tensor is filled from the decoded cache (loading/decoded.py: decoded once per shard set
and load size, then read by every run), or decoded here with decode_rows when
decoded_cache=off. Each batch is then an index gather plus batched augmentation on the
device: no per-epoch decode, no worker processes, no host->device copies after start-up.

Per-GPU memory is rows x L x L bytes. MIMIC-CXR's ~240k frontal images give a train+val
split of ~192k (80 %): 12.6 GB at 256 px (224 px models), 38.5 GB at 448 px; a 384 px model
loads 439 px, 37.0 GB. 256 px fits an H100 beside any study model; 448 px often does not,
and `loader=auto` then keeps the split on the host (loading/host.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from cxr_fast.loading.augment import AugmentSettings
from cxr_fast.loading.decode import decode_rows
from cxr_fast.loading.decoded import HostImages, host_images
from cxr_fast.loading.split_loader import SplitLoader


class ResidentLoader(SplitLoader):
    """Batches of one split, from images decoded once onto `device`."""

    name = "resident"

    def __init__(self, rows: pd.DataFrame, shards_dir: Path, settings: AugmentSettings, *,
                 device: torch.device, batch_size: int, seed: int = 0, rank: int = 0, threads: int = 0,
                 mode: str | None = None, cache: str = "on"):
        super().__init__(settings, device=device, batch_size=batch_size, seed=seed, rank=rank, mode=mode)
        self.positions: torch.Tensor | None = None  # split row i is images[positions[i]] (None: images[i])
        if cache == "off":
            self.images = decode_rows(rows, shards_dir, settings.load_size, self.device, threads)
            return
        split = host_images(rows, shards_dir, settings.load_size, device=self.device, threads=threads, cache=cache)
        if self.device.type == "cpu":
            # On a CPU the device is the host: the mapped cache is in its memory already, shared
            # with every other process, and a private copy would cost more than the whole warm
            # start-up (fresh pages). Rows are looked up through `positions`.
            self.images, self.positions = torch.from_numpy(split.source), torch.from_numpy(split.positions)
        else:
            self.images = to_device(split, self.device)

    def __len__(self) -> int:
        return self.images.shape[0] if self.positions is None else len(self.positions)

    def stored(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 [len(index), 1, L, L]: the split's rows `index` as stored, before any transform."""
        return self.images.index_select(0, index if self.positions is None else self.positions[index])

    def stored_batches(self, indices: np.ndarray, starts: range) -> Iterator[torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        for start in starts:
            yield self.stored(index[start:start + self.batch_size])


def to_device(images: HostImages, device: torch.device, chunk_rows: int = 4096) -> torch.Tensor:
    """The split as one tensor on `device`, copied a chunk at a time through host memory (no
    second full copy of the split on the host)."""
    size = images.load_size
    out = torch.empty((len(images), 1, size, size), dtype=torch.uint8, device=device)
    for start in range(0, len(images), chunk_rows):
        stop = min(start + chunk_rows, len(images))
        out[start:stop].copy_(torch.from_numpy(images.gather(np.arange(start, stop))))
    return out
