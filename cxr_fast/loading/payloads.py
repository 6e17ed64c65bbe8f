"""JPEG bytes straight out of the shards, by the manifest's byte offsets (no tar parsing).

`read_payloads`, the reader of every path that decodes each image once (the resident loader,
hence train and predict), checks each image's bytes against the manifest's crc32
(cxr_fast/data/integrity.py): a damaged shard stops the run with one line naming shard and key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast.data.integrity import member_checksum, member_mismatch
from cxr_fast.errors import CxrError
from cxr_fast.io import read_table
from cxr_fast.schema import CHECKSUM_COLUMN, MANIFEST_COLUMNS, MANIFEST_FILE


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
    present = [folder for folder in folders if (folder / "manifest.parquet").is_file()]
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


def read_manifest(shards_dir: str | os.PathLike) -> pd.DataFrame:
    path = Path(shards_dir) / MANIFEST_FILE
    if not path.is_file():
        raise CxrError(f"{path}: not found; build shards first (make shards, or tools/shard_dataset.py)")
    return read_table(path, columns=MANIFEST_COLUMNS)


class ShardReader:
    """JPEG bytes by manifest row, read with os.pread from shard files opened once.

    With `verify`, each read is checked against the rows' crc32 (when the manifest has one):
    a mismatch is a CxrError naming the shard and the key."""

    def __init__(self, rows: pd.DataFrame, shards_dir: str | os.PathLike, *, verify: bool = False):
        self.shards_dir = Path(shards_dir)
        shard_names = rows["shard"].astype(str).to_numpy()
        names, self.shard_index = np.unique(shard_names, return_inverse=True)
        self.offsets = rows["offset"].to_numpy(dtype=np.int64)
        self.nbytes = rows["nbytes"].to_numpy(dtype=np.int64)
        self.keys = rows["key"].astype(str).to_numpy() if "key" in rows else None
        checked = verify and CHECKSUM_COLUMN in rows and self.keys is not None
        self.checksums = rows[CHECKSUM_COLUMN].to_numpy(dtype=np.int64) if checked else None
        self.handles: list[int] = []
        for name in names:
            path = self.shards_dir / name
            try:
                self.handles.append(os.open(path, os.O_RDONLY))
            except OSError as error:
                self.close()
                raise CxrError(f"{path}: cannot open shard ({error.strerror})") from None
        self.paths = [self.shards_dir / name for name in names]

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, indices) -> list[np.ndarray]:
        out = []
        for i in indices:
            handle = self.handles[self.shard_index[i]]
            size, offset = int(self.nbytes[i]), int(self.offsets[i])
            data = os.pread(handle, size, offset)
            if len(data) != size:
                raise CxrError(f"{self.paths[self.shard_index[i]]}: truncated shard (offset {offset} beyond its end)")
            if self.checksums is not None and member_checksum(data) != self.checksums[i]:
                raise CxrError(member_mismatch(self.paths[self.shard_index[i]], self.keys[i]))
            out.append(np.frombuffer(data, dtype=np.uint8))
        return out

    def close(self) -> None:
        for handle in self.handles:
            os.close(handle)
        self.handles = []


def read_payloads(rows: pd.DataFrame, shards_dir: str | os.PathLike) -> list[np.ndarray]:
    """The JPEG bytes of every row, in row order (uint8 arrays), each checked against the
    manifest's crc32: the bytes every decode-once path (resident loader, predict) decodes."""
    reader = ShardReader(rows, shards_dir, verify=True)
    try:
        return reader.read(range(len(reader)))
    finally:
        reader.close()
