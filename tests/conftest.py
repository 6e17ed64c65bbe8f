"""Shared fixtures: one small phantom data set and its shards, built once per test session.

Sizes follow the CPU budget: a few hundred images drawn at 128 px, shards at 80 px, models
at 64 px (`load_size` 73 with the default 0.875 eval crop).

Every test runs in its own temporary folder (the current directory), so a command's default
`weights/`, `runs/`, `all_pred/` and `reports/` are that test's; and the session fails if the
suite changed those folders in the repository (what the user's own runs and the demo left there).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
# What a user's runs, the demo and `make shards` leave in the project: the suite never touches them.
USER_FOLDERS = ("weights", "runs", "all_pred", "reports", "demo", "shards")

PHANTOM_IMAGES = 500
SHARD_PIXELS = 80


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    from cxr_fast.data.phantom import generate_phantom

    root = tmp_path_factory.mktemp("phantom")
    generate_phantom(root, n_images=PHANTOM_IMAGES, seed=0, image_size=128, workers=2)
    return root


def shard_arguments(phantom_root: Path, out: Path, *extra: str) -> list[str]:
    return ["--source", "mimic", "--root", str(phantom_root / "mimic-cxr-jpg"),
            "--demographics", str(phantom_root / "mimic-iv"), "--out", str(out),
            "--size", str(SHARD_PIXELS), "--shard-size", "64", "--workers", "2", "--no-progress", *extra]


@pytest.fixture(scope="session")
def phantom_shards(phantom_root, tmp_path_factory) -> Path:
    from cxr_fast.data import shard_dataset

    out = tmp_path_factory.mktemp("shards")
    assert shard_dataset.main(shard_arguments(phantom_root, out)) == 0
    return out


@pytest.fixture(autouse=True)
def _in_its_own_folder(tmp_path, monkeypatch):
    """Each test's current directory is its tmp_path: default output folders land there."""
    monkeypatch.chdir(tmp_path)


def folder_snapshot(root: Path, names: tuple[str, ...] = USER_FOLDERS) -> dict[str, tuple[int, int]]:
    """{path under root: (size, mtime_ns)} of every file and folder below root/<name>."""
    snapshot = {}
    for name in names:
        for folder, subfolders, files in os.walk(root / name):
            for entry in (folder, *(os.path.join(folder, file) for file in files)):
                try:
                    stat = os.stat(entry)
                except OSError:  # removed while walking
                    continue
                snapshot[os.path.relpath(entry, root)] = (stat.st_size, stat.st_mtime_ns)
    return snapshot


def pytest_sessionstart(session):
    session.config._user_folders = folder_snapshot(ROOT)


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_user_folders", None)
    if before is None:
        return
    after = folder_snapshot(ROOT)
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        writer = session.config.get_terminal_writer()
        writer.line()
        writer.line(
            f"FAILED: the test suite changed the project's own folders ({shown}); tests must work in tmp_path",
            red=True)
        session.exitstatus = 1
