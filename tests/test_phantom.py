"""The phantom data set: MIMIC layout, determinism, planted disparity, labels, drawn correlates."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_fast.data import phantom
from cxr_fast.data.cohort import build_cohort
from cxr_fast.data.phantom import draw_radiograph, generate_phantom, sample_tables
from cxr_fast.data.phantom.__main__ import main as phantom_main
from cxr_fast.data.phantom.drawing import draw_radiograph_with_regions
from cxr_fast.data.phantom.regions import REGION_FINDINGS, finding_mask
from cxr_fast.data.phantom.truth import prevalence as cohort_prevalence
from cxr_fast.errors import CxrError, run_cli
from cxr_fast.tasks import CHEXPERT_LABELS, TASKS

N_IMAGES = 160
SIZE = 64
SEED = 3

CSV_FILES = {
    "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz": [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
        "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning"],
    "mimic-cxr-jpg/mimic-cxr-2.0.0-chexpert.csv.gz": [
        "subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
        "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
        "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"],
    "mimic-cxr-jpg/mimic-cxr-2.0.0-split.csv.gz": ["dicom_id", "study_id", "subject_id", "split"],
    "mimic-iv/hosp/patients.csv.gz": ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
}
MIMIC_IV_RACES = {
    "WHITE", "WHITE - OTHER EUROPEAN", "WHITE - RUSSIAN", "WHITE - EASTERN EUROPEAN", "WHITE - BRAZILIAN",
    "PORTUGUESE", "BLACK/AFRICAN AMERICAN", "BLACK/CAPE VERDEAN", "BLACK/CARIBBEAN ISLAND", "BLACK/AFRICAN",
    "HISPANIC/LATINO - PUERTO RICAN", "HISPANIC OR LATINO", "HISPANIC/LATINO - DOMINICAN",
    "HISPANIC/LATINO - GUATEMALAN", "SOUTH AMERICAN", "HISPANIC/LATINO - SALVADORAN", "ASIAN", "ASIAN - CHINESE",
    "ASIAN - SOUTH EAST ASIAN", "ASIAN - ASIAN INDIAN", "ASIAN - KOREAN", "OTHER", "MULTIPLE RACE/ETHNICITY",
    "AMERICAN INDIAN/ALASKA NATIVE", "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER", "UNKNOWN", "UNABLE TO OBTAIN",
    "PATIENT DECLINED TO ANSWER",
}


def _generate(root: Path, name: str, **options) -> Path:
    out = root / name
    generate_phantom(out, **{"n_images": N_IMAGES, "seed": SEED, "image_size": SIZE, "workers": 2, **options})
    return out


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("phantom")
    return {
        "biased": _generate(root, "biased"),
        "serial": _generate(root, "serial", workers=1),
        "unbiased": _generate(root, "unbiased", bias=False),
    }


@pytest.fixture(scope="module")
def big_sample() -> phantom.PhantomTables:
    return sample_tables(20_000, seed=11)


def _files(tree: Path) -> dict[str, bytes]:
    return {os.fspath(path.relative_to(tree)): path.read_bytes() for path in sorted(tree.rglob("*")) if path.is_file()}


def _metadata(tree: Path) -> pd.DataFrame:
    return pd.read_csv(tree / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz", dtype={"dicom_id": str})


def _image_path(tree: Path, row) -> Path:
    subject = str(row.subject_id)
    return tree / "mimic-cxr-jpg/files" / f"p{subject[:2]}" / f"p{subject}" / f"s{row.study_id}" / f"{row.dicom_id}.jpg"


# ------------------------------------------------------------------------------ layout and formats


def test_tree_has_the_mimic_file_names_and_columns(trees):
    tree = trees["biased"]
    assert sorted(os.listdir(tree)) == ["mimic-cxr-jpg", "mimic-iv", "phantom_truth.json", "regions"]
    for name, columns in CSV_FILES.items():
        path = tree / name
        assert path.read_bytes()[:2] == b"\x1f\x8b", f"{name} is not gzip"
        assert list(pd.read_csv(path).columns) == columns, name
    admissions = pd.read_csv(tree / "mimic-iv/hosp/admissions.csv.gz")
    assert list(admissions.columns[:3]) == ["subject_id", "hadm_id", "admittime"]
    assert "race" in admissions.columns
    assert not list(tree.rglob(".*")), "temporary files left behind"


def test_csv_values_follow_mimic_conventions(trees):
    tree = trees["biased"]
    metadata = _metadata(tree)
    labels = pd.read_csv(tree / "mimic-cxr-jpg/mimic-cxr-2.0.0-chexpert.csv.gz")
    split = pd.read_csv(tree / "mimic-cxr-jpg/mimic-cxr-2.0.0-split.csv.gz", dtype={"dicom_id": str})
    patients = pd.read_csv(tree / "mimic-iv/hosp/patients.csv.gz")
    admissions = pd.read_csv(tree / "mimic-iv/hosp/admissions.csv.gz")

    assert len(metadata) == N_IMAGES and metadata["dicom_id"].is_unique
    assert metadata["dicom_id"].str.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}").all()
    assert metadata["subject_id"].astype(str).str.fullmatch(r"1\d{7}").all()
    assert metadata["study_id"].astype(str).str.fullmatch(r"5\d{7}").all()
    assert metadata.groupby("study_id")["subject_id"].nunique().max() == 1
    assert set(metadata["ViewPosition"]) <= {"PA", "AP", "LATERAL", "LL"}
    assert {"PA", "AP", "LATERAL"} <= set(metadata["ViewPosition"])
    assert (metadata[["Rows", "Columns"]] == SIZE).all().all()
    dates = pd.to_datetime(metadata["StudyDate"].astype(str), format="%Y%m%d")
    assert dates.dt.year.between(2100, 2220).all()

    values = labels[list(CHEXPERT_LABELS)].to_numpy().ravel()
    assert set(np.unique(values[~np.isnan(values)])) == {1.0, 0.0, -1.0}
    assert np.isnan(values).any()  # blanks
    findings = labels[[c for c in CHEXPERT_LABELS if c != "No Finding"]]
    no_finding = ~(findings == 1.0).any(axis=1)
    assert labels["No Finding"].where(no_finding).eq(1.0)[no_finding].all()
    assert labels["No Finding"][~no_finding].isna().all()
    assert labels["study_id"].is_unique and set(labels["study_id"]) <= set(metadata["study_id"])

    assert list(split["dicom_id"]) == list(metadata["dicom_id"])
    assert set(split["split"]) <= {"train", "validate", "test"}
    assert split.groupby("subject_id")["split"].nunique().max() == 1

    assert set(patients["gender"]) <= {"M", "F"}
    assert patients["anchor_year_group"].str.fullmatch(r"20\d\d - 20\d\d").all()
    assert patients["anchor_age"].between(18, 91).all()
    assert set(admissions["race"]) <= MIMIC_IV_RACES
    assert admissions["hadm_id"].is_unique
    assert pd.to_datetime(admissions["admittime"], format="%Y-%m-%d %H:%M:%S").notna().all()


def test_every_image_is_a_grayscale_jpeg_in_its_mimic_folder(trees):
    tree = trees["biased"]
    metadata = _metadata(tree)
    expected = {_image_path(tree, row) for row in metadata.itertuples()}
    assert set((tree / "mimic-cxr-jpg/files").rglob("*.jpg")) == expected
    for path in expected:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "L" and image.size == (SIZE, SIZE)


def test_the_cohort_builder_reads_the_tree_and_finds_the_planted_groups(trees):
    tree = trees["biased"]
    cohort = build_cohort("mimic", root=tree / "mimic-cxr-jpg", demographics=tree / "mimic-iv").frame
    plan = sample_tables(N_IMAGES, seed=SEED, image_size=SIZE).images.set_index("dicom_id")
    frontal_labelled = plan[~plan["lateral"] & plan["labelled"]]
    assert sorted(cohort["dicom_id"]) == sorted(frontal_labelled.index)
    rows = plan.loc[cohort["dicom_id"]]
    assert (cohort["race"].to_numpy() == rows["race"].to_numpy()).all()
    assert (cohort["age_group"].to_numpy() == rows["age_group"].to_numpy()).all()
    harder = (cohort["race"] == "Black") | (cohort["age_group"] == "80+")
    assert (harder.to_numpy() == rows["harder"].to_numpy()).all()
    assert harder.any() and not harder.all()


# ------------------------------------------------------------------------------ determinism and bias


def test_gzip_tables_do_not_record_the_writing_process(trees):
    """A gzip header names its file; the temporary's name holds the pid, which would differ per run."""
    for name in CSV_FILES:
        header = (trees["biased"] / name).read_bytes()[:64]
        file_name = Path(name).name.removesuffix(".gz").encode()
        assert b".tmp-" not in header and header[10:10 + len(file_name) + 1] == file_name + b"\0"


def test_same_seed_gives_identical_files_whatever_the_workers(trees):
    assert _files(trees["biased"]) == _files(trees["serial"])


def test_different_seed_gives_different_data():
    first, second = sample_tables(50, seed=0), sample_tables(50, seed=1)
    assert not first.metadata["dicom_id"].equals(second.metadata["dicom_id"])
    assert not first.chexpert.equals(second.chexpert)
    one = draw_radiograph({}, rng=np.random.default_rng([0, 0]), size=SIZE)
    other = draw_radiograph({}, rng=np.random.default_rng([1, 0]), size=SIZE)
    assert not np.array_equal(one, other)


def test_bias_changes_only_the_pixels_of_harder_images_with_findings(trees):
    biased, unbiased = _files(trees["biased"]), _files(trees["unbiased"])
    assert biased.keys() == unbiased.keys()
    for name in [*CSV_FILES, "mimic-iv/hosp/admissions.csv.gz"]:
        assert biased[name] == unbiased[name], name

    plan = sample_tables(N_IMAGES, seed=SEED, image_size=SIZE).images
    drawn = (plan[list(phantom.FINDINGS)] > 0).any(axis=1)
    changed = np.array([biased["mimic-cxr-jpg/" + path] != unbiased["mimic-cxr-jpg/" + path] for path in plan["path"]])
    should_change = (plan["harder"] & drawn).to_numpy()
    assert should_change.sum() >= 10 and (plan["harder"] & ~drawn).sum() >= 3  # both cases are exercised
    assert (changed == should_change).all()

    truth_on = json.loads(biased["phantom_truth.json"])
    truth_off = json.loads(unbiased["phantom_truth.json"])
    assert truth_on["bias"] is True and truth_off["bias"] is False and truth_off["planted_disparity"] is None
    assert truth_on["planted_disparity"]["n_images_with_drawn_findings"] == int(should_change.sum())
    del truth_on["bias"], truth_on["planted_disparity"], truth_off["bias"], truth_off["planted_disparity"]
    assert truth_on == truth_off


def test_hardness_lowers_the_contrast_of_findings_only():
    size = 64
    weaker = []
    for index in range(12):
        def draw(findings, hardness):
            rng = np.random.default_rng([7, index])
            return draw_radiograph(findings, rng=rng, size=size, hardness=hardness).astype(float)
        assert np.array_equal(draw({}, 0.0), draw({}, 1.0))
        sick = {"Pleural Effusion": True, "Consolidation": True}
        easy = np.abs(draw(sick, 0.0) - draw({}, 0.0)).mean()
        hard = np.abs(draw(sick, 1.0) - draw({}, 1.0)).mean()
        weaker.append(hard < 0.75 * easy)
    assert all(weaker)


# ------------------------------------------------------------------------------ population statistics


def test_label_sample_has_mimic_like_prevalences(big_sample):
    images = big_sample.images
    frontal = images[~images["lateral"] & images["labelled"]]
    labels = frontal[["subject_id", "study_id"]].merge(big_sample.chexpert, on=["subject_id", "study_id"], how="left")
    prevalence = cohort_prevalence(labels)
    targets = {"cardiomegaly": 0.20, "effusion": 0.24, "edema": 0.12, "fracture": 0.025, "pneumonia": 0.10,
               "no_finding": 0.33}
    for task, target in targets.items():
        assert abs(prevalence[task]["prevalence"] - target) < max(0.03, target * 0.2), (task, prevalence[task])
    assert prevalence["pneumonia"]["uncertain"] > 0 and prevalence["edema"]["uncertain"] > 0
    # Co-occurrence: edema comes with effusion and cardiomegaly far more often than by chance.
    edema = labels["Edema"] == 1.0
    assert (labels["Pleural Effusion"][edema] == 1.0).mean() > 1.5 * (labels["Pleural Effusion"] == 1.0).mean()
    assert (labels["Cardiomegaly"][edema] == 1.0).mean() > 1.5 * (labels["Cardiomegaly"] == 1.0).mean()
    blanks = big_sample.chexpert[list(CHEXPERT_LABELS)].isna().mean()
    assert (blanks > 0.3).all()


def test_label_sample_has_mimic_like_structure(big_sample):
    metadata, images = big_sample.metadata, big_sample.images
    per_subject = len(metadata) / metadata["subject_id"].nunique()
    assert 2.1 < per_subject < 2.5
    assert 0.25 < images["lateral"].mean() < 0.35
    assert metadata.groupby("study_id").size().max() >= 3
    assert metadata.groupby("subject_id")["study_id"].nunique().max() >= 5
    assert 0.01 < 1 - len(big_sample.chexpert) / big_sample.n_studies < 0.035
    subjects = metadata["subject_id"].unique()
    without_admissions = ~np.isin(subjects, big_sample.admissions["subject_id"])
    assert 0.03 < without_admissions.mean() < 0.07
    assert 0 < (~np.isin(subjects, big_sample.patients["subject_id"])).sum() < 0.03 * len(subjects)
    assert images["age"].dropna().between(18, 95).all()
    assert {"F", "M"} <= set(images["sex"])
    assert {"White", "Black", "Asian", "Hispanic/Latino", "Other", "Unknown"} == set(images["race"])
    assert 0.1 < (images["age_group"] == "80+").mean() < 0.25
    assert 0.1 < (images["race"] == "Black").mean() < 0.25
    # Most subjects with admissions use one race value; some mix in UNKNOWN-like values.
    values = big_sample.admissions.groupby("subject_id")["race"].nunique()
    assert 0.6 < (values == 1).mean() < 0.95
    assert big_sample.admissions["race"].isin({"UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER"}).any()


def test_drawing_strengths_agree_with_the_labels(big_sample):
    images = big_sample.images
    labelled = images[images["labelled"]]
    labels = labelled[["subject_id", "study_id"]].merge(big_sample.chexpert, on=["subject_id", "study_id"], how="left")
    for finding in phantom.FINDINGS:
        value, strength = labels[finding].to_numpy(), labelled[finding].to_numpy()
        assert (strength[value == 1.0] == 1.0).all(), finding
        assert ((strength[value == -1.0] > 0) & (strength[value == -1.0] < 1)).all(), finding  # faint
        assert (strength[(value == 0.0) | np.isnan(value)] == 0.0).all(), finding
    nothing_drawn = (labelled[list(phantom.FINDINGS)] == 0).all(axis=1).to_numpy()
    assert ((labels["No Finding"] == 1.0).to_numpy() == nothing_drawn).all()


def test_truth_file_records_what_was_generated(trees):
    truth = json.loads((trees["biased"] / "phantom_truth.json").read_text())
    tables = sample_tables(N_IMAGES, seed=SEED, image_size=SIZE)
    assert truth["seed"] == SEED and truth["n_images"] == N_IMAGES and truth["image_size"] == SIZE
    assert truth["n_subjects"] == tables.n_subjects and truth["n_studies"] == tables.n_studies
    planted = truth["planted_disparity"]
    assert planted["race"] == "Black" and planted["age_group"] == "80+"
    assert planted["contrast"] == phantom.FINDING_CONTRAST_WHEN_HARD and planted["noise_sd"] > 0
    assert planted["n_images"] == int(tables.images["harder"].sum())
    assert set(truth["prevalence"]) == set(TASKS)
    for group in ("view", "sex", "age_group", "race"):
        assert sum(truth["counts"][group].values()) == N_IMAGES
    assert truth["counts"]["race"].get("Black", 0) == int((tables.images["race"] == "Black").sum())
    tree = trees["biased"]
    cohort = build_cohort("mimic", root=tree / "mimic-cxr-jpg", demographics=tree / "mimic-iv").frame
    for task in TASKS:
        assert truth["prevalence"][task]["positive"] == int((cohort[task] == 1.0).sum()), task
        assert truth["prevalence"][task]["uncertain"] == int(cohort[task].isna().sum()), task


# ------------------------------------------------------------------------------ drawing


def _finding_effect(findings: dict, *, size: int = 64, n: int = 16, lateral: bool = False) -> np.ndarray:
    """Mean (with - without) image over n patients: same generator state, so only the finding differs."""
    total = np.zeros((size, size))
    for index in range(n):
        def draw(chosen):
            rng = np.random.default_rng([5, index])
            return draw_radiograph(chosen, rng=rng, size=size, lateral=lateral).astype(float)
        total += draw(findings) - draw({})
    return total / n


def _box(image: np.ndarray, x: tuple[float, float], y: tuple[float, float]) -> np.ndarray:
    size = image.shape[0]
    return image[int(y[0] * size):int(y[1] * size), int(x[0] * size):int(x[1] * size)]


@pytest.mark.parametrize(("finding", "x", "y"), [
    ("Cardiomegaly", (0.55, 0.85), (0.5, 0.8)),  # heart border grows towards the image right
    ("Pleural Effusion", (0.1, 0.9), (0.5, 0.8)),  # lung bases
    ("Edema", (0.2, 0.8), (0.25, 0.6)),  # perihilar
    ("Consolidation", (0.1, 0.9), (0.15, 0.75)),  # somewhere in the lungs
])
def test_a_finding_brightens_its_region_on_frontal_images(finding, x, y):
    effect = _finding_effect({finding: True})
    region = _box(effect, x, y)
    assert region.mean() > 4.0, finding
    outside = np.abs(effect).sum() - np.abs(region).sum()
    assert np.abs(region).sum() > outside, finding


def test_cardiac_region_is_brighter_with_cardiomegaly_over_independent_images():
    size, n = 64, 24
    def mean_cardiac(findings, seed):
        values = [_box(draw_radiograph(findings, rng=np.random.default_rng([seed, i]), size=size).astype(float),
                       (0.6, 0.85), (0.55, 0.8)).mean() for i in range(n)]
        return np.mean(values)
    assert mean_cardiac({"cardiomegaly": True}, 1) > mean_cardiac({}, 2) + 10


def test_fracture_is_visible_at_32_pixels():
    effect_peaks = []
    for index in range(10):
        def draw(chosen):
            return draw_radiograph(chosen, rng=np.random.default_rng([6, index]), size=32).astype(float)
        effect_peaks.append(np.abs(draw({"Fracture": True}) - draw({})).max())
    assert min(effect_peaks) > 20


def test_uncertain_findings_are_drawn_faintly():
    full = np.abs(_finding_effect({"Pleural Effusion": 1.0}, n=8)).sum()
    faint = np.abs(_finding_effect({"Pleural Effusion": 0.5}, n=8)).sum()
    assert 0.2 * full < faint < 0.8 * full


def test_every_finding_is_visible_on_frontal_and_lateral_images_at_64_pixels():
    for finding in phantom.FINDINGS:
        for lateral in (False, True):
            for index in range(3):
                def draw(chosen):
                    rng = np.random.default_rng([8, index])
                    return draw_radiograph(chosen, rng=rng, size=64, lateral=lateral).astype(float)
                change = np.abs(draw({finding: True}) - draw({}))
                # a clear local change (>= 25 grey levels) spanning several pixels
                assert change.max() >= 25 and (change >= 10).sum() >= 4, (finding, lateral, index)


def test_regions_mark_where_each_finding_changed_the_image():
    for index in range(4):
        findings = {"Pleural Effusion": True, "Fracture": True, "Cardiomegaly": 0.5}
        pixels, regions = draw_radiograph_with_regions(findings, rng=np.random.default_rng([9, index]), size=96)
        assert np.array_equal(pixels, draw_radiograph(findings, rng=np.random.default_rng([9, index]), size=96))
        assert set(regions) == {"Pleural Effusion", "Fracture", "Cardiomegaly"}
        for finding, mask in regions.items():
            alone = np.abs(draw_radiograph({finding: findings[finding]}, rng=np.random.default_rng([9, index]), size=96)
                           .astype(float) - draw_radiograph({}, rng=np.random.default_rng([9, index]), size=96))
            assert mask.shape == (96, 96) and 0 < mask.mean() < 0.5, finding
            # the finding's change is concentrated in its region: far above the rest of the image
            assert alone[mask].mean() > 4 * alone[~mask].mean(), finding


def test_every_image_has_a_region_file_with_its_findings(trees):
    tree = trees["biased"]
    plan = sample_tables(N_IMAGES, seed=SEED, image_size=SIZE).images
    legend = json.loads((tree / "regions/legend.json").read_text())
    assert legend["bits"] == {str(bit): name for bit, name in enumerate(REGION_FINDINGS)}
    assert sorted(path.stem for path in (tree / "regions").glob("*.png")) == sorted(plan["dicom_id"])
    for dicom_id, effusion_strength in zip(plan["dicom_id"][:40], plan["Pleural Effusion"][:40]):
        path = tree / "regions" / f"{dicom_id}.png"
        stored = np.asarray(Image.open(path))
        assert stored.shape == (SIZE, SIZE) and stored.dtype == np.uint16
        assert finding_mask(path, "effusion").any() == (effusion_strength > 0)
        assert finding_mask(path, "no_finding") is None


def test_lateral_views_are_drawn_differently():
    rng_state = [4, 0]
    frontal = draw_radiograph({}, rng=np.random.default_rng(rng_state), size=SIZE)
    lateral = draw_radiograph({}, rng=np.random.default_rng(rng_state), size=SIZE, lateral=True)
    assert frontal.dtype == np.uint8 and frontal.shape == lateral.shape == (SIZE, SIZE)
    assert np.abs(frontal.astype(int) - lateral.astype(int)).mean() > 10


def test_draw_radiograph_full_size_and_names():
    image = draw_radiograph({"pneumonia": True}, rng=np.random.default_rng(0), size=512)
    assert image.shape == (512, 512) and image.dtype == np.uint8 and 30 < image.mean() < 220
    plain = draw_radiograph({}, rng=np.random.default_rng(1), size=SIZE)
    ignored = draw_radiograph({"No Finding": True, "Edema": False}, rng=np.random.default_rng(1), size=SIZE)
    assert np.array_equal(ignored, plain)
    with pytest.raises(CxrError, match="unknown finding"):
        draw_radiograph({"Pneumonitis": True}, rng=np.random.default_rng(0), size=SIZE)
    with pytest.raises(CxrError, match="hardness"):
        draw_radiograph({}, rng=np.random.default_rng(0), size=SIZE, hardness=2.0)


# ------------------------------------------------------------------------------ CLI and output folder


def test_cli_writes_a_phantom_and_prints_one_summary_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert phantom_main(["--out", str(out), "--n-images", "12", "--seed", "1", "--image-size", "32",
                         "--workers", "1", "--no-bias"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "12 images" in lines[0] and " s " in lines[0]
    truth = json.loads((out / "phantom_truth.json").read_text())
    assert truth["bias"] is False and truth["n_images"] == 12


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(phantom_main, ["--out", str(tmp_path / "x"), "--n-images", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --n-images")


def test_library_errors_name_the_value_and_the_cli_names_its_flag(tmp_path, capsys):
    with pytest.raises(CxrError, match=r"^image_size must be an integer >= 16, got 8$"):
        generate_phantom(tmp_path / "lib", n_images=3, image_size=8, workers=1)
    with pytest.raises(CxrError, match=r"^seed must be an integer >= 0, got -1$"):
        sample_tables(3, seed=-1)
    with pytest.raises(SystemExit):
        run_cli(phantom_main, ["--out", str(tmp_path / "cli"), "--n-images", "3", "--image-size", "8"])
    assert capsys.readouterr().err == "error: --image-size must be an integer >= 16, got 8\n"
    assert not (tmp_path / "lib").exists() and not (tmp_path / "cli").exists()


def test_refuses_a_foreign_folder_and_cleans_an_old_phantom(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CxrError, match="not a phantom folder"):
        generate_phantom(foreign, n_images=5, image_size=32, workers=1)
    assert (foreign / "notes.txt").read_text() == "mine"

    out = tmp_path / "again"
    generate_phantom(out, n_images=20, seed=1, image_size=32, workers=1)
    generate_phantom(out, n_images=8, seed=2, image_size=32, workers=1)
    metadata = _metadata(out)
    assert len(metadata) == 8
    assert set((out / "mimic-cxr-jpg/files").rglob("*.jpg")) == {_image_path(out, row) for row in metadata.itertuples()}
    assert {path.stem for path in (out / "regions").glob("*.png")} == set(metadata["dicom_id"])
    with gzip.open(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-split.csv.gz") as handle:
        assert len(handle.read().decode().splitlines()) == 9
    assert re.search(r'"seed": 2', (out / "phantom_truth.json").read_text())
