"""One writer per folder: the lock names its holder, dies with it, and guards temporaries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cxr_fast.errors import CxrError
from cxr_fast.io import atomic_path, remove_stale_temporaries
from cxr_fast.locks import LockHeld, exclusive_lock, lock_holder

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from cxr_fast.locks import exclusive_lock
    with exclusive_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_second_writer_is_refused_with_the_holders_name(tmp_path):
    with exclusive_lock(tmp_path / "run"):
        holder = lock_holder(tmp_path / "run")
        assert holder["pid"] == os.getpid()
        with pytest.raises(LockHeld, match=rf"another run is writing here \(pid {os.getpid()} on "):
            with exclusive_lock(tmp_path / "run"):
                pass
    assert lock_holder(tmp_path / "run") is None
    with exclusive_lock(tmp_path / "run"):  # released: free again
        pass


@pytest.mark.slow
def test_the_lock_of_a_killed_process_blocks_nobody(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        assert lock_holder(tmp_path)["pid"] == child.pid
        with pytest.raises(LockHeld, match=f"pid {child.pid}"):
            with exclusive_lock(tmp_path):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (tmp_path / ".lock").is_file()  # left on disk, yet not held
    assert lock_holder(tmp_path) is None
    with exclusive_lock(tmp_path):
        pass


def test_an_unwritable_folder_is_one_line(tmp_path):
    if os.geteuid() == 0:
        blocked = tmp_path / "file"
        blocked.write_text("")
        target = blocked / "sub"  # a path through a file cannot be created, even by root
    else:
        tmp_path.chmod(0o500)
        target = tmp_path / "sub"
    with pytest.raises(CxrError, match="cannot write here"):
        with exclusive_lock(target):
            pass


def test_stale_temporaries_of_other_processes_are_removed(tmp_path):
    (tmp_path / "parts").mkdir()
    stale = [tmp_path / ".a.tar.tmp-999999", tmp_path / "parts" / ".b.json.tmp-1"]
    for path in stale:
        path.write_text("partial")
    keep = tmp_path / "done.tar"
    keep.write_text("final")
    with atomic_path(tmp_path / "c.tar") as mine:
        mine.write_text("being written")
        assert remove_stale_temporaries(tmp_path) == 2
        assert mine.exists()
    assert not any(path.exists() for path in stale)
    assert keep.exists() and (tmp_path / "c.tar").exists()
