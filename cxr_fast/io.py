"""Files that are either complete or absent: every writer goes through a temporary name."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from cxr_fast.errors import CxrError, one_line, reported_os_errors

if TYPE_CHECKING:  # pandas is imported by the readers that need it, not by every atomic write
    import pandas as pd

TEMPORARY_MARK = ".tmp-"  # atomic_path's temporaries: `.NAME.tmp-PID`


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, needed_bytes: int | Callable[[], int] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it over `path` only if the block succeeds.

    The temporary name keeps the final suffix hidden behind `.tmp-<pid>` so globbing for
    final files (`*.tar`, `*.parquet`) never sees a half-written one. An OSError while
    writing (a full disk, a read-only folder) is the one-line CxrError of
    `errors.os_error_line` naming `path`; `needed_bytes` (about the size of the file) goes
    into its no-space line.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")
    try:
        with reported_os_errors(path, needed_bytes=needed_bytes, hidden=tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            if tmp.is_file():
                # Some writers (safetensors) create their file 0600; the result honours the umask
                # like any other file, so a group on a shared cluster can read it.
                os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; if the block succeeds it replaces `path` whole
    (the old folder is moved aside, the new one renamed in, the old one deleted), otherwise it
    is deleted and `path` stays as it was. Readers see the old folder or the new one; a kill
    between the two renames leaves `path` missing and the old one in `.NAME.old-PID`. Such
    `.NAME.tmp-PID` / `.NAME.old-PID` folders of processes no longer running on this host
    (a kill -9) are deleted by the next call for `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        with reported_os_errors(path, hidden=tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_dead_folder_temporaries(path)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            yield tmp
            if path.exists():
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                if old.exists():
                    os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except CxrError as error:
        # A file inside the temporary folder failed: name it where the user will look for it.
        raise CxrError(str(error).replace(str(tmp), str(path))) from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_dead_folder_temporaries(path: Path) -> None:
    """Delete atomic_folder's siblings of `path` whose process is gone (kill -9 mid-build)."""
    name = re.compile(rf"\.{re.escape(path.name)}(?:{re.escape(TEMPORARY_MARK)}|\.old-)(\d+)")
    for sibling in path.parent.iterdir():
        match = name.fullmatch(sibling.name)
        if match and sibling.is_dir() and not sibling.is_symlink() and not process_alive(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (another user's counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return True


def current_umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere set-and-restore reads it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the `atomic_path` temporaries below `folder` left by other processes (a kill -9
    mid-write); return how many. Call it only while holding the folder's lock: then no other
    live process can be writing there."""
    mine = f"{TEMPORARY_MARK}{os.getpid()}"
    removed = 0
    for path in Path(folder).rglob(f".*{TEMPORARY_MARK}*"):
        if path.is_file() and not path.name.endswith(mine):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path, needed_bytes=len(data)) as tmp:
        tmp.write_bytes(data)


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; a missing, unreadable or malformed file is a one-line CxrError."""
    path = Path(path)
    with reported_os_errors(path):
        text = path.read_bytes()
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CxrError(f"{path}: not a JSON file ({one_line(error, 120)})") from error


def write_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    write_bytes(path, text.encode())


def _json_default(value: Any) -> Any:
    # numpy scalars and paths show up in counts and configs; write them as plain JSON.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


# The key under which a parquet file's writer records where it came from (JSON in the file's
# key-value metadata; readers that do not ask never see it).
PARQUET_METADATA_KEY = b"cxr_fast"


def write_parquet(path: str | os.PathLike, frame: pd.DataFrame, *, metadata: dict | None = None) -> None:
    """`metadata`, a JSON-able dict, travels in the file (read back by `parquet_metadata`)."""
    with atomic_path(path, needed_bytes=lambda: _frame_bytes(frame)) as tmp:
        if metadata is None:
            frame.to_parquet(tmp, index=False)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               PARQUET_METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
        pq.write_table(table, tmp)


def parquet_metadata(path: str | os.PathLike) -> dict:
    """What `write_parquet(metadata=...)` recorded in the file ({} when nothing or unreadable)."""
    import pyarrow.parquet as pq

    try:
        raw = (pq.read_schema(path).metadata or {}).get(PARQUET_METADATA_KEY)
        value = json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _frame_bytes(frame: pd.DataFrame) -> int:
    # The table in memory: an upper bound of its compressed file, a fair "needed about".
    return int(frame.memory_usage(index=False, deep=True).sum())


def write_csv(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    path = Path(path)
    with atomic_path(path, needed_bytes=lambda: _frame_bytes(frame)) as tmp:
        if path.suffix == ".gz":
            # mtime=0 and the final name (not the temporary's, which holds the pid) in the
            # header keep gzip output byte-identical between runs.
            with open(tmp, "wb") as raw, gzip.GzipFile(path.name, "wb", fileobj=raw, mtime=0) as handle:
                handle.write(frame.to_csv(index=False).encode())
        else:
            frame.to_csv(tmp, index=False)


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Python and the installed versions of `names` (None when missing), for provenance records."""
    import platform
    from importlib import metadata

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def read_table(path: str | os.PathLike, *, columns: Iterable[str] = (), **read_csv_args: Any) -> pd.DataFrame:
    """Read a CSV (plain or .gz) or parquet file; name the file in any error.

    `columns` are required: a missing one is a CxrError that names it and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CxrError(f"{path}: file not found")
    import pandas as pd

    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, **read_csv_args)
    except (ValueError, OSError, UnicodeDecodeError, EOFError) as error:
        raise CxrError(f"{path}: cannot be read as a table ({error})") from error
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise CxrError(f"{path}: missing column(s) {', '.join(map(repr, missing))}")
    return frame
