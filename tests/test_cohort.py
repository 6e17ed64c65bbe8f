"""Cohort rules (DATA_SPEC.md "Cohort rules") one branch at a time, then each source end to end."""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import pandas as pd
import pytest

from cohort_fixtures import (
    TINY_MIMIC_EXPECTED,
    chexpert_row,
    mimic_image,
    mimic_labels,
    nih_row,
    synthetic_split_frame,
    tiny_mimic,
    write_big_chexpert_csv,
    write_chexpert_csv,
    write_mimic_cxr,
    write_nih,
)
from cxr_fast.data.cohort import FRAME_COLUMNS, CohortOptions, add_cohort_arguments, build_cohort, cohort_from_args
from cxr_fast.data.cohort_rules import (
    clean_age,
    mimic_age,
    parse_age,
    patient_split,
    race_group,
    select_views,
    sex_code,
    subject_race,
    task_labels,
)
from cxr_fast.errors import CxrError
from cxr_fast.schema import age_group
from cxr_fast.tasks import TASK_COLUMNS, TASKS

NAN = float("nan")


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# ---------------------------------------------------------------------------- labels

POLICY_VALUE = {"ignore": NAN, "zeros": 0.0, "ones": 1.0}
SINGLE_COLUMN_TASKS = [task for task in TASKS if len(TASK_COLUMNS[task]) == 1]


@pytest.mark.parametrize("policy", ["ignore", "zeros", "ones"])
@pytest.mark.parametrize("value, expected", [(1.0, 1.0), (0.0, 0.0), (NAN, 0.0), (-1.0, "policy")])
def test_single_column_label_by_value_and_policy(value, expected, policy):
    labels = pd.DataFrame({column: [value] for task in SINGLE_COLUMN_TASKS for column in TASK_COLUMNS[task]})
    result = task_labels(labels, policy)
    want = POLICY_VALUE[policy] if expected == "policy" else expected
    for task in SINGLE_COLUMN_TASKS:
        assert same(float(result[task].iloc[0]), want), task


@pytest.mark.parametrize("policy", ["ignore", "zeros", "ones"])
@pytest.mark.parametrize(
    "consolidation, pneumonia, expected",
    [
        (1.0, NAN, 1.0), (NAN, 1.0, 1.0), (1.0, -1.0, 1.0), (-1.0, 1.0, 1.0),  # positive wins
        (-1.0, NAN, "policy"), (NAN, -1.0, "policy"), (0.0, -1.0, "policy"), (-1.0, -1.0, "policy"),
        (0.0, 0.0, 0.0), (NAN, NAN, 0.0), (0.0, NAN, 0.0),
    ],
)
def test_pneumonia_is_the_union_of_consolidation_and_pneumonia(consolidation, pneumonia, expected, policy):
    result = task_labels(pd.DataFrame({"Consolidation": [consolidation], "Pneumonia": [pneumonia]}), policy)
    want = POLICY_VALUE[policy] if expected == "policy" else expected
    assert same(float(result["pneumonia"].iloc[0]), want)


def test_task_labels_are_float32_in_task_order_and_nan_without_a_source_column():
    labels = pd.DataFrame({"Cardiomegaly": [1.0, 0.0], "Pleural Effusion": [1.0, -1.0]}, index=[7, 3])
    result = task_labels(labels, "zeros")
    assert list(result.columns) == list(TASKS)
    assert list(result.index) == [7, 3]
    assert all(dtype == np.float32 for dtype in result.dtypes)
    assert result["effusion"].tolist() == [1.0, 0.0]
    assert result["fracture"].isna().all()  # a source that does not label a task


def test_task_labels_rejects_an_unknown_policy():
    with pytest.raises(CxrError, match="--uncertain"):
        task_labels(pd.DataFrame({"Cardiomegaly": [1.0]}), "maybe")


# ---------------------------------------------------------------------------- views, sex, age


def test_select_views_is_case_insensitive_and_blank_tolerant():
    views = pd.Series(["PA", " ap", "LATERAL", None, "LL", "AP AXIAL"])
    assert select_views(views, ("PA", "AP")).tolist() == [True, True, False, False, False, False]
    assert select_views(views, ("lateral", "ll")).tolist() == [False, False, True, False, True, False]


def test_sex_code():
    values = pd.Series(["M", "F", "Male", "female", " m ", "Unknown", "X", None])
    assert sex_code(values).tolist() == ["M", "F", "M", "F", "M", "Unknown", "Unknown", "Unknown"]


def test_mimic_age_is_anchor_age_plus_years_since_anchor_year():
    age = mimic_age(pd.Series([50, 50, NAN, 50, 60]), pd.Series([2180, 2180, 2180, NAN, 2190]),
                    pd.Series([21800506, 21851231, 21800506, 21800506, NAN]))
    assert age.tolist()[:2] == [50.0, 55.0]
    assert age.iloc[2:].isna().all()  # any missing part -> NaN


@pytest.mark.parametrize(
    "age, group",
    [(0, "0-20"), (19.99, "0-20"), (20, "20-40"), (39.9, "20-40"), (40, "40-60"), (59.5, "40-60"), (60, "60-80"),
     (79.99, "60-80"), (80, "80+"), (104, "80+"), (NAN, "Unknown")],
)
def test_age_group_edges(age, group):
    assert age_group(pd.Series([age], index=[5])).tolist() == [group]


def test_implausible_ages_become_unknown_and_nih_strings_parse():
    assert clean_age(pd.Series([-1.0, 0.0, 120.0, 414.0, NAN])).tolist()[1:3] == [0.0, 120.0]
    assert clean_age(pd.Series([-1.0, 414.0])).isna().all()
    assert parse_age(pd.Series(["058Y", "7", None, "abc"])).tolist()[:2] == [58.0, 7.0]
    assert parse_age(pd.Series([3, 4])).dtype == np.float64


# ---------------------------------------------------------------------------- race


@pytest.mark.parametrize(
    "value, group",
    [
        ("WHITE", "White"), ("WHITE - OTHER EUROPEAN", "White"), ("WHITE - RUSSIAN", "White"), ("PORTUGUESE", "White"),
        ("BLACK/AFRICAN AMERICAN", "Black"), ("BLACK/CAPE VERDEAN", "Black"), ("ASIAN", "Asian"),
        ("ASIAN - SOUTH EAST ASIAN", "Asian"), ("HISPANIC/LATINO - PUERTO RICAN", "Hispanic/Latino"),
        ("HISPANIC OR LATINO", "Hispanic/Latino"), ("LATINO", "Hispanic/Latino"), ("SOUTH AMERICAN", "Hispanic/Latino"),
        ("UNKNOWN", "Unknown"), ("UNABLE TO OBTAIN", "Unknown"), ("PATIENT DECLINED TO ANSWER", "Unknown"),
        ("AMERICAN INDIAN/ALASKA NATIVE", "Other"), ("NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER", "Other"),
        ("MULTIPLE RACE/ETHNICITY", "Other"), ("OTHER", "Other"),
        ("white", "White"), ("  Asian - Korean ", "Asian"), ("", "Unknown"), (None, "Unknown"), (NAN, "Unknown"),
    ],
)
def test_race_group_by_prefix(value, group):
    assert race_group(value) == group


def admissions_frame(rows: list[tuple[int, str | None, str | None]], column: str = "race") -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["subject_id", column, "admittime"])


def test_subject_race_takes_the_most_frequent_known_group():
    admissions = admissions_frame([
        (1, "BLACK/AFRICAN AMERICAN", "2100-01-01 00:00:00"), (1, "WHITE", "2101-01-01 00:00:00"),
        (1, "WHITE - BRAZILIAN", "2102-01-01 00:00:00"), (1, "UNKNOWN", "2099-01-01 00:00:00"),
        (1, "UNABLE TO OBTAIN", "2099-02-01 00:00:00"),  # unknowns never outvote a known group
    ])
    assert subject_race(admissions).to_dict() == {1: "White"}


def test_subject_race_tie_goes_to_the_earliest_admission():
    admissions = admissions_frame([
        (2, "BLACK/AFRICAN AMERICAN", "2150-03-01 08:00:00"), (2, "ASIAN - CHINESE", "2149-01-01 08:00:00"),
        (3, "ASIAN", "2150-01-01 00:00:00"), (3, "HISPANIC/LATINO - DOMINICAN", "2140-05-01 00:00:00"),
        (3, "ASIAN", "2160-01-01 00:00:00"), (3, "HISPANIC OR LATINO", "2170-05-01 00:00:00"),
        (4, "WHITE", None), (4, "OTHER", "2100-01-01 00:00:00"),  # a missing admittime sorts last
    ])
    assert subject_race(admissions).to_dict() == {2: "Asian", 3: "Hispanic/Latino", 4: "Other"}


def test_subject_race_only_unknown_values_is_unknown_and_ethnicity_column_accepted():
    admissions = admissions_frame([
        (5, "UNKNOWN", "2100-01-01"), (5, None, "2101-01-01"),
        (6, "PATIENT DECLINED TO ANSWER", "2100-01-01"), (7, "HISPANIC/LATINO", "2100-01-01"),
    ], column="ethnicity")
    race = subject_race(admissions)
    assert race.to_dict() == {5: "Unknown", 6: "Unknown", 7: "Hispanic/Latino"}
    assert race.index.name == "subject_id"


# ---------------------------------------------------------------------------- MIMIC end to end


def check_tiny_mimic(cohort, *, demographics: bool = True) -> None:
    frame = cohort.frame
    assert list(frame.columns) == list(FRAME_COLUMNS)
    assert frame["key"].is_monotonic_increasing and frame["key"].is_unique
    assert frame["subject_id"].dtype == np.int64 and frame["study_id"].dtype == np.int64
    assert frame["age"].dtype == np.float64
    assert all(frame[task].dtype == np.float32 for task in TASKS)
    rows = frame.set_index("dicom_id")
    excluded = dict(zip(cohort.exclusions["key"], cohort.exclusions["reason"]))
    for dicom_id, want in TINY_MIMIC_EXPECTED.items():
        if "reason" in want:
            assert excluded[dicom_id] == want["reason"], dicom_id
            continue
        row = rows.loc[dicom_id]
        assert row["key"] == want.get("key", dicom_id)
        assert (row["subject_id"], row["study_id"], row["view"]) == (want["subject_id"], want["study_id"], want["view"])
        subject = str(want["subject_id"])
        assert row["path"].endswith(f"files/p{subject[:2]}/p{subject}/s{want['study_id']}/{dicom_id}.jpg")
        assert os.path.isabs(row["path"])
        if demographics:
            demographic = (row["sex"], row["age_group"], row["race"])
            assert demographic == (want["sex"], want["age_group"], want["race"]), dicom_id
            assert same(row["age"], want["age"]), dicom_id
        else:
            assert (row["sex"], row["age_group"], row["race"]) == ("Unknown", "Unknown", "Unknown")
            assert math.isnan(row["age"])
        for task, value in want["labels"].items():
            assert same(float(row[task]), value), (dicom_id, task)
    assert set(frame["split"]) <= {"train", "val", "test"}
    assert len(frame) + len(cohort.exclusions) == len(TINY_MIMIC_EXPECTED)


def test_mimic_cohort_applies_every_rule(tmp_path):
    root, demographics = tiny_mimic(tmp_path)
    cohort = build_cohort("mimic", root=root, demographics=demographics)
    assert cohort.source == "mimic"
    check_tiny_mimic(cohort)
    assert cohort.exclusion_counts() == {"view": 2, "no_labels": 1}


@pytest.mark.parametrize("layout, race_column, gzip", [("core", "ethnicity", True), ("flat", "race", False),
                                                       ("hosp", "race", False)])
def test_mimic_demographics_layouts_plain_csv_and_ethnicity(tmp_path, layout, race_column, gzip):
    root, demographics = tiny_mimic(tmp_path, layout=layout, race_column=race_column, gzip=gzip)
    check_tiny_mimic(build_cohort("mimic", root=root, demographics=demographics))


def test_mimic_without_demographics_has_unknown_sex_age_race(tmp_path):
    root, _ = tiny_mimic(tmp_path)
    check_tiny_mimic(build_cohort("mimic", root=root), demographics=False)


def test_mimic_prefers_gzipped_csv_over_plain(tmp_path):
    root, _ = tiny_mimic(tmp_path)
    # A plain metadata CSV beside the gzipped one is ignored.
    write_mimic_cxr(root, [mimic_image("zzz", 10000009, 50000009)], [mimic_labels(10000009, 50000009)], gzip=False)
    assert "zzz" not in set(build_cohort("mimic", root=root).frame["key"])


def test_mimic_custom_views(tmp_path):
    root, demographics = tiny_mimic(tmp_path)
    cohort = build_cohort("mimic", root=root, options=CohortOptions(views=("lateral", "pa")))
    assert sorted(cohort.frame["key"]) == ["1-2-3", "img01", "img02", "img04", "img05"]
    assert dict(zip(cohort.exclusions["key"], cohort.exclusions["reason"])) == {
        "img03": "view", "img06": "no_labels", "img07": "view", "img08": "view"}


def test_mimic_official_split(tmp_path):
    root, _ = tiny_mimic(tmp_path)
    cohort = build_cohort("mimic", root=root, options=CohortOptions(split="official"))
    assert dict(zip(cohort.frame["key"], cohort.frame["split"])) == {
        "1-2-3": "train", "img01": "train", "img03": "train", "img04": "val", "img05": "test"}
    assert dict(zip(cohort.exclusions["key"], cohort.exclusions["reason"]))["img07"] == "no_split"


def test_mimic_random_split_ignores_input_row_order(tmp_path):
    root, _ = tiny_mimic(tmp_path)
    first = build_cohort("mimic", root=root).frame
    metadata = root / "mimic-cxr-2.0.0-metadata.csv.gz"
    pd.read_csv(metadata).iloc[::-1].to_csv(metadata, index=False)
    pd.testing.assert_frame_equal(build_cohort("mimic", root=root).frame, first)


# ---------------------------------------------------------------------------- CheXpert


def chexpert_rows() -> list[dict]:
    return [
        chexpert_row("CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg", "Female", 87, "Frontal", "AP",
                     {"Cardiomegaly": 1.0, "Pleural Effusion": -1.0, "Pneumonia": -1.0}),
        chexpert_row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Male", 20, "Frontal", "PA",
                     {"No Finding": 1.0}),
        chexpert_row("CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg", "Male", 20, "Lateral", None),
        chexpert_row("CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg", "Unknown", 45, "Frontal", "LL"),
        chexpert_row("CheXpert-v1.0-small/train/odd/view1.frontal.jpg", "Male", 45, "Frontal", "AP"),
    ]


def test_chexpert_parsing(tmp_path):
    csv = write_chexpert_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", chexpert_rows())
    cohort = build_cohort("chexpert", csv=csv, root=tmp_path / "images", options=CohortOptions(uncertain="ones"))
    frame = cohort.frame.set_index("key")
    assert list(frame.index) == ["train_patient00001_study1_view1_frontal", "train_patient00002_study2_view1_frontal",
                                 "train_patient00003_study1_view1_frontal"]
    row = frame.loc["train_patient00002_study2_view1_frontal"]
    assert (row["subject_id"], row["study_id"], row["dicom_id"]) == ("patient00002", "patient00002/study2", row.name)
    assert row["path"] == os.path.join(os.path.abspath(tmp_path / "images"),
                                       "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg")
    assert (row["sex"], row["age"], row["age_group"], row["race"], row["view"]) == ("F", 87.0, "80+", "Unknown", "AP")
    assert [float(row[task]) for task in TASKS] == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert frame["sex"].tolist() == ["M", "F", "Unknown"]
    assert frame.loc["train_patient00001_study1_view1_frontal", "age_group"] == "20-40"
    assert cohort.frame["subject_id"].map(type).eq(str).all()
    assert dict(zip(cohort.exclusions["key"], cohort.exclusions["reason"])) == {
        "train_patient00001_study1_view2_lateral": "view", "train_odd_view1-frontal": "bad_path"}


def test_chexpert_root_defaults_to_the_folder_above_the_csv(tmp_path):
    csv = write_chexpert_csv(tmp_path / "CheXpert-v1.0-small" / "valid.csv", chexpert_rows()[:2])
    path = build_cohort("chexpert", csv=csv).frame["path"].iloc[0]
    assert path == str(tmp_path / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")


def test_chexpert_custom_views_match_ap_pa_and_orientation_words(tmp_path):
    csv = write_chexpert_csv(tmp_path / "train.csv", chexpert_rows()[:4])
    by_ap_pa = build_cohort("chexpert", csv=csv, options=CohortOptions(views=("PA", "LL")))
    assert by_ap_pa.frame["view"].tolist() == ["PA", "LL"]
    everything = build_cohort("chexpert", csv=csv, options=CohortOptions(views=("Frontal", "Lateral")))
    assert sorted(everything.frame["view"]) == ["AP", "LL", "Lateral", "PA"]  # blank AP/PA -> Frontal/Lateral


# ---------------------------------------------------------------------------- NIH


def test_nih_parsing_and_nested_images(tmp_path):
    rows = [
        nih_row("00000001_000.png", "Cardiomegaly", 0, 1, 58, "M", "PA"),
        nih_row("00000001_001.png", "Effusion|Pneumonia", 1, 1, "059Y", "M", "AP"),
        nih_row("00000002_000.png", "No Finding", 0, 2, 414, "F", "PA"),
        nih_row("00000003_000.png", "Consolidation|Edema", 0, 3, 20, "F", "LL"),
        nih_row("00000004_000.png", "Infiltration", 3, 4, 33, "F", "PA"),
    ]
    images = {"00000001_000.png": "images_001/images", "00000001_001.png": "images_002/images/deeper",
              "00000002_000.png": "images_012/images"}
    csv = write_nih(tmp_path / "nih", rows, images, sex_column="Patient Sex")
    cohort = build_cohort("nih", csv=csv, root=tmp_path / "nih")
    frame = cohort.frame.set_index("key")
    assert list(frame.index) == ["00000001_000", "00000001_001", "00000002_000", "00000004_000"]
    assert frame["subject_id"].tolist() == ["1", "1", "2", "4"]
    assert frame["study_id"].tolist() == ["1_0", "1_1", "2_0", "4_3"]
    assert frame["dicom_id"].tolist() == list(frame.index)
    assert frame.loc["00000001_001", "path"] == str(tmp_path / "nih/images_002/images/deeper/00000001_001.png")
    assert frame.loc["00000004_000", "path"] == str(tmp_path / "nih/00000004_000.png")  # not found anywhere
    assert frame["sex"].tolist() == ["M", "M", "F", "F"]
    assert frame["race"].eq("Unknown").all()
    assert frame["age"].tolist()[:2] == [58.0, 59.0] and math.isnan(frame.loc["00000002_000", "age"])
    assert frame["fracture"].isna().all()
    assert frame.loc["00000001_001", ["effusion", "pneumonia", "cardiomegaly", "no_finding"]].tolist() == [1, 1, 0, 0]
    assert frame.loc["00000002_000", "no_finding"] == 1.0 and frame.loc["00000004_000"][list(TASKS)].sum() == 0
    assert dict(zip(cohort.exclusions["key"], cohort.exclusions["reason"])) == {"00000003_000": "view"}


def test_nih_custom_views(tmp_path):
    rows = [nih_row("a.png", "Consolidation|Edema", 0, 3, 20, "F", "LL"), nih_row("b.png", "No Finding", 0, 4)]
    csv = write_nih(tmp_path, rows, {})
    frame = build_cohort("nih", csv=csv, options=CohortOptions(views=("LL",))).frame
    assert frame["key"].tolist() == ["a"] and frame[["pneumonia", "edema"]].iloc[0].tolist() == [1.0, 1.0]


def test_duplicate_keys_keep_the_first_row(tmp_path):
    rows = [nih_row("a.png", "Edema", 0, 1), nih_row("a.png", "No Finding", 1, 1), nih_row("b.png", "No Finding", 0, 2)]
    cohort = build_cohort("nih", csv=write_nih(tmp_path, rows, {}))
    assert cohort.frame["key"].tolist() == ["a", "b"] and cohort.frame["edema"].tolist() == [1.0, 0.0]
    assert cohort.exclusions.to_dict("records") == [{"key": "a", "reason": "duplicate_key"}]


# ---------------------------------------------------------------------------- split


@pytest.fixture(scope="module")
def split_frame() -> pd.DataFrame:
    return synthetic_split_frame(900, seed=1)


def test_patient_split_fractions_and_prevalence(split_frame):
    assert len(split_frame) >= 2000
    split = patient_split(split_frame, seed=0)
    assert list(split.index) == list(split_frame.index)
    assert split_frame.groupby("subject_id").apply(lambda rows: split[rows.index].nunique()).eq(1).all()
    fractions = split.value_counts(normalize=True)
    for name, target in {"train": 0.6, "val": 0.2, "test": 0.2}.items():
        assert abs(fractions[name] - target) <= 0.02, (name, fractions[name])
    for task in TASKS:
        if (split_frame[task] == 1).sum() >= 100:
            prevalence = split_frame[task].groupby(split).mean()  # mean skips NaN: among labelled
            assert prevalence.max() - prevalence.min() <= 0.02, (task, prevalence.to_dict())


def test_patient_split_is_deterministic_per_seed(split_frame):
    first = patient_split(split_frame, seed=3)
    pd.testing.assert_series_equal(patient_split(split_frame, seed=3), first)
    assert not patient_split(split_frame, seed=4).equals(first)


def test_patient_split_rejects_bad_fractions(split_frame):
    with pytest.raises(CxrError, match="fractions"):
        patient_split(split_frame, seed=0, fractions=(0.5, 0.5, 0.0))


# ---------------------------------------------------------------------------- errors


def test_missing_csv_names_the_file(tmp_path):
    root, _ = tiny_mimic(tmp_path)
    (root / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    with pytest.raises(CxrError, match="mimic-cxr-2.0.0-chexpert.csv"):
        build_cohort("mimic", root=root)
    with pytest.raises(CxrError, match="nope.csv: file not found"):
        build_cohort("chexpert", csv=tmp_path / "nope.csv")


def test_missing_split_and_demographics_files_name_the_file(tmp_path):
    root, demographics = tiny_mimic(tmp_path, split=False)
    with pytest.raises(CxrError, match="mimic-cxr-2.0.0-split"):
        build_cohort("mimic", root=root, options=CohortOptions(split="official"))
    (demographics / "hosp" / "admissions.csv.gz").unlink()
    with pytest.raises(CxrError, match="hosp/admissions.csv"):
        build_cohort("mimic", root=root, demographics=demographics)


def test_missing_columns_name_the_file_and_column(tmp_path):
    root, demographics = tiny_mimic(tmp_path)
    labels = root / "mimic-cxr-2.0.0-chexpert.csv.gz"
    pd.read_csv(labels).drop(columns="Edema").to_csv(labels, index=False)
    with pytest.raises(CxrError, match=r"chexpert\.csv\.gz: missing column.*'Edema'"):
        build_cohort("mimic", root=root)
    admissions = demographics / "hosp" / "admissions.csv.gz"
    pd.read_csv(admissions).drop(columns="race").to_csv(admissions, index=False)
    root2, _ = tiny_mimic(tmp_path / "again")
    with pytest.raises(CxrError, match=r"admissions\.csv\.gz: missing column 'race'"):
        build_cohort("mimic", root=root2, demographics=demographics)
    csv = write_nih(tmp_path / "nih", [nih_row("a.png", "No Finding", 0, 1)], {})
    pd.read_csv(csv).drop(columns="Patient Gender").to_csv(csv, index=False)
    with pytest.raises(CxrError, match="Data_Entry_2017.csv: missing column 'Patient Gender'"):
        build_cohort("nih", csv=csv)


def test_bad_ids_and_split_values_name_the_file(tmp_path):
    root, _ = tiny_mimic(tmp_path)
    split = root / "mimic-cxr-2.0.0-split.csv.gz"
    pd.read_csv(split).replace({"split": {"validate": "holdout"}}).to_csv(split, index=False)
    with pytest.raises(CxrError, match=r"split\.csv\.gz: unknown split value 'holdout'"):
        build_cohort("mimic", root=root, options=CohortOptions(split="official"))
    metadata = root / "mimic-cxr-2.0.0-metadata.csv.gz"
    pd.read_csv(metadata).assign(subject_id=lambda t: t["subject_id"].where(t.index != 3)).to_csv(metadata, index=False)
    with pytest.raises(CxrError, match=r"metadata\.csv\.gz: column 'subject_id' has a missing"):
        build_cohort("mimic", root=root)


def test_bad_label_value_names_file_and_column(tmp_path):
    rows = chexpert_rows()[:2]
    rows[1]["Edema"] = 2.0
    csv = write_chexpert_csv(tmp_path / "train.csv", rows)
    with pytest.raises(CxrError, match=r"train\.csv: column 'Edema' has value 2\.0"):
        build_cohort("chexpert", csv=csv)


def test_empty_cohort_says_why(tmp_path):
    root, _ = tiny_mimic(tmp_path)
    with pytest.raises(CxrError, match=r"metadata\.csv\.gz: no images left after the cohort filters \(view: 9\)"):
        build_cohort("mimic", root=root, options=CohortOptions(views=("AP AXIAL",)))
    split = root / "mimic-cxr-2.0.0-split.csv.gz"
    pd.read_csv(split).iloc[:0].to_csv(split, index=False)
    with pytest.raises(CxrError, match=r"no images left .*\(view: 2, no_labels: 1, no_split: 6\)"):
        build_cohort("mimic", root=root, options=CohortOptions(split="official"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(uncertain="maybe"), "--uncertain"), (dict(split="official-ish"), "--split"),
        (dict(split_seed=-1), "--split-seed"), (dict(split_seed=1.5), "--split-seed"),
        (dict(views=()), "--views"), (dict(views=("PA", " ")), "--views"),
    ],
)
def test_bad_option_values(kwargs, message):
    with pytest.raises(CxrError, match=message):
        CohortOptions(**kwargs)


def test_bad_source_and_misplaced_options(tmp_path):
    csv = write_chexpert_csv(tmp_path / "train.csv", chexpert_rows()[:2])
    with pytest.raises(CxrError, match="unknown value 'padchest'"):
        build_cohort("padchest", csv=csv)
    with pytest.raises(CxrError, match="--split official needs --source mimic"):
        build_cohort("chexpert", csv=csv, options=CohortOptions(split="official"))
    with pytest.raises(CxrError, match="--demographics is only used with --source mimic"):
        build_cohort("chexpert", csv=csv, demographics=tmp_path)
    with pytest.raises(CxrError, match="needs --csv"):
        build_cohort("nih", root=tmp_path)
    with pytest.raises(CxrError, match="needs --root"):
        build_cohort("mimic")
    with pytest.raises(CxrError, match="--csv is not used with --source mimic"):
        build_cohort("mimic", root=tmp_path, csv=csv)
    with pytest.raises(CxrError, match="MIMIC-CXR-JPG folder not found"):
        build_cohort("mimic", root=tmp_path / "missing")


# ---------------------------------------------------------------------------- command line


def test_cohort_arguments_round_trip(tmp_path):
    root, demographics = tiny_mimic(tmp_path)
    parser = argparse.ArgumentParser()
    add_cohort_arguments(parser)
    args = parser.parse_args(["--source", "mimic", "--root", str(root), "--demographics", str(demographics),
                              "--views", "PA, AP,LATERAL", "--uncertain", "zeros", "--split-seed", "7"])
    assert args.views == ("PA", "AP", "LATERAL")
    cohort = cohort_from_args(args)
    assert "img02" in set(cohort.frame["key"])
    assert cohort.frame.set_index("key").loc["img01", "effusion"] == 0.0
    defaults = parser.parse_args(["--source", "mimic", "--root", str(root)])
    assert (defaults.views, defaults.uncertain, defaults.split, defaults.split_seed) == (None, "ignore", "random", 0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--source", "mimic", "--views", "PA,,AP"])


# ---------------------------------------------------------------------------- performance


@pytest.mark.slow
def test_full_size_chexpert_builds_quickly(tmp_path):
    csv = write_big_chexpert_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", n_rows=223_414)
    start = time.perf_counter()
    cohort = build_cohort("chexpert", csv=csv)
    seconds = time.perf_counter() - start
    print(f"\nbuild_cohort on a 223,414-row CheXpert train.csv: {seconds:.1f} s, {len(cohort.frame)} images kept")
    assert len(cohort.frame) + len(cohort.exclusions) == 223_414
    assert cohort.frame["key"].is_unique
    assert seconds < 60  # typically a few seconds; the bound only catches a per-row loop
