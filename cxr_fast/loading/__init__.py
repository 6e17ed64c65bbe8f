"""Loaders: the sampler's index list in, augmented float batches on the training device out.

Three tiers, all reading a split decoded once (the decoded cache, loading/decoded.py) or
streaming it: `resident` keeps the split on the device; `host` keeps it in host memory (the
mapped cache) and copies each batch; `dali` streams JPEGs through a DALI pipeline for sets
larger than the host. `auto` picks the first that fits: the device-memory budget (what is
left beside the model, its optimiser state and activations), then the host's available
memory, then DALI when installed; where none fits it refuses in one line, before any decoding.
Under several processes the main process decides and every process uses its choice.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cxr_fast.errors import CxrError

if TYPE_CHECKING:  # torch is imported where it is used: the analysis reads shard bytes
    import pandas as pd  # (loading.payloads) without paying for torch in every process
    import torch

    from cxr_fast.loading.augment import AugmentSettings

LOADERS = ("resident", "host", "dali")  # the tiers, in the order `auto` tries them


def dali_package() -> str:
    """The DALI wheel for this torch's CUDA major (nvidia-dali-cuda120 for CUDA 12.x); a CPU
    build of torch gets the newest (DALI's CPU operators are the same in every wheel)."""
    import torch

    major = (torch.version.cuda or "13").split(".")[0]
    return f"nvidia-dali-cuda{major}0"


def dali_install_hint() -> str:
    return f"DALI is not installed; on Linux x86_64: pip install {dali_package()} (or use loader=resident or host)"


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def device_memory_bytes(device: torch.device) -> int:
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return available_host_bytes()


def available_host_bytes() -> int:
    """Host memory a split may take: MemAvailable (free plus reclaimable page cache, where a
    mapped decoded cache lives), else the free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
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


def split_bytes(n_images: int, settings: AugmentSettings) -> int:
    """Bytes of `n_images` decoded at the load size (uint8, one channel)."""
    return n_images * settings.load_size ** 2


def choose_loader(requested: str, *, n_images: int, settings: AugmentSettings, budget_bytes: Callable[[], int],
                  host_bytes: Callable[[], int] | None = None) -> str:
    """The loader to use. For loader=auto the first tier that fits: `resident` within
    `budget_bytes()` (see `resident_budget`; asked only for auto, because measuring it may run
    a training batch), `host` within `host_bytes()` (default: available_host_bytes), `dali`
    when installed; else a one-line CxrError with the bytes needed."""
    if requested == "dali" and not dali_available():
        raise CxrError(dali_install_hint())
    if requested != "auto":
        return requested
    needed = split_bytes(n_images, settings)
    budget = budget_bytes()
    if needed <= budget:
        return "resident"
    host = (host_bytes or available_host_bytes)()
    if needed <= host:
        return "host"
    if dali_available():
        return "dali"
    raise CxrError(f"loader=auto: {n_images} images at {settings.load_size} px need {gigabytes(needed)} decoded, "
                   f"more than the device budget ({gigabytes(budget)}) and the host's available memory "
                   f"({gigabytes(host)}), and DALI, which streams them, is not installed (on Linux x86_64: "
                   f"pip install {dali_package()}); or lower image_size")


def gigabytes(count: int) -> str:
    return f"{count / 1e9:.2f} GB ({count:,} bytes)"


def choose_loader_for_all(choose: Callable[[], str], accelerator) -> str:
    """`choose()` on every process (its budget measurement may run collectives), then the
    main process's answer (or its refusal) on all: processes whose free memory differs must
    still use one tier. Single-process: `choose()` as it is."""
    try:
        kind, refusal = choose(), None
    except CxrError as error:
        if accelerator is None or accelerator.num_processes == 1:
            raise
        kind, refusal = None, error
    if accelerator is None or accelerator.num_processes == 1:
        return kind
    import torch
    import torch.distributed as dist

    code = torch.tensor([LOADERS.index(kind) if kind in LOADERS else -1], device=accelerator.device)
    dist.broadcast(code, src=0)  # gloo on CPUs, NCCL on GPUs: the tensor lives on this process's device
    agreed = int(code.item())
    if agreed < 0:
        raise refusal or CxrError("the main process found no loader that fits (its message says why)")
    return LOADERS[agreed]


def check_streamed_shards(rows: pd.DataFrame, shards_dir: Path, *, announce: bool) -> None:
    """The streaming loader's integrity check: each shard it reads must be the recorded file
    (size and sha256, one pass at start-up). It decodes members every epoch, so it leaves their
    checksums to `python -m cxr_fast.data.verify`, and says so."""
    from cxr_fast.data.integrity import check_shard_digests

    check_shard_digests(Path(shards_dir), rows["shard"].astype(str).unique())
    if announce:
        print(f"dali: shard digests checked; image checksums are checked by python -m cxr_fast.data.verify {shards_dir}",
              file=sys.stderr)


def make_loader(kind: str, rows: pd.DataFrame, shards_dir: Path, settings: AugmentSettings, *,
                device: torch.device, batch_size: int, seed: int = 0, rank: int = 0, threads: int = 0,
                cache: str = "on"):
    """A loader of tier `kind`; `cache` is the decoded_cache setting (on, off, verify)."""
    common = {"device": device, "batch_size": batch_size, "seed": seed, "rank": rank, "threads": threads}
    if kind == "resident":
        from cxr_fast.loading.resident import ResidentLoader

        return ResidentLoader(rows, shards_dir, settings, cache=cache, **common)
    if kind == "host":
        from cxr_fast.loading.host import HostLoader

        return HostLoader(rows, shards_dir, settings, cache=cache, **common)
    if kind == "dali":
        if not dali_available():
            raise CxrError(dali_install_hint())
        check_streamed_shards(rows, shards_dir, announce=rank == 0)
        from cxr_fast.loading.dali import DaliLoader

        return DaliLoader(rows, shards_dir, settings, **common)
    raise CxrError(f"unknown loader {kind!r}; choose {', '.join(LOADERS)} or auto")
