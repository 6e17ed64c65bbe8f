"""atomic_folder: a report folder is swapped in whole, and what a killed writer left is cleared."""

from __future__ import annotations

import os
import subprocess
import sys

from cxr_fast.io import atomic_folder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no running process (until the kernel reuses it)
    return child.pid


def test_folders_left_by_a_killed_writer_are_removed_at_the_next_swap(tmp_path):
    out = tmp_path / "report"
    dead = _dead_pid()
    left = [tmp_path / f".report.tmp-{dead}", tmp_path / f".report.old-{dead}"]
    for folder in left:
        (folder / "part").mkdir(parents=True)
    alive = [tmp_path / f".report.tmp-{os.getppid()}", tmp_path / f".other.tmp-{dead}", tmp_path / f".report.old-x{dead}"]
    for folder in alive:
        folder.mkdir()
    with atomic_folder(out) as folder:
        (folder / "index.html").write_text("new")
    assert (out / "index.html").read_text() == "new"
    assert not any(folder.exists() for folder in left)
    assert all(folder.exists() for folder in alive)  # a live writer's, another folder's, not ours
