"""The README's commands in its order on one tree: its train example, then `make demo`'s steps.

The demo keeps its own weights/runs/predictions (demo/), so a user's run of a demo recipe
neither blocks it nor is touched by it; the steps are run from the Makefile itself (its
`demo-steps` target) on the tiny session phantom, one arch and one short epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "effusion_test_resnet"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_readme_train_example_then_the_demo_reaches_its_report(phantom_shards, tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "phantom").symlink_to(phantom_shards)  # what `make shards` leaves
    env = dict(os.environ, WANDB_MODE="disabled")
    # The README's train example, as written (the default shards listing, weights/, runs/).
    train = subprocess.run([sys.executable, "-m", "cxr_fast.train", "--recipe", RECIPE, "epochs=2", "--no-progress"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr
    users_run = (tmp_path / "weights" / RECIPE / "status.json").read_bytes()

    demo = subprocess.run(
        ["make", "-f", str(ROOT / "Makefile"), "--no-print-directory", "demo-steps", f"PY={sys.executable}",
         "DEMO_ARCHS=test_resnet", "DEMO_EPOCHS=1", "DEMO_SETTINGS=batch_size=8 max_steps_per_epoch=2",
         "DEMO_ANALYZE=--bootstrap 20"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert (tmp_path / "reports" / "demo" / "index.html").is_file()
    assert f"report: {tmp_path}/reports/demo/index.html" in demo.stdout
    assert len(list((tmp_path / "demo" / "all_pred").glob("*.parquet"))) == 6
    status = json.loads((tmp_path / "demo" / "weights" / RECIPE / "status.json").read_text())
    assert status["finished"] and status["epoch"] == 1
    # The user's own run is left as it was, and nothing of the demo went into weights/ or all_pred/.
    assert (tmp_path / "weights" / RECIPE / "status.json").read_bytes() == users_run
    assert sorted(path.name for path in (tmp_path / "weights").iterdir()) == [RECIPE]
    assert not (tmp_path / "all_pred").exists()

