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
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_fast.data import shard_dataset, shards
from cxr_fast.errors import CxrError
from cxr_fast.tasks import TASKS
from conftest import SHARD_PIXELS, shard_arguments

ROOT = Path(__file__).resolve().parents[1]
COHORT_COLUMNS = ["key", "dicom_id", "subject_id", "study_id", "path", "view", "sex", "age", "age_group", "race", "split", *TASKS]


def digest_tree(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.iterdir()) if path.is_file()}


def test_outputs_follow_the_data_contract(phantom_shards):
    cohort = pd.read_parquet(phantom_shards / "cohort.parquet")
    manifest = pd.read_parquet(phantom_shards / "manifest.parquet")
    assert list(cohort.columns) == COHORT_COLUMNS
    assert list(manifest.columns) == COHORT_COLUMNS + ["shard", "offset", "nbytes", "height", "width"]
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
    assert sorted(p.name for p in out.iterdir()) == ["cohort.parquet", "exclusions.csv", "meta.json"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["images"]["all"] == len(pd.read_parquet(out / "cohort.parquet"))


def _shard_process(phantom_root: Path, out: Path) -> subprocess.Popen:
    args = shard_arguments(phantom_root, out)
    args[args.index("--shard-size") + 1] = "8"
    args[args.index("--workers") + 1] = "1"
    return subprocess.Popen([sys.executable, "tools/shard_dataset.py", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_run_resumes_to_byte_identical_output(phantom_root, tmp_path):
    clean = _shard_process(phantom_root, tmp_path / "clean")
    assert clean.wait(timeout=300) == 0, clean.stdout.read()

    out = tmp_path / "crashed"
    crashed = _shard_process(phantom_root, out)
    deadline = time.time() + 120
    while len(list((out / shards.PARTS_DIR).glob("*-*.json"))) < 3 and time.time() < deadline:
        assert crashed.poll() is None, "finished before it could be killed"
        time.sleep(0.005)
    crashed.send_signal(signal.SIGKILL)
    crashed.wait()
    assert not (out / "manifest.parquet").exists()
    # Whatever was in flight has only a temporary name: no final-named partial shard.
    for tar in out.glob("*.tar"):
        tarfile.open(tar).getmembers()

    resumed = _shard_process(phantom_root, out)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert not list(out.glob(".*.tmp-*"))
    assert digest_tree(out) == digest_tree(tmp_path / "clean")


def test_a_rerun_with_other_settings_is_refused(phantom_root, phantom_shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(phantom_shards, out)
    args = shard_arguments(phantom_root, out)
    args[args.index("--size") + 1] = "96"
    with pytest.raises(CxrError, match="different cohort or image settings"):
        shard_dataset.main(args)


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
    done = subprocess.run([sys.executable, "tools/shard_dataset.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not out.exists() or not any(out.iterdir()), "something was written"


def test_missing_csv_is_one_line_naming_the_file(damaged_phantom, tmp_path):
    root, _ = damaged_phantom
    target = root / "mimic-cxr-jpg" / "mimic-cxr-2.0.0-chexpert.csv.gz"
    target.unlink()
    _expect_error(shard_arguments(root, tmp_path / "out"), "chexpert", tmp_path / "out")


def test_missing_column_is_one_line_naming_file_and_column(damaged_phantom, tmp_path):
    root, _ = damaged_phantom
    path = root / "mimic-cxr-jpg" / "mimic-cxr-2.0.0-metadata.csv.gz"
    frame = pd.read_csv(path).drop(columns=["ViewPosition"])
    with gzip.open(path, "wt") as handle:
        frame.to_csv(handle, index=False)
    _expect_error(shard_arguments(root, tmp_path / "out"), "ViewPosition", tmp_path / "out")


def test_a_cohort_emptied_by_the_filters_is_an_error(phantom_root, tmp_path):
    _expect_error(shard_arguments(phantom_root, tmp_path / "out", "--views", "XX"), "no images", tmp_path / "out")


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
