"""The training engine: what the training loop, prediction and the benchmark all run.

A recipe's labelled split, the Accelerator and its precision, the prepared (and possibly
compiled) model, one optimiser step, and batched probabilities. `cxr_fast.train` keeps the
loop, checkpoints, status and its command line; `cxr_fast.predict` and `cxr_fast.bench` call
these functions so that what they measure or predict is exactly what training runs.
"""

from __future__ import annotations

import contextlib
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
    """The recipe's model (channels-last if asked) on this process's device and AdamW (fused
    on CUDA), prepared by Accelerate."""
    model = build_model(config.arch, pretrained=config.pretrained, image_size=image_size,
                        pretrained_file=config.pretrained_file)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(accelerator.device)  # before AdamW, which picks its kernel by where the parameters are
    parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=peak_lr(config, accelerator.num_processes),
                                  weight_decay=config.weight_decay, fused=use_fused_adamw(parameters))
    return accelerator.prepare(model, optimizer)


def peak_lr(config: Config, num_processes: int) -> float:
    """The learning rate after warm-up: `lr`, times the process count with lr_scaling=linear."""
    return config.lr * num_processes if config.lr_scaling == "linear" else config.lr


def use_fused_adamw(parameters) -> bool | None:
    """Fused AdamW (one kernel for all parameters) when every parameter is on CUDA; None lets
    torch choose elsewhere (its CPU default)."""
    parameters = list(parameters)
    return True if parameters and all(p.device.type == "cuda" for p in parameters) else None


def configure_backends(config: Config, device: torch.device) -> None:
    """cuDNN autotuning on CUDA (fixed shapes: every batch is full), unless determinism is asked;
    with precision=fp32, TF32 tensor cores for matmuls and convolutions (10 mantissa bits in the
    products, fp32 accumulation: what fp32 training on Ampere and later is meant to run)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not config.deterministic
        if config.precision == "fp32":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls; cuDNN convolutions use TF32 by default


def compile_model(model: torch.nn.Module, config: Config, device: torch.device):
    """The callable used for forward passes; compiled on CUDA by default (costly, useless on CPU).

    Dynamo is reset first: its caches and recompile counters are process-wide, and after a few
    models in one process (predict --all, sweep --in-process, a notebook) the recompile limit
    would silently leave every further model uncompiled.
    """
    wanted = config.compile == "on" or (config.compile == "auto" and device.type == "cuda")
    if not wanted:
        return model
    torch._dynamo.reset()
    return torch.compile(model)


# ------------------------------------------------------------------ memory

# Evaluation batches are this many training batches: without gradients a forward keeps no
# activations for a backward pass (only the few live layer outputs), so a batch several times
# the training one needs less memory than one training step, and validation (for rare tasks
# longer than the epoch's training) takes fewer, fuller launches.
EVAL_BATCH_FACTOR = 4


def eval_batch_size(config: Config) -> int:
    return config.resolved_batch_size * EVAL_BATCH_FACTOR


ACTIVATION_BYTES_PER_INPUT_BYTE = 512  # CPU estimate: ~100 MB per 224 px image for resnet50 in fp32


def loader_budget_bytes(model: torch.nn.Module, config: Config, accelerator, image_size: int, *,
                        training: bool = True) -> int:
    """Bytes the resident loader may take on this process's device: `device_memory_budget` of the
    free memory left once the model is there (it already is), with its training state and one
    batch's activations set aside (measured on CUDA when training, estimated otherwise)."""
    from cxr_fast.loading import device_memory_bytes, resident_budget

    device = accelerator.device
    batch_size = config.resolved_batch_size
    if training and device.type == "cuda":
        activations = measured_activation_bytes(model, accelerator, batch_size, image_size, config.channels_last)
    else:
        activations = estimated_activation_bytes(batch_size, image_size)
    return resident_budget(free_bytes=device_memory_bytes(device), parameter_bytes=parameter_bytes(model),
                           activation_bytes=activations, share=config.device_memory_budget, training=training)


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def estimated_activation_bytes(batch_size: int, image_size: int) -> int:
    return batch_size * image_size ** 2 * 4 * ACTIVATION_BYTES_PER_INPUT_BYTE


def measured_activation_bytes(model: torch.nn.Module, accelerator, batch_size: int, image_size: int,
                              channels_last: bool) -> int:
    """Peak memory of one training forward+backward beyond the model (and its gradients, counted
    with the optimiser state). No optimiser step; the gradients are dropped, the buffers (batch-norm
    statistics) restored and the RNG streams forked, so the run itself is unchanged."""
    buffers = [buffer.clone() for buffer in model.buffers()]
    with cudnn_benchmark_off():  # its trials allocate workspaces that inflate the peak, differently per rank
        peak, before = _one_training_pass_peak(model, accelerator, batch_size, image_size, channels_last)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)
    del buffers
    torch.cuda.empty_cache()
    return max(0, peak - before - parameter_bytes(model))


@contextlib.contextmanager
def cudnn_benchmark_off():
    """cuDNN autotuning off inside, restored after."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def _one_training_pass_peak(model, accelerator, batch_size: int, image_size: int,
                            channels_last: bool) -> tuple[int, int]:
    """(peak allocated bytes, allocated bytes before) of one forward+backward on random images."""
    device = accelerator.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.random.fork_rng(devices=[device]):
        images = torch.rand(batch_size, 1, image_size, image_size, device=device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        model.train()
        with accelerator.autocast():
            loss = model(images).float().mean()
        loss.backward()
    return torch.cuda.max_memory_allocated(device), before


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
    """Sigmoid probabilities for `indices`, in order, on every process.

    Each process evaluates one contiguous share (padded to equal length, so every process runs
    the same number of batches: a DDP forward may be a collective); the shares are gathered
    back in the original order.
    """
    model.eval()
    share, count = eval_share(np.asarray(indices), rank=accelerator.process_index, world_size=accelerator.num_processes)
    probs = _probs(forward, model, loader, share, accelerator)
    if accelerator.num_processes > 1:
        probs = accelerator.gather(probs)
    return probs[:count].cpu().numpy()


def eval_share(indices: np.ndarray, *, rank: int, world_size: int) -> tuple[np.ndarray, int]:
    """(this rank's contiguous part of `indices`, padded to ceil(n / world_size) with the last
    index, len(indices)). Concatenating every rank's part gives `indices`, then the padding."""
    length = -(-len(indices) // world_size)
    part = indices[rank * length:(rank + 1) * length]
    if len(part) < length:
        part = np.concatenate([part, np.full(length - len(part), indices[-1], dtype=indices.dtype)])
    return part, len(indices)


def _probs(forward, model: torch.nn.Module, loader, indices: np.ndarray, accelerator) -> torch.Tensor:
    chunks = []
    for images in loader.eval_batches(indices):
        count = images.shape[0]
        # A short last batch would make a compiled model compile again: pad, then drop.
        if count < loader.batch_size:
            images = torch.cat([images, images[-1:].expand(loader.batch_size - count, *images.shape[1:])])
        if images.is_floating_point() and model_wants_channels_last(model):
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = forward(images)
        chunks.append(probabilities(logits)[:count])
    return torch.cat(chunks) if chunks else torch.zeros(0, device=accelerator.device)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """fp32 sigmoid of (batch, 1) logits, outside autocast: bf16 has 8 mantissa bits, so bf16
    probabilities tie by the thousand over a 45k-image validation split and coarsen the
    threshold search."""
    return torch.sigmoid(logits.float().squeeze(1))
