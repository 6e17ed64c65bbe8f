"""Cohort -> WebDataset shards + DALI index files + manifest.parquet (DATA_SPEC.md, outputs).

Layout of `OUT/`:
  {split}-{NNNNNN}.tar   samples `{key}.jpg` (grayscale JPEG, short side = size) + `{key}.json`
  {split}-{NNNNNN}.idx   DALI `wds2idx` v1.2 index of the tar
  manifest.parquet       cohort rows that were written + shard, offset, nbytes, height, width
  cohort.parquet, exclusions.csv, meta.json
  .parts/plan.json       the settings every shard here was written with (size, quality, shard_size)
  .parts/{split}-{NNNNNN}.json
                         one small JSON per finished shard (its manifest rows with each JPEG's
                         crc32, the tar's sha256 and size, the digest of what it holds, the
                         unreadable images with their source file's size and mtime); the
                         marker that makes a rerun skip that shard

Which image goes into which shard is fixed by the cohort alone (sorted by key within a
split, cut every `shard_size` images), so an interrupted run and a clean run agree. Tar
headers carry no time or owner, JPEG encoding is deterministic, so reruns are byte-identical.

A rerun with other image settings or shard size is refused. Otherwise a shard is rewritten
when its digest (keys, every `{key}.json` payload, image settings) differs from its marker's,
so a changed label or demographic reaches the tar; when its tar is missing or its size or
sha256 is not the recorded one (deleted, truncated, damaged); and when a source image it
could not read has changed size or mtime since (a repaired file is picked up, and the result
equals a clean run's). Shards the cohort no longer has are removed. A readable source image
is assumed unchanged: images are not hashed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from PIL import Image

from cxr_fast.data.integrity import file_sha256, member_checksum
from cxr_fast.errors import CxrError
from cxr_fast.io import atomic_path, write_bytes, write_json
from cxr_fast.schema import CHECKSUM_COLUMN, PLACEMENT_COLUMNS, SPLITS
from cxr_fast.tasks import TASKS

PARTS_DIR = ".parts"
PLAN_FILE = "plan.json"
SAMPLE_FIELDS = ("key", "dicom_id", "subject_id", "study_id", "split", "view", "sex", "age", "age_group", "race")


@dataclass(frozen=True)
class ImageSettings:
    size: int = 256          # short side after resizing, px
    quality: int = 90        # JPEG quality


@dataclass(frozen=True)
class ShardSpec:
    split: str
    index: int
    keys: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"


@dataclass(frozen=True)
class EncodedImage:
    key: str
    jpeg: bytes | None       # None: unreadable
    height: int = 0
    width: int = 0
    problem: str = ""
    source: list[int] | None = None  # unreadable only: the source file's [size, mtime_ns]


class UnreadableImage(Exception):
    pass


# ---------------------------------------------------------------- decoding one source image


def resolve_image_path(path: str) -> Path:
    """The image file for a cohort path; MIMIC's DICOM release has `.dcm` where JPG has `.jpg`."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    dicom = candidate.with_suffix(".dcm")
    if dicom.is_file():
        return dicom
    raise UnreadableImage(f"file not found: {path}")


def source_signature(path: str) -> list[int] | None:
    """[size, mtime_ns] of the image file behind a cohort path; None when there is none. A
    rerun retries an unreadable image whose signature changed (the file was repaired)."""
    try:
        status = resolve_image_path(path).stat()
    except (UnreadableImage, OSError):
        return None
    return [status.st_size, status.st_mtime_ns]


def load_grayscale(path: Path, draft_size: int | None = None) -> Image.Image:
    """Open a JPEG/PNG/DICOM as an 8-bit grayscale PIL image, fully decoded."""
    if path.suffix.lower() == ".dcm":
        return _load_dicom(path)
    try:
        with Image.open(path) as image:
            if draft_size and image.format == "JPEG":
                # libjpeg scales by 1/2, 1/4, 1/8 while decoding: a 3000 px original
                # decodes ~10x faster, and the final resize still anti-aliases.
                image.draft("L", (draft_size, draft_size))
            image.load()
            return _to_l(image)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise UnreadableImage(f"cannot decode: {error}") from error


def _to_l(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        return Image.fromarray(_window_to_uint8(array, array.min(), array.max()))
    return image.convert("L")


def _window_to_uint8(array: np.ndarray, low: float, high: float) -> np.ndarray:
    scale = 255.0 / max(high - low, 1e-9)
    return np.clip((array - low) * scale, 0, 255).round().astype(np.uint8)


def _load_dicom(path: Path) -> Image.Image:
    import pydicom
    from pydicom.pixels import apply_voi_lut

    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array.astype(np.float64)
        # The VOI LUT / window in the header is what a radiologist's viewer shows.
        pixels = np.asarray(apply_voi_lut(pixels, dataset), dtype=np.float64)
    except Exception as error:  # pydicom raises many types for broken files
        raise UnreadableImage(f"cannot decode DICOM: {error}") from error
    image = _window_to_uint8(pixels, pixels.min(), pixels.max())
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        image = 255 - image  # MONOCHROME1 stores bone as dark; flip to the usual look
    return Image.fromarray(image)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    if target == image.size:
        return image
    return image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_image(key: str, path: str, settings: ImageSettings) -> EncodedImage:
    try:
        image = resize_short_side(load_grayscale(resolve_image_path(path), settings.size), settings.size)
    except UnreadableImage as problem:
        return EncodedImage(key=key, jpeg=None, problem=str(problem), source=source_signature(path))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=settings.quality, optimize=False)
    return EncodedImage(key=key, jpeg=buffer.getvalue(), height=image.height, width=image.width)


def _encode_task(job: tuple[str, str, ImageSettings]) -> EncodedImage:
    return encode_image(*job)


# ---------------------------------------------------------------- planning


def plan_shards(cohort: pd.DataFrame, shard_size: int) -> list[ShardSpec]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    specs = []
    for split in SPLITS:
        keys = sorted(cohort.loc[cohort["split"] == split, "key"])
        for index in range(math.ceil(len(keys) / shard_size)):
            specs.append(ShardSpec(split, index, tuple(keys[index * shard_size:(index + 1) * shard_size])))
    return specs


def plan_settings(settings: ImageSettings, shard_size: int) -> dict:
    """What `.parts/plan.json` records: the settings a rerun must share."""
    return dataclasses.asdict(settings) | {"shard_size": shard_size}


def check_settings(out: Path, settings: ImageSettings, shard_size: int) -> None:
    """Refuse a folder whose shards were written with other settings. Writes nothing."""
    plan_path = out / PARTS_DIR / PLAN_FILE
    if not plan_path.is_file():
        return
    previous, wanted = json.loads(plan_path.read_text()), plan_settings(settings, shard_size)
    if previous != wanted:
        differences = ", ".join(
            f"--{name.replace('_', '-')} {previous.get(name, 'unrecorded')} there, {value} now"
            for name, value in wanted.items() if previous.get(name) != value
        )
        raise CxrError(f"{out}: holds shards written with other settings ({differences}); "
                       "use another --out or delete it")


def shard_digest(payloads: list[bytes], settings: ImageSettings) -> str:
    """Digest of everything a shard holds but the source images: keys and `{key}.json`
    payloads (each carries its key) in order, and the image settings."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    for payload in payloads:
        digest.update(b"\n" + payload)
    return digest.hexdigest()


def _read_marker(out: Path, spec: ShardSpec) -> dict | None:
    marker = out / PARTS_DIR / f"{spec.name}.json"
    try:
        part = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None  # none yet, or not ours: the shard is written again
    return part if isinstance(part, dict) else None


def _needs_writing(out: Path, spec: ShardSpec, digest: str, rows: pd.DataFrame) -> bool:
    """Whether a rerun must (re)write this shard: no marker, other contents, a tar that is not
    the one recorded, or an unreadable source image that changed since."""
    part = _read_marker(out, spec)
    if part is None or part.get("digest") != digest:
        return True
    if part.get("shard") is not None and not _tar_matches(out / part["shard"], part):
        return True
    return any(item.get("source", "unrecorded") != source_signature(rows.at[item["key"], "path"])
               for item in part.get("unreadable", []))


def _tar_matches(path: Path, part: dict) -> bool:
    if not path.is_file() or ("bytes" in part and path.stat().st_size != part["bytes"]):
        return False
    return file_sha256(path) == part.get("sha256")


def _add_member_checksums(out: Path, part: dict, spec: ShardSpec) -> dict:
    """A marker written before members had a crc32 gets them from its (verified) tar."""
    if part["shard"] is None or all(CHECKSUM_COLUMN in member for member in part["members"]):
        return part
    with open(out / part["shard"], "rb") as tar:
        for member in part["members"]:
            member[CHECKSUM_COLUMN] = member_checksum(os.pread(tar.fileno(), member["nbytes"], member["offset"]))
    part["bytes"] = (out / part["shard"]).stat().st_size
    write_json(out / PARTS_DIR / f"{spec.name}.json", part)
    return part


def _is_shard_name(stem: str) -> bool:
    split, _, index = stem.rpartition("-")
    return split in SPLITS and len(index) == 6 and index.isdigit()


def _remove_unplanned_shards(out: Path, specs: list[ShardSpec]) -> None:
    """Delete tars, indexes and markers of shards a changed cohort no longer has."""
    planned = {spec.name for spec in specs}
    for path in [*out.glob("*.tar"), *out.glob("*.idx"), *(out / PARTS_DIR).glob("*.json")]:
        if _is_shard_name(path.stem) and path.stem not in planned:
            path.unlink()


# ---------------------------------------------------------------- writing one shard


def sample_payloads(rows: pd.DataFrame, keys: tuple[str, ...]) -> list[bytes]:
    """The `{key}.json` payload of each key, in order: labels (null = excluded from that task)
    and demographics. `rows` is the cohort indexed by key."""
    part = rows.loc[list(keys)]
    # Whole columns as Python values: a row-by-row pandas lookup would cost more than the
    # JSON itself, and every run computes the payloads of every shard for its digest.
    fields = [(field, part[field].tolist()) for field in SAMPLE_FIELDS]
    labels = [(task, part[task].tolist()) for task in TASKS]
    payloads = []
    for row in range(len(part)):
        record = {field: _plain(values[row]) for field, values in fields}
        record["labels"] = {task: _plain(values[row]) for task, values in labels}
        payloads.append(json.dumps(record, sort_keys=True).encode())
    return payloads


def _plain(value):
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return None
    return value.item() if hasattr(value, "item") else value


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    # No mtime, owner or mode differences between runs: byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def write_shard(out: Path, spec: ShardSpec, encoded: list[EncodedImage], payloads: list[bytes], digest: str) -> dict:
    """Write tar + idx + part file for one shard (`payloads`: the `{key}.json` of each
    encoded image, `digest`: its `shard_digest`); return its part record."""
    members: list[dict] = []
    unreadable: list[dict] = []
    index_lines: list[str] = []
    tar_path = out / f"{spec.name}.tar"
    needed = sum(_padded(len(image.jpeg)) + _padded(len(payload)) + 2 * tarfile.BLOCKSIZE
                 for image, payload in zip(encoded, payloads) if image.jpeg is not None)
    with atomic_path(tar_path, needed_bytes=needed) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for image, payload_json in zip(encoded, payloads, strict=True):
            if image.jpeg is None:
                unreadable.append({"key": image.key, "reason": "unreadable", "detail": image.problem,
                                   "source": image.source})
                continue
            entries = []
            for extension, payload in (("jpg", image.jpeg), ("json", payload_json)):
                name = f"{image.key}.{extension}"
                tar.addfile(_tar_member(name, len(payload)), io.BytesIO(payload))
                offset = tar.offset - _padded(len(payload))
                entries.append(f"{extension} {offset} {len(payload)} {name}")
                if extension == "jpg":
                    members.append({"key": image.key, "offset": offset, "nbytes": len(payload),
                                    CHECKSUM_COLUMN: member_checksum(payload),
                                    "height": image.height, "width": image.width})
            index_lines.append(" ".join(entries))
    if not members:
        tar_path.unlink()  # DALI cannot index an empty tar; the part records why
        (out / f"{spec.name}.idx").unlink(missing_ok=True)  # left by an earlier version of this shard
    else:
        write_bytes(out / f"{spec.name}.idx", f"v1.2 {len(members)}\n{chr(10).join(index_lines)}\n".encode())
    part = {
        "shard": f"{spec.name}.tar" if members else None,
        "sha256": file_sha256(tar_path) if members else None,
        "bytes": tar_path.stat().st_size if members else None,
        "members": members,
        "unreadable": unreadable,
        "digest": digest,
    }
    write_json(out / PARTS_DIR / f"{spec.name}.json", part)
    return part


# ---------------------------------------------------------------- the whole run


def _encoded_images(pool, rows: pd.DataFrame, keys: tuple[str, ...], settings: ImageSettings) -> Iterator[EncodedImage]:
    jobs = [(key, rows.at[key, "path"], settings) for key in keys]
    if pool is None:
        return map(_encode_task, jobs)
    return pool.imap(_encode_task, jobs, chunksize=8)


def write_shards(
    cohort: pd.DataFrame,
    out: Path,
    *,
    settings: ImageSettings = ImageSettings(),
    shard_size: int = 2000,
    workers: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Write every shard that is missing or whose contents changed, remove those the cohort
    no longer has; return the part records of all shards. Other settings are refused."""
    from tqdm import tqdm

    check_settings(out, settings, shard_size)
    specs = plan_shards(cohort, shard_size)
    write_json(out / PARTS_DIR / PLAN_FILE, plan_settings(settings, shard_size))
    _remove_unplanned_shards(out, specs)
    rows = cohort.set_index("key", drop=False)
    digests = {spec.name: shard_digest(sample_payloads(rows, spec.keys), settings) for spec in specs}
    todo = [spec for spec in specs if _needs_writing(out, spec, digests[spec.name], rows)]
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=sum(len(s.keys) for s in todo), unit="img", desc="sharding", disable=not progress)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 and todo else None
    try:
        for spec in todo:
            encoded = []
            for image in _encoded_images(pool, rows, spec.keys, settings):
                encoded.append(image)
                bar.update()
            write_shard(out, spec, encoded, sample_payloads(rows, spec.keys), digests[spec.name])
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return [_add_member_checksums(out, _read_marker(out, spec), spec) for spec in specs]


def manifest_from_parts(cohort: pd.DataFrame, parts: list[dict]) -> pd.DataFrame:
    records = [dict(member, shard=part["shard"]) for part in parts for member in part["members"]]
    placed = pd.DataFrame.from_records(
        records, columns=list(PLACEMENT_COLUMNS)
    ).astype({"offset": "int64", "nbytes": "int64", CHECKSUM_COLUMN: "int64", "height": "int32", "width": "int32"})
    manifest = cohort.merge(placed, on="key", how="inner", validate="one_to_one")
    return manifest.sort_values(["shard", "offset"], kind="stable").reset_index(drop=True)


def unreadable_from_parts(parts: list[dict]) -> pd.DataFrame:
    return pd.DataFrame.from_records(
        [item for part in parts for item in part["unreadable"]], columns=["key", "reason", "detail"]
    )
