"""The training loop on phantom shards: learning, checkpoints, resume after kill -9, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_fast.bench.resume import kill_and_resume
from cxr_fast.errors import CxrError
from cxr_fast.recipes import load_config
from cxr_fast.schema import STATUS_FIELDS
from cxr_fast.train import NonFiniteLoss, main, train

RECIPE = "effusion_test_resnet"


def small(shards: Path, out: Path, **overrides) -> list[str]:
    settings = {"shards": shards, "weights_dir": out / "weights", "runs_dir": out / "runs",
                "batch_size": 16, "epochs": 2, "logger": "none", "loader": "resident", "seed": 0}
    settings.update(overrides)
    return [f"{key}={value}" for key, value in settings.items()]


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_two_epochs_learn_and_write_every_output(phantom_shards, tmp_path):
    config = load_config(RECIPE, small(phantom_shards, tmp_path, epochs=3, logger="wandb"))
    result = train(config, progress_bar=False)
    history = result["history"]
    assert [record["epoch"] for record in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    folder = tmp_path / "weights" / RECIPE
    best = json.loads((folder / "best.json").read_text())
    assert best["epoch"] == result["best_epoch"]
    assert best["metrics"]["balanced_accuracy"] == max(r["val_balanced_accuracy"] for r in history)
    assert 0 < best["threshold"] < 1 and best["config"]["recipe"] == RECIPE
    assert set(load_weights(folder / "best.safetensors")) == set(torch.load(folder / "last.pt", weights_only=True)["model"])
    lines = (tmp_path / "runs" / RECIPE / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert {"val_auroc", "val_balanced_accuracy", "val_sensitivity", "val_specificity", "images_per_second",
            "data_wait_share"} <= set(json.loads(lines[0]))
    status = json.loads((tmp_path / "weights" / RECIPE / "status.json").read_text())
    assert status["finished"] is True and set(status) == set(STATUS_FIELDS)
    assert json.loads((tmp_path / "runs" / RECIPE / "config.json").read_text())["loader_used"] == "resident"
    # Rerunning a finished recipe does nothing and changes nothing.
    before = (folder / "last.pt").read_bytes()
    assert train(config, progress_bar=False)["epochs"] == 3
    assert (folder / "last.pt").read_bytes() == before


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(phantom_shards, tmp_path):
    settings = ["batch_size=16", "seed=0", "deterministic=true", "decode_threads=1"]
    result = kill_and_resume(phantom_shards, tmp_path, recipe=RECIPE, epochs=4, kill_after_epoch=1, settings=settings,
                             compare=True, timeout=900)
    assert result.killed and result.epoch_at_kill == 1, result.first_run.output_tail
    assert result.second_run.returncode == 0, result.second_run.output_tail
    assert result.resumed_after_epoch == 1 and result.logged_epochs == [1, 2, 3, 4]
    assert result.identical_weights, f"differs after resume: {result.differing[:5]}"
    assert result.checks["metrics identical to the uninterrupted run (timings aside)"]
    assert result.ok, result.reason


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(phantom_shards, tmp_path, monkeypatch):
    config = load_config(RECIPE, small(phantom_shards, tmp_path, epochs=1))
    train(config, progress_bar=False)
    last = tmp_path / "weights" / RECIPE / "last.pt"
    good = last.read_bytes()

    class PoisonedLoss(torch.nn.BCEWithLogitsLoss):
        def forward(self, logits, target):
            return super().forward(logits, target) * float("nan")

    monkeypatch.setattr(torch.nn, "BCEWithLogitsLoss", PoisonedLoss)
    with pytest.raises(NonFiniteLoss, match="NaN/inf in epoch 2.*last good checkpoint"):
        train(load_config(RECIPE, small(phantom_shards, tmp_path, epochs=2)), progress_bar=False)
    assert last.read_bytes() == good


def test_an_early_stopped_recipe_is_not_trained_again(phantom_shards, tmp_path, monkeypatch):
    # A vanishing step cannot improve validation, so patience 1 stops after epoch 2 of 6.
    config = load_config(RECIPE, small(phantom_shards, tmp_path, epochs=6, early_stopping=1, lr=1e-12,
                                       max_steps_per_epoch=2))
    assert train(config, progress_bar=False)["epochs"] == 2
    status = json.loads((tmp_path / "weights" / RECIPE / "status.json").read_text())
    assert status["finished"] and status["epoch"] == 2
    last = tmp_path / "weights" / RECIPE / "last.pt"
    before = last.read_bytes()

    def no_data(*args, **kwargs):
        raise AssertionError("a finished recipe decoded its data again")

    monkeypatch.setattr("cxr_fast.train.load_task_data", no_data)
    assert train(config, progress_bar=False)["epochs"] == 2
    assert last.read_bytes() == before


def test_a_log_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    from cxr_fast.metrics_log import MetricsLog

    config = load_config(RECIPE, [f"runs_dir={tmp_path}", "logger=none"])
    path = tmp_path / RECIPE / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"epoch": 1, "step": 3}\n{"epoch": 2, "step": 6}\n{"epoch": 3, "st')
    MetricsLog(config, enabled=True, resume_epoch=2)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_bf16_autocast_path_on_cpu(phantom_shards, tmp_path):
    from cxr_fast.models import build_model
    from cxr_fast.engine import make_accelerator

    accelerator = make_accelerator("bf16")
    model = accelerator.prepare(build_model("test_resnet", pretrained=False))
    seen = []
    model.fc.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    model(torch.zeros(2, 1, 64, 64))
    assert seen == [torch.bfloat16]  # computed in bf16 (Accelerate hands back fp32 logits)
    result = train(load_config(RECIPE, small(phantom_shards, tmp_path, epochs=1, precision="bf16",
                                             max_steps_per_epoch=2)), progress_bar=False)
    assert np.isfinite(result["history"][0]["train_loss"])


@pytest.mark.slow
def test_torch_compile_on_a_tiny_model(phantom_shards, tmp_path):
    result = train(load_config(RECIPE, small(phantom_shards, tmp_path, epochs=1, compile="on",
                                             max_steps_per_epoch=2, channels_last="true")), progress_bar=False)
    assert np.isfinite(result["history"][0]["train_loss"])


def test_gradient_accumulation_takes_one_step_per_group(phantom_shards, tmp_path):
    result = train(load_config(RECIPE, small(phantom_shards, tmp_path, epochs=1, grad_accum=2,
                                             max_steps_per_epoch=2)), progress_bar=False)
    assert result["history"][0]["step"] == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--recipe", "effusion_resnet5"], "unknown recipe 'effusion_resnet5'"),
    (["--recipe", RECIPE, "lr=fast"], "setting 'lr' expects float"),
    (["--recipe", RECIPE, "shards=/nonexistent"], "/nonexistent: no shards found"),
    (["9", "test_resnet"], "task index 9 is out of range"),
])
@pytest.mark.slow
def test_cli_errors_are_one_line_and_exit_2(args, message):
    done = subprocess.run([sys.executable, "-m", "cxr_fast.train", *args], capture_output=True, text=True,
                          env=dict(os.environ, WANDB_MODE="disabled"))
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("offline", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "unreachable endpoint"])
def test_unreachable_hub_fails_the_run_at_once_with_the_way_out(phantom_shards, tmp_path, offline):
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    env |= {"WANDB_MODE": "disabled", "HF_HUB_CACHE": str(tmp_path / "hub-cache"), **offline}
    args = small(phantom_shards, tmp_path, epochs=1, image_size=64, batch_size=8)
    done = subprocess.run([sys.executable, "-m", "cxr_fast.train", "--recipe", "effusion_resnet50", *args],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr  # no retries logged
    assert "not in the local cache and the Hugging Face hub cannot be reached" in done.stderr
    assert "pretrained=false" in done.stderr


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """huggingface_hub aimed at a closed local port with an empty cache; counts the probes."""
    from huggingface_hub import constants

    from cxr_fast import hub

    probes = []
    real_probe = hub._probe
    monkeypatch.setattr(hub, "_OFFLINE", {})
    monkeypatch.setattr(hub, "_probe", lambda: probes.append(1) or real_probe())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test: offline mode sets it
    return probes


@pytest.mark.parametrize("mode", [["--in-process"], []], ids=["in-process", "subprocess"])
def test_an_offline_sweep_asks_the_hub_once_and_fails_each_pretrained_run_at_once(
        phantom_shards, tmp_path, monkeypatch, capsys, unreachable_hub, mode):
    from cxr_fast import sweep

    def no_data(*args, **kwargs):
        raise AssertionError("the run went on to decode its data")

    monkeypatch.setattr("cxr_fast.train.load_task_data", no_data)
    settings = [f"shards={phantom_shards}", f"weights_dir={tmp_path / 'weights'}", f"runs_dir={tmp_path / 'runs'}",
                "logger=none", "image_size=64"]
    with pytest.raises(CxrError, match="2 of 2 recipes failed; see the FAILED lines above"):
        sweep.main(["--tasks", "effusion,edema", "--archs", "resnet50", "--logs", str(tmp_path / "logs"),
                    *mode, *settings])
    out = capsys.readouterr().out
    assert "the Hugging Face hub cannot be reached (http://127.0.0.1:9 unreachable" in out
    failed = [line.partition(": ")[2] for line in out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2 and failed[0] == failed[1] and failed[0].startswith("resnet50.a1_in1k: pretrained weights")
    assert len(unreachable_hub) == 1 and os.environ["HF_HUB_OFFLINE"] == "1"  # inherited by the runs it starts
    assert not list(tmp_path.glob("logs/*.log"))  # no run was started to find that out


def test_the_original_cli_form_and_list(capsys):
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert len(listed) == 114 and "effusion_convnext_large" in listed
    assert main(["1", "convnext_large", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["recipe"] == "effusion_convnext_large"
    with pytest.raises(CxrError, match="no recipe given"):
        main([])


@pytest.mark.slow
def test_two_identical_runs_write_byte_identical_best_weights(phantom_shards, tmp_path):
    # Separate processes: the order safetensors kept the metadata in changed from one process to the next.
    for name in ("first", "second"):
        done = subprocess.run([sys.executable, "-m", "cxr_fast.train", "--recipe", RECIPE, "--no-progress",
                               *small(phantom_shards, tmp_path / name, epochs=1, deterministic="true", decode_threads=1)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    first, second = (tmp_path / name / "weights" / RECIPE / "best.safetensors" for name in ("first", "second"))
    assert first.read_bytes() == second.read_bytes()


def test_val_every_validates_every_nth_and_the_final_epoch(phantom_shards, tmp_path, monkeypatch):
    import cxr_fast.train as training
    from cxr_fast.engine import EVAL_BATCH_FACTOR

    batch_sizes = []
    real_make_loader = training.make_loader

    def recording(*args, **kwargs):
        batch_sizes.append(kwargs["batch_size"])
        return real_make_loader(*args, **kwargs)

    monkeypatch.setattr(training, "make_loader", recording)
    config = load_config(RECIPE, small(phantom_shards, tmp_path, epochs=3, val_every=2, max_steps_per_epoch=2))
    history = train(config, progress_bar=False)["history"]
    assert [("val_balanced_accuracy" in record) for record in history] == [False, True, True]
    assert batch_sizes == [16, 16 * EVAL_BATCH_FACTOR]  # train, then val: no gradients, larger batches
    best = json.loads((tmp_path / "weights" / RECIPE / "best.json").read_text())
    assert best["epoch"] in (2, 3)


def test_the_logged_training_loss_is_the_mean_over_ranks():
    from types import SimpleNamespace

    from cxr_fast.train import mean_over_ranks

    calls = []
    ranks = SimpleNamespace(num_processes=2, reduce=lambda value, reduction: calls.append(reduction) or value * 0 + 3.0)
    assert mean_over_ranks(torch.tensor(1.0), ranks) == 3.0 and calls == ["mean"]
    assert mean_over_ranks(torch.tensor(1.0), SimpleNamespace(num_processes=1)) == 1.0


def test_list_takes_a_pattern_over_every_recipe_and_the_error_says_so(capsys):
    assert main(["--list", "*test*"]) == 0
    listed = capsys.readouterr().out.split()
    assert RECIPE in listed and "edema_test_vit" in listed and len(listed) == 6 * 4
    assert main(["--list", "effusion_*"]) == 0
    assert "effusion_test_resnet" in capsys.readouterr().out.split()
    with pytest.raises(CxrError, match=r"--list nothing\*: no recipe matches"):
        main(["--list", "nothing*"])
    with pytest.raises(CxrError, match=r"--list PATTERN. searches every recipe, the CPU-sized test_\* ones too"):
        main(["--recipe", "effusion_resnet5"])


def test_print_config_shows_what_the_run_uses(capsys):
    assert main(["--recipe", "effusion_resnet50", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["image_size"], printed["batch_size"]) == (224, 256)  # the arch's, not 0
    assert main(["--recipe", "effusion_resnet50", "--print-config", "image_size=128", "batch_size=8"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["image_size"], printed["batch_size"]) == (128, 8)


def test_the_epoch_line_reads_an_undefined_balanced_accuracy(tmp_path):
    from cxr_fast.train import CheckpointClock, epoch_line

    config = load_config(RECIPE, [f"weights_dir={tmp_path}", "epochs=2"])
    record = {"epoch": 1, "train_loss": 0.5, "val_auroc": None, "val_balanced_accuracy": None,
              "images_per_second": 100.0, "data_wait_share": 0.1}
    assert "val AUROC None  bal.acc None" in epoch_line(config, record, CheckpointClock(every=0, saved_epoch=0))
