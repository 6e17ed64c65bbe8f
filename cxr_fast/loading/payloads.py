"""JPEG bytes straight out of the shards, by the manifest's byte offsets (no tar parsing).

`read_payloads`, the reader of every path that decodes each image once (the resident loader,
hence train and predict), checks each image's bytes against the manifest's crc32
(cxr_fast/data/integrity.py): a damaged shard stops the run with one line naming shard and key.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast.data.integrity import member_checksum, member_mismatch
from cxr_fast.errors import CxrError
from cxr_fast.io import read_table
from cxr_fast.schema import CHECKSUM_COLUMN, MANIFEST_COLUMNS, MANIFEST_FILE


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
