"""The resume checkpoint `weights/<recipe>/last.pt`: written whole, read without running code.

`torch.load(weights_only=True)` rebuilds tensors, numbers, strings and containers only, so a
`last.pt` received from someone else or planted on a shared disk cannot execute anything. The
RNG states are therefore stored as tensors and lists and rebuilt on resume.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from cxr_fast.errors import CxrError, one_line
from cxr_fast.io import atomic_path

# What `save_checkpoint` writes and `load_checkpoint` requires, with the type of each part.
_PARTS = {"model": dict, "optimizer": dict, "progress": dict, "rng": dict, "config": dict}


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors, lists and numbers (loadable weights-only)."""
    version, words, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # This process's device only: a resume may see another number of GPUs.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`, loaded weights-only and checked for the parts a resume reads;
    anything else (a foreign or crafted file, an old format) is a one-line CxrError."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a checkpoint is only ever replaced whole: this file is not ours
        raise CxrError(f"{path}: not a resume checkpoint that can be read safely ({one_line(error, 120)}); "
                       f"move it away to start over") from error
    if not isinstance(checkpoint, dict):
        raise CxrError(f"{path}: not a resume checkpoint (a {type(checkpoint).__name__}, not a dict)")
    wrong = [name for name, kind in _PARTS.items() if not isinstance(checkpoint.get(name), kind)]
    if wrong:
        raise CxrError(f"{path}: not a resume checkpoint (missing or malformed: {', '.join(wrong)})")
    return checkpoint
