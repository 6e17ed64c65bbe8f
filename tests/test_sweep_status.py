"""`sweep --status`, `--is-finished` and `--is-running` on fabricated weights/runs/log files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_fast import sweep
from cxr_fast.locks import exclusive_lock
from cxr_fast.study_status import last_error_line

TASKS = "effusion,edema,pneumonia,fracture,cardiomegaly"
ARCH = "test_resnet"


def fabricate(root: Path, recipe: str, *, epochs_done: int, finished: bool = False, stopped_early: bool = False,
              log: str | None = None, epoch_seconds: float = 30.0) -> None:
    weights, runs = root / "weights" / recipe, root / "runs" / recipe
    weights.mkdir(parents=True)
    runs.mkdir(parents=True)
    scores = [0.60, 0.72, 0.70, 0.71][:epochs_done]
    lines = [{"epoch": epoch, "step": 10 * epoch, "images_per_second": 100.0 + epoch, "epoch_seconds": epoch_seconds,
              "val_balanced_accuracy": score, "val_auroc": score + 0.1} for epoch, score in enumerate(scores, 1)]
    (runs / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"epoch": 9, "cut')
    best = max(range(epochs_done), key=lambda index: scores[index]) + 1
    (weights / "status.json").write_text(json.dumps({
        "recipe": recipe, "epoch": epochs_done, "epochs": 4, "finished": finished, "stopped_early": stopped_early,
        "best_epoch": best, "best_balanced_accuracy": scores[best - 1]}))
    (weights / "last.pt").write_bytes(b"")
    if log is not None:
        (root / "logs").mkdir(exist_ok=True)
        (root / "logs" / f"{recipe}.log").write_text(log)


def settings(root: Path) -> list[str]:
    return [f"weights_dir={root / 'weights'}", f"runs_dir={root / 'runs'}", "epochs=4"]


@pytest.fixture
def study(tmp_path) -> Path:
    fabricate(tmp_path, f"effusion_{ARCH}", epochs_done=4, finished=True)
    fabricate(tmp_path, f"edema_{ARCH}", epochs_done=3, finished=True, stopped_early=True)
    fabricate(tmp_path, f"pneumonia_{ARCH}", epochs_done=2, log=(
        "== 2025-01-01 10:00:00 Slurm job 7_2 on node1: x\nerror: an old attempt's error\n"
        "== 2025-01-02 10:00:00 Slurm job 8_2 on node2: x\nepoch 2/4\nTraceback (most recent call last):\n"
        "  File ...\nRuntimeError: CUDA error: an illegal memory access\nsrun: cleanup\n"))
    fabricate(tmp_path, f"fracture_{ARCH}", epochs_done=1, log="== start\nepoch 1/4\n")
    return tmp_path


def status_rows(root: Path, capsys) -> dict:
    assert sweep.main(["--status", "--json", "--tasks", TASKS, "--archs", ARCH, "--logs", str(root / "logs"),
                       *settings(root)]) == 0
    return json.loads(capsys.readouterr().out)


def test_status_rows_from_status_metrics_lock_and_log(study, capsys):
    with exclusive_lock(study / "weights" / f"fracture_{ARCH}"):  # a live run holds it
        report = status_rows(study, capsys)
    rows = {row["recipe"].split("_")[0]: row for row in report["recipes"]}
    assert {task: row["state"] for task, row in rows.items()} == {
        "effusion": "finished", "edema": "stopped early", "pneumonia": "failed", "fracture": "running",
        "cardiomegaly": "not started"}
    assert (rows["effusion"]["best_epoch"], rows["effusion"]["best_val_balanced_accuracy"]) == (2, 0.72)
    assert rows["effusion"]["best_val_auroc"] == pytest.approx(0.82) and rows["effusion"]["images_per_second"] == 104.0
    assert rows["effusion"]["seconds_left"] == 0 and rows["edema"]["seconds_left"] == 0
    assert rows["pneumonia"]["seconds_left"] == 2 * 30.0 and rows["pneumonia"]["epochs_done"] == 2
    assert rows["pneumonia"]["last_error"] == "RuntimeError: CUDA error: an illegal memory access"
    assert rows["fracture"]["held_by"].startswith("pid ") and rows["cardiomegaly"]["seconds_left"] is None
    assert report["total"] == {"recipes": 5, "states": {"finished": 1, "stopped early": 1, "failed": 1, "running": 1,
                                                        "not started": 1},
                               "epochs_done": 4 + 3 + 2 + 1, "epochs": 20, "seconds_left": 60.0 + 90.0,
                               "recipes_without_estimate": 1}


def test_status_table_and_interrupted_run(study, capsys):
    assert sweep.main(["--status", "--tasks", TASKS, "--archs", ARCH, "--logs", str(study / "logs"),
                       *settings(study)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["recipe", "state", "epochs"]
    row = next(line for line in lines if line.startswith(f"effusion_{ARCH}"))
    assert row.split() == [f"effusion_{ARCH}", "finished", "4/4", "2", "0.720", "0.820", "104", "0m", "00s"]
    assert "    last error: RuntimeError: CUDA error: an illegal memory access" in lines
    assert "interrupted" in next(line for line in lines if line.startswith(f"fracture_{ARCH}"))
    assert lines[-1].startswith("total: 5 recipes (") and "epochs 10/20" in lines[-1]
    assert "at least 2m 30s (+ 1 recipes without a measured epoch)" in lines[-1]


def test_more_epochs_reopen_a_finished_recipe(study):
    finished = [f"effusion_{ARCH}", *settings(study)]
    assert sweep.main(["--is-finished", *finished]) == 0
    assert sweep.main(["--is-finished", *finished, "epochs=6"]) == 1
    assert sweep.main(["--is-finished", f"edema_{ARCH}", *settings(study), "epochs=6"]) == 0  # stopped early
    assert sweep.main(["--is-finished", f"pneumonia_{ARCH}", *settings(study)]) == 1


def test_is_running_names_the_holder(study, capsys, monkeypatch):
    recipe = [f"pneumonia_{ARCH}", *settings(study)]
    assert sweep.main(["--is-running", *recipe]) == 1 and capsys.readouterr().out == ""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with exclusive_lock(study / "weights" / f"pneumonia_{ARCH}"):
        assert sweep.main(["--is-running", *recipe]) == 0
    said = capsys.readouterr().out
    assert said.startswith("running (held by pid ") and ", Slurm job 4242, since " in said


def test_last_error_line_reads_only_the_latest_job(tmp_path):
    log = tmp_path / "r.log"
    log.write_text("== job 1\nerror: old\n== job 2\nepoch 1/4\n")
    assert last_error_line(log) is None
    assert last_error_line(tmp_path / "missing.log") is None


def test_status_imports_no_torch(study):
    code = ("import sys; from cxr_fast import sweep; "
            f"sweep.main(['--status', '--tasks', 'all', '--archs', 'all', 'weights_dir={study / 'weights'}']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("total: 114 recipes (114 not started)")


def test_status_judges_a_run_by_its_own_settings_unless_asked(tmp_path, capsys):
    """A run trained with epochs=2 is finished 2/2, whatever the recipe's default epochs (30) or
    an epochs= given to --status; --as-requested judges it against the given settings."""
    fabricate(tmp_path, f"effusion_{ARCH}", epochs_done=2, finished=True)
    status = tmp_path / "weights" / f"effusion_{ARCH}" / "status.json"
    status.write_text(json.dumps(json.loads(status.read_text()) | {"epochs": 2}))
    place = [f"weights_dir={tmp_path / 'weights'}", f"runs_dir={tmp_path / 'runs'}"]

    def row(*extra: str) -> dict:
        assert sweep.main(["--status", "--json", "--tasks", "effusion", "--archs", ARCH, *place, *extra]) == 0
        return json.loads(capsys.readouterr().out)["recipes"][0]

    for given in ([], ["epochs=1"], ["epochs=30"]):
        assert (row(*given)["state"], row(*given)["epochs_done"], row(*given)["epochs"]) == ("finished", 2, 2), given
    asked = row("--as-requested", "epochs=6")
    assert (asked["state"], asked["epochs"]) == ("interrupted", 6)
    assert row("--as-requested", "epochs=2")["state"] == "finished"
