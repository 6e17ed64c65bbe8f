"""The phantom's population: subjects, studies, images, labels and demographics (`sample_tables`).

Everything but pixels, vectorised; the package docstring ("Population") gives the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from cxr_fast.data.cohort_rules import mimic_age, subject_race
from cxr_fast.errors import require_int
from cxr_fast.schema import age_group
from cxr_fast.tasks import CHEXPERT_LABELS

# ------------------------------------------------------------------------------ table columns

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
#
# Who is harder to read; how that looks is drawing.py's FINDING_*_WHEN_HARD.

HARDER_RACE = "Black"
HARDER_AGE_GROUP = "80+"
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
    require_int("n_images", n_images, minimum=1)
    require_int("image_size", image_size, minimum=1)
    require_int("seed", seed, minimum=0)
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

