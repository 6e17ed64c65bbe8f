"""Training against hostile files, changed settings, a second writer and signals."""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cxr_fast.errors import CxrError
from cxr_fast.recipes import load_config
from cxr_fast.train import NonFiniteLoss, main, train

RECIPE = "effusion_test_resnet"


def small(shard_folder: Path, out: Path, **overrides) -> list[str]:
    settings = {"shards": shard_folder, "weights_dir": out / "weights", "runs_dir": out / "runs", "batch_size": 16,
                "epochs": 1, "logger": "none", "loader": "resident", "seed": 0, "max_steps_per_epoch": 2}
    settings.update(overrides)
    return [f"{key}={value}" for key, value in settings.items()]


def unread_shards(folder: Path) -> Path:
    """A shards folder that passes the run's input check (a manifest.parquet) for tests that
    stop before any data is read."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.parquet").write_bytes(b"never read")
    return folder


def no_data(*args, **kwargs):
    raise AssertionError("the run went on to decode its data")


class Planted:
    """Unpickling this creates `marker`: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("form", ["torch zip", "plain pickle"])
def test_a_crafted_checkpoint_runs_no_code_and_is_one_line(tmp_path, monkeypatch, form):
    monkeypatch.setattr("cxr_fast.train.load_task_data", no_data)
    config = load_config(RECIPE, small(unread_shards(tmp_path / "shards"), tmp_path))
    last = config.weights_path / "last.pt"
    last.parent.mkdir(parents=True)
    marker = tmp_path / "marker"
    payload = {"model": {}, "optimizer": {}, "progress": {}, "rng": {}, "config": Planted(marker)}
    if form == "torch zip":
        torch.save(payload, last)
    else:
        last.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CxrError) as caught:
        train(config, progress_bar=False)
    assert str(last) in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [[1, 2, 3], {"model": {}, "config": {}}, {"model": "x", "optimizer": {},
                                     "progress": {}, "rng": {}, "config": {}}])
def test_a_foreign_checkpoint_is_one_line_naming_the_file(tmp_path, monkeypatch, content):
    monkeypatch.setattr("cxr_fast.train.load_task_data", no_data)
    config = load_config(RECIPE, small(unread_shards(tmp_path / "shards"), tmp_path))
    last = config.weights_path / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save(content, last)
    with pytest.raises(CxrError, match="not a resume checkpoint") as caught:
        train(config, progress_bar=False)
    assert str(last) in str(caught.value) and "\n" not in str(caught.value)


def test_atomic_files_honour_the_umask(tmp_path):
    from cxr_fast.io import atomic_path

    previous = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))  # what safetensors does
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644


def test_changed_settings_are_refused_and_raised_epochs_continue(phantom_shards, tmp_path):
    previous = os.umask(0o022)
    try:
        first = train(load_config(RECIPE, small(phantom_shards, tmp_path)), progress_bar=False)
    finally:
        os.umask(previous)
    folder = tmp_path / "weights" / RECIPE
    for name in ("best.safetensors", "last.pt", "best.json", "status.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644, name
    from cxr_fast.same_run import is_finished

    assert is_finished(load_config(RECIPE, small(phantom_shards, tmp_path, loader="auto")))
    assert not is_finished(load_config(RECIPE, small(phantom_shards, tmp_path, lr=0.01)))
    for key, value in (("lr", 0.01), ("image_size", 48)):
        with pytest.raises(CxrError, match=f"other settings \\({key} .*restart=true"):
            train(load_config(RECIPE, small(phantom_shards, tmp_path, **{key: value})), progress_bar=False)
    # Its own inputs first: missing shards are named as missing, not as other settings.
    with pytest.raises(CxrError, match="other: no shards found"):
        train(load_config(RECIPE, small(tmp_path / "other", tmp_path)), progress_bar=False)
    # status.json gone (a kill before it was written): the checkpoint's settings are checked.
    (folder / "status.json").unlink()
    with pytest.raises(CxrError, match=f"{folder / 'last.pt'}: .*other settings \\(lr "):
        train(load_config(RECIPE, small(phantom_shards, tmp_path, lr=0.01)), progress_bar=False)

    more = train(load_config(RECIPE, small(phantom_shards, tmp_path, epochs=2, log_every=7)), progress_bar=False)
    assert [record["epoch"] for record in more["history"]] == [1, 2] and first["epochs"] == 1

    restarted = train(load_config(RECIPE, small(phantom_shards, tmp_path, lr=0.01, restart="true")),
                      progress_bar=False)
    assert [record["epoch"] for record in restarted["history"]] == [1]
    assert json.loads((folder / "best.json").read_text())["config"]["lr"] == 0.01
    lines = (tmp_path / "runs" / RECIPE / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]


def test_a_run_is_its_data_not_the_listing_of_candidates(phantom_shards, tmp_path, capsys):
    """The README's train (default listing) then the demo's sweep (one folder): same data, same run."""
    import shutil

    import pandas as pd

    from cxr_fast.sweep import is_finished

    train(load_config(RECIPE, small(phantom_shards, tmp_path)), progress_bar=False)
    listing = f"{phantom_shards},{tmp_path / 'absent-448'}"
    assert is_finished(load_config(RECIPE, small(listing, tmp_path)))
    more = train(load_config(RECIPE, small(listing, tmp_path, epochs=2)), progress_bar=False)
    assert [record["epoch"] for record in more["history"]] == [1, 2]
    assert "resuming after epoch 1" in capsys.readouterr().out  # resumed, not refused
    status = json.loads((tmp_path / "weights" / RECIPE / "status.json").read_text())
    assert status["data"]["shards_dir"] == str(phantom_shards) and status["config"]["shards"] == listing

    copy = shutil.copytree(phantom_shards, tmp_path / "copy")  # the same data elsewhere: the same run
    assert is_finished(load_config(RECIPE, small(copy, tmp_path, epochs=2)))
    manifest = pd.read_parquet(copy / "manifest.parquet")
    manifest.iloc[1:].to_parquet(copy / "manifest.parquet")   # other data in the same folder: another run
    assert not is_finished(load_config(RECIPE, small(copy, tmp_path, epochs=2)))
    with pytest.raises(CxrError, match=rf"other settings \(data '{phantom_shards} \(digest \w{{8}}\)' -> '{copy} \(digest"):
        train(load_config(RECIPE, small(copy, tmp_path, epochs=3)), progress_bar=False)


def test_a_pretrained_file_of_another_architecture_is_refused(tmp_path):
    from safetensors.torch import save_file

    from cxr_fast.models import build_model

    def saved(arch: str) -> Path:
        path = tmp_path / f"{arch}.safetensors"
        save_file({k: v.contiguous() for k, v in build_model(arch, pretrained=False).state_dict().items()}, str(path))
        return path

    with pytest.raises(CxrError, match="does not fit test_resnet.*another architecture") as caught:
        build_model("test_resnet", pretrained=False, pretrained_file=str(saved("test_convnext")))
    assert "\n" not in str(caught.value)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not weights at all")
    with pytest.raises(CxrError, match="cannot be loaded into test_resnet") as caught:
        build_model("test_resnet", pretrained=False, pretrained_file=str(garbage))
    assert "\n" not in str(caught.value)

    own = saved("test_resnet")
    from safetensors.torch import load_file

    loaded = build_model("test_resnet", pretrained=False, pretrained_file=str(own)).state_dict()
    expected = load_file(str(own))
    assert all(torch.equal(loaded[key], expected[key]) for key in expected if not key.startswith("fc."))


def test_an_unwritable_weights_dir_is_found_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr("cxr_fast.train.load_task_data", no_data)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = load_config(RECIPE, small(tmp_path / "shards", tmp_path, weights_dir=blocker / "weights"))
    with pytest.raises(CxrError, match="cannot write here"):
        train(config, progress_bar=False)


def test_nan_in_the_first_epoch_names_no_checkpoint(phantom_shards, tmp_path, monkeypatch):
    class PoisonedLoss(torch.nn.BCEWithLogitsLoss):
        def forward(self, logits, target):
            return super().forward(logits, target) * float("nan")

    monkeypatch.setattr(torch.nn, "BCEWithLogitsLoss", PoisonedLoss)
    with pytest.raises(NonFiniteLoss, match="no checkpoint was written yet") as caught:
        train(load_config(RECIPE, small(phantom_shards, tmp_path)), progress_bar=False)
    assert "last.pt" not in str(caught.value)


def test_settings_may_follow_flags(capsys, tmp_path):
    assert main(["--no-progress", "epochs=3", "--recipe", RECIPE, "--print-config", "lr=0.5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["epochs"], printed["lr"]) == (3, 0.5)

    from cxr_fast import predict, sweep

    assert sweep.main(["--tasks", "effusion", "--dry-run", "epochs=3", "--archs", "test_resnet",
                       f"weights_dir={tmp_path}"]) == 0
    assert "epochs=3" in capsys.readouterr().out
    with pytest.raises(CxrError, match="best.json: not found"):
        predict.main(["--split", "val", f"weights_dir={tmp_path}", "--recipe", RECIPE])


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, WANDB_MODE="disabled"))


@pytest.mark.slow
def test_a_second_run_of_a_recipe_exits_at_once_naming_the_holder(phantom_shards, tmp_path):
    folder = tmp_path / "weights" / RECIPE
    holder = _python(f"import time\nfrom cxr_fast.locks import exclusive_lock\n"
                     f"with exclusive_lock({str(folder)!r}):\n    print('held', flush=True)\n    time.sleep(600)")
    try:
        assert holder.stdout.readline().strip() == "held"
        done = subprocess.run([sys.executable, "-m", "cxr_fast.train", "--recipe", RECIPE, "--no-progress",
                               *small(phantom_shards, tmp_path)], capture_output=True, text=True,
                              env=dict(os.environ, WANDB_MODE="disabled"), timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2
    assert f"pid {holder.pid}" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / RECIPE / "metrics.jsonl").exists()


@pytest.mark.slow
def test_sigterm_stops_the_sweep_and_its_running_training(phantom_shards, tmp_path):
    from cxr_fast.locks import lock_holder

    settings = small(phantom_shards, tmp_path, epochs=100000, max_steps_per_epoch=1)
    sweep = subprocess.Popen([sys.executable, "-m", "cxr_fast.sweep", "--tasks", "effusion", "--archs", "test_resnet",
                              "--logs", str(tmp_path / "logs"), *settings], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=dict(os.environ, WANDB_MODE="disabled"))
    folder = tmp_path / "weights" / RECIPE
    try:
        child = None
        while child is None:  # the training child writes its pid into the recipe's lock
            assert sweep.poll() is None, sweep.stdout.read()
            child = (lock_holder(folder) or {}).get("pid")
            time.sleep(0.1)
        sweep.send_signal(signal.SIGTERM)
        output = sweep.communicate(timeout=120)[0]
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 128 + signal.SIGTERM, output
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    assert lock_holder(folder) is None


class FakeRanks:
    """An accelerator seen from one rank of two; records the barriers it enters."""

    def __init__(self, *, main: bool):
        self.is_main_process, self.num_processes, self.barriers = main, 2, 0

    def wait_for_everyone(self):
        self.barriers += 1

    def print(self, *args):
        pass


def test_every_rank_follows_the_main_process_on_a_restart(tmp_path, monkeypatch):
    """A helper rank acts on the main process's decision, never on what it finds on disk: the
    main process may already have discarded the files, and a rank that skipped the barrier
    would wait in DDP set-up while the main process waits in the barrier."""
    import cxr_fast.train as training

    config = load_config(RECIPE, small(tmp_path / "shards", tmp_path, lr=0.01, restart="true"))
    monkeypatch.setattr(training, "main_process_decides_object", lambda value, accelerator: ("discard", None))
    helper = FakeRanks(main=False)
    training.start_same_run(config, helper, data={})  # nothing on disk any more
    assert helper.barriers == 1
    monkeypatch.setattr(training, "main_process_decides_object", lambda value, accelerator: ("refuse", "saved: other"))
    with pytest.raises(CxrError, match="saved: other"):
        training.start_same_run(config, FakeRanks(main=False), data={})


def test_the_main_process_decides_from_what_is_saved(phantom_shards, tmp_path):
    from cxr_fast.shard_folders import data_identity
    from cxr_fast.train import same_run_decision

    data = data_identity(phantom_shards)
    first = load_config(RECIPE, small(phantom_shards, tmp_path))
    assert same_run_decision(first, data) == ("continue", None)
    train(first, progress_bar=False)
    assert same_run_decision(load_config(RECIPE, small(phantom_shards, tmp_path, epochs=3)), data) == ("continue", None)
    action, reason = same_run_decision(load_config(RECIPE, small(phantom_shards, tmp_path, lr=0.01)), data)
    assert action == "refuse" and "other settings (lr " in reason and "\n" not in reason
    assert same_run_decision(load_config(RECIPE, small(phantom_shards, tmp_path, lr=0.01, restart="true")), data) == \
        ("discard", None)
    (first.weights_path / "status.json").unlink()
    (first.weights_path / "last.pt").write_bytes(b"not a checkpoint")
    action, reason = same_run_decision(first, data)
    assert action == "refuse" and "last.pt" in reason
