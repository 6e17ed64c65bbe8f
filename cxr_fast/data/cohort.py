"""From a chest X-ray source (MIMIC-CXR-JPG, CheXpert, NIH ChestX-ray14) to a cohort table.

`build_cohort` reads a source's CSVs, applies the cohort rules of DATA_SPEC.md (views, six task
labels, sex, age, race, patient-level split) and returns a `Cohort`: one row per kept image
(`Cohort.frame`, columns `FRAME_COLUMNS`, sorted by key) plus one row per dropped input row
(`Cohort.exclusions`, columns `key, reason`). No image is opened here; the sharding tool does
that and adds its own `unreadable` exclusions.

Each rule is a small pure function in `cohort_rules.py` (`select_views`, `task_labels`,
`sex_code`, `clean_age`, `race_group`, `subject_race`, `patient_split`; `age_group` in
schema.py) so it can be tested alone; the per-source readers here only find columns and glue
the rules together. Everything is vectorised:
a 223k-row CheXpert train.csv takes a few seconds.

Decisions where DATA_SPEC.md is silent
--------------------------------------
Types and values
  - MIMIC `subject_id`/`study_id` are int64. CheXpert and NIH ids are str: CheXpert
    `patientNNNNN` and `patientNNNNN/studyN`; NIH `Patient ID` exactly as written in the CSV
    (unpadded, e.g. `"1"`) and `"{Patient ID}_{Follow-up #}"`.
  - `dicom_id` is MIMIC's own id; for CheXpert/NIH it equals the key.
  - `path` is absolute (`os.path.abspath`, symlinks not resolved, so mounted trees keep the
    names the user gave).
  - A missing view is written as `Unknown`. For CheXpert, `view` is the `AP/PA` value and,
    where that is blank (laterals), the `Frontal/Lateral` value.
  - Ages outside 0-120 years (NIH has a few entries such as 414) are data errors and become
    NaN, so `age_group` says `Unknown` instead of inventing an 80+ patient. NIH ages written
    as `058Y` (an older release) are read as 58.
  - Sex accepts `M`/`Male` and `F`/`Female` in any case for every source; anything else,
    blank, or a subject missing from MIMIC-IV `patients` is `Unknown`.
Labels
  - Label cells must be 1, 0, -1 or blank; any other value is a CxrError naming the file and
    column (a silently mis-read label would poison every model trained on it).
  - A task whose source column(s) a source does not have (NIH has no Fracture) is NaN.
  - MIMIC: a study with several label rows uses the first one.
Views
  - `--views` matching is case-insensitive and ignores surrounding blanks (`pa,ap` works).
  - CheXpert: the default is `Frontal/Lateral == Frontal`; a custom list is matched against
    `AP/PA`, except that the words `Frontal` and `Lateral` in the list are matched against the
    `Frontal/Lateral` column (they never occur in `AP/PA`), so `--views Frontal,Lateral`
    keeps every image.
Demographics (MIMIC)
  - Without `--demographics`, sex is `Unknown`, age NaN and race `Unknown` for every image;
    the cohort is still built (labels and splits do not need MIMIC-IV).
  - A blank race value counts as unknown. Race ties that also tie on the earliest admittime
    go to the alphabetically first group (deterministic); a missing admittime sorts last.
  - Files are looked for in DIR, then DIR/hosp, then DIR/core, each as .csv.gz then .csv;
    `race` is preferred over `ethnicity` if a file had both.
Sources and options
  - CheXpert `--root` defaults to the CSV's grandparent (the CSV sits in the data set's own
    folder, which is the first folder of `Path`); NIH `--root` defaults to the CSV's folder.
  - NIH images are looked up by file name in one walk below `--root` (folders visited in
    sorted order, first hit wins); a name not found gets the path `ROOT/<Image Index>`.
  - `--source` is validated by `build_cohort` (a CxrError), not by argparse choices.
  - Options that do not apply to a source (`--csv` for MIMIC, `--demographics` for
    CheXpert/NIH, `--split official` outside MIMIC) are errors rather than silently ignored.
Exclusion reasons (each dropped row gets the first that applies, in this order)
  - `view`: not one of the selected views.
  - `bad_path`: CheXpert `Path` without a `patientN/studyN` part (no subject to split on).
  - `no_labels`: MIMIC study without a row in the label CSV.
  - `no_split`: `--split official` and the split CSV lacks the image.
  - `duplicate_key`: a second kept row with an already used key (the first one is kept).
  - (`unreadable` is added later by tools/shard_dataset.py.)
  Exclusions are listed in input-row order; MIMIC's are keyed by dicom_id (dots kept as `-`).
  The official split also accepts `val` for `validate`; any other value is a CxrError.
Split
  - See `patient_split`: a greedy, seeded assignment of whole subjects that keeps images and
    each task's positives and negatives at 60/20/20. It depends only on the cohort's content
    and the seed, not on the input row order.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from cxr_fast.data.cohort_rules import (UNCERTAIN_POLICIES, check_choice, clean_age, mimic_age,
                                        official_split, parse_age, patient_split, race_column, select_views,
                                        sex_code, shown_value, subject_race, task_labels)
from cxr_fast.errors import CxrError
from cxr_fast.io import read_table
from cxr_fast.schema import UNKNOWN, age_group
from cxr_fast.tasks import TASK_COLUMNS, TASKS

SOURCES = ("mimic", "chexpert", "nih")
SPLIT_METHODS = ("random", "official")

FRAME_COLUMNS: tuple[str, ...] = (
    "key", "dicom_id", "subject_id", "study_id", "path", "view",
    "sex", "age", "age_group", "race", "split", *TASKS,
)
EXCLUSION_COLUMNS = ("key", "reason")
# In the order the filters apply (see the module docstring); the sharding tool adds `unreadable`.
EXCLUSION_REASONS = ("view", "bad_path", "no_labels", "no_split", "duplicate_key")

# Every source column any task reads, once, in a stable order.
LABEL_COLUMNS: tuple[str, ...] = tuple(dict.fromkeys(c for columns in TASK_COLUMNS.values() for c in columns))

MIMIC_TABLES = {
    "metadata": "mimic-cxr-2.0.0-metadata",
    "labels": "mimic-cxr-2.0.0-chexpert",
    "split": "mimic-cxr-2.0.0-split",
}
MIMIC_IV_FOLDERS = (".", "hosp", "core")
DEFAULT_VIEWS = {"mimic": ("PA", "AP"), "chexpert": ("Frontal",), "nih": ("PA", "AP")}


# ------------------------------------------------------------------------------ public types


@dataclass(frozen=True)
class CohortOptions:
    views: tuple[str, ...] | None = None  # None = the source's frontal default
    uncertain: str = "ignore"  # ignore | zeros | ones
    split: str = "random"  # random | official (official: MIMIC only)
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.views is not None:
            views = self.views.split(",") if isinstance(self.views, str) else self.views
            views = tuple(str(view).strip() for view in views)
            if not views or not all(views):
                raise CxrError(f"--views needs a comma-separated list of view names, got {self.views!r}")
            object.__setattr__(self, "views", views)
        check_choice("--uncertain", self.uncertain, UNCERTAIN_POLICIES)
        check_choice("--split", self.split, SPLIT_METHODS)
        seed = self.split_seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise CxrError(f"--split-seed must be an integer >= 0, got {self.split_seed!r}")


@dataclass
class Cohort:
    frame: pd.DataFrame  # one row per kept image, FRAME_COLUMNS, sorted by key
    exclusions: pd.DataFrame  # key, reason: every input row not kept
    source: str

    def exclusion_counts(self) -> dict[str, int]:
        return _reason_counts(self.exclusions["reason"])


# ------------------------------------------------------------------------------ entry points


def build_cohort(
    source: str,
    *,
    root: Path | None = None,
    csv: Path | None = None,
    demographics: Path | None = None,
    options: CohortOptions = CohortOptions(),
) -> Cohort:
    """Read one source and apply the cohort rules; see the module docstring."""
    check_choice("--source", source, SOURCES)
    if options.split == "official" and source != "mimic":
        raise CxrError(f"--split official needs --source mimic (only MIMIC-CXR ships an official split), got {source}")
    if source == "mimic":
        if csv is not None:
            raise CxrError(f"{csv}: --csv is not used with --source mimic (the CSVs are read from --root)")
        if root is None:
            raise CxrError("--source mimic needs --root MIMIC_CXR_JPG_DIR")
        return _mimic_cohort(Path(root), None if demographics is None else Path(demographics), options)
    if demographics is not None:
        raise CxrError(f"{demographics}: --demographics is only used with --source mimic")
    if csv is None:
        raise CxrError(f"--source {source} needs --csv (the data set's label CSV)")
    csv = Path(csv)
    if source == "chexpert":
        return _chexpert_cohort(csv, Path(root) if root is not None else csv.absolute().parent.parent, options)
    return _nih_cohort(csv, Path(root) if root is not None else csv.absolute().parent, options)


def add_cohort_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cohort")
    group.add_argument("--source", required=True, metavar="{mimic,chexpert,nih}", help="which data set")
    group.add_argument("--root", type=Path, help="MIMIC-CXR-JPG folder, or the folder image paths are relative to")
    group.add_argument("--csv", type=Path, help="CheXpert train.csv/valid.csv or NIH Data_Entry_2017.csv")
    group.add_argument("--demographics", type=Path, help="MIMIC-IV folder (patients/admissions; MIMIC only)")
    group.add_argument("--views", type=_comma_list, default=None,
                       help="comma list of views to keep (default: frontal, e.g. PA,AP)")
    group.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="ignore",
                       help="uncertain (-1) labels: ignore = NaN for that task (default), zeros, ones")
    group.add_argument("--split", choices=SPLIT_METHODS, default="random",
                       help="random = patient-level stratified 60/20/20 (default); official = MIMIC's split CSV")
    group.add_argument("--split-seed", type=int, default=0, help="seed of the random split (default 0)")


def cohort_from_args(args: argparse.Namespace) -> Cohort:
    options = CohortOptions(views=args.views, uncertain=args.uncertain, split=args.split, split_seed=args.split_seed)
    return build_cohort(args.source, root=args.root, csv=args.csv, demographics=args.demographics, options=options)


def _comma_list(text: str) -> tuple[str, ...]:
    views = tuple(part.strip() for part in text.split(","))
    if not all(views):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list such as PA,AP, got {text!r}")
    return views


# ------------------------------------------------------------------------------ rules


# ------------------------------------------------------------------------------ MIMIC-CXR-JPG


def _mimic_cohort(root: Path, demographics: Path | None, options: CohortOptions) -> Cohort:
    if not root.is_dir():
        raise CxrError(f"{root}: MIMIC-CXR-JPG folder not found")
    metadata_path = _find_table([root], MIMIC_TABLES["metadata"])
    wanted = ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate")
    metadata = read_table(metadata_path, columns=wanted, usecols=lambda c: c in wanted, dtype={"dicom_id": str})
    subject = _integer_ids(metadata, "subject_id", metadata_path)
    study = _integer_ids(metadata, "study_id", metadata_path)
    dicom = metadata["dicom_id"].astype(str)

    labels_path = _find_table([root], MIMIC_TABLES["labels"])
    label_table = read_table(labels_path, columns=("subject_id", "study_id", *LABEL_COLUMNS))
    _check_label_values(label_table, LABEL_COLUMNS, labels_path)
    label_table = pd.DataFrame({
        "subject_id": _integer_ids(label_table, "subject_id", labels_path),
        "study_id": _integer_ids(label_table, "study_id", labels_path),
        **{column: label_table[column] for column in LABEL_COLUMNS},
    }).drop_duplicates(["subject_id", "study_id"])
    labelled = pd.DataFrame({"subject_id": subject, "study_id": study}).merge(
        label_table, on=["subject_id", "study_id"], how="left", indicator=True, validate="many_to_one")

    view = _view_text(metadata["ViewPosition"])
    reason = _no_reason(len(metadata))
    reason = _first_reason(reason, ~select_views(view, options.views or DEFAULT_VIEWS["mimic"]), "view")
    reason = _first_reason(reason, labelled["_merge"].to_numpy() != "both", "no_labels")
    split = None
    if options.split == "official":
        split_path = _find_table([root], MIMIC_TABLES["split"])
        split_table = read_table(split_path, columns=("dicom_id", "split"), dtype={"dicom_id": str})
        split = official_split(dicom, split_table, split_path)
        reason = _first_reason(reason, split.isna().to_numpy(), "no_split")

    sex, age, race = _mimic_demographics(demographics, subject, metadata["StudyDate"])
    subject_text = subject.astype(str)
    path = (os.path.join(os.path.abspath(root), "files", "p") + subject_text.str[:2] + "/p" + subject_text
            + "/s" + study.astype(str) + "/" + dicom + ".jpg")
    rows = pd.DataFrame({
        "key": _safe_key(dicom), "dicom_id": dicom, "subject_id": subject, "study_id": study,
        "path": path, "view": view, "sex": sex, "age": age, "race": race,
    })
    rows = pd.concat([rows, task_labels(labelled[list(LABEL_COLUMNS)], options.uncertain)], axis=1)
    return _finish("mimic", rows, reason, metadata_path, options, split)


def _mimic_demographics(folder: Path | None, subject: pd.Series, study_date: pd.Series):
    """sex, age, race per image; Unknown/NaN everywhere without a MIMIC-IV folder."""
    if folder is None:
        return (pd.Series(UNKNOWN, index=subject.index), pd.Series(np.nan, index=subject.index),
                pd.Series(UNKNOWN, index=subject.index))
    if not folder.is_dir():
        raise CxrError(f"{folder}: MIMIC-IV folder not found")
    folders = [folder / name for name in MIMIC_IV_FOLDERS]
    patients_path = _find_table(folders, "patients")
    wanted = ("subject_id", "gender", "anchor_age", "anchor_year")
    patients = read_table(patients_path, columns=wanted, usecols=lambda c: c in wanted)
    patients = patients.assign(subject_id=_integer_ids(patients, "subject_id", patients_path))
    patients = patients.drop_duplicates("subject_id").set_index("subject_id")
    sex = sex_code(subject.map(patients["gender"]))
    age = mimic_age(subject.map(patients["anchor_age"]), subject.map(patients["anchor_year"]), study_date)

    admissions_path = _find_table(folders, "admissions")
    kept = ("subject_id", "admittime", "race", "ethnicity")
    admissions = read_table(admissions_path, columns=("subject_id", "admittime"), usecols=lambda c: c in kept)
    if race_column(admissions) is None:
        raise CxrError(f"{admissions_path}: missing column 'race' (or 'ethnicity' in MIMIC-IV 1.0)")
    admissions = admissions.assign(subject_id=_integer_ids(admissions, "subject_id", admissions_path))
    admissions = admissions[admissions["subject_id"].isin(subject.unique())]
    race = subject.map(subject_race(admissions)).fillna(UNKNOWN)
    return sex, age, race


# ------------------------------------------------------------------------------ CheXpert


def _chexpert_cohort(csv: Path, root: Path, options: CohortOptions) -> Cohort:
    table = read_table(csv, columns=("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABEL_COLUMNS),
                       dtype={"Path": str, "Sex": str, "Frontal/Lateral": str, "AP/PA": str})
    _check_label_values(table, LABEL_COLUMNS, csv)
    image = table["Path"].fillna("").astype(str)
    ids = image.str.extract(r"(?P<subject>patient\d+)/(?P<study>study\d+)")

    if options.views is None:
        selected = select_views(table["Frontal/Lateral"], DEFAULT_VIEWS["chexpert"])
    else:
        wanted = {view.upper() for view in options.views}
        orientations = wanted & {"FRONTAL", "LATERAL"}
        selected = (select_views(table["AP/PA"], wanted - orientations)
                    | select_views(table["Frontal/Lateral"], orientations))
    reason = _no_reason(len(table))
    reason = _first_reason(reason, ~selected.to_numpy(), "view")
    reason = _first_reason(reason, ids["subject"].isna().to_numpy(), "bad_path")

    # Path without the data set's own folder and extension: train/patient00001/study1/view1_frontal
    inner = image.str.replace(r"^[^/]*/|\.[^./]*$", "", regex=True)
    key = _safe_key(inner.str.replace("/", "_", regex=False))
    view = _view_text(table["AP/PA"].where(table["AP/PA"].notna(), table["Frontal/Lateral"]))
    rows = pd.DataFrame({
        "key": key, "dicom_id": key,
        "subject_id": ids["subject"].fillna("").astype(str),
        "study_id": (ids["subject"] + "/" + ids["study"]).fillna("").astype(str),
        "path": os.path.abspath(root) + os.sep + image,
        "view": view, "sex": sex_code(table["Sex"]), "age": parse_age(table["Age"]), "race": UNKNOWN,
    })
    rows = pd.concat([rows, task_labels(table[list(LABEL_COLUMNS)], options.uncertain)], axis=1)
    return _finish("chexpert", rows, reason, csv, options)


# ------------------------------------------------------------------------------ NIH ChestX-ray14

NIH_FINDINGS = {  # NIH finding name -> the CheXpert-style column task_labels reads
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Pleural Effusion",
    "Edema": "Edema",
    "Consolidation": "Consolidation",
    "Pneumonia": "Pneumonia",
    "No Finding": "No Finding",
}


def nih_label_columns(findings: pd.Series) -> pd.DataFrame:
    """CheXpert-style 1.0/0.0 columns from NIH's `|`-separated Finding Labels (no Fracture)."""
    padded = "|" + findings.fillna("").astype(str).str.replace(r"\s*\|\s*", "|", regex=True).str.strip() + "|"
    found = {column: padded.str.contains(f"|{name}|", regex=False) for name, column in NIH_FINDINGS.items()}
    return pd.DataFrame(found, index=findings.index).astype(np.float64)


def find_images(root: Path) -> dict[str, str]:
    """File name -> absolute path for every file below `root` (one walk, sorted, first hit wins)."""
    found: dict[str, str] = {}
    for folder, subfolders, names in os.walk(os.path.abspath(root)):
        subfolders.sort()
        for name in names:
            found.setdefault(name, os.path.join(folder, name))
    return found


def _nih_cohort(csv: Path, root: Path, options: CohortOptions) -> Cohort:
    wanted = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "View Position")
    table = read_table(csv, columns=wanted, dtype={"Image Index": str, "Follow-up #": str, "Patient ID": str})
    sex_column = next((c for c in ("Patient Gender", "Patient Sex") if c in table.columns), None)
    if sex_column is None:
        raise CxrError(f"{csv}: missing column 'Patient Gender' (or 'Patient Sex')")
    if not root.is_dir():
        raise CxrError(f"{root}: NIH image folder not found")

    name = table["Image Index"].fillna("").astype(str).str.strip()
    key = _safe_key(name.str.replace(r"\.[^.]*$", "", regex=True))
    found = name.map(find_images(root))
    path = found.where(found.notna(), os.path.abspath(root) + os.sep + name)
    patient = table["Patient ID"].fillna("").astype(str).str.strip()
    view = _view_text(table["View Position"])
    selected = select_views(view, options.views or DEFAULT_VIEWS["nih"])
    reason = _first_reason(_no_reason(len(table)), ~selected.to_numpy(), "view")
    rows = pd.DataFrame({
        "key": key, "dicom_id": key, "subject_id": patient,
        "study_id": patient + "_" + table["Follow-up #"].fillna("").astype(str).str.strip(),
        "path": path.astype(str), "view": view, "sex": sex_code(table[sex_column]),
        "age": parse_age(table["Patient Age"]), "race": UNKNOWN,
    })
    rows = pd.concat([rows, task_labels(nih_label_columns(table["Finding Labels"]), options.uncertain)], axis=1)
    return _finish("nih", rows, reason, csv, options)


# ------------------------------------------------------------------------------ shared steps


def _finish(source: str, rows: pd.DataFrame, reason: pd.Series, main_file: Path, options: CohortOptions,
            official: pd.Series | None = None) -> Cohort:
    """Drop excluded rows (recording why), finish age/split, order columns, sort by key."""
    kept_keys = rows["key"].where(reason.isna())
    reason = _first_reason(reason, (kept_keys.duplicated() & kept_keys.notna()).to_numpy(), "duplicate_key")
    excluded = reason.notna().to_numpy()
    exclusions = pd.DataFrame({"key": rows["key"][excluded].astype(str).to_numpy(),
                               "reason": reason[excluded].astype(str).to_numpy()}, columns=list(EXCLUSION_COLUMNS))
    if excluded.all():
        counts = ", ".join(f"{name}: {count}" for name, count in _reason_counts(exclusions["reason"]).items())
        raise CxrError(f"{main_file}: no images left after the cohort filters ({counts or 'the file has no rows'})")

    frame = rows[~excluded].copy()
    frame["age"] = clean_age(frame["age"])
    frame["age_group"] = age_group(frame["age"])
    frame["split"] = official[~excluded] if official is not None else ""
    frame = frame.sort_values("key", kind="stable").reset_index(drop=True)
    if official is None:
        frame["split"] = patient_split(frame, seed=int(options.split_seed))
    return Cohort(frame=_typed(frame, source), exclusions=exclusions, source=source)


def _typed(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    frame = frame[list(FRAME_COLUMNS)].copy()
    for column in ("key", "dicom_id", "path", "view", "sex", "age_group", "race", "split"):
        frame[column] = frame[column].astype(str)
    id_type = np.int64 if source == "mimic" else str
    for column in ("subject_id", "study_id"):
        frame[column] = frame[column].astype(id_type)
    frame["age"] = frame["age"].astype(np.float64)
    for task in TASKS:
        frame[task] = frame[task].astype(np.float32)
    return frame


def _find_table(folders: list[Path], stem: str) -> Path:
    """The first of FOLDER/stem.csv.gz, FOLDER/stem.csv over `folders`."""
    for folder in folders:
        for suffix in (".csv.gz", ".csv"):
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    looked = " or ".join(str(Path(os.path.normpath(folder)) / stem) + ".csv[.gz]" for folder in folders)
    raise CxrError(f"{looked}: file not found")


def _integer_ids(table: pd.DataFrame, column: str, path: Path) -> pd.Series:
    values = pd.to_numeric(table[column], errors="coerce")
    bad = values.isna() | (values != np.floor(values))
    if bad.any():
        shown = shown_value(table[column][bad].iloc[0])
        raise CxrError(f"{path}: column {column!r} has a missing or non-integer value {shown}")
    return values.astype(np.int64)


def _check_label_values(table: pd.DataFrame, columns: Iterable[str], path: Path) -> None:
    for column in columns:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table[column].notna() & ~values.isin([1.0, 0.0, -1.0])
        if bad.any():
            raise CxrError(f"{path}: column {column!r} has value {shown_value(table[column][bad].iloc[0])}; "
                           "expected 1.0, 0.0, -1.0 or blank")


def _safe_key(keys: pd.Series) -> pd.Series:
    # WebDataset splits a member name at its first dot, so a key never carries one.
    return keys.astype(str).str.replace(".", "-", regex=False)


def _view_text(values: pd.Series) -> pd.Series:
    text = values.astype("string").str.strip()
    return text.where(text.notna() & (text != ""), UNKNOWN).astype(str)


def _no_reason(length: int) -> pd.Series:
    return pd.Series([None] * length, dtype=object)


def _first_reason(reason: pd.Series, failed: np.ndarray | pd.Series, name: str) -> pd.Series:
    """Record `name` for rows that fail a filter and have no earlier reason."""
    failed = np.asarray(failed, dtype=bool)
    return reason.mask(reason.isna().to_numpy() & failed, name)


def _reason_counts(reasons: pd.Series) -> dict[str, int]:
    """Rows per reason, known reasons in filter order first."""
    counts = reasons.astype(str).value_counts()
    order = [*(r for r in EXCLUSION_REASONS if r in counts.index), *sorted(set(counts.index) - set(EXCLUSION_REASONS))]
    return {name: int(counts[name]) for name in order}
