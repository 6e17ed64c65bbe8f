"""The shards are plain WebDataset: stock readers see every sample, the manifest's byte offsets
point at exactly the `{key}.jpg` members, and the `.idx` files are what DALI's `wds2idx` writes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_fast.loading import dali_available


def manifest(shards: Path) -> pd.DataFrame:
    return pd.read_parquet(shards / "manifest.parquet")


def tar_members(path: Path) -> dict[str, tuple[int, bytes]]:
    """name -> (data offset, bytes) of every regular file in a tar."""
    members = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                members[member.name] = (member.offset_data, tar.extractfile(member).read())
    return members


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"))


def test_manifest_offsets_are_the_jpg_members(phantom_shards):
    rows = manifest(phantom_shards)
    assert len(rows) > 0
    for shard, group in rows.groupby("shard"):
        members = tar_members(phantom_shards / shard)
        blob = (phantom_shards / shard).read_bytes()
        # Each sample is exactly {key}.jpg + {key}.json; nothing else in the tar.
        assert sorted(members) == sorted(f"{key}.{ext}" for key in group["key"] for ext in ("jpg", "json"))
        for row in group.itertuples():
            offset, data = members[f"{row.key}.jpg"]
            assert (row.offset, row.nbytes) == (offset, len(data))
            by_offset = blob[row.offset:row.offset + row.nbytes]
            assert by_offset == data
            image = decode(by_offset)
            assert np.array_equal(image, decode(data))
            assert image.shape == (row.height, row.width)


def test_webdataset_library_reads_every_sample(phantom_shards):
    webdataset = pytest.importorskip("webdataset")
    rows = manifest(phantom_shards).set_index("key")
    urls = [str(phantom_shards / shard) for shard in sorted(rows["shard"].unique())]
    seen = []
    for sample in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        assert {"jpg", "json"} <= set(sample)
        record = json.loads(sample["json"])
        assert record["key"] == key and record["split"] == rows.at[key, "split"]
        assert set(record["labels"]) == {"cardiomegaly", "effusion", "edema", "fracture", "pneumonia", "no_finding"}
        label = rows.at[key, "effusion"]
        assert record["labels"]["effusion"] == (None if np.isnan(label) else label)
        assert decode(sample["jpg"]).shape == (rows.at[key, "height"], rows.at[key, "width"])
        seen.append(key)
    assert sorted(seen) == sorted(rows.index)


def reference_index(tar_path: Path) -> str:
    """DALI's wds2idx v1.2 logic: one line per sample, `ext data_offset size name` per component."""
    lines = []
    last = None
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.type != tarfile.REGTYPE:
                continue
            dot = member.name.find(".", member.name.rfind("/") + 1)
            base, ext = member.name[:dot], member.name[dot + 1:]
            entry = f"{ext} {member.offset_data} {member.size} {member.name}"
            if base == last:
                lines[-1] += " " + entry
            else:
                lines.append(entry)
                last = base
    return f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines)


def test_index_files_match_wds2idx(phantom_shards, tmp_path):
    tars = sorted(phantom_shards.glob("*.tar"))
    assert tars and all(tar.with_suffix(".idx").is_file() for tar in tars)
    try:
        from wds2idx import IndexCreator  # shipped with nvidia-dali
    except ImportError:
        IndexCreator = None
    for tar in tars:
        ours = tar.with_suffix(".idx").read_text()
        assert ours == reference_index(tar)
        if IndexCreator is not None:
            theirs = tmp_path / f"{tar.stem}.idx"
            with IndexCreator(str(tar), str(theirs), verbose=False) as creator:
                creator.create_index()
            assert ours == theirs.read_text()


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
def test_dali_webdataset_reader_with_index(phantom_shards):
    from nvidia.dali import fn, pipeline_def, types

    rows = manifest(phantom_shards).set_index("key")
    tars = sorted(phantom_shards.glob("*.tar"))
    batch = 32

    @pipeline_def(batch_size=batch, num_threads=2, device_id=None)
    def pipeline():
        jpg, meta = fn.readers.webdataset(
            paths=[str(tar) for tar in tars], index_paths=[str(tar.with_suffix(".idx")) for tar in tars],
            ext=["jpg", "json"], missing_component_behavior="error", name="reader")
        return jpg, meta, fn.decoders.image(jpg, device="cpu", output_type=types.GRAY)

    pipe = pipeline()
    pipe.build()
    total = pipe.epoch_size("reader")
    assert total == len(rows)
    samples = []
    while len(samples) < total:
        jpgs, metas, images = pipe.run()
        samples += [(np.array(jpgs[i]), np.array(metas[i]), np.array(images[i])) for i in range(len(jpgs))]
    blobs = {shard: (phantom_shards / shard).read_bytes() for shard in rows["shard"].unique()}
    seen = set()
    for jpg, meta, image in samples[:total]:
        record = json.loads(meta.tobytes())  # .json comes back as raw bytes
        key = record["key"]
        row = rows.loc[key]
        by_offset = blobs[row["shard"]][row["offset"]:row["offset"] + row["nbytes"]]
        assert jpg.tobytes() == by_offset
        assert image.shape == (row["height"], row["width"], 1)
        # DALI's CPU decoder and Pillow are both libjpeg-turbo: same pixels (allow one level).
        assert np.abs(image[..., 0].astype(int) - decode(by_offset).astype(int)).max() <= 1
        seen.add(key)
    assert seen == set(rows.index)
