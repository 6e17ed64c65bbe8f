"""tools/shard_dataset.py: outputs of DATA_SPEC.md, resume after a crash, bad input."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_fast.data import shard_dataset, shards
from cxr_fast.data.integrity import CHECKED_FILE
from cxr_fast.errors import CxrError
from cxr_fast.io import TEMPORARY_MARK
from cxr_fast.locks import LOCK_NAME
from cxr_fast.schema import DECODED_CACHE_FOLDER
from cxr_fast.tasks import TASKS
from conftest import SHARD_PIXELS, shard_arguments

ROOT = Path(__file__).resolve().parents[1]
SHARD_TOOL = str(ROOT / "tools" / "shard_dataset.py")  # run from the test's own folder
COHORT_COLUMNS = ["key", "dicom_id", "subject_id", "study_id", "path", "view", "sex", "age", "age_group", "race", "split", *TASKS]


def digest_tree(folder: Path) -> dict[str, str]:
    """sha256 of every file sharding wrote below `folder`: not the lock, whose text names its
    last holder, nor what runs (other tests) left beside the shards: the decoded caches and the
    streaming loader's record of the shards it checked."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name not in (LOCK_NAME, CHECKED_FILE)
            and path.relative_to(folder).parts[0] != DECODED_CACHE_FOLDER}


def temporaries(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if TEMPORARY_MARK in path.name]


def test_outputs_follow_the_data_contract(phantom_shards):
    cohort = pd.read_parquet(phantom_shards / "cohort.parquet")
    manifest = pd.read_parquet(phantom_shards / "manifest.parquet")
    assert list(cohort.columns) == COHORT_COLUMNS
    assert list(manifest.columns) == COHORT_COLUMNS + ["shard", "offset", "nbytes", "crc32", "height", "width"]
    assert cohort["key"].is_unique and not cohort["key"].str.contains(".", regex=False).any()
    assert all(cohort[task].dtype == np.float32 for task in TASKS)
    assert set(manifest["key"]) == set(cohort["key"])  # every phantom image is readable
    assert (manifest[["height", "width"]].min(axis=1) == SHARD_PIXELS).all()
    for split, group in manifest.groupby("split"):
        assert group["shard"].str.startswith(f"{split}-").all()
    assert sorted(p.name for p in phantom_shards.glob("*.tar")) == sorted(manifest["shard"].unique())
    assert sorted(p.stem for p in phantom_shards.glob("*.idx")) == sorted(p.stem for p in phantom_shards.glob("*.tar"))

    meta = json.loads((phantom_shards / "meta.json").read_text())
    assert meta["source"] == "mimic" and meta["versions"]["pandas"] == pd.__version__
    assert meta["counts"]["images"]["all"] == len(manifest)
    for split in ("train", "val", "test"):
        part = manifest[manifest["split"] == split]
        assert meta["counts"]["images"][split] == len(part)
        effusion = meta["counts"]["tasks"]["effusion"][split]
        assert (effusion["positive"], effusion["negative"], effusion["excluded"]) == (
            (part["effusion"] == 1).sum(), (part["effusion"] == 0).sum(), part["effusion"].isna().sum())
        assert meta["counts"]["demographics"]["race"][split] == part["race"].value_counts().sort_index().to_dict()
    for shard, info in meta["shards"].items():
        assert info["sha256"] == hashlib.sha256((phantom_shards / shard).read_bytes()).hexdigest()

    exclusions = pd.read_csv(phantom_shards / "exclusions.csv")
    assert {"view", "no_labels"} <= set(exclusions["reason"])
    assert not set(exclusions["key"]) & set(cohort["key"])


def test_each_sample_json_carries_labels_and_demographics(phantom_shards):
    manifest = pd.read_parquet(phantom_shards / "manifest.parquet").set_index("key")
    with tarfile.open(next(phantom_shards.glob("train-*.tar"))) as tar:
        names = tar.getnames()
        assert names[0].endswith(".jpg") and names[1] == names[0][:-4] + ".json"
        record = json.loads(tar.extractfile(names[1]).read())
    row = manifest.loc[record["key"]]
    assert record["race"] == row["race"] and record["split"] == "train"
    for task in TASKS:
        expected = None if np.isnan(row[task]) else float(row[task])
        assert record["labels"][task] == expected


def test_cohort_only_opens_no_image_and_writes_only_the_tables(phantom_root, tmp_path, monkeypatch):
    def no_images(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", no_images)
    out = tmp_path / "cohort"
    assert shard_dataset.main(shard_arguments(phantom_root, out, "--cohort-only")) == 0
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "cohort.parquet", "exclusions.csv", "meta.json"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["images"]["all"] == len(pd.read_parquet(out / "cohort.parquet"))


def _tool_arguments(phantom_root: Path, out: Path) -> list[str]:
    args = shard_arguments(phantom_root, out)
    args[args.index("--shard-size") + 1] = "8"
    args[args.index("--workers") + 1] = "1"  # no worker pool: a kill leaves no orphan behind
    return args


def _shard_process(phantom_root: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, SHARD_TOOL, *_tool_arguments(phantom_root, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# The tool, killed with SIGKILL by itself right after its N-th tar member: the kill lands at
# the same point of the run however loaded the machine is.
KILLED_AFTER_MEMBERS = """
import os, signal, sys, tarfile
from cxr_fast.data.shard_dataset import main
from cxr_fast.errors import run_cli

left = int(sys.argv[1])
addfile = tarfile.TarFile.addfile

def addfile_then_die(self, *args, **kwargs):
    global left
    addfile(self, *args, **kwargs)
    left -= 1
    if left == 0:
        os.kill(os.getpid(), signal.SIGKILL)

tarfile.TarFile.addfile = addfile_then_die
run_cli(main, sys.argv[2:])
"""


@pytest.mark.slow
def test_a_killed_run_resumes_to_byte_identical_output(phantom_root, tmp_path):
    clean = _shard_process(phantom_root, tmp_path / "clean")
    assert clean.wait(timeout=300) == 0, clean.stdout.read()

    out = tmp_path / "crashed"
    members = 3 * 2 * 8 + 5  # three full shards of 8 (jpg + json each), then mid-way into the fourth
    crashed = subprocess.run([sys.executable, "-c", KILLED_AFTER_MEMBERS, str(members), *_tool_arguments(phantom_root, out)],
                             capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert len(list((out / shards.PARTS_DIR).glob("train-*.json"))) == 3
    assert not (out / "manifest.parquet").exists()
    assert any(path.name.startswith(".train-000003.tar") for path in temporaries(out)), "no partial tar left"
    # Whatever was in flight has only a temporary name: no final-named partial shard.
    for tar in out.glob("*.tar"):
        tarfile.open(tar).getmembers()

    # The dead run's lock blocks nobody; its temporaries are removed.
    resumed = _shard_process(phantom_root, out)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert temporaries(out) == []
    assert digest_tree(out) == digest_tree(tmp_path / "clean")


def test_a_rerun_with_other_settings_is_refused_and_changes_nothing(phantom_root, phantom_shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(phantom_shards, out)
    before = digest_tree(out)
    # --limit changes the cohort too: the refused run must not replace cohort.parquet.
    args = shard_arguments(phantom_root, out, "--limit", "40")
    args[args.index("--size") + 1] = "96"
    with pytest.raises(CxrError, match=f"other settings \\(--size {SHARD_PIXELS} there, 96 now\\)"):
        shard_dataset.main(args)
    assert digest_tree(out) == before


def _sample_record(folder: Path, shard: str, key: str) -> dict:
    with tarfile.open(folder / shard) as tar:
        return json.loads(tar.extractfile(f"{key}.json").read())


def test_a_rerun_after_a_demographics_change_rewrites_only_the_shards_it_changes(phantom_root, tmp_path):
    root = tmp_path / "phantom"
    shutil.copytree(phantom_root, root)
    out = tmp_path / "out"
    assert shard_dataset.main(shard_arguments(root, out)) == 0
    manifest = pd.read_parquet(out / "manifest.parquet")
    subject = manifest.loc[manifest["race"] != "Black", "subject_id"].iloc[0]
    touched = set(manifest.loc[manifest["subject_id"] == subject, "shard"])
    inodes = {tar.name: tar.stat().st_ino for tar in out.glob("*.tar")}

    admissions_path = root / "mimic-iv" / "hosp" / "admissions.csv.gz"
    admissions = pd.read_csv(admissions_path)
    admissions.loc[admissions["subject_id"] == subject, "race"] = "BLACK/AFRICAN AMERICAN"
    with gzip.open(admissions_path, "wt") as handle:
        admissions.to_csv(handle, index=False)
    assert shard_dataset.main(shard_arguments(root, out)) == 0

    rerun = pd.read_parquet(out / "manifest.parquet")
    for row in rerun[rerun["subject_id"] == subject].itertuples():
        assert row.race == "Black" and _sample_record(out, row.shard, row.key)["race"] == "Black"
    assert {name for name, inode in inodes.items() if (out / name).stat().st_ino != inode} == touched
    fresh = tmp_path / "fresh"
    assert shard_dataset.main(shard_arguments(root, fresh)) == 0
    assert digest_tree(out) == digest_tree(fresh)


def test_a_rerun_with_a_smaller_cohort_removes_the_shards_it_no_longer_has(phantom_root, phantom_shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(phantom_shards, out)
    assert shard_dataset.main(shard_arguments(phantom_root, out, "--limit", "100")) == 0
    fresh = tmp_path / "fresh"
    assert shard_dataset.main(shard_arguments(phantom_root, fresh, "--limit", "100")) == 0
    assert digest_tree(out) == digest_tree(fresh)


@pytest.mark.slow
def test_a_second_run_into_a_locked_folder_exits_at_once_naming_the_holder(phantom_root, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom cxr_fast.locks import exclusive_lock\n"
         "with exclusive_lock(sys.argv[1], what='sharding run'):\n    print('held', flush=True)\n    sys.stdin.read()",
         str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = subprocess.run([sys.executable, SHARD_TOOL, *shard_arguments(phantom_root, out)],
                              capture_output=True, text=True)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "another sharding run" in lines[0] and f"pid {holder.pid} " in lines[0]
    assert [path.name for path in out.iterdir()] == [LOCK_NAME]


# ------------------------------------------------------------------ bad input


@pytest.fixture()
def damaged_phantom(phantom_root, tmp_path) -> tuple[Path, pd.DataFrame]:
    root = tmp_path / "phantom"
    shutil.copytree(phantom_root, root)
    cohort_dir = tmp_path / "cohort"
    assert shard_dataset.main(shard_arguments(root, cohort_dir, "--cohort-only")) == 0
    cohort = pd.read_parquet(cohort_dir / "cohort.parquet")
    return root, cohort


def _local(path: str, old_root: Path, new_root: Path) -> Path:
    return new_root / Path(path).relative_to(old_root)


def test_unreadable_and_missing_images_become_exclusions(damaged_phantom, tmp_path):
    root, cohort = damaged_phantom
    truncated, garbage, missing = cohort["path"].iloc[:3]
    data = Path(truncated).read_bytes()
    Path(truncated).write_bytes(data[: len(data) // 3])
    Path(garbage).write_bytes(b"not a jpeg at all")
    Path(missing).unlink()
    out = tmp_path / "out"
    assert shard_dataset.main(shard_arguments(root, out)) == 0
    exclusions = pd.read_csv(out / "exclusions.csv")
    bad = exclusions[exclusions["reason"] == "unreadable"]
    assert set(bad["key"]) == set(cohort["key"].iloc[:3])
    assert bad.set_index("key").loc[cohort["key"].iloc[2], "detail"].startswith("file not found")
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == len(cohort) - 3 and not set(bad["key"]) & set(manifest["key"])


def _expect_error(args: list[str], message: str, out: Path) -> None:
    done = subprocess.run([sys.executable, SHARD_TOOL, *args], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not out.exists() or not any(out.iterdir()), "something was written"


@pytest.mark.slow
def test_missing_csv_is_one_line_naming_the_file(damaged_phantom, tmp_path):
    root, _ = damaged_phantom
    target = root / "mimic-cxr-jpg" / "mimic-cxr-2.0.0-chexpert.csv.gz"
    target.unlink()
    _expect_error(shard_arguments(root, tmp_path / "out"), "chexpert", tmp_path / "out")


@pytest.mark.slow
def test_missing_column_is_one_line_naming_file_and_column(damaged_phantom, tmp_path):
    root, _ = damaged_phantom
    path = root / "mimic-cxr-jpg" / "mimic-cxr-2.0.0-metadata.csv.gz"
    frame = pd.read_csv(path).drop(columns=["ViewPosition"])
    with gzip.open(path, "wt") as handle:
        frame.to_csv(handle, index=False)
    _expect_error(shard_arguments(root, tmp_path / "out"), "ViewPosition", tmp_path / "out")


@pytest.mark.slow
def test_a_cohort_emptied_by_the_filters_is_an_error(phantom_root, tmp_path):
    _expect_error(shard_arguments(phantom_root, tmp_path / "out", "--views", "XX"), "no images", tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("size", ["0", "-3"])
def test_a_shard_size_below_one_is_refused_before_anything_is_written(phantom_root, tmp_path, size):
    args = shard_arguments(phantom_root, tmp_path / "out")
    args[args.index("--shard-size") + 1] = size
    _expect_error(args, f"--shard-size must be >= 1, got {size}", tmp_path / "out")


@pytest.mark.slow
def test_an_unwritable_out_is_one_line_naming_it(phantom_root, tmp_path):
    # A path through a regular file cannot be created even by root (ENOTDIR); a 0o555
    # folder does the same for other users.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "shards"
    _expect_error(shard_arguments(phantom_root, out), f"{out}: cannot write here", out)


# ------------------------------------------------------------------ image decoding


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    dataset.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_release_is_read_windowed_and_monochrome1_inverted(tmp_path, photometric):
    ramp = np.tile(np.linspace(0, 4000, 300), (200, 1))  # dark left, bright right (12 bit)
    _write_dicom(tmp_path / "image.dcm", ramp, photometric)
    encoded = shards.encode_image("k", str(tmp_path / "image.jpg"), shards.ImageSettings(size=100))
    assert encoded.jpeg is not None and (encoded.height, encoded.width) == (100, 150)
    pixels = np.asarray(Image.open(io.BytesIO(encoded.jpeg)))
    left, right = pixels[:, :10].mean(), pixels[:, -10:].mean()
    assert (left < 30 and right > 225) if photometric == "MONOCHROME2" else (left > 225 and right < 30)


def test_large_jpegs_are_resized_by_the_short_side(tmp_path):
    Image.fromarray(np.full((1200, 900), 128, np.uint8)).save(tmp_path / "big.jpg")
    encoded = shards.encode_image("k", str(tmp_path / "big.jpg"), shards.ImageSettings(size=256))
    assert (encoded.height, encoded.width) == (341, 256)
    assert Image.open(io.BytesIO(encoded.jpeg)).mode == "L"
