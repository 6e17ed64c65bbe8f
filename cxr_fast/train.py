"""Train one recipe: `python -m cxr_fast.train --recipe effusion_convnext_large [key=value ...]`.

Also `accelerate launch -m cxr_fast.train --recipe ...` (DDP, multi-node), the original form
`python -m cxr_fast.train 1 convnext_large`, and `--list [PATTERN]`.

One loop, top to bottom: a class-balanced epoch list -> loader batches on the device ->
AMP forward/backward -> validation (AUROC, balanced accuracy at the val-optimal threshold)
-> best checkpoint by val balanced accuracy -> atomic resume state. Rerunning the same
command resumes from `weights/<recipe>/last.pt`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cxr_fast.checkpoint import load_checkpoint, restore_rng, rng_state, save_checkpoint, save_safetensors
from cxr_fast.engine import (SplitData, compile_model, configure_backends, eval_batch_size, labelled_batches,
                             load_task_data, loader_budget_bytes, make_accelerator, peak_lr, predict_probs,
                             prepare_model, train_step)
from cxr_fast.errors import CxrError, one_line, run_cli
from cxr_fast.hub import require_pretrained
from cxr_fast.io import remove_stale_temporaries, write_json
from cxr_fast.locks import exclusive_lock
from cxr_fast.loading import choose_loader, choose_loader_for_all, make_loader, with_shards_resolved
from cxr_fast.loading.augment import AugmentSettings
from cxr_fast.loading.sampler import balanced_epoch, rank_share
from cxr_fast.metrics_log import MetricsLog
from cxr_fast.models import get_arch
from cxr_fast.recipes import Config, all_recipes, load_config, recipe_from_legacy
from cxr_fast.same_run import refuse_changed_settings
from cxr_fast.schema import RESUME_FILE, STATUS_FILE, finished_status, read_status
from cxr_fast.shard_folders import data_identity
from cxr_fast.validation import validation_metrics

# ------------------------------------------------------------------ numerics


def lr_at(step: int, *, total_steps: int, warmup_steps: int, base_lr: float, min_lr_ratio: float) -> float:
    """Linear warmup then cosine to base_lr * min_lr_ratio: a pure function of the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------ checkpoints


def save_best(model: torch.nn.Module, path: Path, record: dict) -> None:
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_safetensors(state, path / "best.safetensors",
                     metadata={"recipe": record["config"]["recipe"], "epoch": str(record["epoch"])})
    write_json(path / "best.json", record)


def write_status(config: Config, state: "Progress", *, finished: bool, stopped_early: bool, data: dict) -> None:
    """`weights/<recipe>/status.json`: what the study runner reads to skip or resume a recipe;
    `data` is the identity of the shards read (shard_folders.data_identity)."""
    write_json(config.weights_path / STATUS_FILE, {
        "recipe": config.recipe, "epoch": state.epoch, "epochs": config.epochs, "finished": finished,
        "stopped_early": stopped_early, "best_epoch": state.best_epoch, "best_balanced_accuracy": state.best_score,
        "config": config.to_dict(), "data": data,
    })


def finished_run(config: Config) -> "Progress | None":
    """The progress of a run that needs no more epochs, read from status.json alone: a rerun
    of a finished recipe returns before decoding any data or building the model."""
    status = finished_status(config.weights_path, recipe=config.recipe, epochs=config.epochs)
    if status is None:
        return None
    return Progress(epoch=status["epoch"], best_epoch=status["best_epoch"], best_score=status["best_balanced_accuracy"])


@dataclass
class Progress:
    """What survives a restart besides weights and optimiser: the loop's own state."""
    epoch: int = 0                      # epochs completed
    step: int = 0                       # optimiser steps taken
    best_score: float = -1.0
    best_epoch: int = -1
    epochs_since_best: int = 0
    history: list = field(default_factory=list)


# ------------------------------------------------------------------ the run


class NonFiniteLoss(CxrError):
    pass


def train(config: Config, *, progress_bar: bool = True) -> dict:
    """Train (or resume) one recipe; return a summary (best epoch, metrics, throughput)."""
    accelerator = make_accelerator(config.precision, grad_accum=config.grad_accum)
    with recipe_lock(config, accelerator):
        return _train(config, accelerator, progress_bar=progress_bar)


@contextlib.contextmanager
def recipe_lock(config: Config, accelerator):
    """One writer per recipe: the main process holds `weights/<recipe>/.lock` for the whole run
    (the other processes of a distributed run are its helpers, not rivals). Taking it creates
    the folder, so an unwritable weights_dir is reported before any work."""
    if not accelerator.is_main_process:
        yield
        return
    with exclusive_lock(config.weights_path, what=f"training of {config.recipe}"):
        remove_stale_temporaries(config.weights_path)
        yield


def start_same_run(config: Config, accelerator, data: dict) -> None:
    """Refuse to continue a saved run under other settings or on other data (`data`: the identity
    of what this run reads), or with restart=true discard it.

    The main process reads the saved run and decides for all: a rank reading on its own could
    find the files already discarded by the main process, skip the barrier below and enter DDP
    set-up while the main process waits there (a hang until the collective's timeout)."""
    action, message = main_process_decides_object(
        same_run_decision(config, data) if accelerator.is_main_process else None, accelerator)
    if action == "refuse":
        raise CxrError(message)
    if action == "discard":
        if accelerator.is_main_process:
            accelerator.print(f"{config.recipe}: restart=true: discarding the saved run with other settings")
            for name in RUN_FILES:
                (config.weights_path / name).unlink(missing_ok=True)
        accelerator.wait_for_everyone()


def same_run_decision(config: Config, data: dict) -> tuple[str, str | None]:
    """("continue", None): no saved run, or one with these settings; ("discard", None): other
    settings and restart=true; ("refuse", the one-line reason): other settings, or a saved run
    that cannot be read."""
    try:
        saved, saved_data, source = saved_settings(config)
    except CxrError as error:  # an unreadable saved run: every rank stops with the reason
        return "refuse", str(error)
    if saved is None:
        return "continue", None
    try:
        refuse_changed_settings(saved, config, source, saved_data=saved_data, data=data)
    except CxrError as error:
        return ("discard", None) if config.restart else ("refuse", str(error))
    return "continue", None


RUN_FILES = (STATUS_FILE, RESUME_FILE, "best.json", "best.safetensors")  # what a saved run consists of


def saved_settings(config: Config) -> tuple[dict | None, dict | None, Path | None]:
    """The saved run's settings and data identity (None for a run saved before it was recorded):
    from status.json when it has them (no checkpoint load), else from last.pt; (None, None, None)
    when there is no saved run."""
    status_path, last_path = config.weights_path / STATUS_FILE, config.weights_path / RESUME_FILE
    if last_path.is_file():
        status = read_status(config.weights_path) or {}
        if isinstance(status.get("config"), dict):
            return status["config"], status.get("data"), status_path
        checkpoint = load_checkpoint(last_path)
        return checkpoint["config"], checkpoint.get("data"), last_path
    return None, None, None


def _train(config: Config, accelerator, *, progress_bar: bool) -> dict:
    from tqdm import tqdm

    device = accelerator.device
    accelerator.print(world_line(config, accelerator))
    # Its own inputs first: missing shards are reported as missing, whatever run is saved. The
    # folder read is resolved from the listed ones; the run is identified by that data.
    shards_dir = Path(with_shards_resolved(config).shards)
    data = data_identity(shards_dir)
    start_same_run(config, accelerator, data)
    done = finished_run(config)
    if done is not None:
        return nothing_to_do(config, done, None, accelerator)
    if config.pretrained and not config.pretrained_file:  # offline: fail before decoding any data
        require_pretrained(get_arch(config.arch).timm_name)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(config.seed)

    configure_backends(config, device)

    train_data, val_data = load_task_data(replace(config, shards=str(shards_dir)))
    settings = AugmentSettings.from_config(config)
    batch_size = config.resolved_batch_size
    # The model first: the resident loader gets a share of what the model leaves free.
    model, optimizer = prepare_model(config, accelerator, settings.image_size)
    # Every process measures (the measurement may run collectives); the main process's tier wins.
    kind = choose_loader_for_all(lambda: choose_loader(
        config.loader, n_images=len(train_data.rows) + len(val_data.rows), settings=settings,
        budget_bytes=lambda: loader_budget_bytes(model, config, accelerator, settings.image_size)), accelerator)
    loaders = {name: make_loader(kind, data.rows, shards_dir, settings, device=device,
                                 batch_size=batch_size if name == "train" else eval_batch_size(config),
                                 seed=config.seed, rank=accelerator.process_index, threads=config.decode_threads,
                                 cache=config.decoded_cache)
               for name, data in (("train", train_data), ("val", val_data))}

    state = Progress()
    last_path = config.weights_path / RESUME_FILE
    if last_path.is_file():
        state = resume(last_path, accelerator, model, optimizer, config, data)
    # Also without status.json (a kill between writing last.pt and status.json).
    if state.epoch >= config.epochs or stopped_early(state, config):
        return nothing_to_do(config, state, kind, accelerator)

    forward = compile_model(model, config, device)
    steps_per_epoch = steps_in_epoch(train_data, config, batch_size, accelerator.num_processes)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)
    base_lr = peak_lr(config, accelerator.num_processes)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    labels_on_device = torch.as_tensor(train_data.labels, device=device)
    log = MetricsLog(config, enabled=accelerator.is_main_process, resume_epoch=state.epoch)
    clock = CheckpointClock(every=config.checkpoint_every, saved_epoch=state.epoch)
    if accelerator.is_main_process:
        write_json(config.run_path / "config.json", config.to_dict() | {"loader_used": kind, "shards_used": str(shards_dir)})

    try:
        for epoch in range(state.epoch, config.epochs):
            indices = rank_share(balanced_epoch(train_data.labels, seed=config.seed, epoch=epoch),
                                 rank=accelerator.process_index, world_size=accelerator.num_processes)
            if config.max_steps_per_epoch:
                indices = indices[: config.max_steps_per_epoch * batch_size * config.grad_accum]
            model.train()
            started = time.perf_counter()
            waited = 0.0
            seen = 0
            bad = torch.zeros((), dtype=torch.bool, device=device)
            loss_sum = torch.zeros((), device=device)
            bar = tqdm(total=len(indices) // batch_size, desc=f"{config.recipe} {epoch + 1}/{config.epochs}",
                       disable=not (progress_bar and accelerator.is_main_process), leave=False)
            batches = labelled_batches(loaders["train"], indices, labels_on_device, epoch=epoch)
            for batch_number in range(len(indices) // batch_size):
                tick = time.perf_counter()
                images, target = next(batches)
                waited += time.perf_counter() - tick
                lr = lr_at(state.step, total_steps=total_steps, warmup_steps=warmup_steps,
                           base_lr=base_lr, min_lr_ratio=config.min_lr_ratio)
                loss = train_step(images, target, lr, model=model, forward=forward, optimizer=optimizer,
                                  loss_fn=loss_fn, accelerator=accelerator, config=config)
                if accelerator.sync_gradients:
                    state.step += 1
                bad |= ~torch.isfinite(loss.detach())
                loss_sum += loss.detach()
                seen += len(images)
                if (batch_number + 1) % config.log_every == 0:
                    check_finite(bad, accelerator, config, epoch, batch_number)  # the only host sync in the loop
                    bar.set_postfix(loss=f"{loss_sum.item() / (batch_number + 1):.4f}",
                                    img_s=f"{seen / (time.perf_counter() - started):.0f}",
                                    data_wait=f"{waited / (time.perf_counter() - started):.0%}")
                bar.update()
            bar.close()
            n_batches = max(1, len(indices) // batch_size)
            check_finite(bad, accelerator, config, epoch, n_batches - 1)
            train_seconds = time.perf_counter() - started
            val = (evaluate(forward, model, loaders["val"], val_data, accelerator)
                   if validated_epoch(epoch + 1, config) else None)
            record = {"epoch": epoch + 1, "step": state.step,
                      "train_loss": mean_over_ranks(loss_sum, accelerator) / n_batches,
                      "images_per_second": seen * accelerator.num_processes / max(train_seconds, 1e-9),
                      "data_wait_share": waited / max(train_seconds, 1e-9), "lr": optimizer.param_groups[0]["lr"],
                      "epoch_seconds": time.perf_counter() - started,  # training + validation: the status view's ETA
                      **{f"val_{key}": value for key, value in (val or {}).items()}}
            # The log line first, then the checkpoint: a kill between the two leaves a line that
            # the resume cuts away and rewrites, never a checkpointed epoch without its line.
            log.log(record)
            state = end_of_epoch(state, record, val, model, accelerator, config)
            stop_early = stopped_early(state, config, accelerator)
            if clock.due(state.epoch, final=stop_early or state.epoch >= config.epochs, accelerator=accelerator):
                clock.started()
                write_resume_state(state, model, optimizer, accelerator, config, data)
                clock.saved(state.epoch)
            accelerator.print(epoch_line(config, record, clock))
            if accelerator.is_main_process:
                write_status(config, state, finished=stop_early or state.epoch >= config.epochs, stopped_early=stop_early,
                             data=data)
            if stop_early:
                accelerator.print(f"{config.recipe}: early stop, no better val balanced accuracy for {config.early_stopping} epochs")
                break
    finally:
        log.close()
    return summary(config, state, kind)


def world_line(config: Config, accelerator) -> str:
    """The run's first line: how many processes train it, and on what (`2 processes on cpu`)."""
    count = accelerator.num_processes
    return f"{config.recipe}: {count} process{'es' if count > 1 else ''} on {accelerator.device.type}"


def mean_over_ranks(value: torch.Tensor, accelerator) -> float:
    """`value` averaged over the processes (each rank trains on its own share of the epoch)."""
    if accelerator.num_processes > 1:
        value = accelerator.reduce(value.detach().clone(), reduction="mean")
    return value.item()


def steps_in_epoch(data: SplitData, config: Config, batch_size: int, world_size: int) -> int:
    minority = int(min(data.labels.sum(), len(data.labels) - data.labels.sum()))
    batches = (2 * minority // world_size) // batch_size
    if config.max_steps_per_epoch:
        batches = min(batches, config.max_steps_per_epoch * config.grad_accum)
    if batches == 0:
        raise CxrError(f"{config.recipe}: a balanced epoch has {2 * minority} images, fewer than one batch of "
                       f"{batch_size} per process; lower batch_size")
    return max(1, batches // config.grad_accum)


def stopped_early(state: Progress, config: Config, accelerator=None) -> bool:
    """Early stopping (off unless early_stopping > 0), decided by the main process for all:
    validation on different GPUs may differ in the last bits, and a process that stops
    alone would leave the others waiting in the next all-reduce."""
    return main_process_decides(bool(config.early_stopping) and state.epochs_since_best >= config.early_stopping,
                                accelerator)


def check_finite(bad: torch.Tensor, accelerator, config: Config, epoch: int, batch: int) -> None:
    if accelerator.num_processes > 1:  # every process stops together, or none does
        bad = accelerator.reduce(bad.float(), reduction="sum") > 0
    if bool(bad):
        last = config.weights_path / RESUME_FILE
        kept = (f"the last good checkpoint is kept in {last} (continue from it with precision=fp32, or start "
                f"over with a lower lr than {config.lr} and restart=true)" if last.is_file() else
                f"no checkpoint was written yet (try a lower lr than {config.lr}, or precision=fp32)")
        raise NonFiniteLoss(f"{config.recipe}: the loss became NaN/inf in epoch {epoch + 1} by batch {batch + 1}; {kept}")


def evaluate(forward, model, loader, data: SplitData, accelerator) -> dict:
    probs = predict_probs(forward, model, loader, np.arange(len(data.rows)), accelerator)
    return validation_metrics(data.labels, probs)


def validated_epoch(epoch: int, config: Config) -> bool:
    """Whether epoch `epoch` (1-based) ends with a validation: every `val_every`-th and the last."""
    return epoch % config.val_every == 0 or epoch == config.epochs


def end_of_epoch(state: Progress, record: dict, val: dict | None, model, accelerator, config: Config) -> Progress:
    """The loop's progress after an epoch; a better val balanced accuracy writes best.safetensors.
    An epoch without validation (val_every > 1) changes neither the best epoch nor the patience."""
    state.epoch = record["epoch"]
    state.history.append(record)
    if val is None:
        return state
    score = val["balanced_accuracy"] if val["balanced_accuracy"] is not None else -1.0
    if score > state.best_score:
        state.best_score, state.best_epoch, state.epochs_since_best = score, state.epoch, 0
        if accelerator.is_main_process:
            save_best(accelerator.unwrap_model(model), config.weights_path,
                      {"epoch": state.epoch, "metrics": val, "threshold": val["threshold"], "config": config.to_dict()})
    else:
        state.epochs_since_best += 1
    return state


def write_resume_state(state: Progress, model, optimizer, accelerator, config: Config, data: dict) -> None:
    """`last.pt`: everything a resume needs, written by the main process while the others wait."""
    if accelerator.is_main_process:
        save_checkpoint({
            "model": accelerator.unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "progress": state.__dict__,
            "rng": rng_state(),
            "config": config.to_dict(),
            "data": data,
        }, config.weights_path / RESUME_FILE)
    accelerator.wait_for_everyone()


# Automatic cadence: at least this many save durations between two saves, so saving takes at
# most ~1/20 = 5% of the run (last.pt of beit_large, weights + AdamW, is ~3.6 GB).
SAVE_TIME_RATIO = 20


def checkpoint_due(*, epoch: int, final: bool, every: int, seconds_since_save: float,
                   save_seconds: float | None) -> bool:
    """Whether to write last.pt after `epoch` (1-based): always after the last epoch of the run
    (also an early stop); every `every` epochs when set; otherwise once the time since the last
    save is at least SAVE_TIME_RATIO x that save's duration (the first save of a process is due).
    A new best epoch does not force one: best.safetensors is written on its own."""
    if final:
        return True
    if every:
        return epoch % every == 0
    return save_seconds is None or seconds_since_save >= SAVE_TIME_RATIO * save_seconds


@dataclass
class CheckpointClock:
    """When last.pt was written and how long that took: the cadence's inputs and the log's news."""
    every: int
    saved_epoch: int                                  # the epoch in last.pt (0: none yet)
    saved_at: float = field(default_factory=time.perf_counter)
    save_seconds: float | None = None                 # None until this process has saved once
    saved_now: bool = False
    _start: float = 0.0

    def due(self, epoch: int, *, final: bool, accelerator=None) -> bool:
        """Decided by the main process for all: the others wait for its save."""
        due = checkpoint_due(epoch=epoch, final=final, every=self.every,
                             seconds_since_save=time.perf_counter() - self.saved_at, save_seconds=self.save_seconds)
        self.saved_now = main_process_decides(due, accelerator)
        return self.saved_now

    def started(self) -> None:
        self._start = time.perf_counter()

    def saved(self, epoch: int) -> None:
        self.saved_at = time.perf_counter()
        self.save_seconds = self.saved_at - self._start
        self.saved_epoch = epoch

    def describe(self) -> str:
        if self.saved_now:
            return f"last.pt saved ({self.save_seconds:.1f} s)"
        if not self.saved_epoch:
            return "no last.pt yet"
        return f"last.pt from epoch {self.saved_epoch}, {(time.perf_counter() - self.saved_at) / 60:.1f} min ago"


def main_process_decides_object(value, accelerator):
    """The main process's `value` (any picklable object) on every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def main_process_decides(flag: bool, accelerator) -> bool:
    """The main process's `flag` on every process: a decision that leads into a collective
    (a barrier, an all-reduce) must be the same everywhere, and timings or the last bits of a
    validation metric may differ between processes."""
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    from accelerate.utils import broadcast

    return bool(broadcast(torch.tensor([flag], device=accelerator.device), from_process=0).item())


def resume(path: Path, accelerator, model, optimizer, config: Config, data: dict) -> Progress:
    checkpoint = load_checkpoint(path)
    refuse_changed_settings(checkpoint["config"], config, path, saved_data=checkpoint.get("data"), data=data)
    try:
        accelerator.unwrap_model(model).load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler") and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(checkpoint["scaler"])
        restore_rng(checkpoint["rng"])
        state = Progress(**checkpoint["progress"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise CxrError(f"{path}: does not fit {config.recipe} ({one_line(error, 120)}); move it away to start over") from error
    accelerator.print(f"{config.recipe}: resuming after epoch {state.epoch} (best epoch {state.best_epoch})")
    return state


def epoch_line(config: Config, record: dict, clock: CheckpointClock) -> str:
    if "val_balanced_accuracy" in record:
        auroc, balanced = record["val_auroc"], record["val_balanced_accuracy"]  # None: undefined (one class)
        val = (f"val AUROC {auroc if auroc is None else f'{auroc:.3f}'}  "
               f"bal.acc {balanced if balanced is None else f'{balanced:.3f}'}")
    else:
        val = f"not validated (val_every={config.val_every})"
    return (f"{config.recipe} epoch {record['epoch']}/{config.epochs}: loss {record['train_loss']:.4f}  {val}  "
            f"{record['images_per_second']:.0f} img/s  data wait {record['data_wait_share']:.0%}  {clock.describe()}")


def nothing_to_do(config: Config, state: Progress, loader: str | None, accelerator) -> dict:
    accelerator.print(f"{config.recipe}: already trained {state.epoch} epochs (best epoch {state.best_epoch}); nothing to do")
    return summary(config, state, loader)


def summary(config: Config, state: Progress, loader: str | None) -> dict:
    last = state.history[-1] if state.history else {}
    return {"recipe": config.recipe, "epochs": state.epoch, "best_epoch": state.best_epoch,
            "best_balanced_accuracy": state.best_score, "loader": loader,
            "images_per_second": last.get("images_per_second"), "history": state.history}


# ------------------------------------------------------------------ command line


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, str | None, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_fast.train",
        description="Train one recipe. Settings: key=value after the recipe (see cxr_fast/recipes.py:Config).",
        epilog="examples: --recipe effusion_test_resnet epochs=2 | 1 convnext_large | --list 'effusion_*'",
    )
    parser.add_argument("--recipe", help="{task}_{arch}, e.g. effusion_convnext_large")
    parser.add_argument("--list", nargs="?", const="", metavar="PATTERN",
                        help="list the 114 study recipes and exit; with a PATTERN (wildcards, e.g. '*test*'): "
                             "every recipe that matches, the CPU-sized test_* ones too")
    parser.add_argument("--list-all", action="store_true", help="with --list: include the CPU-sized recipes")
    parser.add_argument("--print-config", action="store_true",
                        help="print the settings the run will use (the arch's image_size and batch_size filled in) and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("rest", nargs="*", help="`<label_index> <arch>` (original form) and/or key=value settings")
    args = parser.parse_intermixed_args(argv)
    positional = [item for item in args.rest if "=" not in item]
    overrides = [item for item in args.rest if "=" in item]
    recipe = args.recipe
    if len(positional) == 2 and recipe is None:
        recipe = recipe_from_legacy(*positional)
    elif positional:
        raise CxrError(f"unexpected argument(s) {' '.join(positional)}; give --recipe R or `<label_index> <arch>`")
    return args, recipe, overrides


def listed_recipes(pattern: str, *, every: bool = False) -> list[str]:
    """`--list`: the study's recipes; `--list PATTERN`: every recipe matching it (test_* too).
    A pattern that matches nothing is an error, not an empty list."""
    import fnmatch

    if not pattern:
        return all_recipes(study_only=not every)
    names = [name for name in all_recipes() if fnmatch.fnmatch(name, pattern)]
    if not names:
        raise CxrError(f"--list {pattern}: no recipe matches (recipes are {{task}}_{{arch}}, e.g. effusion_test_resnet; "
                       "wildcards: --list '*resnet*')")
    return names


def main(argv: list[str] | None = None) -> int:
    args, recipe, overrides = parse_args(argv)
    if args.list is not None:
        for name in listed_recipes(args.list, every=args.list_all):
            print(name)
        return 0
    if recipe is None:
        raise CxrError("no recipe given: use --recipe {task}_{arch} (see --list) or `<label_index> <arch>`")
    config = load_config(recipe, overrides)
    if args.print_config:
        print(json.dumps(config.with_arch_defaults().to_dict(), indent=2))
        return 0
    result = train(config, progress_bar=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # one summary line per run, not per process
        return 0
    print(f"{config.recipe}: best epoch {result['best_epoch']} (val balanced accuracy "
          f"{result['best_balanced_accuracy']:.3f}) -> {config.weights_path / 'best.safetensors'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
