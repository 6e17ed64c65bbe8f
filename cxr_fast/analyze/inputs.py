"""Reading `all_pred/<recipe>.parquet` files and turning them into per-task arrays.

Every check names the offending file: a half-finished prediction run or a file from another
cohort should stop the analysis with one clear line, not with a KeyError deep in numpy.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast.analyze.parallel import workers
from cxr_fast.errors import CxrError
from cxr_fast.io import read_table
from cxr_fast.schema import (DEMOGRAPHICS, PREDICTION_LATER_COLUMNS, PREDICTION_OPTIONAL_COLUMNS,
                             PREDICTION_REQUIRED_COLUMNS, UNKNOWN)
from cxr_fast.tasks import TASKS

# Attributes that files written before they existed lack: read as Unknown.
OPTIONAL_ATTRIBUTES: tuple[str, ...] = PREDICTION_LATER_COLUMNS
IMAGE_COLUMNS: tuple[str, ...] = ("key", "dicom_id", "subject_id", "study_id", "label", "sex", "age", "age_group", "race", "view")


def prediction_files(pred_dir: str | Path) -> list[Path]:
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise CxrError(f"{pred_dir}: prediction directory not found")
    # Hidden names are in-flight atomic writes (cxr_fast.io), never finished predictions.
    files = sorted(path for path in pred_dir.glob("*.parquet") if not path.name.startswith("."))
    if not files:
        raise CxrError(f"{pred_dir}: no prediction files (*.parquet) in this directory")
    return files


def read_prediction_file(path: Path, *, split: str) -> pd.DataFrame:
    """One model's rows of `split` with a label, validated."""
    frame = read_table(path, columns=PREDICTION_REQUIRED_COLUMNS)
    tasks = frame["task"].dropna().unique()
    if len(tasks) != 1:
        raise CxrError(f"{path}: expected one task per prediction file, found {sorted(map(str, tasks))}")
    if str(tasks[0]) not in TASKS:
        # Its labels would be read as another task's: refuse rather than report them.
        raise CxrError(f"{path}: unknown task {str(tasks[0])!r}; known: {', '.join(TASKS)}")
    archs = frame["arch"].dropna().unique()
    if len(archs) != 1:
        raise CxrError(f"{path}: expected one arch per prediction file, found {sorted(map(str, archs))}")
    rows = frame[frame["split"] == split]
    if rows.empty:
        present = ", ".join(sorted(map(str, frame["split"].dropna().unique()))) or "none"
        raise CxrError(f"{path}: no rows with split == {split!r} (splits present: {present})")
    rows = rows[rows["label"].notna()].copy()  # unlabelled images cannot be right or wrong
    if rows.empty:
        raise CxrError(f"{path}: every {split} row has a missing label")
    _check_values(path, rows)
    for column in OPTIONAL_ATTRIBUTES:
        if column not in rows:
            rows[column] = UNKNOWN
    for column in DEMOGRAPHICS + OPTIONAL_ATTRIBUTES:
        rows[column] = rows[column].fillna(UNKNOWN).astype(str)
    for column in PREDICTION_OPTIONAL_COLUMNS:
        if column not in rows:
            rows[column] = np.nan
    default_recipe = f"{tasks[0]}_{archs[0]}"
    rows["recipe"] = rows["recipe"].astype(object).where(rows["recipe"].notna(), default_recipe).astype("str")
    rows["label"] = rows["label"].astype(float)
    return rows


def _check_values(path: Path, rows: pd.DataFrame) -> None:
    if rows["key"].duplicated().any():
        example = rows.loc[rows["key"].duplicated(), "key"].iloc[0]
        raise CxrError(f"{path}: key {example!r} appears more than once")
    bad_label = ~rows["label"].isin([0, 1])
    if bad_label.any():
        raise CxrError(f"{path}: label must be 0 or 1, found {rows.loc[bad_label, 'label'].iloc[0]!r}")
    bad_pred = ~rows["pred"].isin([0, 1])
    if bad_pred.any():
        raise CxrError(f"{path}: pred must be 0 or 1, found {rows.loc[bad_pred, 'pred'].iloc[0]!r}")
    prob = pd.to_numeric(rows["prob"], errors="coerce").to_numpy(float)
    if not np.isfinite(prob).all():
        raise CxrError(f"{path}: {int((~np.isfinite(prob)).sum())} {rows['split'].iloc[0]} row(s) have a missing or non-numeric prob")
    outside = (prob < 0) | (prob > 1)
    if outside.any():
        raise CxrError(f"{path}: prob must be in [0, 1], found {prob[outside][0]!r} ({int(outside.sum())} row(s))")
    if "threshold" in rows:
        _check_pred_matches_threshold(path, rows, prob)


# Probabilities and thresholds are stored as float32: a prob within this of the threshold may
# round to either side, so only a clear contradiction is refused.
THRESHOLD_TOLERANCE = 1e-6


def _check_pred_matches_threshold(path: Path, rows: pd.DataFrame, prob: np.ndarray) -> None:
    """pred must be prob >= threshold: a file whose pred says otherwise was edited or mixed up,
    and the FNR/FPR of `pred` would not describe the model at that threshold."""
    threshold = pd.to_numeric(rows["threshold"], errors="coerce").to_numpy(float)
    pred = rows["pred"].to_numpy(float) == 1
    known = np.isfinite(threshold)
    contradicts = known & ((pred & (prob < threshold - THRESHOLD_TOLERANCE))
                           | (~pred & (prob >= threshold + THRESHOLD_TOLERANCE)))
    if contradicts.any():
        first = np.flatnonzero(contradicts)[0]
        raise CxrError(f"{path}: pred contradicts prob >= threshold in {int(contradicts.sum())} row(s), e.g. key "
                       f"{rows['key'].iloc[first]!r}: prob {prob[first]:.6g}, threshold {threshold[first]:.6g}, "
                       f"pred {int(pred[first])}")


def _check_one_file_per_arch(task: str, rows: pd.DataFrame) -> None:
    files = rows.drop_duplicates("source")
    duplicated = files["arch"].duplicated()
    if duplicated.any():
        arch = files["arch"][duplicated].iloc[0]
        both = rows.loc[rows["arch"] == arch, "source"].unique()
        raise CxrError(f"{both[-1]}: task {task!r} arch {arch!r} is also in {both[0]}")


def _same_images_and_labels(grid: pd.DataFrame, n_models: int) -> bool:
    """`grid`: a task's rows sorted by (arch, key). True when every model's keys and labels
    equal the first model's, i.e. the rows are an (archs x images) grid."""
    if len(grid) % n_models:
        return False
    keys = grid["key"].to_numpy().reshape(n_models, -1)
    labels = grid["label"].to_numpy().reshape(n_models, -1)
    return bool((keys == keys[0]).all() and (labels == labels[0]).all())


def _raise_first_difference(task: str, rows: pd.DataFrame) -> None:
    """The one-line error for the first source whose images or labels differ from the first's."""
    by_source = {source: part.sort_values("key", kind="stable") for source, part in rows.groupby("source", sort=False)}
    sources = list(by_source)
    reference = by_source[sources[0]].set_index("key")["label"]
    for source in sources[1:]:
        other = by_source[source].set_index("key")["label"]
        if other.index.equals(reference.index) and np.array_equal(other.to_numpy(), reference.to_numpy()):
            continue  # this one matches the first; the difference is further on
        only_reference = reference.index.difference(other.index)
        only_other = other.index.difference(reference.index)
        if len(only_reference) or len(only_other):
            example = (list(only_other) + list(only_reference))[0]
            raise CxrError(
                f"{source}: task {task!r} test images differ from {sources[0]} "
                f"({len(only_other)} key(s) only here, {len(only_reference)} only there, e.g. {example!r}); "
                "models of one task must be predicted on the same images"
            )
        mismatch = reference.index[reference.to_numpy() != other.reindex(reference.index).to_numpy()]
        if len(mismatch):
            raise CxrError(f"{source}: task {task!r} labels differ from {sources[0]} for {len(mismatch)} image(s), e.g. {mismatch[0]!r}")
    raise CxrError(f"task {task!r}: its prediction files disagree on images or labels")


def load_predictions(*, pred_dir: str | Path, split: str = "test") -> pd.DataFrame:
    """Every prediction file of `pred_dir`, rows of `split` with a label, stacked.

    One row per (model, image); columns are PREDICTION_REQUIRED_COLUMNS + PREDICTION_OPTIONAL_COLUMNS + `source`.
    Each file is checked on its own here; that the models of a task share their images is
    checked where the rows become per-task arrays (task_data).
    """
    files = prediction_files(pred_dir)
    # Threads: parquet decoding releases the GIL. The first bad file (in name order) is the error.
    with ThreadPoolExecutor(max_workers=workers()) as pool:
        frames = list(pool.map(functools.partial(read_prediction_file, split=split), files))
    predictions = pd.concat(frames, ignore_index=True)
    # `source` (the file) as codes into the list of files: a path string per row would be the
    # largest column of the study's 3.7 million rows.
    codes = np.repeat(np.arange(len(files)), [len(frame) for frame in frames])
    predictions["source"] = pd.Categorical.from_codes(codes, categories=[str(path) for path in files])
    return predictions


@dataclass(frozen=True)
class TaskData:
    """One task's models on its shared images, as aligned arrays (images sorted by key)."""

    task: str
    archs: tuple[str, ...]
    recipes: tuple[str, ...]
    images: pd.DataFrame        # one row per image: IMAGE_COLUMNS
    label: np.ndarray           # (n,) bool
    prob: np.ndarray            # (models, n) float
    pred: np.ndarray            # (models, n) bool
    subject_index: np.ndarray   # (n,) int, position of the image's subject in 0..n_subjects-1

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.label[None, :]

    @property
    def n_subjects(self) -> int:
        return int(self.subject_index.max()) + 1 if self.subject_index.size else 0


def task_data(predictions: pd.DataFrame) -> list[TaskData]:
    """Split the stacked predictions into one TaskData per task (sorted by task name).

    Models of one task must be scored on the same images with the same labels (every pairwise
    comparison, kappa or share of models wrong, is per image): a file that differs is a
    one-line error naming it."""
    if "source" not in predictions:
        predictions = predictions.assign(source=predictions["task"].astype(str) + "_" + predictions["arch"].astype(str))
    tasks = []
    for task, rows in predictions.groupby("task", sort=True):
        _check_one_file_per_arch(task, rows)
        rows = rows.sort_values(["arch", "key"], kind="stable")
        archs = tuple(rows["arch"].drop_duplicates())
        if not _same_images_and_labels(rows, len(archs)):
            _raise_first_difference(task, rows)
        n_images = len(rows) // len(archs)
        images = rows.iloc[:n_images].reindex(columns=list(IMAGE_COLUMNS)).reset_index(drop=True)
        prob = rows["prob"].to_numpy(float).reshape(len(archs), n_images)
        pred = rows["pred"].to_numpy(float).reshape(len(archs), n_images) == 1
        recipes = (tuple(map(str, rows["recipe"].to_numpy()[::n_images])) if "recipe" in rows
                   else tuple(f"{task}_{arch}" for arch in archs))
        tasks.append(TaskData(
            task=str(task), archs=tuple(map(str, archs)), recipes=recipes, images=images,
            label=images["label"].to_numpy(float) == 1, prob=prob, pred=pred,
            subject_index=pd.factorize(images["subject_id"])[0],
        ))
    return tasks
