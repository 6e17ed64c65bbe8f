"""The built-in phantom: a MIMIC-CXR-JPG + MIMIC-IV look-alike with procedurally drawn radiographs.

It stands in for the credentialed data wherever the real data is absent, so it is written in
the real layout (DATA_SPEC.md) and read by the real cohort builder unchanged:

    OUT/mimic-cxr-jpg/files/p{first 2 digits}/p{subject_id}/s{study_id}/{dicom_id}.jpg
    OUT/mimic-cxr-jpg/mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz
    OUT/mimic-iv/hosp/{patients,admissions}.csv.gz
    OUT/phantom_truth.json      what was planted, realised prevalences, counts per group

    python -m cxr_fast.data.phantom --out DIR --n-images N --seed S [--image-size 512] [--no-bias]

Population (`sample_tables`, no pixels involved)
  - Studies per subject: geometric, mean 1.6. Images per study: frontal only 55 %, frontal +
    lateral 40 %, two frontals + lateral 3 %, lateral only 2 % (mean 1.46). So images per
    subject is about 2.3 (MIMIC's 81,432 images / 35,143 patients) and about 31 % of images
    are laterals (ViewPosition LATERAL or LL); frontals are AP (55 %) or PA per study.
  - Labels per study, from a latent state: a third of studies are normal; the rest have at
    least one positive finding, with a heart-failure component that makes cardiomegaly,
    effusion and edema co-occur, and a per-subject propensity so a patient's studies resemble
    each other. Among frontal labelled images (uncertain excluded) prevalences come out near
    MIMIC's: cardiomegaly 20 %, effusion 24 %, edema 12 %, fracture 2.5 %, consolidation OR
    pneumonia 10 %, no finding 33 %. `No Finding` is 1.0 exactly when none of the other 13
    labels is 1.0, else blank. Sick studies carry uncertain (-1.0) labels; every study has
    explicit 0.0 negatives and blanks. 2 % of studies have no chexpert row (their images are
    still drawn from the latent findings).
  - Demographics are independent of the labels (so the only built-in disparity is the planted
    one): sex M/F, age at study 18-95, race from several admissions per subject, mostly one
    value, sometimes another spelling of the same group, UNKNOWN-like values or OTHER; 5 % of
    subjects have no admission, 1 % are missing from patients.csv, and 10 % extra MIMIC-IV
    subjects have no chest X-ray at all (as in the real MIMIC-IV).
  - Race and age group per image are derived with the cohort builder's own functions
    (`cxr_fast.data.cohort.subject_race`, `mimic_age`, `age_group`), so the planted groups
    are exactly the groups the cohort reports.

Drawing (`draw_radiograph`)
  A frontal or lateral chest (body, lungs, mediastinum, heart, ribs, clavicles or spine,
  vessels) with per-image position, scale, rotation, exposure, gamma and noise, plus one
  visible correlate per finding: cardiomegaly = larger cardiac silhouette, effusion = basal
  opacity with a meniscus that blunts the costophrenic angle, edema = perihilar bat-wing
  haze, consolidation/pneumonia = patchy airspace opacity, fracture = a rib gap through a
  bright callus, and also atelectasis (plate-like band), lung opacity (fuzzy blobs), lung
  lesion (sharp nodule), pneumothorax (dark rim with a pleural line), enlarged
  cardiomediastinum (wide upper mediastinum), pleural other (wall thickening), support
  devices (tube, line, pacemaker). So an image without any positive or uncertain label shows
  none of them, and `No Finding` is learnable too.
  Uncertain (-1.0) labels are drawn faintly: the same correlate at half strength.
  Above 256 px the chest is drawn at half the output resolution and scaled up (the finest
  drawn structure is still several pixels wide; it halves the generation time).
  Each image has its own generator `np.random.default_rng([seed, image_index])`, split into
  independent streams for anatomy, each finding, exposure and the planted hardness, so
  adding or removing a finding never moves the rest of the picture.

The planted disparity (on by default; `--no-bias` turns it off)
  Images of subjects whose derived race is `Black`, and images whose age group at the study
  is `80+`, get hardness 1.0: every finding is drawn at FINDING_CONTRAST_WHEN_HARD (0.2) of
  its contrast and overlaid, inside the finding only, with blotchy noise (sd
  FINDING_NOISE_SD_WHEN_HARD, grain 1/16 of the image), so a classifier misses findings
  there. Everything else is identical with and without bias: same subjects, labels,
  demographics and CSV bytes; images without any drawn finding have identical pixels.

Deviations from the real MIMIC files (all deliberate)
  - Images are square `--image-size` JPEGs and `Rows`/`Columns` say so (real ones are
    ~3000 px). The official split is 80/10/10 per subject (the real one is ~98/1/1) so a
    small phantom still has validation and test images.
  - admissions.csv.gz has a subset of MIMIC-IV's columns (no provider ids or ED times).
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from cxr_fast.data.cohort import age_group, mimic_age, subject_race
from cxr_fast.errors import CxrError, run_cli
from cxr_fast.io import atomic_path, write_csv, write_json
from cxr_fast.tasks import CHEXPERT_LABELS, TASK_COLUMNS, TASKS

# ------------------------------------------------------------------------------ file names

JPG_FOLDER = "mimic-cxr-jpg"
HOSP_FOLDER = Path("mimic-iv") / "hosp"
TRUTH_NAME = "phantom_truth.json"
METADATA_NAME = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT_NAME = "mimic-cxr-2.0.0-chexpert.csv.gz"
SPLIT_NAME = "mimic-cxr-2.0.0-split.csv.gz"
PATIENTS_NAME = "patients.csv.gz"
ADMISSIONS_NAME = "admissions.csv.gz"

METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning",
)
CHEXPERT_COLUMNS = ("subject_id", "study_id", *CHEXPERT_LABELS)
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
PATIENTS_COLUMNS = ("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod")
ADMISSIONS_COLUMNS = (
    "subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
    "admission_location", "discharge_location", "insurance", "language", "marital_status",
    "race", "hospital_expire_flag",
)

# The 13 findings (every CheXpert label but No Finding); each has a drawn correlate.
FINDINGS: tuple[str, ...] = tuple(label for label in CHEXPERT_LABELS if label != "No Finding")

# ------------------------------------------------------------------------------ the planted disparity

HARDER_RACE = "Black"
HARDER_AGE_GROUP = "80+"
FINDING_CONTRAST_WHEN_HARD = 0.2
FINDING_NOISE_SD_WHEN_HARD = 0.15
UNCERTAIN_STRENGTH = 0.5  # -1.0 labels are drawn at this fraction of full strength

# ------------------------------------------------------------------------------ population parameters

MEAN_STUDIES_PER_SUBJECT = 1.6
MAX_STUDIES_PER_SUBJECT = 40
STUDY_VIEWS = (("F",), ("F", "L"), ("F", "F", "L"), ("L",))  # F = frontal, L = lateral
STUDY_VIEWS_P = (0.55, 0.40, 0.03, 0.02)
P_AP = 0.55  # frontal view of a study is AP (portable) rather than PA
P_LL = 0.15  # a lateral is LL rather than LATERAL
P_STUDY_WITHOUT_LABELS = 0.02
P_NO_ADMISSIONS = 0.05
P_MISSING_FROM_PATIENTS = 0.01
MIMIC_IV_ONLY_SUBJECTS = 0.10  # extra MIMIC-IV subjects without any chest X-ray
SPLIT_P = {"train": 0.8, "validate": 0.1, "test": 0.1}
STUDY_SPAN_DAYS = 4 * 365  # a subject's studies fall within this many days (keeps age <= 95)

# Label model. Per subject: P(sick study) ~ Beta(2, 1) (mean 2/3, so a third of studies are
# normal) and a heart-failure-prone flag. Positive probability of each finding in a sick
# study, (typical, heart failure):
P_HEART_FAILURE_PRONE = 0.33
P_HEART_FAILURE = (0.15, 0.60)  # per sick study, (not prone, prone)
P_POSITIVE: dict[str, tuple[float, float]] = {
    "Atelectasis": (0.30, 0.30),
    "Cardiomegaly": (0.17, 0.60),
    "Edema": (0.065, 0.45),
    "Enlarged Cardiomediastinum": (0.03, 0.12),
    "Fracture": (0.037, 0.037),
    "Lung Lesion": (0.045, 0.045),
    "Lung Opacity": (0.33, 0.33),
    "Pleural Effusion": (0.25, 0.60),
    "Pleural Other": (0.015, 0.015),
    "Pneumothorax": (0.05, 0.05),
    "Support Devices": (0.28, 0.40),
}
P_AIRSPACE = 0.135  # consolidation and/or pneumonia, per sick study
AIRSPACE_KIND_P = (0.35, 0.40, 0.25)  # consolidation only, pneumonia only, both
# A sick study with no positive drawn above gets one of these (never a task finding, so the
# task prevalences stay as tuned).
FALLBACK_FINDINGS = ("Atelectasis", "Lung Opacity", "Support Devices")
# Not positive: uncertain (sick studies only), else explicit 0.0, else blank.
P_UNCERTAIN = {
    "Atelectasis": 0.07, "Cardiomegaly": 0.04, "Consolidation": 0.04, "Edema": 0.07,
    "Enlarged Cardiomediastinum": 0.06, "Fracture": 0.005, "Lung Lesion": 0.02,
    "Lung Opacity": 0.02, "Pleural Effusion": 0.04, "Pleural Other": 0.01, "Pneumonia": 0.12,
    "Pneumothorax": 0.01, "Support Devices": 0.003,
}
P_NEGATIVE = {
    "Atelectasis": 0.02, "Cardiomegaly": 0.15, "Consolidation": 0.25, "Edema": 0.15,
    "Enlarged Cardiomediastinum": 0.08, "Fracture": 0.03, "Lung Lesion": 0.02,
    "Lung Opacity": 0.03, "Pleural Effusion": 0.35, "Pleural Other": 0.01, "Pneumonia": 0.12,
    "Pneumothorax": 0.35, "Support Devices": 0.01,
}

# Latent race group -> share of subjects, and the MIMIC-IV spellings used for it (weights).
RACE_GROUP_P = {"White": 0.60, "Black": 0.18, "Hispanic/Latino": 0.06, "Asian": 0.04,
                "Other": 0.04, "Unknown": 0.08}
RACE_SPELLINGS: dict[str, dict[str, float]] = {
    "White": {"WHITE": 0.80, "WHITE - OTHER EUROPEAN": 0.08, "WHITE - RUSSIAN": 0.04,
              "WHITE - EASTERN EUROPEAN": 0.03, "WHITE - BRAZILIAN": 0.02, "PORTUGUESE": 0.03},
    "Black": {"BLACK/AFRICAN AMERICAN": 0.80, "BLACK/CAPE VERDEAN": 0.09,
              "BLACK/CARIBBEAN ISLAND": 0.07, "BLACK/AFRICAN": 0.04},
    "Hispanic/Latino": {"HISPANIC/LATINO - PUERTO RICAN": 0.35, "HISPANIC OR LATINO": 0.25,
                        "HISPANIC/LATINO - DOMINICAN": 0.20, "HISPANIC/LATINO - GUATEMALAN": 0.08,
                        "SOUTH AMERICAN": 0.07, "HISPANIC/LATINO - SALVADORAN": 0.05},
    "Asian": {"ASIAN": 0.45, "ASIAN - CHINESE": 0.30, "ASIAN - SOUTH EAST ASIAN": 0.10,
              "ASIAN - ASIAN INDIAN": 0.10, "ASIAN - KOREAN": 0.05},
    "Other": {"OTHER": 0.55, "MULTIPLE RACE/ETHNICITY": 0.20, "AMERICAN INDIAN/ALASKA NATIVE": 0.15,
              "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER": 0.10},
    "Unknown": {"UNKNOWN": 0.70, "UNABLE TO OBTAIN": 0.18, "PATIENT DECLINED TO ANSWER": 0.12},
}
# Per admission: the subject's usual spelling, or an unknown-like value, an OTHER-like value,
# or another spelling of the same group (MIMIC-IV is this messy).
ADMISSION_RACE_P = {"unknown": 0.08, "other": 0.03, "respelled": 0.05}
ANCHOR_YEAR_GROUPS = ("2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019", "2020 - 2022")

# Stream ids: images use [seed, image_index]; the tables use an index no image can have.
_TABLE_STREAM = 2**40


# ------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class PhantomTables:
    """Everything except pixels. The first five frames are written as they are.

    `images` has one row per metadata row (same order): `dicom_id, subject_id, study_id,
    path` (relative to the mimic-cxr-jpg folder), `view`, `lateral`, the derived `sex, age,
    age_group, race`, `harder` (in a planted group, whether or not bias is on), `labelled`
    (the study has a chexpert row) and one drawing strength per finding (`FINDINGS`: 1.0
    positive, 0.5 uncertain, 0.0 not drawn).
    """

    metadata: pd.DataFrame
    chexpert: pd.DataFrame
    split: pd.DataFrame
    patients: pd.DataFrame
    admissions: pd.DataFrame
    images: pd.DataFrame

    @property
    def n_subjects(self) -> int:
        return int(self.metadata["subject_id"].nunique())

    @property
    def n_studies(self) -> int:
        return int(self.metadata["study_id"].nunique())


def sample_tables(n_images: int, *, seed: int = 0, image_size: int = 512) -> PhantomTables:
    """Sample the whole population, labels and demographics for exactly `n_images` images.

    Vectorised and linear in `n_images`; it draws no pixels, so large label-only samples
    are cheap (20,000 images take about a second).
    """
    _check_positive_int("--n-images", n_images)
    _check_positive_int("--image-size", image_size)
    _check_seed(seed)
    rng = np.random.default_rng([seed, _TABLE_STREAM])
    layout = _sample_layout(rng, n_images)
    subjects = _sample_subjects(rng, layout.n_subjects)
    studies = _sample_studies(rng, layout, subjects)
    labels, strengths = _sample_labels(rng, layout.study_subject, subjects)
    labelled = rng.random(len(studies)) >= P_STUDY_WITHOUT_LABELS
    images = _sample_images(rng, layout, studies)

    extras = _sample_subjects(rng, round(MIMIC_IV_ONLY_SUBJECTS * layout.n_subjects))
    extras = extras[~extras["subject_id"].isin(subjects["subject_id"])]
    people = pd.concat([subjects, extras], ignore_index=True).sort_values("subject_id", ignore_index=True)
    admissions = _sample_admissions(rng, people)
    patients = _patients_table(rng, people)

    metadata = _metadata_table(layout, images, studies, image_size)
    chexpert = _chexpert_table(studies, labels, labelled)
    split = pd.DataFrame({
        "dicom_id": metadata["dicom_id"], "study_id": metadata["study_id"],
        "subject_id": metadata["subject_id"],
        "split": subjects["split"].to_numpy()[layout.study_subject[layout.image_study]],
    })
    plan = _image_plan(metadata, patients, admissions, strengths=strengths[layout.image_study],
                       labelled=labelled[layout.image_study], lateral=images["lateral"].to_numpy())
    return PhantomTables(metadata=metadata, chexpert=chexpert, split=split, patients=patients,
                         admissions=admissions, images=plan)


class _Layout(NamedTuple):
    study_subject: np.ndarray  # subject index per study (subjects 0..n_subjects-1, in order)
    study_order: np.ndarray  # 0 for a subject's first study, 1 for the next, ...
    image_study: np.ndarray  # study index per image
    image_view: np.ndarray  # "F" or "L" per image

    @property
    def n_subjects(self) -> int:
        return int(self.study_subject[-1]) + 1


def _sample_layout(rng: np.random.Generator, n_images: int) -> _Layout:
    """Subjects -> studies -> images, cut to exactly n_images (the last study may lose images)."""
    sizes = np.array([len(views) for views in STUDY_VIEWS])
    n_subjects = n_images // 2 + 16  # ~1.17 n_images images expected; grow if unlucky
    while True:
        per_subject = np.minimum(rng.geometric(1 / MEAN_STUDIES_PER_SUBJECT, n_subjects), MAX_STUDIES_PER_SUBJECT)
        composition = rng.choice(len(STUDY_VIEWS), size=int(per_subject.sum()), p=STUDY_VIEWS_P)
        if sizes[composition].sum() >= n_images:
            break
        n_subjects *= 2
    study_subject = np.repeat(np.arange(n_subjects), per_subject)
    study_order = np.arange(len(study_subject)) - np.repeat(np.cumsum(per_subject) - per_subject, per_subject)
    per_study = sizes[composition]
    last = int(np.searchsorted(np.cumsum(per_study), n_images))
    per_study = per_study[: last + 1].copy()
    per_study[-1] -= int(per_study.sum()) - n_images
    image_study = np.repeat(np.arange(last + 1), per_study)
    slot = np.arange(n_images) - np.repeat(np.cumsum(per_study) - per_study, per_study)
    views = np.array([list(v) + [""] * (3 - len(v)) for v in STUDY_VIEWS])
    image_view = views[composition[image_study], slot]
    return _Layout(study_subject[: last + 1], study_order[: last + 1], image_study, image_view)


def _sample_subjects(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """One row per subject with images, in ascending subject_id order."""
    first_gap_years = rng.integers(0, 3, n)  # first study is 0-2 years after anchor_year
    age_at_first = rng.normal(63.0, 17.0, n)
    race = rng.choice(list(RACE_GROUP_P), size=n, p=list(RACE_GROUP_P.values()))
    return pd.DataFrame({
        "subject_id": np.sort(_unique_ids(rng, n, first_digit=1)),
        "gender": np.where(rng.random(n) < 0.48, "F", "M"),
        # MIMIC-IV anchor ages are adults; <= 88 keeps every study age <= 95.
        "anchor_age": np.clip(np.rint(age_at_first) - first_gap_years, 18, 88).astype(np.int64),
        "anchor_year": rng.integers(2110, 2201, n),
        "anchor_year_group": rng.choice(ANCHOR_YEAR_GROUPS, size=n),
        "first_gap_years": first_gap_years,
        "latent_race": race,
        "usual_race": _usual_spelling(rng, race),
        "p_sick": rng.beta(2.0, 1.0, n),
        "heart_failure_prone": rng.random(n) < P_HEART_FAILURE_PRONE,
        "split": rng.choice(list(SPLIT_P), size=n, p=list(SPLIT_P.values())),
        "has_admissions": rng.random(n) >= P_NO_ADMISSIONS,
        "in_patients": _all_but_a_few(rng, n, P_MISSING_FROM_PATIENTS),
    })


def _all_but_a_few(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """True except for round(fraction * n) entries (at least one once n >= 10)."""
    missing = max(round(fraction * n), 1 if n >= 10 else 0)
    keep = np.ones(n, dtype=bool)
    keep[rng.choice(n, size=missing, replace=False)] = False
    return keep


def _usual_spelling(rng: np.random.Generator, groups: np.ndarray) -> np.ndarray:
    spelling = np.empty(len(groups), dtype=object)
    for group, choices in RACE_SPELLINGS.items():
        rows = np.flatnonzero(groups == group)
        spelling[rows] = rng.choice(list(choices), size=len(rows), p=list(choices.values()))
    return spelling


def _sample_studies(rng: np.random.Generator, layout: _Layout, subjects: pd.DataFrame) -> pd.DataFrame:
    """study_id, date and time per study; a subject's studies are in date order."""
    owner = layout.study_subject
    n = len(owner)
    first_day = (_year_start(subjects["anchor_year"].to_numpy() + subjects["first_gap_years"].to_numpy())
                 + rng.integers(0, 365, len(subjects)).astype("timedelta64[D]"))
    gaps = np.where(layout.study_order == 0, 0.0, rng.exponential(150.0, n))
    since_first = np.cumsum(gaps)
    since_first -= np.repeat(since_first[layout.study_order == 0], np.bincount(owner))
    days = first_day[owner] + np.minimum(since_first, STUDY_SPAN_DAYS).astype(np.int64).astype("timedelta64[D]")
    seconds = rng.integers(0, 86_400, n)
    return pd.DataFrame({
        "study_id": _unique_ids(rng, n, first_digit=5),
        "subject_id": subjects["subject_id"].to_numpy()[owner],
        "date": days,
        "StudyDate": np.char.replace(np.datetime_as_string(days, unit="D"), "-", "").astype(np.int64),
        # MIMIC writes StudyTime as HHMMSS.fff
        "StudyTime": (seconds // 3600 * 10_000 + seconds % 3600 // 60 * 100 + seconds % 60
                      + rng.integers(0, 1000, n) / 1000.0),
        "frontal_view": np.where(rng.random(n) < P_AP, "AP", "PA"),
    })


def _sample_labels(rng: np.random.Generator, owner: np.ndarray,
                   subjects: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """CheXpert values per study (NaN/1/0/-1, all 14 columns) and drawing strengths (n, 13)."""
    n = len(owner)
    sick = rng.random(n) < subjects["p_sick"].to_numpy()[owner]
    prone = subjects["heart_failure_prone"].to_numpy()[owner]
    heart_failure = sick & (rng.random(n) < np.where(prone, P_HEART_FAILURE[1], P_HEART_FAILURE[0]))
    positive: dict[str, np.ndarray] = {}
    for finding, (typical, failing) in P_POSITIVE.items():
        positive[finding] = sick & (rng.random(n) < np.where(heart_failure, failing, typical))
    airspace = sick & (rng.random(n) < P_AIRSPACE)
    kind = rng.choice(3, size=n, p=AIRSPACE_KIND_P)
    positive["Consolidation"] = airspace & (kind != 1)
    positive["Pneumonia"] = airspace & (kind != 0)
    # A sick study always has a positive finding, so `No Finding` == "nothing drawn".
    nothing = sick & ~np.any(list(positive.values()), axis=0)
    fallback = rng.choice(FALLBACK_FINDINGS, size=n)
    for finding in FALLBACK_FINDINGS:
        positive[finding] |= nothing & (fallback == finding)

    values: dict[str, np.ndarray] = {}
    for finding in FINDINGS:
        draw = rng.random(n)
        value = np.full(n, np.nan)
        value[draw >= 1.0 - P_NEGATIVE[finding]] = 0.0
        value[sick & (draw < P_UNCERTAIN[finding])] = -1.0
        value[positive[finding]] = 1.0
        values[finding] = value
    any_positive = np.any([values[f] == 1.0 for f in FINDINGS], axis=0)
    values["No Finding"] = np.where(any_positive, np.nan, 1.0)
    labels = pd.DataFrame({label: values[label] for label in CHEXPERT_LABELS})
    strengths = np.stack([np.select([values[f] == 1.0, values[f] == -1.0], [1.0, UNCERTAIN_STRENGTH], 0.0)
                          for f in FINDINGS], axis=1)
    return labels, strengths


def _sample_images(rng: np.random.Generator, layout: _Layout, studies: pd.DataFrame) -> pd.DataFrame:
    n = len(layout.image_study)
    lateral = layout.image_view == "L"
    view = np.where(lateral, np.where(rng.random(n) < P_LL, "LL", "LATERAL"),
                    studies["frontal_view"].to_numpy()[layout.image_study])
    # MIMIC dicom_ids are five dashed groups of 8 hex digits (never a dot).
    words = rng.integers(0, 2**32, size=(n, 5), dtype=np.uint64)
    dicom_id = ["-".join(f"{word:08x}" for word in row) for row in words.tolist()]
    return pd.DataFrame({"dicom_id": dicom_id, "view": view, "lateral": lateral})


def _sample_admissions(rng: np.random.Generator, people: pd.DataFrame) -> pd.DataFrame:
    """Several admissions per subject (none for some), sorted by subject and admittime."""
    n = len(people)
    count = np.where(people["has_admissions"].to_numpy(), np.minimum(rng.geometric(0.45, n), 12), 0)
    owner = np.repeat(np.arange(n), count)
    m = len(owner)
    # Admissions fall from a year before the first study to a few years after it.
    window = _year_start(people["anchor_year"].to_numpy() + people["first_gap_years"].to_numpy() - 1)
    admit = window[owner].astype("datetime64[s]") + rng.integers(0, 6 * 365 * 86_400, m).astype("timedelta64[s]")
    discharge = admit + rng.integers(6 * 3600, 14 * 86_400, m).astype("timedelta64[s]")

    race = people["usual_race"].to_numpy()[owner].copy()
    draw = rng.random(m)
    unknown = draw < ADMISSION_RACE_P["unknown"]
    other = ~unknown & (draw < ADMISSION_RACE_P["unknown"] + ADMISSION_RACE_P["other"])
    respelled = ~unknown & ~other & (draw < sum(ADMISSION_RACE_P.values()))
    race[unknown] = _usual_spelling(rng, np.full(int(unknown.sum()), "Unknown"))
    race[other] = _usual_spelling(rng, np.full(int(other.sum()), "Other"))
    race[respelled] = _usual_spelling(rng, people["latent_race"].to_numpy()[owner][respelled])

    def pick(*choices: str) -> np.ndarray:
        return rng.choice(choices, size=m)

    table = pd.DataFrame({
        "subject_id": people["subject_id"].to_numpy()[owner],
        "hadm_id": _unique_ids(rng, m, first_digit=2),
        "admittime": _timestamps(admit),
        "dischtime": _timestamps(discharge),
        "deathtime": np.nan,
        "admission_type": pick("EW EMER.", "URGENT", "ELECTIVE", "OBSERVATION ADMIT", "DIRECT EMER."),
        "admission_location": pick("EMERGENCY ROOM", "TRANSFER FROM HOSPITAL", "PHYSICIAN REFERRAL",
                                   "WALK-IN/SELF REFERRAL", "CLINIC REFERRAL"),
        "discharge_location": pick("HOME", "HOME HEALTH CARE", "SKILLED NURSING FACILITY", "REHAB"),
        "insurance": pick("Medicare", "Medicaid", "Other"),
        "language": pick("ENGLISH", "ENGLISH", "ENGLISH", "?"),
        "marital_status": pick("MARRIED", "SINGLE", "WIDOWED", "DIVORCED"),
        "race": race,
        "hospital_expire_flag": 0,
    })
    return table.sort_values(["subject_id", "admittime"], ignore_index=True, kind="stable")


def _patients_table(rng: np.random.Generator, people: pd.DataFrame) -> pd.DataFrame:
    n = len(people)
    # Deaths come after the last study (which is at most ~6 years after anchor_year).
    death = _year_start(people["anchor_year"].to_numpy() + people["first_gap_years"].to_numpy() + 5) \
        + rng.integers(0, 1000, n).astype("timedelta64[D]")
    dod = np.where(rng.random(n) < 0.08, np.datetime_as_string(death, unit="D"), None)
    table = people.assign(dod=dod)[list(PATIENTS_COLUMNS)]
    return table[people["in_patients"].to_numpy()].reset_index(drop=True)


def _metadata_table(layout: _Layout, images: pd.DataFrame, studies: pd.DataFrame, image_size: int) -> pd.DataFrame:
    study = studies.iloc[layout.image_study].reset_index(drop=True)
    portable = study["frontal_view"].to_numpy() == "AP"
    procedure = np.where(portable, "CHEST (PORTABLE AP)", "CHEST (PA AND LAT)")
    view_meaning = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}
    return pd.DataFrame({
        "dicom_id": images["dicom_id"],
        "subject_id": study["subject_id"],
        "study_id": study["study_id"],
        "PerformedProcedureStepDescription": procedure,
        "ViewPosition": images["view"],
        "Rows": image_size,
        "Columns": image_size,
        "StudyDate": study["StudyDate"],
        "StudyTime": study["StudyTime"],
        "ProcedureCodeSequence_CodeMeaning": procedure,
        "ViewCodeSequence_CodeMeaning": images["view"].map(view_meaning),
        "PatientOrientationCodeSequence_CodeMeaning": np.where(portable, "Recumbent", "Erect"),
    })


def _chexpert_table(studies: pd.DataFrame, labels: pd.DataFrame, labelled: np.ndarray) -> pd.DataFrame:
    table = pd.concat([studies[["subject_id", "study_id"]], labels], axis=1)[labelled]
    return table.sort_values(["subject_id", "study_id"], ignore_index=True)[list(CHEXPERT_COLUMNS)]


def _image_plan(metadata: pd.DataFrame, patients: pd.DataFrame, admissions: pd.DataFrame, *,
                strengths: np.ndarray, labelled: np.ndarray, lateral: np.ndarray) -> pd.DataFrame:
    """Per image: where it goes, what the cohort will say about its patient, what to draw."""
    subject = metadata["subject_id"]
    by_subject = patients.set_index("subject_id")
    age = mimic_age(subject.map(by_subject["anchor_age"]), subject.map(by_subject["anchor_year"]),
                    metadata["StudyDate"])
    groups = age_group(age)
    race = subject.map(subject_race(admissions)).fillna("Unknown").astype(str)
    subject_text = subject.astype(str)
    plan = pd.DataFrame({
        "dicom_id": metadata["dicom_id"],
        "subject_id": subject,
        "study_id": metadata["study_id"],
        "path": ("files/p" + subject_text.str[:2] + "/p" + subject_text + "/s"
                 + metadata["study_id"].astype(str) + "/" + metadata["dicom_id"] + ".jpg"),
        "view": metadata["ViewPosition"],
        "lateral": lateral,
        "sex": subject.map(by_subject["gender"]).fillna("Unknown").astype(str),
        "age": age,
        "age_group": groups,
        "race": race,
        "harder": ((race == HARDER_RACE) | (groups == HARDER_AGE_GROUP)).to_numpy(),
        "labelled": labelled,
    })
    for column, finding in enumerate(FINDINGS):
        plan[finding] = strengths[:, column]
    return plan


def image_hardness(images: pd.DataFrame, *, bias: bool) -> np.ndarray:
    """Per image hardness in [0, 1]: 1.0 for the planted groups when bias is on, else 0."""
    return images["harder"].to_numpy(dtype=np.float64) if bias else np.zeros(len(images))


def _unique_ids(rng: np.random.Generator, n: int, *, first_digit: int) -> np.ndarray:
    """n distinct 8-digit integers starting with `first_digit`, in random order."""
    return rng.choice(10_000_000, size=n, replace=False).astype(np.int64) + first_digit * 10_000_000


def _year_start(years: np.ndarray) -> np.ndarray:
    return (np.asarray(years, dtype=np.int64) - 1970).astype("datetime64[Y]").astype("datetime64[D]")


def _timestamps(values: np.ndarray) -> np.ndarray:
    """MIMIC-IV writes times as `YYYY-MM-DD HH:MM:SS`."""
    if len(values) == 0:  # np.char.replace cannot size an empty result
        return np.array([], dtype=object)
    return np.char.replace(np.datetime_as_string(values, unit="s"), "T", " ")


# ------------------------------------------------------------------------------ drawing: geometry
#
# Everything is drawn in chest coordinates: the unit square, x to the image's right (the
# patient's left on a frontal), y down. `_Frame` maps them to pixels with this image's zoom,
# rotation and shift. Intensities are "density" in [0, 1]: air dark, bone bright.

BACKGROUND_LEVEL = 0.04
BODY_LEVEL = 0.50
MEDIASTINUM_LEVEL = 0.64
HEART_LEVEL = 0.62
BONE_GAIN = 0.16  # a bone line at level 1.0 adds this much density


@dataclass(frozen=True)
class _Frame:
    size: int
    zoom: float
    angle: float  # radians
    shift: tuple[float, float]  # fraction of the image

    def to_pixels(self, xy: Iterable) -> list[tuple[float, float]]:
        points = np.asarray(xy, dtype=np.float64).reshape(-1, 2) - 0.5
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        x = (points[:, 0] * cos - points[:, 1] * sin) * self.zoom + 0.5 + self.shift[0]
        y = (points[:, 0] * sin + points[:, 1] * cos) * self.zoom + 0.5 + self.shift[1]
        return list(zip((x * self.size).tolist(), (y * self.size).tolist()))

    def pixels(self, length: float) -> float:
        return length * self.zoom * self.size

    def reduced(self, factor: int) -> "_Frame":
        return replace(self, size=max(8, self.size // factor))


@dataclass(frozen=True)
class _Ellipse:
    cx: float
    cy: float
    rx: float
    ry: float
    tilt: float = 0.0

    def outline(self, n: int = 40) -> np.ndarray:
        t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
        x, y = self.rx * np.cos(t), self.ry * np.sin(t)
        cos, sin = math.cos(self.tilt), math.sin(self.tilt)
        return np.stack([self.cx + x * cos - y * sin, self.cy + x * sin + y * cos], axis=1)


@dataclass(frozen=True)
class _Lung:
    outline: np.ndarray  # closed polygon
    wall: np.ndarray  # chest-wall edge, from the apex down to the costophrenic angle
    far_base: np.ndarray  # the other end of the diaphragm (medial, or anterior on a lateral)
    hilum: np.ndarray

    def wall_point(self, t: float) -> np.ndarray:
        return _along(self.wall, t)[0]

    def inner_point(self, rng: np.random.Generator, depth: tuple[float, float] = (0.3, 0.8)) -> np.ndarray:
        """A random point between the hilum and the chest wall (inside the lung)."""
        wall = self.wall_point(rng.uniform(0.15, 0.9))
        return self.hilum + rng.uniform(*depth) * (wall - self.hilum)


@dataclass(frozen=True)
class _Chest:
    frame: _Frame
    body: np.ndarray
    lungs: tuple[_Lung, ...]
    lung_level: float
    solids: tuple[tuple[np.ndarray, float], ...]  # (polygon, level) painted over the lungs in order
    heart: _Ellipse
    heart_growth: tuple[float, float]  # where an enlarged heart extends to
    mediastinum: np.ndarray
    bone_lines: tuple[tuple[np.ndarray, float, float], ...]  # (points, width, level)
    ribs: tuple[np.ndarray, ...]  # rib centre lines a fracture may break
    rib_width: float
    rib_break: tuple[float, float]  # where along a rib a break shows over lung
    tube: np.ndarray  # endotracheal tube path
    central_line: np.ndarray
    pacer: np.ndarray


def _along(points: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Point at fraction t of a polyline's length, and the unit direction there."""
    steps = np.diff(points, axis=0)
    lengths = np.hypot(steps[:, 0], steps[:, 1])
    target = t * lengths.sum()
    index = min(int(np.searchsorted(np.cumsum(lengths), target)), len(steps) - 1)
    before = lengths[:index].sum()
    fraction = (target - before) / max(lengths[index], 1e-9)
    return points[index] + fraction * steps[index], steps[index] / max(lengths[index], 1e-9)


def _random_frame(rng: np.random.Generator, size: int) -> _Frame:
    return _Frame(size=size, zoom=rng.uniform(0.88, 1.04), angle=rng.uniform(-0.05, 0.05),
                  shift=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)))


def _frontal_chest(rng: np.random.Generator, frame: _Frame) -> _Chest:
    half_width = rng.uniform(0.33, 0.39)
    top = rng.uniform(0.10, 0.15)
    base = rng.uniform(0.70, 0.78)
    dome = rng.uniform(0.06, 0.10)
    # Image left is the patient's right, whose hemidiaphragm sits a little higher.
    lungs = (_frontal_lung(-1, half_width, top, base - 0.02, dome), _frontal_lung(1, half_width, top, base, dome))
    # A normal heart: cardiothoracic ratio ~0.4, resting on the left hemidiaphragm.
    heart = _Ellipse(0.5 + rng.uniform(0.035, 0.06), base - dome - rng.uniform(0.02, 0.05),
                     rng.uniform(0.13, 0.155), rng.uniform(0.09, 0.11), tilt=rng.uniform(0.25, 0.5))
    heart_top = heart.cy - heart.ry
    mediastinum = np.array([[0.44, 0.0], [0.56, 0.0], [0.565, top], [0.57, heart_top + 0.02],
                            [0.43, heart_top + 0.02], [0.435, top]])
    body = np.array([[0.41, -0.05], [0.59, -0.05], [0.62, 0.03], [0.5 + half_width + 0.12, 0.08],
                     [0.5 + half_width + 0.10, 0.35], [0.5 + half_width + 0.09, 0.7], [0.5 + half_width + 0.1, 1.05],
                     [0.5 - half_width - 0.1, 1.05], [0.5 - half_width - 0.09, 0.7], [0.5 - half_width - 0.10, 0.35],
                     [0.5 - half_width - 0.12, 0.08], [0.38, 0.03]])
    solids = (
        (mediastinum, MEDIASTINUM_LEVEL),
        (_Ellipse(0.565, top + 0.12, 0.035, 0.03).outline(), MEDIASTINUM_LEVEL),  # aortic knob
        (heart.outline(), HEART_LEVEL),
        (_Ellipse(0.5 + 0.2, base + 0.05, rng.uniform(0.03, 0.06), 0.03).outline(), 0.28),  # gastric bubble
        (np.array([[0.49, 0.0], [0.51, 0.0], [0.515, top + 0.1], [0.485, top + 0.1]]), 0.30),  # trachea
    )
    ribs, bones = [], [(np.array([[0.5, -0.05], [0.5, 1.05]]), 0.05, 0.5)]  # spine
    spacing = (base - top) / 8.5
    for side in (-1, 1):
        for i in range(9):
            rib = _frontal_rib(side, top - 0.02 + i * spacing, half_width)
            ribs.append(rib)
            bones.append((rib, 0.016, 1.0))
            anterior = np.array([[0.5 + side * half_width, top + 0.05 + i * spacing],
                                 [0.5 + side * (half_width * 0.6), top + 0.09 + i * spacing],
                                 [0.5 + side * 0.13, top + 0.15 + i * spacing]])
            bones.append((anterior, 0.012, 0.45))
        bones.append((np.array([[0.5 + side * 0.04, top + 0.03], [0.5 + side * 0.17, top - 0.005],
                                [0.5 + side * 0.31, top - 0.03]]), 0.025, 1.0))  # clavicle
    bones.extend(_vessels(rng, lungs))
    return _Chest(
        frame=frame, body=body, lungs=lungs, lung_level=0.14, solids=solids, heart=heart,
        heart_growth=(0.035, 0.012), mediastinum=mediastinum, bone_lines=tuple(bones),
        ribs=tuple(ribs[1:8] + ribs[10:17]), rib_width=0.016, rib_break=(0.55, 0.85),
        tube=np.array([[0.5, -0.05], [0.502, top + 0.05], [0.505, top + 0.13]]),
        central_line=np.array([[0.5 + 0.3, top - 0.04], [0.5 + 0.16, top + 0.0], [0.5 + 0.04, top + 0.1],
                               [0.5 + 0.02, heart_top]]),
        pacer=np.array([0.5 + 0.27, top + 0.04]),
    )


def _frontal_lung(side: int, half_width: float, top: float, base: float, dome: float) -> _Lung:
    t = np.linspace(0.04, 1.0, 14)
    wall = np.stack([0.5 + side * (0.16 + (half_width - 0.16) * np.sin(t * np.pi / 2) ** 0.55),
                     top + (base - top) * t], axis=1)
    wall = np.vstack([[0.5 + side * 0.14, top], wall])
    u = np.linspace(0.0, 1.0, 12)[1:]
    diaphragm = np.stack([0.5 + side * (half_width - (half_width - 0.06) * u),
                          base - dome * np.sin(np.pi * 0.9 * u) ** 0.8], axis=1)
    medial = np.array([[0.5 + side * 0.07, top + 0.2], [0.5 + side * 0.08, top + 0.05]])
    outline = np.vstack([wall, diaphragm, medial])
    hilum = np.array([0.5 + side * 0.13, top + 0.42 * (base - top)])
    return _Lung(outline=outline, wall=wall, far_base=diaphragm[-1], hilum=hilum)


def _frontal_rib(side: int, y: float, half_width: float) -> np.ndarray:
    """A posterior rib: from the spine out and up, then down along the chest wall."""
    t = np.linspace(0.0, 1.0, 9)
    return np.stack([0.5 + side * (0.06 + t * (half_width - 0.045)),
                     y - 0.03 * np.sin(np.pi * t * 0.9) + 0.09 * t ** 3], axis=1)


def _lateral_chest(rng: np.random.Generator, frame: _Frame) -> _Chest:
    """Patient facing image left: sternum left, spine right, one superimposed lung field."""
    top = rng.uniform(0.08, 0.13)
    base = rng.uniform(0.74, 0.82)
    back = rng.uniform(0.76, 0.82)
    front = rng.uniform(0.22, 0.27)
    wall = np.array([[0.52, top], [0.62, top + 0.04], [0.70, top + 0.15], [back - 0.02, 0.4],
                     [back, base - 0.1], [back + 0.01, base]])
    diaphragm = np.array([[back - 0.05, base - 0.04], [0.6, base - 0.1], [0.45, base - 0.11],
                          [front + 0.04, base - 0.08], [front + 0.02, base - 0.06]])
    anterior = np.array([[front, 0.55], [front + 0.03, 0.3], [0.4, top + 0.04]])
    lung = _Lung(outline=np.vstack([wall, diaphragm, anterior]), wall=wall,
                 far_base=diaphragm[-1], hilum=np.array([0.52, 0.45]))
    heart = _Ellipse(front + rng.uniform(0.13, 0.16), base - rng.uniform(0.16, 0.19),
                     rng.uniform(0.13, 0.15), rng.uniform(0.11, 0.13), tilt=rng.uniform(-0.5, -0.3))
    mediastinum = np.array([[front + 0.1, top + 0.02], [0.47, top + 0.02], [0.48, 0.42], [front + 0.08, 0.45],
                            [front + 0.05, 0.3]])
    body = _Ellipse(0.52, 0.58, 0.44, 0.62).outline(48)
    vertebrae = tuple((_Ellipse(back + 0.07, y, 0.045, 0.028).outline(16), 0.72)
                      for y in np.arange(0.05, 1.0, 0.075))
    solids = (
        (np.array([[0.5, -0.05], [0.55, -0.05], [0.56, 0.35], [0.52, 0.35]]), 0.3),  # trachea
        (mediastinum, 0.38),
        (heart.outline(), 0.55),
        *vertebrae,
    )
    ribs, bones = [], [(np.array([[front - 0.04, 0.18], [front - 0.02, 0.55]]), 0.022, 0.8)]  # sternum
    for i in range(8):
        y = top + 0.04 + i * (base - top) / 8.5
        rib = np.array([[back + 0.04, y], [back - 0.1, y + 0.05], [0.45, y + 0.12], [front + 0.05, y + 0.2]])
        ribs.append(rib)
        bones.append((rib, 0.014, 0.6))
    bones.extend(_vessels(rng, (lung,)))
    return _Chest(
        frame=frame, body=body, lungs=(lung,), lung_level=0.26, solids=solids, heart=heart,
        heart_growth=(0.05, 0.0), mediastinum=mediastinum, bone_lines=tuple(bones),
        ribs=tuple(ribs[1:7]), rib_width=0.014, rib_break=(0.12, 0.45),
        tube=np.array([[0.5, -0.05], [0.53, top + 0.1], [0.54, top + 0.18]]),
        central_line=np.array([[0.45, -0.02], [0.48, top + 0.12], [0.46, 0.42]]),
        pacer=np.array([front + 0.02, top + 0.06]),
    )


def _vessels(rng: np.random.Generator, lungs: Iterable[_Lung]) -> list[tuple[np.ndarray, float, float]]:
    """Faint branching lung markings fanning out from each hilum."""
    lines = []
    for lung in lungs:
        for _ in range(7):
            wall = lung.wall_point(rng.uniform(0.1, 0.95))
            end = lung.hilum + rng.uniform(0.35, 0.7) * (wall - lung.hilum)
            middle = (lung.hilum + end) / 2 + rng.normal(0.0, 0.015, 2)
            lines.append((np.stack([lung.hilum, middle, end]), 0.006, 0.4))
    return lines


# ------------------------------------------------------------------------------ drawing: painting


class _Canvas:
    """One 8-bit drawing surface in chest coordinates, read back blurred as float32 in [0, 1].

    `reduce` draws at 1/reduce resolution and scales up: for very blurred layers that is
    indistinguishable and several times cheaper.
    """

    def __init__(self, frame: _Frame, *, reduce: int = 1) -> None:
        self.full_size = frame.size
        reduce = min(reduce, max(1, frame.size // 128))  # never below 128 px: small images stay sharp
        self.frame = frame.reduced(reduce) if reduce > 1 else frame
        self.image = Image.new("L", (self.frame.size, self.frame.size), 0)
        self.draw = ImageDraw.Draw(self.image)

    def fill(self, level: float) -> None:
        self.draw.rectangle((0, 0, self.frame.size, self.frame.size), fill=_byte(level))

    def polygon(self, points: np.ndarray, level: float = 1.0) -> None:
        self.draw.polygon(self.frame.to_pixels(points), fill=_byte(level))

    def line(self, points: np.ndarray, width: float, level: float = 1.0) -> None:
        self.draw.line(self.frame.to_pixels(points), fill=_byte(level),
                       width=max(1, round(self.frame.pixels(width))), joint="curve")

    def lines(self, lines: Iterable[tuple[np.ndarray, float, float]]) -> None:
        """Many (points, width, level) lines with one coordinate transform (ribs, vessels)."""
        lines = list(lines)
        pixels = self.frame.to_pixels(np.concatenate([points for points, _, _ in lines]))
        start = 0
        for points, width, level in lines:
            self.draw.line(pixels[start:start + len(points)], fill=_byte(level),
                           width=max(1, round(self.frame.pixels(width))), joint="curve")
            start += len(points)

    def array(self, blur: float) -> np.ndarray:
        image = self.image
        radius = self.frame.pixels(blur)
        if radius >= 0.3:
            image = image.filter(ImageFilter.GaussianBlur(radius))
        if image.size[0] != self.full_size:
            image = image.resize((self.full_size, self.full_size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.float32) * np.float32(1 / 255)


def _byte(level: float) -> int:
    return int(round(min(max(level, 0.0), 1.0) * 255))


class _Anatomy:
    """The painted normal chest: `base` (soft tissue, air, heart) and `bones` (density added)."""

    def __init__(self, chest: _Chest) -> None:
        self.chest = chest
        base = _Canvas(chest.frame, reduce=2)
        base.fill(BACKGROUND_LEVEL)
        base.polygon(chest.body, BODY_LEVEL)
        for lung in chest.lungs:
            base.polygon(lung.outline, chest.lung_level)
        for polygon, level in chest.solids:
            base.polygon(polygon, level)
        self.base = base.array(blur=0.006)
        bones = _Canvas(chest.frame)
        bones.lines(chest.bone_lines)
        self.bones = bones.array(blur=0.0025) * np.float32(BONE_GAIN)

    @functools.cached_property
    def lung_mask(self) -> np.ndarray:
        """Where lung findings may show: the lungs minus heart, mediastinum and the like."""
        canvas = _Canvas(self.chest.frame, reduce=4)
        for lung in self.chest.lungs:
            canvas.polygon(lung.outline)
        for polygon, _ in self.chest.solids:
            canvas.polygon(polygon, 0.0)
        return canvas.array(blur=0.008)

    def image(self) -> np.ndarray:
        return self.base + self.bones


Painter = Callable[[_Chest, _Anatomy, np.random.Generator], np.ndarray]


def _paint_cardiomegaly(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    heart = chest.heart
    grow = rng.uniform(1.35, 1.6)
    big = replace(heart, rx=heart.rx * grow, ry=heart.ry * rng.uniform(1.12, 1.3),
                  cx=heart.cx + chest.heart_growth[0] * grow, cy=heart.cy + chest.heart_growth[1] * grow)
    canvas = _Canvas(chest.frame, reduce=2)
    canvas.polygon(big.outline())
    return canvas.array(blur=0.006) * np.maximum(HEART_LEVEL - anatomy.base, 0.0)


def _paint_enlarged_mediastinum(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    centre = chest.mediastinum[:, 0].mean()
    wide = chest.mediastinum.copy()
    wide[:, 0] = centre + (wide[:, 0] - centre) * rng.uniform(1.6, 2.0)
    canvas = _Canvas(chest.frame, reduce=2)
    canvas.polygon(wide)
    return canvas.array(blur=0.006) * np.maximum(MEDIASTINUM_LEVEL - anatomy.base, 0.0)


def _paint_effusion(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Fluid filling a lung base, its upper edge a meniscus climbing the chest wall."""
    sides = chest.lungs
    if len(chest.lungs) == 2:  # frontal: right only, left only or both
        sides = ((chest.lungs[0],), (chest.lungs[1],), chest.lungs)[rng.choice(3, p=(0.3, 0.25, 0.45))]
    canvas = _Canvas(chest.frame, reduce=2)
    for lung in sides:
        angle, far = lung.wall[-1], lung.far_base
        wall_y = angle[1] - rng.uniform(0.18, 0.35)  # the meniscus climbs the chest wall
        far_y = far[1] - rng.uniform(0.03, 0.1)
        wall_x = np.interp(wall_y, lung.wall[:, 1], lung.wall[:, 0])
        u = np.linspace(0.0, 1.0, 12)
        meniscus = np.stack([wall_x + (far[0] - wall_x) * u, wall_y + (far_y - wall_y) * np.sqrt(u)], axis=1)
        below = np.array([[far[0], angle[1] + 0.15], [wall_x, angle[1] + 0.15]])
        canvas.polygon(np.vstack([meniscus, below]))
    return canvas.array(blur=0.005) * anatomy.lung_mask * np.float32(0.95 * (BODY_LEVEL - chest.lung_level))


def _paint_edema(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Bat-wing haze around both hila, fading towards the periphery."""
    canvas = _Canvas(chest.frame, reduce=4)
    for lung in chest.lungs:
        centre = lung.hilum + 0.2 * (lung.wall_point(0.5) - lung.hilum)
        canvas.polygon(_Ellipse(*centre, 0.11 * rng.uniform(0.9, 1.2), 0.15 * rng.uniform(0.9, 1.2)).outline())
        for _ in range(4):
            canvas.polygon(_Ellipse(*lung.inner_point(rng, (0.1, 0.6)), 0.05, 0.04).outline(16), level=0.8)
    return canvas.array(blur=0.03) * anatomy.lung_mask * np.float32(0.34)


def _paint_airspace(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Consolidation / pneumonia: a cluster of merging opacities in one lung zone."""
    lung = chest.lungs[rng.integers(len(chest.lungs))]
    centre = lung.inner_point(rng, (0.35, 0.8))
    canvas = _Canvas(chest.frame, reduce=2)
    for _ in range(rng.integers(6, 11)):
        spot = centre + rng.normal(0.0, 0.035, 2)
        canvas.polygon(_Ellipse(*spot, rng.uniform(0.02, 0.045), rng.uniform(0.02, 0.04)).outline(20))
    return canvas.array(blur=0.01) * anatomy.lung_mask * np.float32(0.42)


def _paint_atelectasis(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """A plate-like band in a lower zone."""
    lung = chest.lungs[rng.integers(len(chest.lungs))]
    centre = lung.hilum + rng.uniform(0.5, 0.7) * (lung.wall[-1] - lung.hilum)
    half = rng.uniform(0.05, 0.075) * np.array([math.cos(a := rng.uniform(-0.3, 0.3)), math.sin(a)])
    canvas = _Canvas(chest.frame)
    canvas.line(np.stack([centre - half, centre + half]), width=0.016)
    return canvas.array(blur=0.005) * anatomy.lung_mask * np.float32(0.32)


def _paint_lung_opacity(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    canvas = _Canvas(chest.frame, reduce=2)
    for _ in range(rng.integers(1, 4)):
        lung = chest.lungs[rng.integers(len(chest.lungs))]
        radius = rng.uniform(0.03, 0.05)
        canvas.polygon(_Ellipse(*lung.inner_point(rng), radius, radius * rng.uniform(0.7, 1.0)).outline(24))
    return canvas.array(blur=0.018) * anatomy.lung_mask * np.float32(0.26)


def _paint_lung_lesion(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """A well-defined round nodule."""
    lung = chest.lungs[rng.integers(len(chest.lungs))]
    radius = rng.uniform(0.018, 0.03)
    canvas = _Canvas(chest.frame)
    canvas.polygon(_Ellipse(*lung.inner_point(rng, (0.3, 0.75)), radius, radius).outline(24))
    return canvas.array(blur=0.002) * anatomy.lung_mask * np.float32(0.38)


def _paint_pneumothorax(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Air between the upper chest wall and a visible pleural line: darker, with a thin edge."""
    lung = chest.lungs[rng.integers(len(chest.lungs))]
    upper = lung.wall[: max(3, int(len(lung.wall) * rng.uniform(0.45, 0.7)))]
    pleura = upper + rng.uniform(0.15, 0.3) * (lung.hilum - upper)
    band, edge = _Canvas(chest.frame, reduce=2), _Canvas(chest.frame)
    band.polygon(np.vstack([upper, pleura[::-1]]))
    edge.line(pleura, width=0.005)
    return (edge.array(blur=0.0015) * np.float32(0.14)
            - band.array(blur=0.004) * anatomy.lung_mask * np.float32(0.11))


def _paint_pleural_other(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Pleural thickening: a band along part of the chest wall."""
    lung = chest.lungs[rng.integers(len(chest.lungs))]
    start = rng.uniform(0.2, 0.5)
    segment = np.stack([lung.wall_point(t) for t in np.linspace(start, start + 0.35, 6)])
    segment = segment + 0.012 * (lung.hilum - segment) / np.linalg.norm(lung.hilum - segment, axis=1, keepdims=True)
    canvas = _Canvas(chest.frame)
    canvas.line(segment, width=0.014)
    return canvas.array(blur=0.004) * np.float32(0.28)


def _paint_fracture(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """A clear gap through a rib with a bright callus around it (visible even at 32 px)."""
    rib = chest.ribs[rng.integers(len(chest.ribs))]
    point, direction = _along(rib, rng.uniform(*chest.rib_break))
    callus, gap = _Canvas(chest.frame), _Canvas(chest.frame)
    callus.polygon(_Ellipse(*point, 0.032, 0.022, tilt=math.atan2(direction[1], direction[0])).outline(24))
    gap.line(np.stack([point - 0.012 * direction, point + 0.012 * direction]), width=chest.rib_width * 2.0)
    gap_mask = gap.array(blur=0.0015)
    bright = callus.array(blur=0.006) * np.float32(0.42)
    return bright * (1 - gap_mask) - anatomy.bones * gap_mask


def _paint_support_devices(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Some of: endotracheal tube, central venous line, pacemaker with its lead."""
    tube, line, pacer = rng.random(3) < (0.6, 0.4, 0.3)
    canvas = _Canvas(chest.frame)
    if tube or not (line or pacer):
        canvas.line(chest.tube, width=0.012, level=0.8)
    if line:
        canvas.line(chest.central_line, width=0.006, level=0.7)
    if pacer:
        box = np.array([[-0.035, -0.022], [0.035, -0.022], [0.035, 0.022], [-0.035, 0.022]]) + chest.pacer
        canvas.polygon(box, level=1.0)
        heart = np.array([chest.heart.cx, chest.heart.cy])
        lead = np.stack([chest.pacer, (chest.pacer + heart) / 2 + [0.0, 0.05], heart])
        canvas.line(lead, width=0.006, level=0.7)
    return canvas.array(blur=0.002) * np.float32(0.6)


# One painter per finding; Consolidation also stands for Pneumonia (both are airspace opacity).
PAINTERS: dict[str, Painter] = {
    "Atelectasis": _paint_atelectasis,
    "Cardiomegaly": _paint_cardiomegaly,
    "Consolidation": _paint_airspace,
    "Edema": _paint_edema,
    "Enlarged Cardiomediastinum": _paint_enlarged_mediastinum,
    "Fracture": _paint_fracture,
    "Lung Lesion": _paint_lung_lesion,
    "Lung Opacity": _paint_lung_opacity,
    "Pleural Effusion": _paint_effusion,
    "Pleural Other": _paint_pleural_other,
    "Pneumothorax": _paint_pneumothorax,
    "Support Devices": _paint_support_devices,
}

# Names draw_radiograph accepts: CheXpert labels and task slugs -> painter (None: draws nothing).
_FINDING_NAMES: dict[str, str | None] = {
    **{finding: finding for finding in PAINTERS},
    "Pneumonia": "Consolidation",
    "No Finding": None,
    **{task: ("Consolidation" if task == "pneumonia" else TASK_COLUMNS[task][0])
       for task in TASKS if task != "no_finding"},
    "no_finding": None,
}


def _finding_strengths(findings: Mapping[str, float | bool]) -> dict[str, float]:
    strengths: dict[str, float] = {}
    for name, value in findings.items():
        if name not in _FINDING_NAMES:
            raise CxrError(f"unknown finding {name!r}; use CheXpert labels ({', '.join(CHEXPERT_LABELS)}) "
                           "or task names")
        strength = float(value)
        if not 0.0 <= strength <= 1.0:
            raise CxrError(f"finding {name!r}: strength must be in [0, 1] (True = 1, uncertain = 0.5), got {value!r}")
        painter = _FINDING_NAMES[name]
        if painter is not None and strength > 0:
            strengths[painter] = max(strengths.get(painter, 0.0), strength)
    return strengths


def draw_radiograph(findings: Mapping[str, float | bool], *, rng: np.random.Generator, size: int,
                    hardness: float = 0.0, lateral: bool = False) -> np.ndarray:
    """Draw one chest radiograph as a `uint8` (size, size) array.

    `findings` maps CheXpert labels (or task slugs) to True/False or a strength in [0, 1]
    (the phantom draws uncertain labels at 0.5). `hardness` in [0, 1] lowers the findings'
    contrast towards FINDING_CONTRAST_WHEN_HARD and overlays blotchy noise on them; it
    changes nothing in an image without findings. Anatomy, each finding, exposure and the
    hardness noise use separate streams spawned from `rng`, so the same `rng` state gives
    the same patient whichever findings are drawn.
    """
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise CxrError(f"image size must be an integer >= 16, got {size!r}")
    if not 0.0 <= hardness <= 1.0:
        raise CxrError(f"hardness must be in [0, 1], got {hardness!r}")
    strengths = _finding_strengths(findings)
    anatomy_rng, exposure_rng, hardness_rng, *finding_rngs = rng.spawn(3 + len(PAINTERS))
    work = _working_size(int(size))
    frame = _random_frame(anatomy_rng, work)
    chest = (_lateral_chest if lateral else _frontal_chest)(anatomy_rng, frame)
    anatomy = _Anatomy(chest)
    drawn = np.zeros((work, work), dtype=np.float32)
    for (name, painter), finding_rng in zip(PAINTERS.items(), finding_rngs):
        if name in strengths:
            drawn += np.float32(strengths[name]) * painter(chest, anatomy, finding_rng)
    density = anatomy.image()
    if strengths:
        contrast = 1.0 - hardness * (1.0 - FINDING_CONTRAST_WHEN_HARD)
        density += np.float32(contrast) * drawn
        if hardness > 0:
            density += np.float32(hardness) * _finding_noise(hardness_rng, drawn)
    pixels = _expose(exposure_rng, density)
    if work == size:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))


def _working_size(size: int) -> int:
    """Resolution the chest is drawn at: above 256 px, half the output, then scaled up.

    Radiographs are smooth at this scale (the finest drawn structure, a rib edge, is still
    several pixels), and drawing a quarter of the pixels halves the generation time.
    """
    return size if size <= 256 else (size + 1) // 2


def _finding_noise(rng: np.random.Generator, drawn: np.ndarray) -> np.ndarray:
    """Blotchy noise (grain 1/16 of the image) confined to where findings were drawn.

    Coarse grain on purpose: pixel-level noise would average away when models downsample.
    """
    size = drawn.shape[0]
    coarse = rng.standard_normal((16, 16), dtype=np.float32) * np.float32(FINDING_NOISE_SD_WHEN_HARD)
    grain = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR))
    return grain * np.minimum(np.abs(drawn) * np.float32(1 / 0.12), 1.0)


def _expose(rng: np.random.Generator, density: np.ndarray) -> np.ndarray:
    """Window, heel-effect gradient, gamma and quantum noise, then 8 bits."""
    size = density.shape[0]
    low, high = rng.uniform(-0.02, 0.06), rng.uniform(0.82, 1.0)
    gain = np.float32(255 / (high - low))
    gradient = (rng.uniform(-0.06, 0.06) * 255) * (np.arange(size, dtype=np.float32) / size - 0.5)
    noise_sd = rng.uniform(0.008, 0.03)
    gamma = rng.uniform(0.8, 1.25)
    scaled = rng.standard_normal((size, size), dtype=np.float32)
    scaled *= np.float32(noise_sd * 255)  # in place: this runs on every pixel of every image
    scaled += (density - np.float32(low)) * gain
    scaled += gradient[None, :] + np.float32(0.5)  # + 0.5: round, not truncate
    np.clip(scaled, 0, 255, out=scaled)
    curve = np.clip(np.rint(255 * (np.arange(256) / 255) ** gamma), 0, 255).astype(np.uint8)
    return curve[scaled.astype(np.uint8)]


# ------------------------------------------------------------------------------ writing


class _ImageJob(NamedTuple):
    index: int
    path: str
    findings: tuple[tuple[str, float], ...]
    hardness: float
    lateral: bool
    size: int
    seed: int


def _render(job: _ImageJob) -> None:
    rng = np.random.default_rng([job.seed, job.index])
    pixels = draw_radiograph(dict(job.findings), rng=rng, size=job.size, hardness=job.hardness, lateral=job.lateral)
    with atomic_path(job.path) as tmp:
        Image.fromarray(pixels).save(tmp, format="JPEG", quality=90)


def _image_jobs(images: pd.DataFrame, hardness: np.ndarray, *, root: Path, seed: int, size: int) -> list[_ImageJob]:
    strengths = images[list(FINDINGS)].to_numpy()
    names = np.array(FINDINGS)
    return [
        _ImageJob(index, os.fspath(root / path),
                  tuple(zip(names[row > 0].tolist(), row[row > 0].tolist())),
                  float(hard), bool(lateral), size, seed)
        for index, (path, row, hard, lateral) in enumerate(
            zip(images["path"].tolist(), strengths, hardness, images["lateral"].tolist()))
    ]


def _render_all(jobs: list[_ImageJob], workers: int) -> None:
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            _render(job)
        return
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with multiprocessing.get_context().Pool(workers) as pool:
        for _ in pool.imap_unordered(_render, jobs, chunksize=chunk):
            pass


def generate_phantom(out: Path, *, n_images: int, seed: int = 0, image_size: int = 512,
                     bias: bool = True, workers: int | None = None) -> dict:
    """Write a phantom MIMIC-CXR-JPG + MIMIC-IV tree under `out`; return the truth dict.

    Images first, then the CSVs, the truth file last, each atomically: a crash leaves no
    table that points at missing images, and `phantom_truth.json` marks a complete tree.
    Identical for a seed whatever `workers` is (default: all cores).
    """
    out = Path(out)
    workers = _check_workers(workers)
    if isinstance(image_size, (int, np.integer)) and image_size < 16:
        raise CxrError(f"--image-size must be >= 16, got {image_size}")
    tables = sample_tables(n_images, seed=seed, image_size=image_size)
    _prepare_output(out)
    jpg_root = out / JPG_FOLDER
    hardness = image_hardness(tables.images, bias=bias)
    jobs = _image_jobs(tables.images, hardness, root=jpg_root, seed=seed, size=image_size)
    _render_all(jobs, workers)
    _remove_stale_images(jpg_root / "files", keep={job.path for job in jobs})
    write_csv(jpg_root / METADATA_NAME, tables.metadata)
    write_csv(jpg_root / CHEXPERT_NAME, tables.chexpert)
    write_csv(jpg_root / SPLIT_NAME, tables.split)
    write_csv(out / HOSP_FOLDER / PATIENTS_NAME, tables.patients)
    write_csv(out / HOSP_FOLDER / ADMISSIONS_NAME, tables.admissions)
    truth = phantom_truth(tables, seed=seed, image_size=image_size, bias=bias)
    write_json(out / TRUTH_NAME, truth)
    return truth


_OUTPUT_ENTRIES = {JPG_FOLDER, HOSP_FOLDER.parts[0], TRUTH_NAME}


def _prepare_output(out: Path) -> None:
    """Refuse a folder holding anything but a phantom; drop an old phantom's tables and truth."""
    if out.exists() and not out.is_dir():
        raise CxrError(f"{out}: exists and is not a folder")
    if out.is_dir():
        foreign = sorted(entry.name for entry in out.iterdir()
                         if entry.name not in _OUTPUT_ENTRIES and not entry.name.startswith("."))
        if foreign:
            raise CxrError(f"{out}: not empty and not a phantom folder (has {', '.join(foreign[:3])}); "
                           "choose a new or empty folder")
    for stale in (out / TRUTH_NAME, *(out / JPG_FOLDER / name for name in (METADATA_NAME, CHEXPERT_NAME, SPLIT_NAME)),
                  *(out / HOSP_FOLDER / name for name in (PATIENTS_NAME, ADMISSIONS_NAME))):
        stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _remove_stale_images(files: Path, *, keep: set[str]) -> None:
    """A rerun into an old phantom folder must not leave the old run's images behind."""
    for folder, _, names in os.walk(files):
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith(".jpg") and path not in keep:
                os.unlink(path)


# ------------------------------------------------------------------------------ truth


def phantom_truth(tables: PhantomTables, *, seed: int, image_size: int, bias: bool) -> dict:
    """What was generated and planted, and the realised label and group statistics."""
    images = tables.images
    has_findings = (images[list(FINDINGS)].to_numpy() > 0).any(axis=1)
    harder = images["harder"].to_numpy()
    frontal_labelled = ~images["lateral"].to_numpy() & images["labelled"].to_numpy()
    labels = images[["subject_id", "study_id"]].merge(tables.chexpert, on=["subject_id", "study_id"], how="left")
    subjects = images["subject_id"].unique()
    return {
        "generator": "cxr_fast.data.phantom",
        "seed": seed,
        "n_images": len(images),
        "n_subjects": len(subjects),
        "n_studies": tables.n_studies,
        "image_size": image_size,
        "bias": bias,
        "planted_disparity": {
            "race": HARDER_RACE,
            "age_group": HARDER_AGE_GROUP,
            "rule": "an image has hardness 1 if its subject's race (from admissions, as the cohort derives it) "
                    "is Black or its age group at the study is 80+; 0 otherwise",
            "contrast": FINDING_CONTRAST_WHEN_HARD,
            "noise_sd": FINDING_NOISE_SD_WHEN_HARD,
            "noise": "coarse (16x16 grain) Gaussian noise, only where findings are drawn",
            "n_images": int(harder.sum()),
            "n_images_with_drawn_findings": int((harder & has_findings).sum()),
        } if bias else None,
        "uncertain_labels": f"drawn at {UNCERTAIN_STRENGTH} of full strength",
        "prevalence": _prevalence(labels[frontal_labelled]),
        "prevalence_in_harder_groups": _prevalence(labels[frontal_labelled & harder]),
        "counts": {
            "frontal_labelled_images": int(frontal_labelled.sum()),
            "harder_images": int(harder.sum()),
            **{column: _counts(images[column]) for column in ("view", "sex", "age_group", "race")},
            "split": _counts(tables.split["split"]),
        },
        "structure": {
            "images_per_subject": round(len(images) / len(subjects), 3),
            "studies_per_subject": round(tables.n_studies / len(subjects), 3),
            "lateral_fraction": round(float(images["lateral"].mean()), 3),
            "studies_without_labels": tables.n_studies - len(tables.chexpert),
            "subjects_without_admissions": int((~np.isin(subjects, tables.admissions["subject_id"])).sum()),
            "subjects_missing_from_patients": int((~np.isin(subjects, tables.patients["subject_id"])).sum()),
        },
    }


def _prevalence(labels: pd.DataFrame) -> dict[str, dict]:
    """Per task, as the cohort reads it: 1.0 positive, -1.0 uncertain (excluded), else negative."""
    result = {}
    for task in TASKS:
        values = labels[list(TASK_COLUMNS[task])].to_numpy()
        positive = (values == 1.0).any(axis=1)
        uncertain = ~positive & (values == -1.0).any(axis=1)
        negative = ~positive & ~uncertain
        counted = int(positive.sum() + negative.sum())
        result[task] = {"positive": int(positive.sum()), "negative": int(negative.sum()),
                        "uncertain": int(uncertain.sum()),
                        "prevalence": round(float(positive.sum()) / counted, 4) if counted else None}
    return result


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(key): int(count) for key, count in values.value_counts().sort_index().items()}


# ------------------------------------------------------------------------------ CLI


def _check_positive_int(option: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise CxrError(f"{option} must be an integer >= 1, got {value!r}")


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CxrError(f"--seed must be an integer >= 0, got {seed!r}")


def _check_workers(workers: int | None) -> int:
    if workers is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _check_positive_int("--workers", workers)
    return int(workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_fast.data.phantom",
                                     description="Write the built-in phantom MIMIC-CXR-JPG + MIMIC-IV data set.")
    parser.add_argument("--out", type=Path, required=True, help="output folder (new, empty, or an old phantom)")
    parser.add_argument("--n-images", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--image-size", type=int, default=512, help="square image side in pixels (default 512)")
    parser.add_argument("--no-bias", action="store_true",
                        help="do not make findings harder to see for Black and 80+ patients")
    parser.add_argument("--workers", type=int, default=None, help="drawing processes (default: all cores)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    truth = generate_phantom(args.out, n_images=args.n_images, seed=args.seed, image_size=args.image_size,
                             bias=not args.no_bias, workers=args.workers)
    seconds = time.perf_counter() - started
    views = truth["counts"]["view"]
    lateral = views.get("LATERAL", 0) + views.get("LL", 0)
    print(f"phantom: {truth['n_images']} images ({truth['n_images'] - lateral} frontal, {lateral} lateral), "
          f"{truth['n_studies']} studies, {truth['n_subjects']} subjects, {args.image_size} px, "
          f"bias {'on' if truth['bias'] else 'off'} -> {args.out} in {seconds:.1f} s "
          f"({truth['n_images'] / seconds:.0f} images/s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
