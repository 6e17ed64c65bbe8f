"""Build the cohort of a chest X-ray source and write it as WebDataset shards.

    python tools/shard_dataset.py --source mimic --root MIMIC_CXR_JPG --demographics MIMIC_IV --out OUT
    python tools/shard_dataset.py --source chexpert --csv CheXpert/train.csv --root DIR --out OUT --cohort-only
    python tools/shard_dataset.py --source nih --csv Data_Entry_2017.csv --root DIR --out OUT

Outputs and their schemas: DATA_SPEC.md and the docstring of cxr_fast/data/shards.py.
Rerunning the same command after a crash finishes the missing shards; a rerun after the
cohort changed rewrites the shards whose contents changed; a rerun also rewrites shards that
were deleted, truncated or damaged, and retries source images that could not be read and have
changed since. One run at a time per --out. `python -m cxr_fast.data.verify OUT` checks them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pandas as pd

from cxr_fast.data import shards
from cxr_fast.data.cohort import add_cohort_arguments, cohort_from_args
from cxr_fast.errors import CxrError, run_cli
from cxr_fast.io import package_versions, remove_stale_temporaries, write_csv, write_json, write_parquet
from cxr_fast.locks import exclusive_lock
from cxr_fast.schema import DECODED_CACHE_FOLDER, DEMOGRAPHICS, MANIFEST_FILE, SPLITS
from cxr_fast.tasks import TASKS

VERSIONED_PACKAGES = ("cxr_fast", "numpy", "pandas", "pyarrow", "pillow", "pydicom")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cohort_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--cohort-only", action="store_true", help="write cohort, exclusions and meta only; open no image")
    parser.add_argument("--size", type=int, default=256, help="short side of the stored JPEGs, px (default 256)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    parser.add_argument("--shard-size", type=int, default=2000, help="images per shard (default 2000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="encoding processes (default: all cores)")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N cohort images by key (quick trials)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    check_arguments(args)
    return args


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers with one line, before any input is read or output written."""
    if not 1 <= args.quality <= 100:
        raise CxrError(f"--quality must be in 1-100, got {args.quality}")
    if args.size < 8:
        raise CxrError(f"--size must be >= 8, got {args.size}")
    if args.shard_size < 1:
        raise CxrError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.limit is not None and args.limit < 1:
        raise CxrError(f"--limit must be >= 1, got {args.limit}")


def apply_limit(cohort: pd.DataFrame, exclusions: pd.DataFrame, limit: int | None):
    if limit is None or limit >= len(cohort):
        return cohort, exclusions
    dropped = pd.DataFrame({"key": cohort["key"].iloc[limit:], "reason": "limit"})
    return cohort.iloc[:limit].reset_index(drop=True), pd.concat([exclusions, dropped], ignore_index=True)


def counts(frame: pd.DataFrame, exclusions: pd.DataFrame) -> dict:
    """Images per split, per task (positive/negative/excluded) and per demographic group."""
    by_split = {split: frame[frame["split"] == split] for split in SPLITS}
    return {
        "images": {split: len(part) for split, part in by_split.items()} | {"all": len(frame)},
        "subjects": {split: int(part["subject_id"].nunique()) for split, part in by_split.items()},
        "tasks": {
            task: {
                split: {
                    "positive": int((part[task] == 1).sum()),
                    "negative": int((part[task] == 0).sum()),
                    "excluded": int(part[task].isna().sum()),
                }
                for split, part in by_split.items()
            }
            for task in TASKS
        },
        "demographics": {
            column: {split: part[column].value_counts().sort_index().to_dict() for split, part in by_split.items()}
            for column in DEMOGRAPHICS
        },
        "exclusions": exclusions["reason"].value_counts().sort_index().to_dict(),
    }


def recorded_arguments(args: argparse.Namespace) -> dict:
    # Paths as given, minus knobs that do not change the output and the output folder itself
    # (so a rerun, or the same run elsewhere, writes an identical meta.json).
    skip = {"workers", "no_progress", "out"}
    return {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items() if name not in skip}


def shard_checksums(out: Path) -> dict | None:
    """meta.json's shard checksums of a previous run here (None: none)."""
    try:
        return json.loads((out / "meta.json").read_text()).get("shards")
    except (OSError, ValueError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cohort = cohort_from_args(args)
    frame, exclusions = apply_limit(cohort.frame, cohort.exclusions, args.limit)
    # One writer per folder: a second run exits here naming this one. Temporaries of a
    # killed run (a partial tar among them) are removed once no live run can own them.
    with exclusive_lock(args.out, what="sharding run"):
        remove_stale_temporaries(args.out)
        return write_outputs(args, cohort.source, frame, exclusions)


def write_outputs(args: argparse.Namespace, source: str, frame: pd.DataFrame, exclusions: pd.DataFrame) -> int:
    out: Path = args.out
    settings = shards.ImageSettings(size=args.size, quality=args.quality)
    if not args.cohort_only:
        shards.check_settings(out, settings, args.shard_size)  # a refused rerun changes nothing
        # The manifest is written last, so a folder that has one is finished; this run may
        # rewrite shards (moving offsets), so it goes first.
        (out / MANIFEST_FILE).unlink(missing_ok=True)
    write_parquet(out / "cohort.parquet", frame)
    meta = {"source": source, "arguments": recorded_arguments(args), "versions": package_versions(VERSIONED_PACKAGES)}
    if args.cohort_only:
        write_csv(out / "exclusions.csv", exclusions)
        write_json(out / "meta.json", meta | {"counts": counts(frame, exclusions)})
        print(f"cohort: {len(frame)} images, {len(exclusions)} excluded -> {out}")
        return 0

    before = shard_checksums(out)
    parts = shards.write_shards(
        frame, out, settings=settings, shard_size=args.shard_size, workers=args.workers, progress=not args.no_progress
    )
    manifest = shards.manifest_from_parts(frame, parts)
    if manifest.empty:
        raise CxrError(f"{out}: no image could be read (see {out / 'exclusions.csv'})")
    exclusions = pd.concat([exclusions, shards.unreadable_from_parts(parts)], ignore_index=True)
    write_parquet(out / MANIFEST_FILE, manifest)
    write_csv(out / "exclusions.csv", exclusions)
    checksums = {part["shard"]: {"sha256": part["sha256"], "bytes": part["bytes"], "images": len(part["members"])}
                 for part in parts if part["shard"]}
    write_json(out / "meta.json", meta | {"counts": counts(manifest, exclusions), "shards": checksums})
    if checksums != before:
        # Decoded caches of the old shards would never be read again (their names no longer
        # match); a run still mapping one keeps its pages. We hold the lock: none is being built.
        shutil.rmtree(out / DECODED_CACHE_FOLDER, ignore_errors=True)
    print(f"shards: {len(manifest)} images in {len(checksums)} shards, {len(exclusions)} excluded -> {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
