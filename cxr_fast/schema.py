"""The shared vocabulary: split and group names, and the columns and fields of the files that
one stage writes and another reads. Each fact is written here once; writers and readers
import it, so they cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # read without numpy/pandas: `sweep --status` and `--is-finished` start fast
    import pandas as pd

# ------------------------------------------------------------------ splits and groups

SPLITS: tuple[str, ...] = ("train", "val", "test")
UNKNOWN = "Unknown"

# The demographic attributes every image carries (cohort -> shards -> predictions -> analysis).
DEMOGRAPHICS: tuple[str, ...] = ("sex", "age_group", "race")
SEX_GROUPS: tuple[str, ...] = ("F", "M")
RACE_GROUPS: tuple[str, ...] = ("White", "Black", "Asian", "Hispanic/Latino", "Other")
# Each group includes its lower bound: 20 is in `20-40`.
AGE_GROUPS: tuple[str, ...] = ("0-20", "20-40", "40-60", "60-80", "80+")
AGE_GROUP_LOWER_BOUNDS: tuple[float, ...] = (20.0, 40.0, 60.0, 80.0)
# The acquisition attribute: AP films are mostly portable, inpatient, sicker patients, so view
# confounds demographic comparisons.
VIEW = "view"


def age_group(age: pd.Series) -> pd.Series:
    """`0-20` (< 20), `20-40`, `40-60`, `60-80`, `80+`, `Unknown` (NaN); 20 is in `20-40`."""
    import numpy as np
    import pandas as pd

    values = pd.to_numeric(age, errors="coerce").to_numpy(np.float64)
    with np.errstate(invalid="ignore"):
        conditions = [np.isnan(values), *(values < bound for bound in AGE_GROUP_LOWER_BOUNDS)]
    groups = np.select(conditions, [UNKNOWN, *AGE_GROUPS[:4]], default=AGE_GROUPS[4])
    return pd.Series(groups, index=age.index, dtype=object).astype(str)


# ------------------------------------------------------------------ shards/manifest.parquet

MANIFEST_FILE = "manifest.parquet"
DECODED_CACHE_FOLDER = "decoded"  # <shards>/decoded/<load>px-<digest>.u8: loading/decoded.py
# Where an image's JPEG bytes are: shard file name, byte offset and length inside it.
PAYLOAD_COLUMNS: tuple[str, ...] = ("shard", "offset", "nbytes")
# The CRC-32 of those bytes (zlib.crc32, an unsigned 32-bit number), recorded while sharding and
# checked wherever the bytes are decoded (cxr_fast/data/integrity.py); manifests written before
# it existed lack it.
CHECKSUM_COLUMN = "crc32"
# What the sharding tool adds to each cohort row (DATA_SPEC.md); height/width of the stored JPEG.
PLACEMENT_COLUMNS: tuple[str, ...] = ("key", *PAYLOAD_COLUMNS, CHECKSUM_COLUMN, "height", "width")
# What every reader of the manifest needs.
MANIFEST_COLUMNS: tuple[str, ...] = ("key", "split", *PAYLOAD_COLUMNS)

# ------------------------------------------------------------------ all_pred/<recipe>.parquet

PREDICTION_COLUMNS: tuple[str, ...] = (
    "key", "dicom_id", "subject_id", "study_id", "split", "task", "arch", "recipe",
    "label", "prob", "pred", "threshold", "sex", "age", "age_group", "race", VIEW,
)
# The analysis carries these into its image list when present but does not need them.
PREDICTION_OPTIONAL_COLUMNS: tuple[str, ...] = ("study_id", "age", "recipe", "threshold")
# Columns added after the first prediction files were written: read as Unknown where missing.
PREDICTION_LATER_COLUMNS: tuple[str, ...] = (VIEW,)
PREDICTION_REQUIRED_COLUMNS: tuple[str, ...] = tuple(
    column for column in PREDICTION_COLUMNS
    if column not in PREDICTION_OPTIONAL_COLUMNS + PREDICTION_LATER_COLUMNS)

# ------------------------------------------------------------------ weights/<recipe>/status.json

STATUS_FILE = "status.json"
RESUME_FILE = "last.pt"
# Written by the training loop after every epoch; `config` (the run's settings) and `data` (what
# it read: the shard folder and its manifest's digest, cxr_fast/shard_folders.py) let the "same
# run" check (cxr_fast/same_run.py) skip loading the checkpoint.
STATUS_FIELDS: tuple[str, ...] = (
    "recipe", "epoch", "epochs", "finished", "stopped_early", "best_epoch", "best_balanced_accuracy", "config",
    "data",
)


def read_status(recipe_folder: Path) -> dict | None:
    """`status.json` of one recipe's weights folder; None when there is none or it is not JSON
    (a run that has not finished an epoch yet, or a foreign file: both mean "train")."""
    try:
        status = json.loads((Path(recipe_folder) / STATUS_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return status if isinstance(status, dict) else None


def finished_status(recipe_folder: Path, *, recipe: str, epochs: int) -> dict | None:
    """The status of a run of `recipe` that needs no more epochs when `epochs` are asked for,
    else None. Finished means: it said so and either stopped early or has done `epochs`; a
    raised `epochs` therefore continues a finished run. The resume checkpoint must exist
    too, since that is what training would continue from."""
    status = read_status(recipe_folder)
    if status is None or status.get("recipe") != recipe or not (Path(recipe_folder) / RESUME_FILE).is_file():
        return None
    done = status.get("finished") and (status.get("stopped_early") or status.get("epoch", 0) >= epochs)
    return status if done else None
