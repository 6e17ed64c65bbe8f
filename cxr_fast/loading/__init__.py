"""Loaders: the sampler's index list in, augmented float batches on the training device out.

`resident` decodes a split once onto the device; `dali` streams JPEGs through a DALI
pipeline for data that does not fit. `auto` picks `resident` when the split fits the
device-memory budget (what is left beside the model, its optimiser
state and activations), else `dali` (never `dali` when DALI is not installed).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from cxr_fast.errors import CxrError
from cxr_fast.loading.augment import AugmentSettings

DALI_INSTALL_HINT = (
    "DALI is not installed; on Linux x86_64: pip install nvidia-dali-cuda130 "
    "(or use loader=resident)"
)


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def with_shards_resolved(config):
    """`config` with `shards` narrowed to the one listed folder that serves its load size
    (shard_folders.resolve_shards): train, predict and bench read the same folder for the same recipe."""
    import dataclasses

    from cxr_fast.shard_folders import resolve_shards

    return dataclasses.replace(config, shards=str(resolve_shards(config.shards, config.resolved_load_size)))


TRAINING_STATE_COPIES = 3  # gradients + AdamW's two moments, each as large as the parameters


def resident_budget(*, free_bytes: int, parameter_bytes: int, activation_bytes: int, share: float,
                    training: bool = True) -> int:
    """Bytes the resident loader may take: `share` of the free memory (measured with the model
    already on the device) left after the training state that the first step allocates
    (gradients + AdamW moments: 3 x the parameter bytes; none for prediction) and one batch's
    activations."""
    reserved = (TRAINING_STATE_COPIES * parameter_bytes if training else 0) + activation_bytes
    return max(0, int(share * (free_bytes - reserved)))


def choose_loader(requested: str, *, n_images: int, settings: AugmentSettings, budget_bytes: Callable[[], int]) -> str:
    """The loader to use; `budget_bytes` (see `resident_budget`) is asked only for loader=auto,
    because measuring it may run a training batch."""
    from cxr_fast.loading.resident import ResidentLoader

    if requested == "dali" and not dali_available():
        raise CxrError(DALI_INSTALL_HINT)
    if requested != "auto":
        return requested
    fits = ResidentLoader.bytes_needed(n_images, settings) <= budget_bytes()
    if fits or not dali_available():
        return "resident"
    return "dali"


def make_loader(kind: str, rows: pd.DataFrame, shards_dir: Path, settings: AugmentSettings, *,
                device: torch.device, batch_size: int, seed: int = 0, rank: int = 0, threads: int = 0):
    if kind == "resident":
        from cxr_fast.loading.resident import ResidentLoader

        return ResidentLoader(rows, shards_dir, settings, device=device, batch_size=batch_size, seed=seed, rank=rank,
                              threads=threads)
    if kind == "dali":
        if not dali_available():
            raise CxrError(DALI_INSTALL_HINT)
        from cxr_fast.loading.dali import DaliLoader

        return DaliLoader(rows, shards_dir, settings, device=device, batch_size=batch_size, seed=seed, rank=rank,
                          threads=threads)
    raise CxrError(f"unknown loader {kind!r}; choose resident, dali or auto")
