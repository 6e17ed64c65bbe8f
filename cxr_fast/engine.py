"""The training engine: what the training loop, prediction and the benchmark all run.

A recipe's labelled split, the Accelerator and its precision, the prepared (and possibly
compiled) model, one optimiser step, and batched probabilities. `cxr_fast.train` keeps the
loop, checkpoints, status and its command line; `cxr_fast.predict` and `cxr_fast.bench` call
these functions so that what they measure or predict is exactly what training runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr_fast.errors import CxrError
from cxr_fast.loading.payloads import read_manifest
from cxr_fast.models import build_model
from cxr_fast.recipes import Config


# ------------------------------------------------------------------ data


@dataclass
class SplitData:
    rows: pd.DataFrame        # manifest rows of the split with a label for the task
    labels: np.ndarray        # float32 0/1


def task_split(manifest: pd.DataFrame, task: str, split: str) -> SplitData:
    rows = manifest[(manifest["split"] == split) & manifest[task].notna()].reset_index(drop=True)
    return SplitData(rows=rows, labels=rows[task].to_numpy(dtype=np.float32, copy=True))


def load_task_data(config: Config) -> tuple[SplitData, SplitData]:
    manifest = read_manifest(config.shards)
    if config.task not in manifest.columns:
        raise CxrError(f"{Path(config.shards) / 'manifest.parquet'}: no column for task {config.task!r}")
    train, val = task_split(manifest, config.task, "train"), task_split(manifest, config.task, "val")
    for name, data in (("train", train), ("val", val)):
        classes = set(np.unique(data.labels).tolist())
        if classes != {0.0, 1.0}:
            raise CxrError(f"{config.shards}: the {name} split has no {'positive' if 1.0 not in classes else 'negative'} "
                           f"images for task {config.task!r}; a balanced classifier cannot be trained")
    return train, val


# ------------------------------------------------------------------ device and precision


def precision_for(requested: str, device: torch.device) -> str:
    """Accelerate's mixed_precision value: bf16 where the hardware has it, else fp16 (GPU) or fp32."""
    if requested != "auto":
        return {"fp32": "no"}.get(requested, requested)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # CPUs without native bf16 emulate it, several times slower than fp32.
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"


def make_accelerator(precision: str, *, grad_accum: int = 1):
    """An Accelerator for this process's device with the requested mixed precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cuda = torch.cuda.is_available()
    # Accelerate keeps its settings in a process-wide singleton; a second run in the same
    # process (sweeps in a notebook, tests) may ask for another precision. The distributed
    # part of the state (PartialState) is kept.
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision_for(precision, torch.device("cuda" if cuda else "cpu")),
                       gradient_accumulation_steps=grad_accum, cpu=not cuda)


# ------------------------------------------------------------------ model


def prepare_model(config: Config, accelerator, image_size: int):
    """The recipe's model (channels-last if asked) and AdamW, prepared by Accelerate."""
    model = build_model(config.arch, pretrained=config.pretrained, image_size=image_size,
                        pretrained_file=config.pretrained_file)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return accelerator.prepare(model, optimizer)


def compile_model(model: torch.nn.Module, config: Config, device: torch.device):
    """The callable used for forward passes; compiled on CUDA by default (costly, useless on CPU)."""
    wanted = config.compile == "on" or (config.compile == "auto" and device.type == "cuda")
    return torch.compile(model) if wanted else model


def model_wants_channels_last(model: torch.nn.Module) -> bool:
    parameter = next((p for p in model.parameters() if p.dim() == 4), None)
    return parameter is not None and parameter.is_contiguous(memory_format=torch.channels_last) and not parameter.is_contiguous()


# ------------------------------------------------------------------ steps


def labelled_batches(loader, indices: np.ndarray, labels_on_device: torch.Tensor, *, epoch: int):
    """(images, targets) for one epoch's index list: the training loop's data path.

    The targets are gathered on the device in one copy per epoch: a per-batch copy from
    pageable host memory would make the host wait for the GPU every step.
    """
    targets = labels_on_device[torch.as_tensor(indices, device=labels_on_device.device)]
    for number, images in enumerate(loader.train_batches(indices, epoch=epoch)):
        yield images, targets[number * loader.batch_size:(number + 1) * loader.batch_size]


def train_step(images: torch.Tensor, target: torch.Tensor, lr: float, *, model, forward, optimizer, loss_fn,
               accelerator, config: Config) -> torch.Tensor:
    """One forward/backward/optimiser (micro-)step: the loop's body, also timed by cxr_fast.bench."""
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with accelerator.accumulate(model):
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = forward(images).float().squeeze(1)
        loss = loss_fn(logits, target)
        accelerator.backward(loss)
        if config.clip_grad and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), config.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


@torch.no_grad()
def predict_probs(forward, model: torch.nn.Module, loader, indices: np.ndarray, accelerator) -> np.ndarray:
    """Sigmoid probabilities for `indices`, in order (every process evaluates the whole list)."""
    model.eval()
    chunks = []
    with accelerator.autocast():
        for images in loader.eval_batches(indices):
            count = images.shape[0]
            # A short last batch would make a compiled model compile again: pad, then drop.
            if count < loader.batch_size:
                images = torch.cat([images, images[-1:].expand(loader.batch_size - count, *images.shape[1:])])
            if images.is_floating_point() and model_wants_channels_last(model):
                images = images.contiguous(memory_format=torch.channels_last)
            chunks.append(torch.sigmoid(forward(images).float().squeeze(1))[:count])
    return torch.cat(chunks).cpu().numpy() if chunks else np.zeros(0, dtype=np.float32)
