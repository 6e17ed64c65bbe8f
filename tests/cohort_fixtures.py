"""Writers of tiny MIMIC-CXR-JPG, MIMIC-IV, CheXpert and NIH input trees (no images unless asked).

`tiny_mimic` writes one small, hand-checked scenario; `TINY_MIMIC_EXPECTED` holds what the
cohort must say about each of its images, so a test reads as "input -> expected row".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast.tasks import CHEXPERT_LABELS, TASKS

MIMIC_METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS)
NIH_COLUMNS = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position",
    "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
)


def write_csv(path: Path, rows: list[dict] | pd.DataFrame, columns: tuple[str, ...] | None = None) -> Path:
    """Write rows as CSV (gzipped when the name ends in .gz); blank cells for missing values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows, columns=list(columns) if columns else None)
    frame.to_csv(path, index=False)
    return path


# ---------------------------------------------------------------------------- MIMIC-CXR-JPG


def mimic_image(dicom_id: str, subject_id: int, study_id: int, view: str | None = "PA",
                date: int | None = 21800506) -> dict:
    return {
        "dicom_id": dicom_id, "subject_id": subject_id, "study_id": study_id,
        "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view, "Rows": 3056,
        "Columns": 2544, "StudyDate": date, "StudyTime": 123456.0,
        "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
        "ViewCodeSequence_CodeMeaning": "postero-anterior", "PatientOrientationCodeSequence_CodeMeaning": "Erect",
    }


def mimic_labels(subject_id: int, study_id: int, labels: dict[str, float] | None = None) -> dict:
    """A label row: every CheXpert column blank except `labels` (column name -> 1.0/0.0/-1.0)."""
    blank = dict.fromkeys(CHEXPERT_LABELS, np.nan)
    return {"subject_id": subject_id, "study_id": study_id, **blank, **(labels or {})}


def write_mimic_cxr(root: Path, images: list[dict], labels: list[dict], split: list[dict] | None = None,
                    *, gzip: bool = True) -> Path:
    suffix = ".csv.gz" if gzip else ".csv"
    # Label columns in a shuffled order: the reader must select them by name.
    label_columns = ("subject_id", "study_id", *sorted(CHEXPERT_LABELS, reverse=True))
    write_csv(root / f"mimic-cxr-2.0.0-metadata{suffix}", images, MIMIC_METADATA_COLUMNS)
    write_csv(root / f"mimic-cxr-2.0.0-chexpert{suffix}", labels, label_columns)
    if split is not None:
        write_csv(root / f"mimic-cxr-2.0.0-split{suffix}", split, ("dicom_id", "study_id", "subject_id", "split"))
    return root


def write_mimic_iv(folder: Path, patients: list[dict], admissions: list[dict], *, layout: str = "hosp",
                   race_column: str = "race", gzip: bool = True) -> Path:
    """patients/admissions in FOLDER (layout "flat"), FOLDER/hosp (2.x) or FOLDER/core (1.0)."""
    target = folder if layout == "flat" else folder / layout
    suffix = ".csv.gz" if gzip else ".csv"
    write_csv(target / f"patients{suffix}", patients,
              ("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"))
    renamed = [{(race_column if name == "race" else name): value for name, value in row.items()} for row in admissions]
    write_csv(target / f"admissions{suffix}", renamed,
              ("subject_id", "hadm_id", "admittime", "dischtime", "admission_type", "insurance", race_column))
    return folder


def patient(subject_id: int, gender: str, anchor_age: int, anchor_year: int) -> dict:
    return {"subject_id": subject_id, "gender": gender, "anchor_age": anchor_age, "anchor_year": anchor_year,
            "anchor_year_group": "2014 - 2016", "dod": None}


def admission(subject_id: int, race: str | None, admittime: str | None) -> dict:
    return {"subject_id": subject_id, "hadm_id": 20000000 + abs(hash((subject_id, race, admittime))) % 9_999_999,
            "admittime": admittime, "dischtime": None, "admission_type": "EW EMER.", "insurance": "Other", "race": race}


NAN = float("nan")

# dicom_id -> what the cohort must say (None: excluded, with the reason given instead).
TINY_MIMIC_EXPECTED: dict[str, dict] = {
    # subject 10000001: F, anchor 50 @ 2180; admissions WHITE, WHITE, BLACK -> White
    "img01": dict(subject_id=10000001, study_id=50000001, view="PA", sex="F", age=50.0, age_group="40-60", race="White",
                  labels=dict(cardiomegaly=1.0, effusion=NAN, edema=0.0, fracture=0.0, pneumonia=1.0, no_finding=0.0)),
    "img02": dict(reason="view"),  # LATERAL
    "img03": dict(subject_id=10000001, study_id=50000002, view="AP", sex="F", age=55.0, age_group="40-60", race="White",
                  labels=dict(cardiomegaly=0.0, effusion=0.0, edema=0.0, fracture=0.0, pneumonia=0.0, no_finding=1.0)),
    # subject 10000002: M, anchor 30 @ 2150, study in 2140 -> 20;
    # BLACK (2150-03) vs ASIAN (2149-01): a tie -> Asian (the earliest admission)
    "img04": dict(subject_id=10000002, study_id=50000003, view="PA", sex="M", age=20.0, age_group="20-40", race="Asian",
                  labels=dict(cardiomegaly=0.0, effusion=0.0, edema=0.0, fracture=NAN, pneumonia=NAN, no_finding=0.0)),
    # subject 10000003: missing from patients; only UNKNOWN / UNABLE TO OBTAIN admissions
    "img05": dict(subject_id=10000003, study_id=50000004, view="PA", sex="Unknown", age=NAN, age_group="Unknown",
                  race="Unknown", labels=dict.fromkeys(TASKS, 0.0)),
    # subject 10000004: F, anchor 85 @ 2120, no admissions
    "img06": dict(reason="no_labels"),
    "img07": dict(subject_id=10000004, study_id=50000006, view="AP", sex="F", age=85.0, age_group="80+", race="Unknown",
                  labels=dict(cardiomegaly=0.0, effusion=0.0, edema=0.0, fracture=0.0, pneumonia=0.0, no_finding=1.0)),
    "img08": dict(reason="view"),  # no ViewPosition
    # subject 10000005: M, anchor 60 @ 2190, study in 2189 -> 59; PORTUGUESE -> White; a dot in the dicom_id
    "1.2.3": dict(key="1-2-3", subject_id=10000005, study_id=50000007, view="PA", sex="M", age=59.0, age_group="40-60",
                  race="White", labels=dict(cardiomegaly=0.0, effusion=1.0, edema=NAN, fracture=0.0, pneumonia=1.0,
                                            no_finding=0.0)),
}


def tiny_mimic(tmp_path: Path, *, gzip: bool = True, layout: str = "hosp", race_column: str = "race",
               split: bool = True) -> tuple[Path, Path]:
    """Write the TINY_MIMIC_EXPECTED scenario; returns (MIMIC-CXR-JPG root, MIMIC-IV folder)."""
    images = [
        mimic_image("img01", 10000001, 50000001, "PA", 21800506),
        mimic_image("img02", 10000001, 50000001, "LATERAL", 21800506),
        mimic_image("img03", 10000001, 50000002, "AP", 21850101),
        mimic_image("img04", 10000002, 50000003, "PA", 21400101),
        mimic_image("img05", 10000003, 50000004, "PA", 21600101),
        mimic_image("img06", 10000004, 50000005, "PA", 21200101),
        mimic_image("img07", 10000004, 50000006, "AP", 21200101),
        mimic_image("img08", 10000004, 50000006, None, 21200101),
        mimic_image("1.2.3", 10000005, 50000007, "PA", 21890704),
    ]
    labels = [
        mimic_labels(10000001, 50000001, {"Cardiomegaly": 1.0, "Pleural Effusion": -1.0, "Consolidation": 1.0,
                                          "Pneumonia": -1.0, "Edema": 0.0}),
        mimic_labels(10000001, 50000002, {"No Finding": 1.0}),
        mimic_labels(10000002, 50000003, {"Fracture": -1.0, "Pneumonia": -1.0}),  # uncertain + blank
        mimic_labels(10000003, 50000004),
        mimic_labels(10000004, 50000006, {"No Finding": 1.0}),
        mimic_labels(10000005, 50000007, {"Pleural Effusion": 1.0, "Edema": -1.0, "Consolidation": 0.0,
                                          "Pneumonia": 1.0}),
    ]
    split_rows = [
        {"dicom_id": "img01", "study_id": 50000001, "subject_id": 10000001, "split": "train"},
        {"dicom_id": "img02", "study_id": 50000001, "subject_id": 10000001, "split": "train"},
        {"dicom_id": "img03", "study_id": 50000002, "subject_id": 10000001, "split": "train"},
        {"dicom_id": "img04", "study_id": 50000003, "subject_id": 10000002, "split": "validate"},
        {"dicom_id": "img05", "study_id": 50000004, "subject_id": 10000003, "split": "test"},
        {"dicom_id": "1.2.3", "study_id": 50000007, "subject_id": 10000005, "split": "train"},
        # img07 missing -> no_split
    ]
    root = write_mimic_cxr(tmp_path / "mimic-cxr-jpg", images, labels, split_rows if split else None, gzip=gzip)
    patients = [
        patient(10000001, "F", 50, 2180),
        patient(10000002, "M", 30, 2150),
        patient(10000004, "F", 85, 2120),
        patient(10000005, "M", 60, 2190),
        patient(19999999, "F", 40, 2150),  # in MIMIC-IV, not in the CXR data
    ]
    admissions = [
        admission(10000001, "WHITE", "2180-01-01 10:00:00"),
        admission(10000001, "BLACK/AFRICAN AMERICAN", "2179-01-01 10:00:00"),
        admission(10000001, "WHITE - OTHER EUROPEAN", "2181-01-01 10:00:00"),
        admission(10000002, "BLACK/AFRICAN AMERICAN", "2150-03-01 08:00:00"),
        admission(10000002, "ASIAN - CHINESE", "2149-01-01 08:00:00"),
        admission(10000002, "UNKNOWN", "2148-01-01 08:00:00"),
        admission(10000003, "UNKNOWN", "2160-01-01 08:00:00"),
        admission(10000003, "UNABLE TO OBTAIN", "2161-01-01 08:00:00"),
        admission(10000005, "PORTUGUESE", "2189-01-01 08:00:00"),
    ]
    demographics = write_mimic_iv(tmp_path / "mimic-iv", patients, admissions, layout=layout,
                                  race_column=race_column, gzip=gzip)
    return root, demographics


# ---------------------------------------------------------------------------- CheXpert


def chexpert_row(path: str, sex: str = "Male", age: float = 50, frontal: str = "Frontal", ap_pa: str | None = "PA",
                 labels: dict[str, float] | None = None) -> dict:
    return {"Path": path, "Sex": sex, "Age": age, "Frontal/Lateral": frontal, "AP/PA": ap_pa,
            **{name: np.nan for name in CHEXPERT_LABELS}, **(labels or {})}


def write_chexpert_csv(path: Path, rows: list[dict]) -> Path:
    return write_csv(path, rows, CHEXPERT_COLUMNS)


def write_big_chexpert_csv(path: Path, n_rows: int = 223_414, seed: int = 0) -> Path:
    """A CheXpert-shaped train.csv of `n_rows` rows (about 3.5 images per patient), built vectorised."""
    rng = np.random.default_rng(seed)
    patient_index = np.sort(rng.integers(1, n_rows // 3.5 + 1, size=n_rows))
    study = rng.integers(1, 6, size=n_rows)
    view = np.arange(n_rows) % 3 + 1
    lateral = rng.random(n_rows) < 0.15
    patients = pd.Series(patient_index).map("{:05d}".format)
    paths = ("CheXpert-v1.0-small/train/patient" + patients + "/study" + pd.Series(study).astype(str)
             + "/view" + pd.Series(view).astype(str) + np.where(lateral, "_lateral.jpg", "_frontal.jpg"))
    frame = pd.DataFrame({
        "Path": paths,
        "Sex": rng.choice(["Male", "Female", "Unknown"], size=n_rows, p=[0.59, 0.4, 0.01]),
        "Age": rng.integers(18, 91, size=n_rows),
        "Frontal/Lateral": np.where(lateral, "Lateral", "Frontal"),
        "AP/PA": np.where(lateral, None, rng.choice(["AP", "PA"], size=n_rows, p=[0.8, 0.2])),
    })
    for name in CHEXPERT_LABELS:
        frame[name] = rng.choice([np.nan, 1.0, 0.0, -1.0], size=n_rows, p=[0.6, 0.2, 0.1, 0.1])
    return write_csv(path, frame)


# ---------------------------------------------------------------------------- NIH ChestX-ray14


def nih_row(image: str, findings: str, follow_up: int, patient_id: int, age: object = 50, sex: str = "M",
            view: str = "PA") -> dict:
    return {"Image Index": image, "Finding Labels": findings, "Follow-up #": follow_up, "Patient ID": patient_id,
            "Patient Age": age, "Patient Gender": sex, "View Position": view, "OriginalImage[Width": 2500,
            "Height]": 2048, "OriginalImagePixelSpacing[x": 0.143, "y]": 0.143}


def write_nih(root: Path, rows: list[dict], image_folders: dict[str, str], *,
              sex_column: str = "Patient Gender") -> Path:
    """Data_Entry_2017.csv in `root`, and an empty file per `image_folders` entry (name -> folder below root)."""
    for name, folder in image_folders.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_bytes(b"")
    columns = tuple(sex_column if column == "Patient Gender" else column for column in NIH_COLUMNS)
    renamed = [{(sex_column if name == "Patient Gender" else name): value for name, value in row.items()}
               for row in rows]
    return write_csv(root / "Data_Entry_2017.csv", renamed, columns)


# ---------------------------------------------------------------------------- split


PREVALENCE = {"cardiomegaly": 0.15, "effusion": 0.22, "edema": 0.12, "fracture": 0.06, "pneumonia": 0.10,
              "no_finding": 0.30}


def synthetic_split_frame(n_subjects: int, seed: int = 0) -> pd.DataFrame:
    """A cohort-like frame (subject_id + six tasks) where a subject's images share their labels' odds.

    Subjects have 1-12 images (geometric), and each subject has its own risk per task, so
    positives cluster within subjects the way they do in real data. About 5% of labels are NaN.
    """
    rng = np.random.default_rng(seed)
    per_subject = np.minimum(rng.geometric(0.35, size=n_subjects), 12)
    subject = np.repeat(np.arange(1, n_subjects + 1) * 7 + 1000, per_subject)
    n_images = len(subject)
    frame = pd.DataFrame({"key": [f"k{i:07d}" for i in range(n_images)], "subject_id": subject})
    subject_row = np.repeat(np.arange(n_subjects), per_subject)
    for task, prevalence in PREVALENCE.items():
        risk = rng.beta(0.6, 0.6 * (1 - prevalence) / prevalence, size=n_subjects)
        labels = (rng.random(n_images) < risk[subject_row]).astype(np.float32)
        labels[rng.random(n_images) < 0.05] = np.nan
        frame[task] = labels
    return frame
