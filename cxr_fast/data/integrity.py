"""What the shards' records promise about their bytes, and the checks of those promises.

Two records, both written while sharding (DATA_SPEC.md):
- per shard, in `meta.json` `shards`: the file's sha256 and size. Checked by a rerun of the
  sharding tool (which rewrites a shard that fails), by the streaming (DALI) loader at
  start-up, and by `python -m cxr_fast.data.verify`.
- per image, in the manifest's `crc32` column: the CRC-32 of its JPEG bytes. Checked wherever
  the bytes are decoded once anyway (the resident loader, hence predict; `verify`), so a
  flipped byte stops the run with one line instead of training on a damaged image.
Two same-size shards swapped fail both: each record is tied to its shard's name.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Iterable

from cxr_fast.errors import CxrError
from cxr_fast.io import write_json

META_FILE = "meta.json"


def member_checksum(data) -> int:
    """CRC-32 of one member's bytes (bytes or a uint8 array), as recorded in the manifest."""
    return zlib.crc32(data) & 0xFFFFFFFF


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def member_mismatch(shard_path: Path, key: str) -> str:
    """The one line for an image whose bytes are not those recorded."""
    return f"{shard_path}: {key}: bytes differ from the manifest's checksum (a damaged or replaced shard)"


def shard_records(folder: Path) -> dict[str, dict]:
    """`meta.json` `shards` of a finished shard folder: name -> {sha256, bytes, images};
    empty when there is none (a folder sharded before the records existed)."""
    try:
        records = json.loads((Path(folder) / META_FILE).read_text()).get("shards", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return records if isinstance(records, dict) else {}


def shard_problem(path: Path, record: dict | None) -> str | None:
    """What is wrong with the shard at `path` against its record (None: nothing)."""
    if not record or "sha256" not in record:
        return f"{path}: no recorded digest in {META_FILE}"
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if record.get("bytes") is not None and size != record["bytes"]:
        return f"{path}: {size} bytes, {record['bytes']} recorded (truncated or replaced)"
    if file_sha256(path) != record["sha256"]:
        return f"{path}: sha256 differs from {META_FILE} (damaged or replaced)"
    return None


def check_shard_digests(folder: Path, names: Iterable[str]) -> None:
    """Stop with one line when a shard of `names` is missing, truncated or not the one
    recorded (the streaming loader's start-up check: it never decodes a member twice).

    A shard that matched is not read again while it keeps the size and modification time it
    had then (CHECKED_FILE, written where the folder is writable): a study's 114 runs, each
    on several processes and restarted, would otherwise each read the whole shard set at
    start-up. A byte that rots in place keeps both; `python -m cxr_fast.data.verify` finds it."""
    folder = Path(folder)
    records, checked = shard_records(folder), _read_checked(folder)
    problems, matched = [], {}
    for name in sorted(set(names)):
        path, record = folder / name, records.get(name)
        entry = {"sha256": (record or {}).get("sha256"), "stamp": _stamp(path)}
        if entry["sha256"] and entry["stamp"] and checked.get(name) == entry:
            continue
        problem = shard_problem(path, record)
        if problem:
            problems.append(problem)
        else:
            matched[name] = entry
    if matched:
        _write_checked(folder, {**checked, **matched})
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CxrError(f"{problems[0]}{more}; python -m cxr_fast.data.verify {folder} lists every problem")


# Shards whose sha256 matched their record: name -> {sha256, stamp: [size, mtime_ns]}.
CHECKED_FILE = "checked.json"


def _stamp(path: Path) -> list[int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]


def _read_checked(folder: Path) -> dict:
    try:
        checked = json.loads((folder / CHECKED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return checked if isinstance(checked, dict) else {}


def _write_checked(folder: Path, checked: dict) -> None:
    """Best effort: a read-only or full shard folder (a shared copy of the data set) only
    means the next start hashes again."""
    try:
        write_json(folder / CHECKED_FILE, checked)
    except (OSError, CxrError):
        pass
