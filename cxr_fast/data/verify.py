"""Check shard folders against their records: `python -m cxr_fast.data.verify SHARDS [SHARDS ...]`.

Every shard's size and sha256 against `meta.json`, every image's bytes against the
manifest's crc32 (cxr_fast/data/integrity.py). Prints one line per problem (shard, key when it
is one image, what is wrong) and exits 0 when there is none, 1 otherwise (2: not a shard folder).
A damaged folder is repaired by rerunning the tools/shard_dataset.py command that built it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

import pandas as pd

from cxr_fast.data.integrity import member_checksum, member_mismatch, shard_problem, shard_records
from cxr_fast.errors import run_cli
from cxr_fast.loading.payloads import read_manifest
from cxr_fast.schema import CHECKSUM_COLUMN, MANIFEST_FILE


def folder_problems(folder: Path) -> Iterator[str]:
    """Every problem of one shard folder, shard by shard: first the file, then its members."""
    manifest = read_manifest(folder)
    records = shard_records(folder)
    if CHECKSUM_COLUMN not in manifest:
        yield (f"{folder / MANIFEST_FILE}: no {CHECKSUM_COLUMN} column (sharded by an older version): images "
               "cannot be checked; rerun its tools/shard_dataset.py command to add them")
    by_shard = dict(tuple(manifest.groupby("shard", sort=True)))
    for name in sorted(set(by_shard) | set(records)):
        path = folder / name
        problem = shard_problem(path, records.get(name))
        if problem:
            yield problem
        if name not in by_shard:
            yield f"{path}: not in {MANIFEST_FILE}"
        elif path.is_file() and CHECKSUM_COLUMN in manifest:
            yield from member_problems(path, by_shard[name])


def member_problems(path: Path, rows: pd.DataFrame) -> Iterator[str]:
    """One line per image of `rows` whose bytes in the shard at `path` are missing or not the recorded ones."""
    with open(path, "rb") as handle:
        for key, offset, nbytes, expected in rows[["key", "offset", "nbytes", CHECKSUM_COLUMN]].itertuples(index=False):
            handle.seek(int(offset))
            data = handle.read(int(nbytes))
            if len(data) != nbytes:
                yield f"{path}: {key}: cut off (the shard ends before its bytes)"
            elif member_checksum(data) != expected:
                yield member_mismatch(path, key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_fast.data.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, metavar="SHARDS", help="shard folder(s) (tools/shard_dataset.py --out)")
    args = parser.parse_args(argv)
    found = 0
    for folder in args.folders:
        for problem in folder_problems(folder):
            print(problem, flush=True)
            found += 1
    print(f"{found} problem(s)" if found else f"ok: {', '.join(map(str, args.folders))}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    run_cli(main)
