"""The checkpoints of a run, written whole and read without running code.

`weights/<recipe>/last.pt`, the resume checkpoint: `torch.load(weights_only=True)` rebuilds
tensors, numbers, strings and containers only, so a `last.pt` received from someone else or
planted on a shared disk cannot execute anything. The RNG states are therefore stored as
tensors and lists and rebuilt on resume.

`weights/<recipe>/best.safetensors`, the best weights: identical tensors and metadata give an
identical file (the header is written in one fixed order).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from cxr_fast.errors import CxrError, one_line
from cxr_fast.io import atomic_path, write_bytes

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
    # torch.save to a path reports a full disk as `basic_ios::clear: iostream error`; to a
    # Python file it raises the OSError itself, which atomic_path turns into one line.
    with atomic_path(path, needed_bytes=lambda: tensor_bytes(checkpoint)) as tmp, open(tmp, "wb") as handle:
        try:
            torch.save(checkpoint, handle)
        except RuntimeError as error:
            # torch's zip writer hides the write's OSError behind `unexpected pos` on the way out.
            if isinstance(error.__context__, OSError):
                raise error.__context__ from error
            raise


def tensor_bytes(value) -> int:
    """Bytes of every tensor in a nested checkpoint: about the size of its file."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write `tensors` and `metadata` as a safetensors file; the same input gives the same bytes."""
    write_bytes(path, canonical_safetensors(_safetensors_bytes(tensors, metadata)))


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def canonical_safetensors(data: bytes) -> bytes:
    """`data` with its JSON header rewritten with the metadata keys sorted. safetensors keeps
    the metadata in a hash map, whose order changes from one process to the next; the
    tensors' entries and offsets are already in a fixed order and stay as they are."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8 bytes
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a file that is not one is a one-line CxrError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise CxrError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CxrError(f"{path}: not a safetensors file ({one_line(error, 120)})") from error


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
