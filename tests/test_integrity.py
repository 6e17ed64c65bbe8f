"""Every byte verified once: the shards' records (meta.json digests, the manifest's crc32), the
`verify` command, the decode-once path of training and prediction, the streaming loader's
start-up check, and sharding reruns that repair."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pandas as pd
import pytest
import torch

from cxr_fast.data import shard_dataset, shards
from cxr_fast.data.integrity import CHECKED_FILE
from cxr_fast.data.verify import main as verify_main
from cxr_fast.errors import CxrError
from cxr_fast.loading import make_loader
from cxr_fast.loading.augment import AugmentSettings
from cxr_fast.loading.resident import ResidentLoader
from cxr_fast.schema import DECODED_CACHE_FOLDER
from conftest import shard_arguments
from test_shards import digest_tree

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = AugmentSettings(image_size=64)


@pytest.fixture()
def copied_shards(phantom_shards, tmp_path) -> Path:
    """The shared phantom shards as a fresh folder: without what other tests' runs left beside
    them, the decoded cache (decoded from the good bytes, so it would not be re-read) and the
    streaming loader's record of checked shards (which would skip the check)."""
    out = tmp_path / "shards"
    shutil.copytree(phantom_shards, out, ignore=shutil.ignore_patterns(DECODED_CACHE_FOLDER, CHECKED_FILE))
    return out


def manifest(folder: Path) -> pd.DataFrame:
    return pd.read_parquet(folder / "manifest.parquet")


def flip_byte(folder: Path, row) -> None:
    """Flip one byte in the middle of an image's JPEG bytes (the tar keeps its size)."""
    path = folder / row.shard
    data = bytearray(path.read_bytes())
    data[row.offset + row.nbytes // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def verify(folder: Path, capsys) -> tuple[int, list[str]]:
    status = verify_main([str(folder)])
    return status, capsys.readouterr().out.splitlines()


def test_the_manifest_records_each_images_crc32(phantom_shards):
    rows = manifest(phantom_shards)
    for row in rows.groupby("shard").head(3).itertuples():
        with open(phantom_shards / row.shard, "rb") as handle:
            assert zlib.crc32(os.pread(handle.fileno(), row.nbytes, row.offset)) == row.crc32
    meta = json.loads((phantom_shards / "meta.json").read_text())
    assert {name: record["bytes"] for name, record in meta["shards"].items()} == {
        path.name: path.stat().st_size for path in phantom_shards.glob("*.tar")}


def test_verify_is_silent_on_clean_shards_and_names_shard_and_key_after_one_flipped_byte(copied_shards, capsys):
    assert verify(copied_shards, capsys) == (0, [])
    row = next(manifest(copied_shards).itertuples())
    flip_byte(copied_shards, row)
    status, lines = verify(copied_shards, capsys)
    assert status == 1
    assert f"{copied_shards / row.shard}: sha256 differs from meta.json (damaged or replaced)" in lines
    assert [line for line in lines if row.key in line] == [
        f"{copied_shards / row.shard}: {row.key}: bytes differ from the manifest's checksum (a damaged or replaced shard)"]
    assert len(lines) == 2


def test_two_same_size_shards_swapped_are_caught_by_verify_and_by_the_loader(copied_shards, capsys):
    sizes: dict[int, list[Path]] = {}
    for tar in sorted(copied_shards.glob("train-*.tar")):
        sizes.setdefault(tar.stat().st_size, []).append(tar)
    first, second = next(paths for paths in sizes.values() if len(paths) >= 2)[:2]
    swap = first.with_suffix(".swap")
    first.rename(swap), second.rename(first), swap.rename(second)

    status, lines = verify(copied_shards, capsys)
    assert status == 1
    assert {f"{path}: sha256 differs from meta.json (damaged or replaced)" for path in (first, second)} <= set(lines)
    assert any(line.startswith(f"{first}: ") and "checksum" in line for line in lines)
    rows = manifest(copied_shards)
    with pytest.raises(CxrError, match=f"{first}: .*: bytes differ from the manifest's checksum"):
        ResidentLoader(rows[rows["shard"] == first.name], copied_shards, SETTINGS, device=torch.device("cpu"), batch_size=8)


def test_verify_names_missing_and_truncated_shards(copied_shards, capsys):
    tars = sorted(copied_shards.glob("*.tar"))
    tars[0].unlink()
    with open(tars[1], "r+b") as handle:
        handle.truncate(tars[1].stat().st_size // 2)
    status, lines = verify(copied_shards, capsys)
    assert status == 1
    assert f"{tars[0]}: missing" in lines
    assert any(line.startswith(f"{tars[1]}: ") and "truncated or replaced" in line for line in lines)
    assert any(line.startswith(f"{tars[1]}: ") and "cut off" in line for line in lines)


def test_the_resident_loader_stops_on_a_flipped_byte_in_one_line(copied_shards):
    rows = manifest(copied_shards)
    train = rows[rows["split"] == "train"].reset_index(drop=True)
    row = train.iloc[len(train) // 2]
    flip_byte(copied_shards, row)
    with pytest.raises(CxrError) as caught:
        ResidentLoader(train, copied_shards, SETTINGS, device=torch.device("cpu"), batch_size=8)
    assert str(caught.value).startswith(f"{copied_shards / row.shard}: {row.key}: bytes differ")
    assert "\n" not in str(caught.value)


def test_an_image_that_does_not_decode_is_named_where_the_manifest_has_no_checksums(copied_shards):
    rows = manifest(copied_shards).drop(columns=["crc32"])  # a manifest from before the column
    train = rows[rows["split"] == "train"].reset_index(drop=True)
    row = train.iloc[3]
    path = copied_shards / row.shard
    data = bytearray(path.read_bytes())
    data[row.offset:row.offset + 64] = b"\0" * 64  # the JPEG's markers gone
    path.write_bytes(bytes(data))
    # cache="off": the decoded cache would read the folder's own manifest, which has the checksums.
    with pytest.raises(CxrError, match=f"^{path}: {row.key}: cannot decode its JPEG"):
        ResidentLoader(train, copied_shards, SETTINGS, device=torch.device("cpu"), batch_size=8, cache="off")


def test_the_streaming_loader_checks_shard_digests_at_start_up(copied_shards, monkeypatch):
    monkeypatch.setattr("cxr_fast.loading.dali_available", lambda: True)  # the check comes before DALI is imported
    rows = manifest(copied_shards)
    val = rows[rows["split"] == "val"].reset_index(drop=True)
    flip_byte(copied_shards, val.iloc[0])
    with pytest.raises(CxrError, match=f"{copied_shards / val.iloc[0]['shard']}: sha256 differs .* cxr_fast.data.verify"):
        make_loader("dali", val, copied_shards, SETTINGS, device=torch.device("cpu"), batch_size=8)


def test_a_shard_that_matched_is_not_read_again_until_it_changes(copied_shards, monkeypatch):
    """The start-up check of a study's many runs hashes each shard once; a shard rewritten
    since (a new modification time), even to the same size, is read and checked again."""
    from cxr_fast.data import integrity

    reads = []
    real_sha256 = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path: reads.append(path.name) or real_sha256(path))
    names = sorted(manifest(copied_shards)["shard"].astype(str).unique())
    integrity.check_shard_digests(copied_shards, names)
    assert sorted(reads) == names
    reads.clear()
    integrity.check_shard_digests(copied_shards, names)
    assert reads == []  # every stamp still holds
    row = manifest(copied_shards).iloc[0]
    path = copied_shards / row.shard
    stamped = path.stat().st_mtime_ns
    flip_byte(copied_shards, row)  # same size, new bytes
    # A rewrite moves the modification time; on a coarse file-system clock it could fall in the
    # tick of the stamp, so the test moves it explicitly.
    os.utime(path, ns=(stamped + 10**9, stamped + 10**9))
    with pytest.raises(CxrError, match=f"{copied_shards / row.shard}: sha256 differs"):
        integrity.check_shard_digests(copied_shards, names)
    assert reads == [row.shard]


def test_an_unwritable_shard_folder_only_means_hashing_again(copied_shards, monkeypatch):
    from cxr_fast.data import integrity

    def refuse(path, obj):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(integrity, "write_json", refuse)
    names = manifest(copied_shards)["shard"].astype(str).unique()
    integrity.check_shard_digests(copied_shards, names)  # no error
    assert not (copied_shards / integrity.CHECKED_FILE).exists()


@pytest.mark.slow
def test_training_on_a_flipped_byte_stops_in_one_line_naming_shard_and_key(copied_shards, tmp_path):
    rows = manifest(copied_shards)
    row = rows[rows["split"] == "train"].iloc[10]
    flip_byte(copied_shards, row)
    done = subprocess.run(
        [sys.executable, "-m", "cxr_fast.train", "--recipe", "effusion_test_resnet", "--no-progress",
         f"shards={copied_shards}", f"weights_dir={tmp_path / 'weights'}", f"runs_dir={tmp_path / 'runs'}",
         "epochs=1", "batch_size=16", "logger=none", "loader=resident"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[-1] == f"error: {copied_shards / row.shard}: {row.key}: bytes differ from the manifest's checksum " \
                        "(a damaged or replaced shard)", done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------ reruns repair


def test_a_rerun_rewrites_deleted_truncated_and_damaged_shards(phantom_root, phantom_shards, copied_shards):
    tars = sorted(copied_shards.glob("*.tar"))
    tars[0].unlink()
    with open(tars[1], "r+b") as handle:
        handle.truncate(tars[1].stat().st_size - 1024)
    flip_byte(copied_shards, next(manifest(copied_shards)[lambda m: m["shard"] == tars[2].name].itertuples()))
    assert shard_dataset.main(shard_arguments(phantom_root, copied_shards)) == 0
    assert digest_tree(copied_shards) == digest_tree(phantom_shards)


def test_a_rerun_adds_checksums_to_shards_written_without_them(phantom_root, phantom_shards, copied_shards):
    for marker in (copied_shards / shards.PARTS_DIR).glob("*-*.json"):
        part = json.loads(marker.read_text())
        for member in part["members"]:
            del member["crc32"]
        del part["bytes"]
        marker.write_text(json.dumps(part))
    tars = {tar.name: tar.stat().st_ino for tar in copied_shards.glob("*.tar")}
    assert shard_dataset.main(shard_arguments(phantom_root, copied_shards)) == 0
    assert {tar.name: tar.stat().st_ino for tar in copied_shards.glob("*.tar")} == tars  # nothing re-encoded
    assert digest_tree(copied_shards) == digest_tree(phantom_shards)


def test_a_rerun_retries_a_repaired_source_image_and_equals_a_clean_run(phantom_root, tmp_path):
    root = tmp_path / "phantom"
    shutil.copytree(phantom_root, root)
    cohort_dir = tmp_path / "cohort"
    assert shard_dataset.main(shard_arguments(root, cohort_dir, "--cohort-only")) == 0
    cohort = pd.read_parquet(cohort_dir / "cohort.parquet")
    broken = Path(cohort["path"].iloc[0])
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 3])

    out = tmp_path / "out"
    assert shard_dataset.main(shard_arguments(root, out)) == 0
    assert cohort["key"].iloc[0] in set(pd.read_csv(out / "exclusions.csv")["key"])
    broken.write_bytes(good)  # repaired
    assert shard_dataset.main(shard_arguments(root, out)) == 0
    assert cohort["key"].iloc[0] in set(manifest(out)["key"])

    clean = tmp_path / "clean"
    assert shard_dataset.main(shard_arguments(root, clean)) == 0
    assert digest_tree(out) == digest_tree(clean)


def test_an_unchanged_unreadable_source_does_not_rewrite_its_shard(phantom_root, tmp_path):
    root = tmp_path / "phantom"
    shutil.copytree(phantom_root, root)
    out = tmp_path / "out"
    assert shard_dataset.main(shard_arguments(root, out, "--limit", "80")) == 0
    first = manifest(out).sort_values("key").iloc[0]
    Path(first["path"]).write_bytes(b"not a jpeg")
    assert shard_dataset.main(shard_arguments(root, out, "--limit", "80")) == 0  # picks up the change
    tars = {tar.name: tar.stat().st_ino for tar in out.glob("*.tar")}
    assert shard_dataset.main(shard_arguments(root, out, "--limit", "80")) == 0
    assert {tar.name: tar.stat().st_ino for tar in out.glob("*.tar")} == tars
