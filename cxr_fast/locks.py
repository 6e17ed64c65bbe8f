"""One writer per folder: an exclusive lock that names its holder and dies with it.

A run that writes a folder (`weights/<recipe>/`, a shard folder) holds `<folder>/.lock` for
its whole life. The lock is `flock(2)` on that file, so the kernel (or the NFS server) drops
it when the holder exits for any reason, kill -9 included: a lock file left on disk by a dead
run blocks nobody. The file's text says who holds it (pid, host, Slurm job, start time), so a
second run exits at once with a line that names the holder.

Filesystems: local disks and NFSv4 (where Linux emulates flock with byte-range locks, so
the lock holds across client nodes; a crashed node's lock is freed when its lease expires,
about 90 s) work as is. Lustre needs the `flock` mount option for a cluster-wide lock
(`localflock` locks within one node only); mounted with `noflock`, locking fails, and the
error says so. `CXR_FAST_LOCKS=off` runs without locks, for filesystems that cannot lock,
at the cost of this protection.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from cxr_fast.errors import CxrError, one_line, os_problem

LOCK_NAME = ".lock"


class LockHeld(CxrError):
    """Another live process holds the folder's lock; `holder` is what it wrote (may be empty)."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def locks_enabled() -> bool:
    return os.environ.get("CXR_FAST_LOCKS", "on").lower() not in ("off", "0", "false", "no")


def this_process() -> dict:
    """Who we are, as written into a lock we hold."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job and "SLURM_ARRAY_TASK_ID" in os.environ \
        else os.environ.get("SLURM_JOB_ID")
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": job,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe(holder: dict) -> str:
    """`pid 12 on node3, Slurm job 77_4, since 2026-...`; what is unknown is left out."""
    if not holder:
        return "a process that has not yet written its name"
    parts = [f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"]
    if holder.get("slurm_job"):
        parts.append(f"Slurm job {holder['slurm_job']}")
    if holder.get("started"):
        parts.append(f"since {holder['started']}")
    return ", ".join(parts)


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike, *, what: str = "run") -> Iterator[Path]:
    """Hold `<folder>/.lock` for the block, creating the folder; raise LockHeld at once if
    another process holds it, or a one-line CxrError if the folder cannot be written."""
    folder = Path(folder)
    if not locks_enabled():
        yield folder / LOCK_NAME
        return
    path = folder / LOCK_NAME
    handle = _open_lock_file(path)
    try:
        if not _try_flock(handle, path, attempts=5):
            holder = _read_holder(path)
            raise LockHeld(f"{folder}: another {what} is writing here ({describe(holder)}); "
                           f"wait for it to end or stop it", holder)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(this_process()) + "\n")
        handle.flush()
        yield path
    finally:
        handle.close()  # releases the flock


def lock_holder(folder: str | os.PathLike) -> dict | None:
    """Who holds `<folder>/.lock` now (their record, possibly empty), or None when nobody does.
    Never creates anything: a folder without a lock file is not locked."""
    path = Path(folder) / LOCK_NAME
    if not locks_enabled() or not path.is_file():
        return None
    try:
        handle = open(path, "r")
    except OSError:
        return None
    with handle:
        if _try_flock(handle, path, shared=True):
            return None
    return _read_holder(path)


def _open_lock_file(path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # "a+" creates without truncating: the holder's record must survive a failed attempt.
        return open(path, "a+")
    except OSError as error:
        raise CxrError(f"{path.parent}: cannot write here ({os_problem(error)})") from error


def _try_flock(handle, path: Path, *, shared: bool = False, attempts: int = 1) -> bool:
    """Non-blocking flock. A few quick retries ride out `lock_holder`'s momentary shared lock."""
    try:
        for attempt in range(attempts):
            try:
                fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if attempt + 1 < attempts:
                    time.sleep(0.05)
        return False
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise CxrError(f"{path}: this filesystem cannot lock files ({one_line(error)}); mount it with "
                           f"locking (Lustre: -o flock) or set CXR_FAST_LOCKS=off to run unprotected") from error
        raise


def _read_holder(path: Path) -> dict:
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}
