"""JPEG bytes straight out of the shards, by the manifest's byte offsets (no tar parsing)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cxr_fast.errors import CxrError
from cxr_fast.io import read_table

MANIFEST_COLUMNS = ("key", "split", "shard", "offset", "nbytes")


def read_manifest(shards_dir: str | os.PathLike) -> pd.DataFrame:
    path = Path(shards_dir) / "manifest.parquet"
    if not path.is_file():
        raise CxrError(f"{path}: not found; build shards first (make shards, or tools/shard_dataset.py)")
    return read_table(path, columns=MANIFEST_COLUMNS)


def read_payloads(rows: pd.DataFrame, shards_dir: str | os.PathLike) -> list[bytes]:
    """The JPEG bytes of each row, in row order; each shard file is opened once."""
    payloads: list[bytes | None] = [None] * len(rows)
    order = rows.reset_index(drop=True)
    for shard, group in order.groupby("shard", sort=True):
        path = Path(shards_dir) / shard
        try:
            handle = os.open(path, os.O_RDONLY)
        except OSError as error:
            raise CxrError(f"{path}: cannot open shard ({error.strerror})") from None
        try:
            for position, offset, nbytes in zip(group.index, group["offset"], group["nbytes"]):
                data = os.pread(handle, int(nbytes), int(offset))
                if len(data) != nbytes:
                    raise CxrError(f"{path}: truncated shard (offset {offset} beyond its end)")
                payloads[position] = data
        finally:
            os.close(handle)
    return payloads  # type: ignore[return-value]
