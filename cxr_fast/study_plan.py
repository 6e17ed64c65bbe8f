"""`python -m cxr_fast.sweep --plan`: what the selected study costs on this machine, before it runs.

Per recipe: images per balanced epoch (2 x the minority class of the task's train split),
validation images, epochs (an upper bound: early stopping may end a run sooner), validations
(`val_every`: every N-th epoch and the last) and hours on the device the throughput was
measured on (named in the output), from measured `bench train` throughput (a results file of
`bench train`, `bench suite` or `bench gpu-check`). Validation is counted
at 3x the training rate (a forward pass without the backward); its share of the hours is shown
per recipe and in total (for rare tasks it exceeds the training). An arch without a
measurement is shown as unknown and leaves the total open. The floor: the recipe's training
and validation FLOPs (cxr_fast/flops.py) over the bf16 peak of the device the throughput was
measured on, so the distance between measured and possible is in view.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cxr_fast.errors import CxrError, one_line
from cxr_fast.flops import BACKWARD_PER_FORWARD, forward_flops, peak_flops
from cxr_fast.recipes import Config

RESULTS_DIR = Path("benchmarks/results")
EVAL_SPEEDUP = 3.0      # forward only vs forward + backward
SLURM_MARGIN = 1.25     # the array's --time: the longest recipe plus a quarter (start-up, checkpoints, a slow node)


@dataclass
class RecipePlan:
    recipe: str
    arch: str
    epochs: int
    images_per_epoch: int
    validation_images: int
    images_per_second: float | None
    val_every: int = 1
    forward_flops: int | None = None   # one image's forward pass at the recipe's size
    peak_flops: float | None = None    # the device's dense bf16 FLOP/s

    @property
    def validations(self) -> int:
        """Validated epochs: every val_every-th and the last (train.validated_epoch)."""
        return self.epochs // self.val_every + (self.epochs % self.val_every != 0)

    @property
    def _training_images(self) -> float:
        return self.epochs * self.images_per_epoch

    @property
    def _validation_images_at_training_rate(self) -> float:
        return self.validations * self.validation_images / EVAL_SPEEDUP

    @property
    def hours(self) -> float | None:
        if not self.images_per_second:
            return None
        return (self._training_images + self._validation_images_at_training_rate) / self.images_per_second / 3600

    @property
    def validation_hours(self) -> float | None:
        return self._validation_images_at_training_rate / self.images_per_second / 3600 if self.images_per_second else None

    @property
    def validation_share(self) -> float:
        """Validation's share of the recipe's hours (needs no throughput: both scale with it)."""
        total = self._training_images + self._validation_images_at_training_rate
        return self._validation_images_at_training_rate / total if total else 0.0

    @property
    def flops(self) -> float | None:
        if self.forward_flops is None:
            return None
        return self.forward_flops * (self._training_images * (1 + BACKWARD_PER_FORWARD)
                                     + self.validations * self.validation_images)

    @property
    def floor_hours(self) -> float | None:
        """Hours at the device's peak: no run can be faster."""
        return self.flops / self.peak_flops / 3600 if self.flops is not None and self.peak_flops else None


def throughput_entries(data: Any) -> Iterator[dict]:
    """Every measured `bench train` record inside a results file, however it is nested."""
    if isinstance(data, dict):
        if data.get("kind") == "train" and isinstance(data.get("settings"), dict) and data.get("synthetic"):
            yield data
            return
        for value in data.values():
            yield from throughput_entries(value)
    elif isinstance(data, list):
        for value in data:
            yield from throughput_entries(value)


def read_throughput(path: Path) -> dict[str, float]:
    """arch -> training images/s: the fastest real-loader median measured for it (else the synthetic one)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise CxrError(f"{path}: not a readable results file ({one_line(error)})") from error
    rates: dict[str, float] = {}
    for entry in throughput_entries(data):
        measured = entry.get("real") or entry["synthetic"]
        arch, rate = entry["settings"]["arch"], float(measured["images_per_second"]["median"])
        rates[arch] = max(rates.get(arch, 0.0), rate)
    if not rates:
        raise CxrError(f"{path}: no `bench train` measurement in it")
    return rates


def measured_device(path: Path) -> str | None:
    """The GPU a results file's training throughput was measured on (None: a CPU, or several)."""
    data = json.loads(Path(path).read_text())
    gpus = {((entry.get("machine") or {}).get("gpu") or {}).get("name") for entry in throughput_entries(data)}
    return gpus.pop() if len(gpus) == 1 else None


def measured_on(path: Path) -> str:
    """The device(s) a results file's training throughput was measured on: a GPU's name, or
    `CPU (<model>, N cores)`; the plan's hours are hours on that device."""
    try:
        entries = list(throughput_entries(json.loads(Path(path).read_text())))
    except (OSError, ValueError):
        return "an unknown device"
    devices = []
    for entry in entries:
        machine = entry.get("machine") or {}
        gpu = (machine.get("gpu") or {}).get("name")
        cores = f", {machine['cpu_count']} cores" if machine.get("cpu_count") else ""
        device = gpu or f"CPU ({machine.get('cpu') or 'unknown model'}{cores})"
        if device not in devices:
            devices.append(device)
    return " / ".join(devices) or "an unknown device"


def newest_results(folder: Path = RESULTS_DIR, device: str | None = None) -> Path | None:
    """The newest results file in `folder` with training measurements from this kind of device
    (the GPU's name, or none for a CPU). Newest by the date the file records (a fresh clone gives
    every file the same modification time), then by modification time."""
    found = []
    for path in folder.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        entries = list(throughput_entries(data))
        gpus = {((entry.get("machine") or {}).get("gpu") or {}).get("name") for entry in entries}
        if entries and (device in gpus if device else gpus == {None}):
            dates = [str(item.get("date") or "") for item in (data, *entries) if isinstance(item, dict)]
            found.append((max(dates), path.stat().st_mtime, path))
    return max(found)[2] if found else None


def this_device() -> str | None:
    import torch

    return torch.cuda.get_device_properties(torch.cuda.current_device()).name if torch.cuda.is_available() else None


def recipe_plan(config: Config, rates: dict[str, float], peak: float | None = None) -> RecipePlan:
    from cxr_fast.loading.payloads import read_manifest
    from cxr_fast.shard_folders import resolve_shards

    manifest = _manifest(resolve_shards(config.shards, 0), read_manifest)  # the label counts: any size of the cohort
    if config.task not in manifest.columns:
        raise CxrError(f"{config.shards}: the manifest has no column for task {config.task!r}")
    labels = manifest[config.task]
    train = labels[manifest["split"] == "train"].dropna().to_numpy()
    minority = int(min(np.sum(train == 1), np.sum(train == 0)))
    validation = int(labels[manifest["split"] == "val"].notna().sum())
    per_epoch = 2 * minority
    if config.max_steps_per_epoch:
        per_epoch = min(per_epoch, config.max_steps_per_epoch * config.resolved_batch_size * config.grad_accum)
    return RecipePlan(recipe=config.recipe, arch=config.arch, epochs=config.epochs, images_per_epoch=per_epoch,
                      validation_images=validation, images_per_second=rates.get(config.arch),
                      val_every=config.val_every, peak_flops=peak,
                      # Counted only where a peak makes a floor of them (a CPU login node has none).
                      forward_flops=forward_flops(config.arch, config.resolved_image_size) if peak else None)


_MANIFESTS: dict[Path, Any] = {}


def _manifest(folder: Path, read):
    if folder not in _MANIFESTS:
        _MANIFESTS[folder] = read(folder)
    return _MANIFESTS[folder]


def slurm_time(plans: list[RecipePlan]) -> str | None:
    """The array's --time: the longest recipe's estimate with a margin, None if any is unknown."""
    hours = [plan.hours for plan in plans]
    if not plans or any(value is None for value in hours):
        return None
    minutes = max(10, math.ceil(max(hours) * SLURM_MARGIN * 60))
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def format_plan(plans: list[RecipePlan], source: Path | None, device: str | None = None) -> str:
    """The plan's table; hours are on the device the throughput file was measured on (named);
    `device`, the GPU whose peak gives the floor (None: a CPU)."""
    measured = measured_on(source) if source else "no measured device"
    lines = [f"{'recipe':<40} {'epoch img':>10} {'val img':>8} {'epochs':>6} {'img/s':>8} {'hours':>8} "
             f"{'vals':>5} {'val %':>6} {'floor-h':>8}"]
    for plan in plans:
        rate = f"{plan.images_per_second:.0f}" if plan.images_per_second else "unknown"
        hours = f"{plan.hours:.2f}" if plan.hours is not None else "unknown"
        floor = f"{plan.floor_hours:.3f}" if plan.floor_hours is not None else "unknown"
        lines.append(f"{plan.recipe:<40} {plan.images_per_epoch:>10,} {plan.validation_images:>8,} {plan.epochs:>6} "
                     f"{rate:>8} {hours:>8} {plan.validations:>5} {100 * plan.validation_share:>5.1f}% {floor:>8}")
    known = [plan for plan in plans if plan.hours is not None]
    unknown = sorted({plan.arch for plan in plans if plan.hours is None})
    total_hours = sum(plan.hours for plan in known)
    total = f"{total_hours:.2f} hours on {measured} at most (epochs are an upper bound: early stopping ends runs sooner)"
    lines.append(f"total: {len(plans)} recipes, {sum(p.images_per_epoch * p.epochs for p in plans):,} training images, "
                 + total + (f" + unknown for {', '.join(unknown)} (no measurement: "
                            "python -m cxr_fast.bench train --arch A --json FILE)" if unknown else ""))
    if known:
        validation = sum(plan.validation_hours for plan in known)
        every = sorted({plan.val_every for plan in plans})
        lines.append(f"validation: {validation:.2f} of those hours ({100 * validation / total_hours:.1f}%), "
                     f"val_every={','.join(map(str, every))} (1: every epoch; N: every N-th and the last)")
    lines.append(floor_line(plans, device))
    lines.append(f"throughput: {source}, measured on {measured}" if source else "throughput: no results file for this device")
    return "\n".join(lines)


def floor_line(plans: list[RecipePlan], device: str | None) -> str:
    """The study's FLOPs over the device's peak, and how far the measured hours are from it."""
    if not plans or plans[0].peak_flops is None:
        return f"floor: unknown (no bf16 peak known for {device or 'a CPU'}; cxr_fast/flops.py lists the GPUs)"
    flops = sum(plan.flops for plan in plans)
    floor = sum(plan.floor_hours for plan in plans)
    measured = [(plan.hours, plan.floor_hours) for plan in plans if plan.hours is not None]
    ratio = (f"; the measured hours are {sum(h for h, _ in measured) / sum(f for _, f in measured):.1f}x it"
             if measured and sum(f for _, f in measured) else "")
    return (f"floor: {flops:.2e} FLOPs = {floor:.2f} hours at the {plans[0].peak_flops / 1e12:.0f} TFLOP/s "
            f"bf16 peak of {device}{ratio}")


def study_plan(configs: list[Config], *, throughput: Path | None) -> tuple[list[RecipePlan], Path | None, str | None]:
    """(one plan per config, the throughput file read, the device the plan is for: the one that
    throughput was measured on, else this machine's GPU)."""
    source = throughput or newest_results(device=this_device())
    rates = read_throughput(source) if source else {}
    device = (measured_device(source) if source else None) or this_device()
    peak = peak_flops(device)
    return [recipe_plan(config, rates, peak) for config in configs], source, device
