"""`bench train`: end-to-end training images/s with the real loop's pieces, real loader vs one
synthetic batch already on the device (the model's own ceiling). Efficiency = real / synthetic;
the two are timed in alternating blocks so drift on a shared machine hits both alike."""

from __future__ import annotations

import contextlib
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from cxr_fast.bench.data import WORKDIR, prepare_data
from cxr_fast.bench.machine import command_line, machine_info, now, spread, synchronize, timed
from cxr_fast.bench.records import Throughput, TrainResult, TrainSettings
from cxr_fast.errors import CxrError
from cxr_fast.loading.augment import AugmentSettings

TRAIN_LOADERS = ("resident", "host", "dali", "synthetic")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def bench_train(*, arch: str, loader: str = "resident", image_size: int = 0, batch_size: int = 0, steps: int = 10,
                repeats: int = 3, warmup: int = 3, compile: bool = False, channels_last: bool = True,
                precision: str = "auto", shards: Path | None = None, images: int = 800, workdir: Path = WORKDIR,
                argv: list[str]) -> TrainResult:
    """`steps` training steps per timed block, `repeats` blocks per stream after `warmup` steps
    (compilation happens there). image_size / batch_size 0: the arch's own. `argv`: recorded."""
    from cxr_fast.loading import choose_loader, make_loader, with_shards_resolved
    from cxr_fast.loading.sampler import balanced_epoch
    from cxr_fast.recipes import load_config
    from cxr_fast.engine import (compile_model, configure_backends, labelled_batches, load_task_data, loader_budget_bytes,
                                 make_accelerator, prepare_model, train_step)

    if loader not in TRAIN_LOADERS:
        raise CxrError(f"unknown loader {loader!r}; choose from {', '.join(TRAIN_LOADERS)}")
    real = loader != "synthetic"
    shards = shards or (prepare_data(images, workdir=workdir) if real else Path("."))
    overrides = {"shards": str(shards), "pretrained": False, "compile": "on" if compile else "off",
                 "channels_last": channels_last, "precision": precision, "logger": "none",
                 "loader": loader if real else "auto", "seed": 0}
    if image_size:
        overrides["image_size"] = image_size
    if batch_size:
        overrides["batch_size"] = batch_size
    config = load_config(f"effusion_{arch}", overrides)
    if real:
        config = with_shards_resolved(config)
    accelerator = make_accelerator(config.precision)
    device = accelerator.device
    settings = AugmentSettings.from_config(config)
    batch_size = config.resolved_batch_size
    torch.manual_seed(0)
    configure_backends(config, device)

    say(f"{arch} at {settings.image_size} px, batch {batch_size} on {device}: building the model")
    model, optimizer = prepare_model(config, accelerator, settings.image_size)
    forward = compile_model(model, config, device)
    model.train()
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(images, target):
        return train_step(images, target, config.lr, model=model, forward=forward, optimizer=optimizer,
                          loss_fn=loss_fn, accelerator=accelerator, config=config)

    # The ceiling: one batch already on the device, repeated.
    synthetic_images = torch.randn(batch_size, 1, settings.image_size, settings.image_size, device=device)
    synthetic_target = (torch.rand(batch_size, device=device) < 0.5).float()

    streams: dict[str, Callable[[], torch.Tensor]] = {"synthetic": lambda: step(synthetic_images, synthetic_target)}
    loader_used = None
    setup_seconds = None
    if real:
        started = time.perf_counter()
        say(f"decoding the train split of {shards} for the {loader} loader")
        train_data, _val = load_task_data(config)
        loader_used = choose_loader(config.loader, n_images=len(train_data.rows), settings=settings,
                                    budget_bytes=lambda: loader_budget_bytes(model, config, accelerator, settings.image_size))
        batch_loader = make_loader(loader_used, train_data.rows, shards, settings, device=device, batch_size=batch_size,
                                   seed=config.seed, threads=config.decode_threads,
                                   cache=config.decoded_cache)
        setup_seconds = round(time.perf_counter() - started, 2)
        labels = torch.as_tensor(train_data.labels, device=device)

        def batches():  # the training loop's data path: balanced epochs -> loader -> labels
            epoch = 0
            while True:
                indices = balanced_epoch(train_data.labels, seed=config.seed, epoch=epoch)
                yield from labelled_batches(batch_loader, indices, labels, epoch=epoch)
                epoch += 1

        real_batches = batches()
        streams = {"real": lambda: step(*next(real_batches)), **streams}

    # Warm-up (compilation, allocator, cuDNN autotuning, worker start), then alternating timed blocks.
    say(f"warm-up: {warmup} steps per stream ({', '.join(streams)})" + (", compiling" if compile else ""))
    last = None
    for run_step in streams.values():
        for _ in range(warmup):
            last = run_step()
    synchronize(device)
    if last is not None and not torch.isfinite(last.detach()).item():
        raise CxrError(f"bench: the loss is not finite for {arch} at {accelerator.mixed_precision} precision; "
                       "fp32 precision avoids overflow")
    values: dict[str, list[float]] = {name: [] for name in streams}
    stopped = None
    with signals_as_interrupt():
        try:
            for block in range(repeats):
                for name, run_step in streams.items():
                    elapsed = timed(lambda: [run_step() for _ in range(steps)], device)
                    values[name].append(steps * batch_size / elapsed)
                say(f"block {block + 1}/{repeats} ({steps} steps each): "
                    + ", ".join(f"{name} {rates[-1]:.0f} img/s" for name, rates in values.items()))
        except KeyboardInterrupt:
            complete = min(len(rates) for rates in values.values())  # blocks every stream has
            if not complete:
                raise  # nothing measured to keep
            values = {name: rates[:complete] for name, rates in values.items()}
            stopped = f"stopped after {complete} of {repeats} blocks"
            say(f"{stopped}: keeping what was measured")

    result = TrainResult(
        command=command_line(argv), date=now(), machine=machine_info(),
        settings=TrainSettings(arch=arch, loader=loader, loader_used=loader_used, image_size=settings.image_size,
                               batch_size=batch_size, steps=steps, warmup=warmup, repeats=repeats, compile=bool(compile),
                               channels_last=bool(channels_last), precision=precision,
                               mixed_precision=accelerator.mixed_precision, device=str(device),
                               shards=str(shards) if real else None),
        setup_seconds=setup_seconds,
        synthetic=Throughput(spread(values["synthetic"])),
        stopped=stopped,
    )
    if real:
        result.real = Throughput(spread(values["real"]))
        # Blocks alternate, so each real block has a synthetic neighbour under the same load.
        paired = [real_rate / synthetic_rate for real_rate, synthetic_rate in zip(values["real"], values["synthetic"])]
        result.efficiency = round(statistics.median(paired), 3)
        result.efficiency_of_medians = round(result.real.images_per_second.median
                                             / result.synthetic.images_per_second.median, 3)
    if device.type == "cuda":
        result.max_memory_gib = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    _report(result)
    return result


def say(text: str) -> None:
    """Progress on stderr: a CPU run of a GPU-sized setting takes minutes before its first number."""
    print(f"bench train: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def signals_as_interrupt():
    """SIGTERM (a scheduler's or `timeout`'s stop) handled like Ctrl-C while the blocks are timed,
    so the blocks already measured are kept either way."""
    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report(result: TrainResult) -> None:
    s = result.settings
    line = (f"bench train {s.arch} {s.image_size}px b{s.batch_size}: "
            f"synthetic {result.synthetic.images_per_second.median:.0f} img/s")
    if result.real is not None:
        line += f", {s.loader_used} {result.real.images_per_second.median:.0f} img/s, efficiency {result.efficiency:.2f}"
    if result.stopped:
        line += f" ({result.stopped})"
    print(line, file=sys.stderr, flush=True)
