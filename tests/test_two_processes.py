"""Two real processes on the CPU (torchrun, gloo): the distributed path the study runs on GPUs.

`accelerate launch --cpu --num_processes 2` starts ONE process with accelerate 1.16, so these
tests start `torchrun --nproc_per_node 2` and assert the world size the run reports. Every run
is under a time limit, so a hang (one rank waiting in a collective the other never enters)
fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

RECIPE = "effusion_test_resnet"
TIME_LIMIT = 240  # seconds per launch; a healthy one takes ~20 s on two busy cores
TWO = f"{RECIPE}: 2 processes on cpu"


def tiny(shards: Path, out: Path, **overrides) -> list[str]:
    settings = {"shards": shards, "weights_dir": out / "weights", "runs_dir": out / "runs", "batch_size": 16,
                "image_size": 64, "epochs": 1, "max_steps_per_epoch": 2, "logger": "none", "loader": "resident",
                "seed": 0, "precision": "fp32", "decode_threads": 1, "pretrained": "false"}
    settings.update(overrides)
    return [f"{key}={value}" for key, value in settings.items()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(settings: list[str], *, processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m cxr_fast.train ...`; the whole process group is killed
    and the test fails when it runs past TIME_LIMIT."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "cxr_fast.train", "--recipe", RECIPE, "--no-progress", *settings]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = process.communicate(timeout=TIME_LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"hang: {' '.join(settings)} ran past {TIME_LIMIT} s\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def succeeded(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[0] == TWO, run.stdout[:500]  # the world size the children got
    return run.stdout


@pytest.fixture(scope="module")
def fresh_two_process_run(phantom_shards, tmp_path_factory) -> Path:
    """One epoch trained by two processes (shared by the tests below: each launch costs ~20 s)."""
    out = tmp_path_factory.mktemp("two-processes")
    succeeded(torchrun(tiny(phantom_shards, out)))
    return out


@pytest.mark.slow
def test_two_process_validation_equals_one_process_evaluation(phantom_shards, fresh_two_process_run, tmp_path):
    """Each of two gloo processes evaluates half of the validation split; the gathered metrics
    are those of one process evaluating the same weights over the whole split."""
    from cxr_fast.predict import predict
    from cxr_fast.validation import validation_metrics

    out = fresh_two_process_run
    best = json.loads((out / "weights" / RECIPE / "best.json").read_text())
    logged = json.loads((out / "runs" / RECIPE / "metrics.jsonl").read_text().splitlines()[0])
    table = pd.read_parquet(predict(RECIPE, {"weights_dir": str(out / "weights"), "shards": str(phantom_shards)},
                                    split="val", out_dir=tmp_path / "pred"))
    one_process = validation_metrics(table["label"].to_numpy(), table["prob"].to_numpy())
    assert best["metrics"]["n"] == len(table) == one_process["n"]  # no padding, no duplicates
    for key in ("auroc", "balanced_accuracy", "threshold"):
        assert best["metrics"][key] == pytest.approx(one_process[key], abs=1e-6), key
        assert logged[f"val_{key}"] == pytest.approx(one_process[key], abs=1e-6), key


@pytest.mark.slow
def test_two_processes_resume_refuse_restart_and_stop_early(phantom_shards, fresh_two_process_run, tmp_path):
    """A saved run's life under two processes: each decision (continue, refuse, discard, stop)
    is the main process's, taken for both, so no rank is left waiting in a collective."""
    shutil.copytree(fresh_two_process_run, tmp_path, dirs_exist_ok=True)
    folder = tmp_path / "weights" / RECIPE
    assert json.loads((folder / "status.json").read_text())["epoch"] == 1

    resumed = succeeded(torchrun(tiny(phantom_shards, tmp_path, epochs=2)))
    assert "resuming after epoch 1" in resumed
    logged = (tmp_path / "runs" / RECIPE / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in logged] == [1, 2]

    refused = torchrun(tiny(phantom_shards, tmp_path, epochs=2, lr=0.01))
    assert refused.returncode != 0 and "other settings (lr " in refused.stderr and "-> 0.01" in refused.stderr
    assert json.loads((folder / "status.json").read_text())["epoch"] == 2  # nothing discarded

    # restart=true discards the saved run; a vanishing step cannot improve validation, so
    # patience 1 stops the fresh run after its epoch 2 of 6.
    restarted = succeeded(torchrun(tiny(phantom_shards, tmp_path, epochs=6, lr=1e-12, early_stopping=1,
                                        restart="true")))
    assert "discarding the saved run" in restarted and "early stop" in restarted
    status = json.loads((folder / "status.json").read_text())
    assert status["stopped_early"] and status["epoch"] == 2 and status["config"]["lr"] == 1e-12
