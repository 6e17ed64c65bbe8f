"""The kill-and-resume check, used by `bench resume` and the test suite alike.

A training run (`python -m cxr_fast.train`, in its own process) is killed with SIGKILL right
after epoch `kill_after_epoch` is checkpointed, the same command is run again, and the check
is that the rerun resumes after that epoch, logs every epoch once and finishes. With
`compare=True` an uninterrupted run of the same command is the reference: the resumed run's
weights must be bit-identical to it (this needs `deterministic=true`; on a CPU).

The first run holds still once its epoch's status.json is written (the last file an epoch
writes) until it is killed, so the kill always lands after that checkpoint, however slowly the
machine runs: nothing is decided by a time window; the timeout only stops a run that hangs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn, Sequence

from cxr_fast.bench.machine import now, start_logged, training_device, wait_or_kill
from cxr_fast.bench.records import ResumeResult, RunRecord
from cxr_fast.errors import CxrError, run_cli
from cxr_fast.schema import RESUME_FILE, STATUS_FILE

# Timings differ between any two runs; everything else in a metrics line must not.
TIMING_KEYS = ("images_per_second", "data_wait_share", "epoch_seconds")
EXIT_ORPHANED = 3
_HOLD = ("import sys; from cxr_fast.bench.resume import train_and_hold; "
         "train_and_hold(int(sys.argv[1]), sys.argv[2:])")


def kill_and_resume(shards: Path, work: Path, *, recipe: str = "effusion_test_resnet", epochs: int = 3,
                    kill_after_epoch: int = 1, settings: Sequence[str] = (), compare: bool = False,
                    timeout: float = 600, command: str | None = None) -> ResumeResult:
    """Run the check in `work` (its `killed/` and `uninterrupted/` folders are replaced).
    `settings`: extra key=value training settings; `timeout`: seconds allowed per run."""
    if not 1 <= kill_after_epoch < epochs:
        raise CxrError(f"the kill must follow an epoch before the last: epoch {kill_after_epoch} of {epochs}")
    killed_dir, reference_dir = Path(work) / "killed", Path(work) / "uninterrupted"
    for folder in (killed_dir, reference_dir):
        shutil.rmtree(folder, ignore_errors=True)
    arguments = train_arguments(shards, killed_dir, recipe=recipe, epochs=epochs, settings=settings)
    result = ResumeResult(train_command=shlex.join(["python", "-m", "cxr_fast.train", *arguments]),
                          device=str(training_device()), date=now(), command=command, epochs=epochs)

    if compare:
        reference_log = Path(work) / "uninterrupted.log"
        reference = train_arguments(shards, reference_dir, recipe=recipe, epochs=epochs, settings=settings)
        result.uninterrupted_run = run_to_end(reference, reference_log, timeout)
        if result.uninterrupted_run.returncode != 0:
            return _failed(result, "the uninterrupted reference run failed")

    weights = killed_dir / "weights" / recipe
    result.first_run, result.killed = kill_after(kill_after_epoch, arguments, weights / STATUS_FILE,
                                                 Path(work) / "killed.log", timeout)
    if not result.killed:
        return _failed(result, f"the first run did not reach the end of epoch {kill_after_epoch} "
                               f"(exit status {result.first_run.returncode})")
    result.epoch_at_kill = _checkpoint_epoch(weights / RESUME_FILE)
    result.second_run = run_to_end(arguments, Path(work) / "resumed.log", timeout)
    resumed = re.search(r"resuming after epoch (\d+)", (Path(work) / "resumed.log").read_text(errors="replace"))
    result.resumed_after_epoch = int(resumed.group(1)) if resumed else None
    metrics = killed_dir / "runs" / recipe / "metrics.jsonl"
    result.logged_epochs = [record["epoch"] for record in _metrics(metrics)]
    status_file = weights / STATUS_FILE
    result.status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    result.checks = {
        "rerun exits 0": result.second_run.returncode == 0,
        "rerun resumes after the killed run's last checkpoint": result.resumed_after_epoch == result.epoch_at_kill,
        "every epoch logged exactly once": result.logged_epochs == list(range(1, epochs + 1)),
        "status finished": result.status.get("finished") is True and result.status.get("epoch") == epochs,
    }
    if compare:
        result.differing = differing_weights(reference_dir / "weights" / recipe, weights)
        result.identical_weights = not result.differing
        result.checks["weights bit-identical to the uninterrupted run"] = result.identical_weights
        result.checks["metrics identical to the uninterrupted run (timings aside)"] = (
            _without_timings(_metrics(reference_dir / "runs" / recipe / "metrics.jsonl")) == _without_timings(_metrics(metrics)))
    result.ok = all(result.checks.values())
    if not result.ok:
        result.reason = "failed: " + ", ".join(name for name, passed in result.checks.items() if not passed)
    print(f"bench resume: {'ok' if result.ok else result.reason}", file=sys.stderr)
    return result


def train_arguments(shards: Path, out: Path, *, recipe: str, epochs: int, settings: Sequence[str]) -> list[str]:
    """`python -m cxr_fast.train` arguments writing to `out`; `settings` override the defaults."""
    return ["--recipe", recipe, "--no-progress", f"shards={shards}", f"epochs={epochs}", "logger=none",
            "pretrained=false", "compile=off", "loader=resident", f"weights_dir={out / 'weights'}",
            f"runs_dir={out / 'runs'}", *settings]


def run_to_end(arguments: list[str], log: Path, timeout: float) -> RunRecord:
    """`python -m cxr_fast.train arguments`, output to `log`; killed after `timeout` s (a hang)."""
    started = time.perf_counter()
    process = start_logged([sys.executable, "-m", "cxr_fast.train", *arguments], log)
    return _record(started, wait_or_kill(process, timeout), log)


def kill_after(epoch: int, arguments: list[str], status_file: Path, log: Path, timeout: float) -> tuple[RunRecord, bool]:
    """Start the run held after `epoch`, SIGKILL it once status.json says that epoch is done.
    Returns its record and whether it was killed there (False: it failed or hung first)."""
    started = time.perf_counter()
    process = start_logged([sys.executable, "-c", _HOLD, str(epoch), *arguments], log)
    deadline = time.monotonic() + timeout
    while process.poll() is None and _status_epoch(status_file) < epoch and time.monotonic() < deadline:
        time.sleep(0.05)
    reached = process.poll() is None and _status_epoch(status_file) >= epoch
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    return _record(started, process.returncode, log), reached


def train_and_hold(epoch: int, argv: list[str]) -> NoReturn:
    """`python -m cxr_fast.train argv`, except that once the status.json of epoch `epoch` is
    written the process waits to be killed (and exits if the process that started it is gone)."""
    import cxr_fast.train as training

    write_status = training.write_status
    parent = os.getppid()

    def write_status_then_hold(config, state, **kwargs) -> None:
        write_status(config, state, **kwargs)
        if state.epoch >= epoch:
            while os.getppid() == parent:
                time.sleep(0.1)
            os._exit(EXIT_ORPHANED)

    training.write_status = write_status_then_hold
    run_cli(training.main, argv)


def differing_weights(expected: Path, actual: Path) -> list[str]:
    """`file: tensor` for every tensor of best.safetensors and last.pt's model that is not
    bit-identical between two weights folders (missing or extra tensors included)."""
    import torch
    from safetensors.torch import load_file

    from cxr_fast.checkpoint import load_checkpoint

    differing = []
    for name in ("best.safetensors", "last.pt"):
        if name.endswith(".pt"):
            a, b = load_checkpoint(expected / name)["model"], load_checkpoint(actual / name)["model"]
        else:
            a, b = load_file(str(expected / name)), load_file(str(actual / name))
        differing += [f"{name}: {key}" for key in sorted(set(a) | set(b))
                      if key not in a or key not in b or not torch.equal(a[key], b[key])]
    return differing


def _record(started: float, returncode: int | None, log: Path) -> RunRecord:
    return RunRecord(seconds=round(time.perf_counter() - started, 1), returncode=returncode,
                     output_tail=log.read_text(errors="replace")[-1500:])


def _status_epoch(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):  # not written yet
        return 0


def _checkpoint_epoch(path: Path) -> int | None:
    from cxr_fast.checkpoint import load_checkpoint

    try:
        return int(load_checkpoint(path)["progress"]["epoch"])
    except (CxrError, KeyError, TypeError, ValueError):
        return None


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def _without_timings(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in records]


def _failed(result: ResumeResult, reason: str) -> ResumeResult:
    result.reason = reason
    print(f"bench resume: {reason}", file=sys.stderr)
    return result
