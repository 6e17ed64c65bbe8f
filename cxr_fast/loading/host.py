"""The `host` loader: the split stays in host memory (the mapped decoded cache), batches travel.

For splits that do not fit the device beside the model (448 px MIMIC) but fit the host. Each
batch's rows are gathered from the cache into pinned memory on a background thread, one batch
ahead, copied to the device without blocking, and augmented there exactly as `resident` does,
with the same draws: for the same seed, `host` and `resident` give the same batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from cxr_fast.loading.augment import AugmentSettings
from cxr_fast.loading.decoded import host_images
from cxr_fast.loading.prefetch import Prefetched
from cxr_fast.loading.split_loader import SplitLoader

PREFETCH_BATCHES = 1  # one batch gathered ahead: its copy overlaps the step


class HostLoader(SplitLoader):
    """Batches of one split, gathered from host memory and augmented on `device`."""

    name = "host"

    def __init__(self, rows: pd.DataFrame, shards_dir: Path, settings: AugmentSettings, *,
                 device: torch.device, batch_size: int, seed: int = 0, rank: int = 0, threads: int = 0,
                 mode: str | None = None, cache: str = "on"):
        super().__init__(settings, device=device, batch_size=batch_size, seed=seed, rank=rank, mode=mode)
        self.images = host_images(rows, shards_dir, settings.load_size, device=self.device, threads=threads,
                                  cache=cache)

    def __len__(self) -> int:
        return len(self.images)

    def stored_batches(self, indices: np.ndarray, starts: range) -> Iterator[torch.Tensor]:
        indices = np.asarray(indices)
        gathered = Prefetched((self._gather(indices[start:start + self.batch_size]) for start in starts),
                              depth=PREFETCH_BATCHES, name="host-gather")
        try:
            for batch in gathered:
                yield batch.to(self.device, non_blocking=True)
        finally:
            gathered.close()

    def _gather(self, indices: np.ndarray) -> torch.Tensor:
        size = self.images.load_size
        # Pinned on CUDA so the copy is asynchronous; torch's pinned-memory cache keeps a
        # buffer until the copy that reads it is done.
        batch = torch.empty((len(indices), 1, size, size), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        self.images.gather(indices, out=batch.numpy())
        return batch
