"""The cohort rules of DATA_SPEC.md, each a small pure function over pandas columns.

`select_views`, `task_labels`, `sex_code`, `parse_age`, `clean_age`, `mimic_age`, `race_group`,
`subject_race`, `patient_split` and `official_split` can be tested alone; `cohort.py` reads each
source's files and glues them together (its docstring lists the decisions the spec leaves open).
The phantom generator draws its population through the same rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from cxr_fast.errors import CxrError
from cxr_fast.schema import SPLITS, UNKNOWN
from cxr_fast.tasks import TASK_COLUMNS, TASKS

UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")

# The value an uncertain (-1) label takes under each --uncertain policy.
UNCERTAIN_VALUE = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}

PLAUSIBLE_AGE = (0.0, 120.0)

# Upper-cased prefix -> group; the first matching prefix wins, no match -> "Other".
RACE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("WHITE", "White"),
    ("PORTUGUESE", "White"),
    ("BLACK", "Black"),
    ("ASIAN", "Asian"),
    ("HISPANIC", "Hispanic/Latino"),
    ("LATINO", "Hispanic/Latino"),
    ("SOUTH AMERICAN", "Hispanic/Latino"),
    ("UNKNOWN", UNKNOWN),
    ("UNABLE TO OBTAIN", UNKNOWN),
    ("PATIENT DECLINED", UNKNOWN),
)
OTHER_RACE = "Other"

SEX_CODES = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}
SPLIT_NAMES = {"train": "train", "validate": "val", "val": "val", "test": "test"}


# ------------------------------------------------------------------------------ cell helpers


def shown_value(value: object) -> str:
    """A cell value as the user would write it (numpy scalars as plain numbers)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def check_choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CxrError(f"{option}: unknown value {value!r}; choose one of {', '.join(choices)}")


def as_numbers(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce").astype(np.float64)


def upper_text(values: pd.Series) -> pd.Series:
    return values.astype("string").str.strip().str.upper()


def lower_text(values: pd.Series) -> pd.Series:
    return values.astype("string").str.strip().str.lower()


# ------------------------------------------------------------------------------ rules


def select_views(values: pd.Series, views: Iterable[str]) -> pd.Series:
    """True where the view is one of `views` (case-insensitive, blanks around ignored)."""
    wanted = {view.strip().upper() for view in views}
    return upper_text(values).isin(wanted)


def task_labels(labels: pd.DataFrame, policy: str = "ignore") -> pd.DataFrame:
    """The six task columns (float32 1.0/0.0/NaN, TASKS order) from CheXpert-style label columns.

    Per task: any source column 1 -> 1; else any -1 -> the policy's value; else (0 or blank) 0.
    For a single column this is exactly the per-task rule; for `pneumonia` it is the union
    rule (positive wins over uncertain, uncertain over blank/negative). A task none of whose
    columns is present is NaN (a source that does not label it).
    """
    check_choice("--uncertain", policy, UNCERTAIN_POLICIES)
    tasks = {}
    for task in TASKS:
        columns = [column for column in TASK_COLUMNS[task] if column in labels.columns]
        if not columns:
            tasks[task] = np.full(len(labels), np.nan, dtype=np.float32)
            continue
        values = np.column_stack([as_numbers(labels[column]).to_numpy() for column in columns])
        positive = (values == 1.0).any(axis=1)
        uncertain = (values == -1.0).any(axis=1)
        tasks[task] = np.where(positive, 1.0, np.where(uncertain, UNCERTAIN_VALUE[policy], 0.0)).astype(np.float32)
    return pd.DataFrame(tasks, index=labels.index)


def sex_code(values: pd.Series) -> pd.Series:
    """`M`, `F` or `Unknown` from M/Male/F/Female in any case."""
    return upper_text(values).map(SEX_CODES).fillna(UNKNOWN).astype(str)


def parse_age(values: pd.Series) -> pd.Series:
    """Ages as float64; accepts numbers and NIH's old `058Y` strings; anything else NaN."""
    if pd.api.types.is_numeric_dtype(values):
        return values.astype(np.float64)
    text = values.astype("string").str.strip().str.rstrip("Yy")
    return pd.to_numeric(text, errors="coerce").astype(np.float64)


def clean_age(age: pd.Series) -> pd.Series:
    """NaN for ages outside 0-120 years (data-entry errors, e.g. NIH's 414)."""
    low, high = PLAUSIBLE_AGE
    return age.astype(np.float64).where(age.between(low, high))


def mimic_age(anchor_age: pd.Series, anchor_year: pd.Series, study_date: pd.Series) -> pd.Series:
    """Age at the study: anchor_age + (year(StudyDate) - anchor_year); StudyDate is YYYYMMDD."""
    study_year = np.floor(as_numbers(study_date) / 10_000)
    return as_numbers(anchor_age) + study_year - as_numbers(anchor_year)


def race_group(value: object) -> str:
    """Map one MIMIC-IV race/ethnicity value to a group by upper-cased prefix; blank -> Unknown."""
    if not isinstance(value, str) or not value.strip():
        return UNKNOWN
    text = value.strip().upper()
    for prefix, group in RACE_PREFIXES:
        if text.startswith(prefix):
            return group
    return OTHER_RACE


def race_column(admissions: pd.DataFrame) -> str | None:
    """`race` (MIMIC-IV 2.x) or `ethnicity` (MIMIC-IV 1.0)."""
    return next((column for column in ("race", "ethnicity") if column in admissions.columns), None)


def subject_race(admissions: pd.DataFrame) -> pd.Series:
    """Race group per subject (index subject_id, sorted) from MIMIC-IV admissions.

    The most frequent non-Unknown group; ties go to the tied group with the earliest
    admittime; subjects with only unknown values are `Unknown`.
    """
    column = race_column(admissions)
    if column is None:
        raise CxrError("admissions: missing column 'race' (or 'ethnicity')")
    raw = admissions[column].astype(object).where(admissions[column].notna(), "")
    # Map the few distinct values, not every admission.
    groups = raw.map({value: race_group(value) for value in pd.unique(raw)})
    table = pd.DataFrame({
        "subject_id": admissions["subject_id"].to_numpy(),
        "group": groups.to_numpy(),
        "admittime": pd.to_datetime(admissions["admittime"], errors="coerce", format="ISO8601").to_numpy(),
    })
    subjects = np.sort(table["subject_id"].unique())
    votes = (
        table[table["group"] != UNKNOWN]
        .groupby(["subject_id", "group"], sort=False)
        .agg(count=("group", "size"), first=("admittime", "min"))
        .reset_index()
        .sort_values(["subject_id", "count", "first", "group"], ascending=[True, False, True, True],
                     na_position="last", kind="stable")
    )
    winners = votes.drop_duplicates("subject_id").set_index("subject_id")["group"]
    return winners.reindex(subjects, fill_value=UNKNOWN).astype(str).rename("race").rename_axis("subject_id")


def patient_split(
    frame: pd.DataFrame, *, seed: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> pd.Series:
    """`train`/`val`/`test` per row of `frame` (needs `subject_id` and the task columns).

    Patient-level: all images of a subject share a split. The split keeps three kinds of
    counts at `fractions`: images, and each task's positives and negatives (both, so each
    task's prevalence among its labelled images matches across splits; NaN labels count in
    neither). Subjects go one at a time, largest first (ties in an order shuffled by `seed`,
    so another seed gives another split), each to the split that leaves every count closest
    to its share of what has been placed so far. Large subjects first and small ones last
    is the bin-packing habit: the last, small subjects fine-tune the totals.
    """
    targets = np.asarray(fractions, dtype=np.float64)
    if targets.shape != (3,) or (targets <= 0).any() or abs(targets.sum() - 1.0) > 1e-6:
        raise CxrError(f"split fractions must be three positive numbers summing to 1, got {fractions}")
    subjects = frame["subject_id"]
    counts = {"images": np.ones(len(frame))}
    for task in (task for task in TASKS if task in frame.columns):
        values = frame[task].to_numpy(np.float64)
        counts[f"{task}+"] = values == 1.0
        counts[f"{task}-"] = values == 0.0
    per_subject = pd.DataFrame(counts, index=frame.index).astype(np.float64).groupby(subjects, sort=True).sum()
    chosen = _assign_subjects(per_subject.to_numpy(), targets, np.random.default_rng(seed))
    by_subject = pd.Series(np.asarray(SPLITS, dtype=object)[chosen], index=per_subject.index)
    return subjects.map(by_subject).astype(str).rename("split")


def _assign_subjects(counts: np.ndarray, fractions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split index per subject from `counts` [subjects, quantities] (column 0 = images)."""
    n_subjects = len(counts)
    order = rng.permutation(n_subjects)
    order = order[np.argsort(-counts[order, 0], kind="stable")]
    # deviation[j, q]: amount of quantity q placed in split j minus split j's share f_j of
    # all placed. The cost is sum_jq w_jq deviation_jq^2, with w relative to each split's final
    # target (so a rare task's positives weigh as much as the image count). Placing a subject
    # with counts x moves every split by -f_j x and the chosen split b by +x as well; only b's
    # term depends on the choice (the rest is the same for every b), and it grows by
    #   2 deviation_b.(w_b x) + (1 - 2 f_b) sum_q w_bq x_q^2.
    # The per-subject parts are precomputed, so the loop is one small product per subject.
    totals = np.maximum(counts.sum(axis=0), 1.0)
    weight = 1.0 / (fractions[:, None] * totals[None, :]) ** 2
    weighted = counts[:, None, :] * weight[None]  # [subjects, 3, quantities]
    constant = (weighted * counts[:, None, :]).sum(axis=2) * (1.0 - 2.0 * fractions)[None]
    share = fractions[:, None]
    deviation = np.zeros((3, counts.shape[1]))
    chosen = np.empty(n_subjects, dtype=np.int64)
    for subject in order:
        best = int(np.argmin(2.0 * np.einsum("jq,jq->j", deviation, weighted[subject]) + constant[subject]))
        deviation -= share * counts[subject]
        deviation[best] += counts[subject]
        chosen[subject] = best
    return chosen


def official_split(dicom_ids: pd.Series, split_table: pd.DataFrame, path: Path) -> pd.Series:
    """MIMIC's split per image (`train`/`val`/`test`), NaN where the split CSV lacks it."""
    names = lower_text(split_table["split"]).map(SPLIT_NAMES)
    if names.isna().any():
        bad = split_table["split"][names.isna()].iloc[0]
        raise CxrError(f"{path}: unknown split value {shown_value(bad)}; expected train, validate or test")
    by_dicom = pd.Series(names.to_numpy(), index=split_table["dicom_id"].astype(str).to_numpy())
    by_dicom = by_dicom[~by_dicom.index.duplicated()]
    return dicom_ids.map(by_dicom)
