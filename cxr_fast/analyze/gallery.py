"""Which images the report shows, and their pixels: the systematic misses and matched controls.

Per task the gallery holds the first PER_ERROR systematically misclassified images of each
kind (missed positives, false alarms), in systematic_images.csv's order (most models wrong,
then most confidently wrong), and for each kind CONTROLS correctly classified images of the
same label (at least `threshold` of the models right) matched on view: one control per shown
miss, of that miss's view, drawn at random (seeded by the task's name) while any is left.
`explain` computes heatmaps for exactly these images, and the reader-study export writes them.

Pixels come from the shards by the manifest's byte offsets (no source tree needed). The shard
folder is the one each prediction file records (`predict` writes it into the file's metadata),
or the one given.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast.analyze.inputs import TaskData
from cxr_fast.analyze.systematic import systematic_images
from cxr_fast.errors import CxrError
from cxr_fast.io import parquet_metadata
from cxr_fast.loading.payloads import read_manifest, read_payloads

PER_ERROR = 12   # systematic images shown per task and error kind (all in systematic_images.csv)
CONTROLS = 4     # correctly classified images shown beside each error kind, matched on view
THUMBNAIL_PX = 112
ROLES = {"false_negative": "missed positive", "false_positive": "false alarm",
         "control_positive": "correct positive", "control_negative": "correct negative"}
COLUMNS = ["task", "role", "rank", "key", "dicom_id", "label", "view", "sex", "age", "age_group", "race",
           "n_models", "share_wrong", "prob_min", "prob_median", "prob_max"]


def _image_rows(data: TaskData, positions: np.ndarray, role: str) -> pd.DataFrame:
    prob = data.prob[:, positions]
    rows = data.images.iloc[positions].reset_index(drop=True)
    return rows.assign(task=data.task, role=role, rank=np.arange(1, len(positions) + 1), n_models=len(data.archs),
                       share_wrong=(~data.correct[:, positions]).mean(axis=0), prob_min=prob.min(axis=0),
                       prob_median=np.median(prob, axis=0), prob_max=prob.max(axis=0)).reindex(columns=COLUMNS)


def _matched_controls(data: TaskData, misses: pd.DataFrame, *, label: bool, threshold: float, count: int) -> np.ndarray:
    """Positions of up to `count` correctly classified images of `label`, one per shown miss
    (in order) of the same view, at random without replacement."""
    rng = np.random.default_rng(zlib.crc32(f"{data.task}:{label}".encode()))
    right = (data.correct.mean(axis=0) >= threshold - 1e-9) & (data.label == label)
    views = data.images["view"].to_numpy()
    chosen: list[int] = []
    for view in misses["view"].tolist()[:count]:
        pool = np.flatnonzero(right & (views == view))
        pool = pool[~np.isin(pool, chosen)]
        if len(pool):
            chosen.append(int(rng.choice(pool)))
    return np.asarray(chosen, dtype=int)


def select_gallery(tasks: list[TaskData], *, threshold: float, per_error: int = PER_ERROR,
                   controls: int = CONTROLS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(shown images, counts): one row per shown image (COLUMNS; role = error kind or control)
    and per (task, error kind) how many systematic images there are and how many are shown."""
    frames, counts = [], []
    for data in tasks:
        listed = systematic_images(tasks=[data], threshold=threshold)
        position = pd.Series(np.arange(len(data.images)), index=data.images["key"])
        for error, label in (("false_negative", True), ("false_positive", False)):
            kind = listed[listed["error"] == error].head(per_error)
            positions = position[kind["key"]].to_numpy()
            misses = _image_rows(data, positions, error)
            matched = _matched_controls(data, misses, label=label, threshold=threshold, count=controls)
            frames += [misses, _image_rows(data, matched, "control_positive" if label else "control_negative")]
            counts.append({"task": data.task, "error": error, "systematic": int((listed["error"] == error).sum()),
                           "shown": len(misses)})
    shown = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    return shown, pd.DataFrame(counts, columns=["task", "error", "systematic", "shown"])


# ------------------------------------------------------------------ where the pixels are


def recorded_shards(files: list[str | Path]) -> Path | None:
    """The first shard folder that the prediction files record and that still exists."""
    for path in files:
        shards = parquet_metadata(path).get("shards")
        if shards and (Path(shards) / "manifest.parquet").is_file():
            return Path(shards)
    return None


def read_images(keys: list[str], shards: Path) -> dict[str, bytes]:
    """The stored JPEG bytes of each key found in the shard folder's manifest."""
    manifest = read_manifest(shards)
    rows = manifest[manifest["key"].isin(set(keys))].drop_duplicates("key").reset_index(drop=True)
    return dict(zip(rows["key"], (payload.tobytes() for payload in read_payloads(rows, shards))))


def thumbnail(jpeg: bytes, size: int = THUMBNAIL_PX, quality: int = 80) -> bytes:
    """A small JPEG of a stored image (long side `size`)."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as image:
        image = image.convert("L")
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def small_jpeg(path: Path, size: int = THUMBNAIL_PX, quality: int = 75) -> bytes | None:
    """An overlay PNG from explain, shrunk to a thumbnail JPEG (None if it cannot be read)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=quality)
    except (OSError, UnidentifiedImageError):
        return None
    return out.getvalue()


@dataclass
class Gallery:
    """What the report's gallery section shows; `note` says why images are missing, if they are."""

    shown: pd.DataFrame
    counts: pd.DataFrame
    thumbnails: dict[str, bytes] = field(default_factory=dict)              # key -> JPEG
    overlays: dict[tuple[str, str], list[tuple[str, bytes]]] = field(default_factory=dict)  # (task, key) -> [(arch, JPEG)]
    pointing: pd.DataFrame | None = None
    note: str = ""

    @property
    def has_images(self) -> bool:
        return bool(self.thumbnails)


OVERLAYS_PER_IMAGE = 3
EXPLAIN_FOLDER = "explain"


def build_gallery(*, tasks: list[TaskData], files: list[str | Path], threshold: float, images: bool = True,
                  shards: str | Path | None = None, explain_dir: str | Path | None = None) -> Gallery:
    """The gallery of the analysed tasks: selection always; pixels unless `images` is False or
    no shard folder is found (then `note` says so in one line); overlays from `explain_dir`."""
    shown, counts = select_gallery(tasks, threshold=threshold)
    gallery = Gallery(shown=shown, counts=counts)
    if not images:
        gallery.note = "Radiographs left out (--no-images)."
        return gallery
    folder = Path(shards) if shards else recorded_shards(files)
    if folder is None or not (folder / "manifest.parquet").is_file():
        where = f"{folder}" if folder else "the prediction files record none"
        gallery.note = (f"No radiographs: the shard folder was not found ({where}); "
                        "give it with --shards to see the images.")
        return gallery
    try:
        stored = read_images(shown["key"].drop_duplicates().tolist(), folder)
    except CxrError as error:
        gallery.note = f"No radiographs: {error}"
        return gallery
    gallery.thumbnails = {key: thumbnail(data) for key, data in stored.items()}
    if explain_dir is not None:
        gallery.overlays, gallery.pointing = _read_explanations(Path(explain_dir), shown, tasks)
    return gallery


def _read_explanations(explain_dir: Path, shown: pd.DataFrame, tasks: list[TaskData]):
    from cxr_fast.io import read_table

    overlays: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    if not explain_dir.is_dir():
        return overlays, None
    recipes = {data.task: list(zip(data.recipes, data.archs)) for data in tasks}
    for task, key in zip(shown["task"], shown["key"]):
        found = []
        for recipe, arch in sorted(recipes.get(task, [])):
            if len(found) == OVERLAYS_PER_IMAGE:
                break
            jpeg = small_jpeg(explain_dir / recipe / f"{key}.png")
            if jpeg is not None:
                found.append((arch, jpeg))
        overlays[task, key] = found
    pointing_file = explain_dir / "pointing.csv"
    pointing = read_table(pointing_file) if pointing_file.is_file() else None
    return overlays, pointing
