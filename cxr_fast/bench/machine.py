"""Where and when a benchmark ran: the machine, its libraries, the command, and the clock."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from cxr_fast.bench.records import Gpu, Machine, Rate
from cxr_fast.loading.workers import usable_cores  # re-exported for the bench modules


PROJECT_ROOT = Path(__file__).resolve().parents[2]


def start_logged(command: list[str], log: Path, *, env: dict[str, str] | None = None,
                 own_group: bool = False) -> subprocess.Popen:
    """Start a child with its output in `log` (a file, not a pipe: a child nobody reads from
    cannot block on a full pipe), W&B off, unbuffered, this project first on its import path.
    With `own_group` the child leads a new process group, which `wait_or_kill` ends as a whole:
    the processes it starts itself (without own_group) stay in that group."""
    log.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
                 "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
                 **(env or {})}
    with open(log, "w") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=child_env,
                                start_new_session=own_group)


def wait_or_kill(process: subprocess.Popen, timeout: float) -> int | None:
    """The child's exit status, or None when it ran past `timeout` seconds and was killed, with
    its process group when it leads one (a training run it started must not keep the GPU busy)."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        return None
    except KeyboardInterrupt:  # its own session does not get the terminal's Ctrl-C
        kill_group(process)
        raise


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to `process`, and to its group when it leads one (start_logged's own_group); then reap it."""
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except ProcessLookupError:  # already gone
        pass
    process.wait()


def training_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict:
    from cxr_fast.io import package_versions

    versions = package_versions(("torch", "torchvision", "timm", "accelerate", "nvidia-dali-cuda130", "webdataset",
                                 "pillow", "numpy", "pandas"))
    try:
        from PIL import features

        versions["libjpeg (pillow)"] = features.version("jpg")
        versions["libjpeg_turbo (pillow)"] = bool(features.check_feature("libjpeg_turbo"))
    except Exception:  # older Pillow
        pass
    versions["python"] = platform.python_version()
    versions["cuda (torch build)"] = torch.version.cuda
    return versions


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info() -> Machine:
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = Gpu(name=props.name, count=torch.cuda.device_count(), memory_gib=round(props.total_memory / 2**30, 1),
                  capability=f"{props.major}.{props.minor}")
    return Machine(machine=machine_name(), hostname=socket.gethostname(), platform=platform.platform(),
                   cpu=cpu_model(), cpu_count=os.cpu_count(), usable_cores=usable_cores(),
                   torch_threads=torch.get_num_threads(), gpu=gpu, load_average=load_average(),
                   libraries=library_versions())


def machine_name() -> str:
    name = os.environ.get("CXR_BENCH_MACHINE")
    if not name:
        kind = torch.cuda.get_device_name().split()[-1] if torch.cuda.is_available() else "cpu"
        name = f"{kind}{usable_cores()}c-{socket.gethostname()}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower()


def command_line(argv: list[str]) -> str:
    return "python -m cxr_fast.bench " + shlex.join(argv)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(block: Callable[[], object], device: torch.device) -> float:
    """Seconds that `block` takes on `device`: CUDA events on a GPU, perf_counter on a CPU."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        block()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    started = time.perf_counter()
    block()
    return time.perf_counter() - started


def spread(values: list[float]) -> Rate:
    """Median, min, max and relative spread ((max - min) / median) of repeated measurements."""
    median = statistics.median(values)
    return Rate(median=round(median, 1), min=round(min(values), 1), max=round(max(values), 1),
                spread=round((max(values) - min(values)) / median, 3) if median else None,
                values=[round(value, 1) for value in values])


def replace_option(argv: list[str], option: str, value: str) -> list[str]:
    """`argv` with `option` set to `value` (for the command that reproduces one part of a run)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == option:
            skip = True
            continue
        if item.startswith(option + "="):
            continue
        out.append(item)
    return [*out, option, value]
