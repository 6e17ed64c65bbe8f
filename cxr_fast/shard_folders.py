"""Which shard folder a run reads, and what identifies the data in it.

`shards=` lists one cohort sharded at several sizes; `resolve_shards` picks the folder a run
reads. A run's identity is that data (`data_identity`: the folder and the digest of its
manifest), not the listing that said where to look: two runs that list other candidates but
read the same folder are the same run. Imports neither torch nor pandas: `sweep --status`
and `--is-finished` ask it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cxr_fast.data.integrity import file_sha256
from cxr_fast.errors import CxrError
from cxr_fast.schema import MANIFEST_FILE


def stored_size(folder: Path) -> int | None:
    """Short side of the JPEGs in a shard folder, px (tools/shard_dataset.py --size), from its meta.json."""
    for path, read in ((folder / "meta.json", lambda data: data["arguments"]["size"]),
                       (folder / ".parts" / "plan.json", lambda data: data["size"])):
        try:
            return int(read(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def resolve_shards(listed: str | os.PathLike, load_size: int) -> Path:
    """The shard folder a run reads: of the comma-separated folders in `listed` (one cohort
    sharded at several sizes), the smallest whose stored size is at least `load_size`, so no
    run trains on upsampled images and none decodes more pixels than it uses. Listed folders
    that do not exist are passed over; a folder of unknown size counts as large enough."""
    folders = [Path(item.strip()) for item in str(listed).split(",") if item.strip()]
    present = [folder for folder in folders if (folder / MANIFEST_FILE).is_file()]
    if not present:
        shown = ", ".join(str(folder) for folder in folders) or "(none)"
        raise CxrError(f"{shown}: no shards found (no manifest.parquet); build them first "
                       "(make shards, or tools/shard_dataset.py)")
    sizes = {folder: stored_size(folder) for folder in present}
    large_enough = [folder for folder in present if sizes[folder] is None or sizes[folder] >= load_size]
    if not large_enough:
        largest = max(present, key=lambda folder: sizes[folder])
        raise CxrError(f"{largest}: images stored at {sizes[largest]} px, but this recipe loads {load_size} px; "
                       f"shard at --size {load_size} or more (tools/shard_dataset.py ... --out {largest}-{load_size} "
                       f"--size {load_size}) and list it in shards= (comma-separated)")
    return min(large_enough, key=lambda folder: sizes[folder] or 0)


_DIGESTS: dict[tuple, str] = {}  # (manifest path, size, mtime): a study's 114 status rows hash each folder once


def data_identity(folder: Path) -> dict:
    """{"shards_dir": the folder read, "digest": sha256 of its manifest.parquet}. The manifest
    names every image with its labels, split, demographics and byte range in the shards, and
    the sharding tool rewrites it whenever any of those changes, so equal digests mean equal data."""
    manifest = Path(folder) / MANIFEST_FILE
    try:
        stat = manifest.stat()
        key = (str(manifest.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _DIGESTS:
            _DIGESTS[key] = file_sha256(manifest)
    except OSError as error:
        raise CxrError(f"{manifest}: cannot be read ({error.strerror})") from None
    return {"shards_dir": str(folder), "digest": _DIGESTS[key]}


def describe_data(identity: dict | None) -> str:
    """`shards/phantom (digest 1a2b3c4d)` for messages."""
    if not identity:
        return "unknown data"
    return f"{identity.get('shards_dir')} (digest {str(identity.get('digest'))[:8]})"
