"""`bench gpu-check OUT_DIR [--tiny]`: the GPU path checked end to end in one command (< 10 min on one H100/H200).

A preflight first: a CUDA build of torch that sees no GPU is a one-line error naming torch's
CUDA version and the driver's (from `nvidia-smi`), and without `--tiny` no GPU at all is an
error too: a CPU run is never reported as a GPU check. Without a C compiler or Python headers
(Triton builds a small C module) the compiled parts are skipped with that reason.

Then the parts, most important first, each in its own process group under its own time limit
(a hang, a crash or a CUDA error loses that part only; on a timeout the whole group is killed,
so a training run a part started cannot keep the GPU busy during the next parts);
OUT_DIR/gpu-check.json is rewritten atomically after every part and every entry of a part:
  loader      resident loader on the device: augmented 224 px images/s (target >= 30,000);
              and the same for `host` (pinned host memory -> device)
  train       the real training command, compile=on, bf16, channels-last: killed after epoch
              1 of 2, rerun, resumed (bench resume's check); then the real predict on the result
  efficiency  bench train, real loader vs one synthetic batch, eager for resnet50 convnext_tiny
              efficientnet_b0 vit_base convnext_large, then compiled for resnet50 and
              convnext_large only (the budget fits two compiles) (target >= 0.97)
  dali        (when DALI is installed) nvJPEG decode + augment images/s; DALI vs resident
              evaluation batches within one grey level, training batches within one on average
  memory      peak device memory of a MIMIC-scale resident tensor (240,000 x 256 x 256 uint8)
              beside convnext_large training at its batch size
The phantom is portrait (rows = 1.2 x columns, like MIMIC's 3056 x 2544), so the crop code
runs on non-square images. The JSON's `not_covered` lists what the check does not run.
`--tiny` runs the same code on the CPU with test archs, a few images at 64 px and a tiny
resident tensor (the test suite does, so the check cannot rot).

Only torch, timm, accelerate, pandas, pyarrow and safetensors are needed; DALI, webdataset and
wandb are optional (a GPU image's python3 may have none of them).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cxr_fast.bench.records import Machine, Record, Status, absent
from cxr_fast.errors import CxrError, one_line
from cxr_fast.io import write_json

RESULT_FILE = "gpu-check.json"
PARTS = ("loader", "train", "efficiency", "dali", "memory")
TARGETS = {"loader_images_per_second": 30_000, "train_efficiency": 0.97}
EFFICIENCY_ARCHS = ("resnet50", "convnext_tiny", "efficientnet_b0", "vit_base", "convnext_large")
COMPILED_ARCHS = ("resnet50", "convnext_large")  # the study's most common and its largest
PORTRAIT = 1.2  # rows / columns of the phantom's images (MIMIC-CXR: 3056 / 2544)
NOT_COVERED = (
    "several GPUs: DDP, NCCL collectives and their time-outs (tests/test_two_processes.py runs two "
    "processes on the CPU with gloo)",
    "several nodes and a shared weights/ folder on a network filesystem",
    "full-size MIMIC-CXR data: the phantom has a few thousand images",
    "the analysis (cxr_fast.analyze) and the study's 114 recipes at full length",
)
MIMIC_IMAGES = 240_000
GREY_LEVEL = 1 / 255 / 0.226  # one grey level in normalised units (augment.STD), kept import-free here


@dataclass(frozen=True)
class Scale:
    """Every size the check uses: the GPU settings, or the tiny CPU ones of the test suite."""

    images: int = 3000            # phantom radiographs (about 2/3 are kept frontal)
    image_size: int = 224
    batch_size: int = 256
    resume_recipe: str = "effusion_resnet50"
    resume_settings: tuple[str, ...] = ("image_size=224", "batch_size=128", "max_steps_per_epoch=20",
                                        "precision=bf16", "channels_last=true", "compile=on")
    efficiency_archs: tuple[str, ...] = EFFICIENCY_ARCHS
    compiled_archs: tuple[str, ...] = COMPILED_ARCHS
    portrait: float = PORTRAIT
    train_image_size: int = 0     # 0: each arch's native size and registry batch size
    train_batch_size: int = 0
    steps: int = 10
    repeats: int = 3
    precision: str = "bf16"
    compile: bool = True
    resident_images: int = MIMIC_IMAGES
    resident_side: int = 256
    memory_arch: str = "convnext_large"
    # Seconds per part: together under 10 minutes (limits, not expected durations).
    budgets: dict = field(default_factory=lambda: {"shards": 60, "loader": 45, "train": 180, "efficiency": 210,
                                                   "dali": 40, "memory": 60})


TINY = Scale(images=60, image_size=64, batch_size=8, resume_recipe="effusion_test_resnet",
             resume_settings=("image_size=64", "batch_size=8", "max_steps_per_epoch=2", "precision=auto",
                              "channels_last=true", "compile=off"),
             efficiency_archs=("test_resnet",), compiled_archs=(), train_image_size=32, train_batch_size=8, steps=2, repeats=2,
             precision="auto", compile=False, resident_images=500, resident_side=64, memory_arch="test_convnext",
             budgets={"shards": 240, "loader": 120, "train": 300, "efficiency": 240, "dali": 180, "memory": 120})


@dataclass
class Part(Record):
    status: Status
    seconds: float | None = None
    budget_seconds: float | None = None
    reason: str | None = absent()
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class GpuCheckResult(Record):
    command: str
    date: str
    tiny: bool
    preflight: dict[str, Any]
    machine: Machine | None = None
    result_name: str | None = None   # benchmarks/results/<this>: named after the GPU and the date
    parts: dict[str, Part] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)
    not_covered: list[str] = field(default_factory=lambda: list(NOT_COVERED))
    wall_seconds: float = 0.0
    kind: str = "gpu-check"


# ---------------------------------------------------------------------- preflight


def nvidia_smi() -> str | None:
    """`nvidia-smi`'s output, None when it is missing or fails (no driver)."""
    try:
        done = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def driver_versions(smi_output: str | None) -> tuple[str | None, str | None]:
    """(driver version, highest CUDA version the driver supports) from nvidia-smi's banner."""
    if not smi_output:
        return None, None
    driver = re.search(r"Driver Version:\s*([\d.]+)", smi_output)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", smi_output)
    return (driver.group(1) if driver else None), (cuda.group(1) if cuda else None)


def no_gpu_reason(torch_cuda: str | None, torch_version: str, smi_output: str | None) -> str:
    """One line: why this torch sees no GPU."""
    if torch_cuda is None:
        return f"no GPU: torch {torch_version} is a CPU-only build (install a CUDA build of torch)"
    driver, driver_cuda = driver_versions(smi_output)
    if smi_output is None:
        return (f"no GPU: torch {torch_version} is built for CUDA {torch_cuda}, but nvidia-smi is missing or fails "
                "(no NVIDIA driver, or no GPU allocated to this job)")
    if driver_cuda and _version(driver_cuda) < _version(torch_cuda):
        return (f"no GPU: torch {torch_version} is built for CUDA {torch_cuda}, but the driver {driver} supports "
                f"CUDA {driver_cuda} at most (install a torch built for CUDA <= {driver_cuda}, or update the driver)")
    return (f"no GPU: torch {torch_version} (CUDA {torch_cuda}) sees none, though nvidia-smi reports driver {driver} "
            f"(CUDA {driver_cuda}); check CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def compiler_missing() -> str | None:
    """Why torch.compile (Triton/Inductor) cannot build here, None when it can."""
    compiler = next((name for name in (os.environ.get("CC"), "cc", "gcc", "clang") if name and shutil.which(name)), None)
    if compiler is None:
        return "no C compiler on PATH (cc/gcc/clang): Triton and Inductor build C modules; install gcc"
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        return f"{header}: not found; Triton needs the Python headers (install python3-dev)"
    return None


def preflight(*, tiny: bool) -> dict[str, Any]:
    """What this machine can run; a CxrError when it cannot run the GPU check at all."""
    import torch

    from cxr_fast.loading import dali_available

    cuda = torch.cuda.is_available()
    if not cuda and not tiny:
        raise CxrError(no_gpu_reason(torch.version.cuda, torch.__version__, nvidia_smi()))
    missing = compiler_missing()
    return {"device": "cuda" if cuda else "cpu", "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "driver": driver_versions(nvidia_smi())[0] if cuda else None,
            "compile": "ok" if missing is None else f"skipped: {missing}",
            "optional": {"nvidia.dali": dali_available(),
                         **{name: importlib.util.find_spec(name) is not None for name in ("webdataset", "wandb")}}}


# ---------------------------------------------------------------------- the run


def gpu_check(out_dir: Path, *, tiny: bool = False, parts: tuple[str, ...] = PARTS, workdir: Path | None = None,
              argv: list[str]) -> GpuCheckResult:
    """Preflight, then each part in its own process under its time limit; the result file
    OUT_DIR/gpu-check.json is complete after every part. Exits through CxrError only at preflight."""
    from cxr_fast.bench.machine import command_line, machine_info, now

    started = time.perf_counter()
    scale = TINY if tiny else Scale()
    out_dir = Path(out_dir)
    work = Path(workdir) if workdir else out_dir / "work"
    result = GpuCheckResult(command=command_line(argv), date=now(), tiny=tiny, preflight=preflight(tiny=tiny))
    result.machine = machine_info()
    gpu = result.machine.gpu.name if result.machine.gpu else "cpu"
    result.result_name = f"{_slug(gpu)}-{datetime.date.today().isoformat()}.json"
    path = out_dir / RESULT_FILE

    def save() -> None:
        result.wall_seconds = round(time.perf_counter() - started, 1)
        result.targets = target_report(result)
        write_json(path, result.to_json())

    save()
    shards = _run_part("shards", scale, tiny, work, result, save)
    for name in parts:
        if shards.status != "ok":
            result.parts[name] = Part(status="skipped", reason=f"no shards to read: {shards.reason}")
        else:
            _run_part(name, scale, tiny, work, result, save)
        save()
    print(f"gpu-check: {result.wall_seconds:.0f} s -> {path}; keep it as benchmarks/results/{result.result_name}",
          file=sys.stderr)
    return result


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-").lower()


def _run_part(name: str, scale: Scale, tiny: bool, work: Path, result: GpuCheckResult, save: Callable[[], None]) -> Part:
    """`python -m cxr_fast.bench.gpu_check NAME WORK [--tiny]` under the part's time limit; the
    child writes WORK/parts/NAME.json after every entry, so a timeout keeps what it measured."""
    budget = scale.budgets[name]
    part_file = work / "parts" / f"{name}.json"
    part_file.unlink(missing_ok=True)
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check: {name} (limit {budget} s) ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    command = [sys.executable, "-m", "cxr_fast.bench.gpu_check", name, str(work), *(["--tiny"] if tiny else []),
               *(["--no-compile"] if result.preflight["compile"] != "ok" else [])]
    from cxr_fast.bench.machine import start_logged, wait_or_kill

    process = start_logged(command, log, env={"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}, own_group=True)
    returncode = wait_or_kill(process, budget)
    part = _read_part(part_file)
    part.seconds, part.budget_seconds = round(time.perf_counter() - started, 1), budget
    if returncode is None:
        part.status, part.reason = "failed", f"time limit {budget} s reached; entries measured before it are kept"
    elif returncode != 0 and part.status == "ok":
        part.status = "failed"
        part.reason = part.reason or f"exit status {returncode}: " + _tail(log)
    result.parts[name] = part
    save()
    print(f"gpu-check: {name} {part.status}" + (f": {part.reason}" if part.reason else ""), file=sys.stderr, flush=True)
    return part


def _read_part(path: Path) -> Part:
    try:
        return Part.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return Part(status="failed", reason="the part wrote no result")


def _tail(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return one_line(lines[-1]) if lines else "(no output)"


# ---------------------------------------------------------------------- the parts (child processes)


class PartWriter:
    """A part's record, written atomically after every entry it adds."""

    def __init__(self, path: Path):
        self.path, self.part = path, Part(status="ok")

    def add(self, key: str, value: Any) -> None:
        self.part.result[key] = value.to_json() if isinstance(value, Record) else value
        write_json(self.path, self.part.to_json())

    def finish(self, status: Status, reason: str | None = None) -> None:
        self.part.status, self.part.reason = status, reason
        write_json(self.path, self.part.to_json())


def shard_folder(work: Path, scale: Scale) -> Path:
    from cxr_fast.bench.data import prepare_data

    return prepare_data(scale.images, workdir=work / "data", source_size=256, shard_px=256, portrait=scale.portrait)


def part_shards(out: PartWriter, scale: Scale, work: Path, compile: bool) -> None:
    out.add("shards", str(shard_folder(work, scale)))


def part_loader(out: PartWriter, scale: Scale, work: Path, compile: bool) -> None:
    _measure_loader("resident", out, scale, work)
    if out.part.status == "ok":
        _measure_loader("host", out, scale, work)


def _measure_loader(kind: str, out: PartWriter, scale: Scale, work: Path) -> Any:
    from cxr_fast.bench.data import measure_loader, read_rows
    from cxr_fast.bench.machine import command_line, training_device, usable_cores
    from cxr_fast.loading.augment import AugmentSettings

    shards = shard_folder(work, scale)
    ctx = {"rows": read_rows(shards), "shards": shards, "settings": AugmentSettings(image_size=scale.image_size),
           "batch_size": scale.batch_size, "device": training_device(), "workers": usable_cores(), "seed": 0}
    command = command_line(["data", "--shards", str(shards), "--loaders", kind, "--image-size", str(scale.image_size),
                            "--batch-size", str(scale.batch_size)])
    entry = measure_loader(kind, ctx, repeats=scale.repeats, warmup=3, seconds=1.0 if scale is TINY else 2.0,
                           command=command)
    out.add(kind, entry)
    if entry.status != "ok":
        out.finish(entry.status, entry.reason)
    return ctx


def part_train(out: PartWriter, scale: Scale, work: Path, compile: bool) -> None:
    from cxr_fast.bench.resume import kill_and_resume
    from cxr_fast.predict import predict

    shards = shard_folder(work, scale)
    resume_dir = work / "resume"
    settings = list(scale.resume_settings)
    if not compile:  # no C compiler or Python headers: the loop still runs, eagerly
        settings.append("compile=off")
        out.part.reason = "compile=off: no C compiler or Python headers (see preflight)"
    resumed = kill_and_resume(shards, resume_dir, recipe=scale.resume_recipe, epochs=2, kill_after_epoch=1,
                              settings=settings, timeout=scale.budgets["train"])
    out.add("resume", resumed)
    if not resumed.ok:
        return out.finish("failed", resumed.reason)
    weights_dir = resume_dir / "killed" / "weights"
    path = predict(scale.resume_recipe, {"shards": str(shards), "weights_dir": str(weights_dir)}, split="test",
                   out_dir=work / "predictions")
    import pandas as pd

    table = pd.read_parquet(path)
    finite = bool(table["prob"].between(0, 1).all())
    out.add("predict", {"file": str(path), "rows": len(table), "probabilities_in_0_1": finite})
    if table.empty or not finite:
        out.finish("failed", f"{path}: {len(table)} rows, probabilities in [0, 1]: {finite}")
    else:
        out.finish("ok", out.part.reason)


def part_efficiency(out: PartWriter, scale: Scale, work: Path, compile: bool) -> None:
    """Eager for every arch first (the cheap answers), then compiled while time is left."""
    from cxr_fast.bench.train import bench_train

    shards = shard_folder(work, scale)
    failures = []
    for arch, compiled in efficiency_runs(scale, compile):
        key = f"{arch} {'compiled' if compiled else 'eager'}"
        argv = ["train", "--arch", arch, "--loader", "resident", "--shards", str(shards), "--precision",
                scale.precision, "--steps", str(scale.steps), "--repeats", str(scale.repeats)]
        if scale.train_image_size:
            argv += ["--image-size", str(scale.train_image_size), "--batch-size", str(scale.train_batch_size)]
        try:
            measured = bench_train(arch=arch, loader="resident", image_size=scale.train_image_size,
                                   batch_size=scale.train_batch_size, steps=scale.steps, repeats=scale.repeats,
                                   warmup=3, compile=compiled, precision=scale.precision, shards=shards,
                                   argv=argv + (["--compile"] if compiled else []))
            out.add(key, measured)
        except Exception as error:  # one arch failing must not lose the others
            failures.append(f"{key}: {one_line(error)}")
            out.add(key, {"status": "failed", "reason": one_line(error)})
        _reset_compiler()
    if not scale.compile or not compile:
        out.part.reason = "compiled runs skipped: " + ("--no-compile (no C compiler or Python headers)"
                                                       if scale.compile else "tiny settings run eager only")
    if failures:
        out.finish("failed", "; ".join(failures))
    else:
        out.finish("ok", out.part.reason)


def efficiency_runs(scale: Scale, compile: bool) -> list[tuple[str, bool]]:
    """(arch, compiled) in order: every arch eager, then the compiled ones while time is left.
    Only `compiled_archs` compile: each compile takes a minute or more of the part's budget."""
    eager = [(arch, False) for arch in scale.efficiency_archs]
    if not (scale.compile and compile):
        return eager
    return eager + [(arch, True) for arch in scale.efficiency_archs if arch in scale.compiled_archs]


def _reset_compiler() -> None:
    """Each model starts with a fresh Dynamo cache (the recompile limit would else turn compile off)."""
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def part_dali(out: PartWriter, scale: Scale, work: Path, compile: bool) -> None:
    import numpy as np
    import torch

    from cxr_fast.loading import dali_available, dali_package, make_loader

    if not dali_available():
        return out.finish("skipped", f"nvidia-dali is not installed (pip install {dali_package()})")
    ctx = _measure_loader("dali", out, scale, work)
    if out.part.status != "ok":
        return
    rows, settings = ctx["rows"], ctx["settings"]
    order = np.random.default_rng(0).permutation(len(rows))[: 4 * scale.batch_size]
    loaders = {kind: make_loader(kind, rows, ctx["shards"], settings, device=ctx["device"], batch_size=scale.batch_size,
                                 seed=0) for kind in ("resident", "dali")}
    # Evaluation: the same resize and centre crop, so within one grey level everywhere. Training:
    # the same augmentation draws (seed, epoch, batch), resampled by another kernel, so within
    # one grey level on average (edges of the random crops may differ more).
    checks = {"eval_batches": (lambda loader: loader.eval_batches(order), "max"),
              "train_batches": (lambda loader: loader.train_batches(order, epoch=0), "mean")}
    for name, (batches_of, bound) in checks.items():
        batches = {kind: torch.cat(list(batches_of(loader))) for kind, loader in loaders.items()}
        levels = grey_level_difference(batches["resident"], batches["dali"])
        out.add(f"{name}_difference_grey_levels", levels)
        if levels[bound] > 1.0 + 1e-3:
            return out.finish("failed", f"DALI and resident {name.replace('_', ' ')} differ by {levels[bound]} grey "
                                        f"levels ({bound}; > 1)")


def grey_level_difference(first, second) -> dict[str, float]:
    difference = (first - second).abs()
    return {"max": round(float(difference.max()) / GREY_LEVEL, 3), "mean": round(float(difference.mean()) / GREY_LEVEL, 4)}


def part_memory(out: PartWriter, scale: Scale, work: Path, compile: bool) -> None:
    """A MIMIC-scale resident tensor on the device, then the largest study model trains beside it."""
    import torch

    from cxr_fast.bench.machine import training_device
    from cxr_fast.bench.train import bench_train

    device = training_device()
    resident = torch.zeros(scale.resident_images, scale.resident_side, scale.resident_side, dtype=torch.uint8,
                           device=device)
    out.add("resident_tensor_gib", round(resident.numel() / 2**30, 2))
    measured = bench_train(arch=scale.memory_arch, loader="synthetic", image_size=scale.train_image_size,
                           batch_size=scale.train_batch_size, steps=2, repeats=1, warmup=2, compile=False,
                           precision=scale.precision, argv=["train", "--arch", scale.memory_arch, "--loader", "synthetic"])
    out.add("train", measured)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        peak = torch.cuda.max_memory_allocated(device)
        out.add("peak_gib", round(peak / 2**30, 2))
        out.add("device_gib", round(total / 2**30, 2))
        out.add("headroom_share", round(1 - peak / total, 3))
    del resident


PART_FUNCTIONS = {"shards": part_shards, "loader": part_loader, "train": part_train, "efficiency": part_efficiency,
                  "dali": part_dali, "memory": part_memory}


def run_part(name: str, work: Path, *, tiny: bool, compile: bool = True) -> int:
    """One part in this process: its record in WORK/parts/NAME.json, failed with the reason on an error."""
    out = PartWriter(Path(work) / "parts" / f"{name}.json")
    try:
        PART_FUNCTIONS[name](out, TINY if tiny else Scale(), Path(work), compile)
    except Exception as error:  # recorded; the parent goes on with the next part
        out.finish("failed", f"{type(error).__name__}: {one_line(error)}")
        raise
    write_json(out.path, out.part.to_json())
    return 0


# ---------------------------------------------------------------------- targets


def target_report(result: GpuCheckResult) -> dict[str, Any]:
    """The headline numbers beside their targets (GPU runs only: a tiny CPU run has none)."""
    report: dict[str, Any] = {}
    loader = result.parts.get("loader")
    rate = (loader.result.get("resident") or {}).get("images_per_second", {}).get("median") if loader else None
    if rate is not None and not result.tiny:
        target = TARGETS["loader_images_per_second"]
        report["resident images/s >= 30,000 (224 px)"] = {"value": rate, "met": rate >= target}
    efficiency = result.parts.get("efficiency")
    for key, entry in (efficiency.result.items() if efficiency and not result.tiny else ()):
        value = entry.get("efficiency") if isinstance(entry, dict) else None
        if value is not None:
            report[f"training efficiency >= 0.97 ({key})"] = {"value": value,
                                                             "met": value >= TARGETS["train_efficiency"]}
    return report


def main(argv: list[str] | None = None) -> int:
    """Child entry point: `python -m cxr_fast.bench.gpu_check PART WORK [--tiny] [--no-compile]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cxr_fast.bench.gpu_check")
    parser.add_argument("part", choices=sorted(PART_FUNCTIONS))
    parser.add_argument("work")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    return run_part(args.part, Path(args.work), tiny=args.tiny, compile=not args.no_compile)


if __name__ == "__main__":
    from cxr_fast.errors import run_cli

    run_cli(main)
