"""Class-balanced epoch lists: a pure function of (seed, epoch), split evenly across ranks.

Each epoch holds every minority image plus an equally large random subset of the majority,
shuffled. Because nothing but (seed, epoch) feeds the draw, a resumed or distributed run
sees exactly the images an uninterrupted single-process run would.
"""

from __future__ import annotations

import numpy as np


def balanced_epoch(labels: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
    """Indices into `labels` (0/1, no NaN) for one epoch: all minority + same-size majority sample."""
    labels = np.asarray(labels)
    positives = np.flatnonzero(labels == 1)
    negatives = np.flatnonzero(labels == 0)
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError("a balanced epoch needs both classes in the training pool")
    minority, majority = sorted((positives, negatives), key=len)
    rng = np.random.default_rng([seed, epoch])
    chosen = rng.choice(majority, size=len(minority), replace=False)
    epoch_list = np.concatenate([minority, chosen])
    rng.shuffle(epoch_list)
    return epoch_list


def rank_share(indices: np.ndarray, *, rank: int, world_size: int) -> np.ndarray:
    """This rank's part of an epoch list; every rank gets the same count (the tail is dropped)."""
    usable = len(indices) // world_size * world_size
    return indices[rank:usable:world_size]
