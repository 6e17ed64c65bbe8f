"""Prediction files and the study runner."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_fast import sweep
from cxr_fast.errors import CxrError
from cxr_fast.io import parquet_metadata
from cxr_fast.predict import main as predict_main, predict
from cxr_fast.recipes import load_config
from cxr_fast.schema import PREDICTION_COLUMNS
from cxr_fast.train import train

RECIPE = "edema_test_convnext"


@pytest.fixture(scope="module")
def trained(phantom_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    settings = [f"shards={phantom_shards}", f"weights_dir={out / 'weights'}", f"runs_dir={out / 'runs'}",
                "epochs=1", "batch_size=16", "logger=none"]
    train(load_config(RECIPE, settings), progress_bar=False)
    return out


def test_prediction_file_has_the_schema_and_uses_the_validation_threshold(phantom_shards, trained, tmp_path):
    path = predict(RECIPE, {"shards": str(phantom_shards), "weights_dir": str(trained / "weights")},
                   split="test", out_dir=tmp_path)
    assert path == tmp_path / f"{RECIPE}.parquet"
    table = pd.read_parquet(path)
    assert list(table.columns) == list(PREDICTION_COLUMNS)
    manifest = pd.read_parquet(phantom_shards / "manifest.parquet")
    expected = manifest[(manifest["split"] == "test") & manifest["edema"].notna()]
    assert sorted(table["key"]) == sorted(expected["key"])
    assert (table["split"] == "test").all() and (table["task"] == "edema").all() and (table["arch"] == "test_convnext").all()
    threshold = json.loads((trained / "weights" / RECIPE / "best.json").read_text())["threshold"]
    assert np.allclose(table["threshold"], threshold)
    assert (table["pred"] == (table["prob"] >= table["threshold"]).astype(int)).all()
    merged = table.merge(expected[["key", "edema", "race", "age_group"]], on="key")
    assert (merged["label"] == merged["edema"]).all() and (merged["race_x"] == merged["race_y"]).all()
    # the file records where its images and model came from (explain and the gallery read it)
    assert parquet_metadata(path) == {"shards": str(Path(phantom_shards).resolve()),
                                      "weights_dir": str((trained / "weights").resolve())}


def test_predictions_are_deterministic_and_splits_selectable(phantom_shards, trained, tmp_path):
    settings = {"shards": str(phantom_shards), "weights_dir": str(trained / "weights")}
    first = pd.read_parquet(predict(RECIPE, settings, split="val", out_dir=tmp_path / "a"))
    second = pd.read_parquet(predict(RECIPE, settings, split="val", out_dir=tmp_path / "b"))
    pd.testing.assert_frame_equal(first, second)
    everything = pd.read_parquet(predict(RECIPE, settings, split="all", out_dir=tmp_path / "c"))
    assert set(everything["split"]) == {"train", "val", "test"}


def test_predict_original_cli_form_and_missing_weights(phantom_shards, trained, tmp_path):
    args = ["2", "test_convnext", f"shards={phantom_shards}", f"weights_dir={trained / 'weights'}",
            "--out-dir", str(tmp_path)]
    assert predict_main(args) == 0 and (tmp_path / f"{RECIPE}.parquet").is_file()
    assert predict_main(["--all", f"shards={phantom_shards}", f"weights_dir={trained / 'weights'}",
                         "--out-dir", str(tmp_path / "all"), "--split", "val"]) == 0
    assert [p.name for p in (tmp_path / "all").iterdir()] == [f"{RECIPE}.parquet"]
    with pytest.raises(CxrError, match="no trained recipe"):
        predict_main(["--all", f"weights_dir={tmp_path / 'none'}"])
    with pytest.raises(CxrError, match="best.json: not found; train first"):
        predict("fracture_test_convnext", {"weights_dir": str(trained / "weights")})


# ------------------------------------------------------------------ sweep


def write_run(weights: Path, recipe: str, *, epoch: int, finished: bool, stopped_early: bool = False) -> Path:
    """A recipe folder as training leaves it: status.json and a resume checkpoint."""
    folder = weights / recipe
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({
        "recipe": recipe, "epoch": epoch, "epochs": epoch, "finished": finished, "stopped_early": stopped_early,
        "best_epoch": 1, "best_balanced_accuracy": 0.5}))
    (folder / "last.pt").write_bytes(b"resume state")
    return folder


def test_sweep_dry_run_lists_every_selected_recipe_and_skips_finished(tmp_path, capsys):
    weights = tmp_path / "weights"
    write_run(weights, "effusion_resnet50", epoch=3, finished=True)
    write_run(weights, "edema_resnet50", epoch=1, finished=False)
    write_run(weights, "effusion_convnext_base", epoch=2, finished=True)  # finished for epochs=2, not for 3
    assert sweep.main(["--tasks", "effusion,edema", "--archs", "resnet50,convnext_*", "--dry-run",
                       f"weights_dir={weights}", "epochs=3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * 5 - 1
    assert not any("effusion_resnet50" in line for line in lines)
    assert any("--recipe edema_resnet50" in line for line in lines)
    assert any("--recipe effusion_convnext_base" in line for line in lines)
    assert all(line.startswith(sys.executable) and line.endswith("epochs=3") for line in lines)


def test_is_finished_is_what_training_would_do(tmp_path):
    weights = tmp_path / "weights"
    write_run(weights, "effusion_resnet50", epoch=2, finished=True)
    write_run(weights, "edema_resnet50", epoch=2, finished=True)

    def finished(recipe: str, epochs: int) -> int:
        return sweep.main(["--is-finished", recipe, f"weights_dir={weights}", f"epochs={epochs}"])

    assert finished("effusion_resnet50", 2) == 0 and finished("effusion_resnet50", 3) == 1
    (weights / "effusion_resnet50" / "last.pt").unlink()
    assert finished("effusion_resnet50", 2) == 1          # training would start over: not finished
    (weights / "edema_resnet50" / "status.json").write_text("{not json")
    assert finished("edema_resnet50", 2) == 1
    write_run(weights, "fracture_resnet50", epoch=2, finished=True)
    (weights / "fracture_resnet50" / "status.json").write_text(json.dumps({"recipe": "edema_resnet50", "epoch": 2,
                                                                           "finished": True}))
    assert finished("fracture_resnet50", 2) == 1          # another recipe's status


def test_sweep_all_is_the_114_study_recipes(capsys):
    assert sweep.main(["--tasks", "all", "--archs", "all", "--dry-run"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 114


def test_sweep_writes_a_slurm_array(tmp_path):
    script, logs = tmp_path / "study.sbatch", tmp_path / "not" / "yet" / "logs"
    assert sweep.main(["--tasks", "all", "--archs", "resnet50,densenet121", "--slurm", str(script),
                       "--gpus-per-task", "2", "--logs", str(logs), "epochs=100"]) == 0
    text = script.read_text()
    assert "#SBATCH --array=0-11" in text and "#SBATCH --gres=gpu:2" in text and "#SBATCH --cpus-per-task=16" in text
    python = str(Path(sys.executable).absolute())
    assert os.path.isabs(python) and f"{python} -m accelerate.commands.launch --multi_gpu --num_processes 2 " \
        "--num_machines 1 --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process 8 " \
        "-m cxr_fast.train --recipe \"$RECIPE\" --no-progress epochs=100" in text
    assert "\naccelerate " not in text and "\npython " not in text  # nothing relies on an activated venv
    assert f"{python} -m cxr_fast.sweep --is-finished \"$RECIPE\" epochs=100" in text
    assert f"{python} -m cxr_fast.sweep --is-running \"$RECIPE\" epochs=100" in text
    assert "no_finding_densenet121" in text and "cardiomegaly_resnet50" in text
    # Slurm does not create the folder of --output: the writer does.
    assert logs.is_dir() and f"#SBATCH --output={logs.absolute()}/slurm-%A_%a.log" in text
    assert f'LOG={logs.absolute()}/"$RECIPE".log' in text and "$(hostname)" in text and "CUDA_VISIBLE_DEVICES" in text


def test_slurm_cpu_jobs_have_no_gres_and_no_launcher(tmp_path):
    script = tmp_path / "cpu.sbatch"
    assert sweep.main(["--tasks", "effusion", "--archs", "test_resnet", "--slurm", str(script), "--gpus-per-task", "0",
                       "--cpus-per-task", "1", "--logs", str(tmp_path / "logs")]) == 0
    text = script.read_text()
    assert "--gres" not in text and "accelerate" not in text and "#SBATCH --cpus-per-task=1" in text
    assert f"\n{Path(sys.executable).absolute()} -m cxr_fast.train --recipe \"$RECIPE\" --no-progress\n" in text


def test_slurm_one_gpu_runs_train_directly(tmp_path):
    script = tmp_path / "one.sbatch"
    assert sweep.main(["--tasks", "effusion", "--archs", "resnet50", "--slurm", str(script),
                       "--logs", str(tmp_path / "logs")]) == 0
    text = script.read_text()
    assert "#SBATCH --gres=gpu:1" in text and "#SBATCH --cpus-per-task=8" in text and "accelerate" not in text


def test_sweep_validates_every_config_before_running(capsys):
    with pytest.raises(CxrError, match="unknown setting 'epoch'"):
        sweep.main(["--tasks", "0", "--archs", "resnet50", "epoch=3", "--dry-run"])
    with pytest.raises(CxrError, match="no arch matches 'resnet9'"):
        sweep.main(["--archs", "resnet9", "--dry-run"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--in-process"]], ids=["subprocess", "in-process"])
def test_sweep_trains_locally_and_then_skips(phantom_shards, tmp_path, capsys, mode):
    settings = [f"shards={phantom_shards}", f"weights_dir={tmp_path / 'weights'}", f"runs_dir={tmp_path / 'runs'}",
                "epochs=1", "batch_size=16", "logger=none", "max_steps_per_epoch=2"]
    assert sweep.main(["--tasks", "effusion", "--archs", "test_resnet", "--logs", str(tmp_path / "logs"), *mode, *settings]) == 0
    assert json.loads((tmp_path / "weights" / "effusion_test_resnet" / "status.json").read_text())["finished"]
    capsys.readouterr()
    assert sweep.main(["--tasks", "effusion", "--archs", "test_resnet", "--dry-run", *settings]) == 0
    assert capsys.readouterr().out.strip() == ""


@pytest.mark.slow
def test_sweep_continues_a_finished_recipe_when_more_epochs_are_asked_for(phantom_shards, tmp_path, capsys):
    settings = [f"shards={phantom_shards}", f"weights_dir={tmp_path / 'weights'}", f"runs_dir={tmp_path / 'runs'}",
                "batch_size=16", "logger=none", "max_steps_per_epoch=2"]
    selection = ["--tasks", "effusion", "--archs", "test_resnet", "--in-process"]
    assert sweep.main([*selection, *settings, "epochs=2"]) == 0
    capsys.readouterr()
    assert sweep.main([*selection, *settings, "epochs=3"]) == 0
    assert "1 recipes to train, 0 already finished" in capsys.readouterr().out
    status = json.loads((tmp_path / "weights" / "effusion_test_resnet" / "status.json").read_text())
    assert status["finished"] and status["epoch"] == 3
    lines = (tmp_path / "runs" / "effusion_test_resnet" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
