"""What the `resident` and `host` loaders share: the split's stored uint8 rows come to the
device in batches (each tier its own way), and are augmented there with the draws of
(seed, epoch, batch, rank), so the two tiers give the same batches for the same seed."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from cxr_fast.loading.augment import (AugmentSettings, batch_generator, default_mode, draw_params, eval_transform,
                                      train_transform)


class SplitLoader:
    """Augmented batches of one split on `device`; a tier supplies `stored_batches`."""

    name = ""

    def __init__(self, settings: AugmentSettings, *, device: torch.device, batch_size: int, seed: int = 0,
                 rank: int = 0, mode: str | None = None):
        self.settings = settings
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank  # augmentation draws differ per process
        self.mode = mode or default_mode(self.device)

    def stored_batches(self, indices: np.ndarray, starts: range) -> Iterator[torch.Tensor]:
        """uint8 [B, 1, L, L] on the device: the rows indices[start:start + batch_size] as stored."""
        raise NotImplementedError

    def train_batches(self, indices: np.ndarray, *, epoch: int) -> Iterator[torch.Tensor]:
        """Augmented batches of `indices` (full batches only: a ragged tail would retrace compile)."""
        starts = range(0, len(indices) - self.batch_size + 1, self.batch_size)
        for number, batch in enumerate(self.stored_batches(indices, starts)):
            params = draw_params(self.settings, len(batch), batch_generator(self.seed, epoch, number, self.rank))
            yield train_transform(batch, self.settings, params, mode=self.mode)

    def eval_batches(self, indices: np.ndarray) -> Iterator[torch.Tensor]:
        for batch in self.stored_batches(indices, range(0, len(indices), self.batch_size)):
            yield eval_transform(batch, self.settings)
