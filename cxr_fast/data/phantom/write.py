"""Writing a phantom tree: images in parallel, then the tables, the truth file last (`generate_phantom`)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from cxr_fast.data.phantom.drawing import MIN_IMAGE_SIZE, draw_radiograph_with_regions
from cxr_fast.data.phantom.population import FINDINGS, image_hardness, sample_tables
from cxr_fast.data.phantom.regions import REGIONS_FOLDER, region_path, write_legend, write_regions
from cxr_fast.data.phantom.truth import phantom_truth
from cxr_fast.errors import CxrError, require_int
from cxr_fast.io import atomic_path, write_csv, write_json

# ------------------------------------------------------------------------------ file names

JPG_FOLDER = "mimic-cxr-jpg"
HOSP_FOLDER = Path("mimic-iv") / "hosp"
TRUTH_NAME = "phantom_truth.json"
METADATA_NAME = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT_NAME = "mimic-cxr-2.0.0-chexpert.csv.gz"
SPLIT_NAME = "mimic-cxr-2.0.0-split.csv.gz"
PATIENTS_NAME = "patients.csv.gz"
ADMISSIONS_NAME = "admissions.csv.gz"


# ------------------------------------------------------------------------------ writing


class _ImageJob(NamedTuple):
    index: int
    path: str
    regions_path: str
    findings: tuple[tuple[str, float], ...]
    hardness: float
    lateral: bool
    size: int
    seed: int


def _render(job: _ImageJob) -> None:
    rng = np.random.default_rng([job.seed, job.index])
    pixels, regions = draw_radiograph_with_regions(dict(job.findings), rng=rng, size=job.size,
                                                   hardness=job.hardness, lateral=job.lateral)
    with atomic_path(job.path) as tmp:
        Image.fromarray(pixels).save(tmp, format="JPEG", quality=90)
    write_regions(job.regions_path, regions, job.size)


def _image_jobs(images: pd.DataFrame, hardness: np.ndarray, *, root: Path, regions: Path, seed: int,
                size: int) -> list[_ImageJob]:
    strengths = images[list(FINDINGS)].to_numpy()
    names = np.array(FINDINGS)
    return [
        _ImageJob(index, os.fspath(root / path), os.fspath(region_path(regions, dicom_id)),
                  tuple(zip(names[row > 0].tolist(), row[row > 0].tolist())),
                  float(hard), bool(lateral), size, seed)
        for index, (path, dicom_id, row, hard, lateral) in enumerate(
            zip(images["path"].tolist(), images["dicom_id"].tolist(), strengths, hardness, images["lateral"].tolist()))
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
    workers = _default_workers() if workers is None else require_int("workers", workers, minimum=1)
    require_int("image_size", image_size, minimum=MIN_IMAGE_SIZE)
    tables = sample_tables(n_images, seed=seed, image_size=image_size)
    _prepare_output(out)
    jpg_root = out / JPG_FOLDER
    hardness = image_hardness(tables.images, bias=bias)
    regions_root = out / REGIONS_FOLDER
    jobs = _image_jobs(tables.images, hardness, root=jpg_root, regions=regions_root, seed=seed, size=image_size)
    _render_all(jobs, workers)
    _remove_stale_images(jpg_root / "files", keep={job.path for job in jobs}, suffix=".jpg")
    _remove_stale_images(regions_root, keep={job.regions_path for job in jobs}, suffix=".png")
    write_legend(regions_root)
    write_csv(jpg_root / METADATA_NAME, tables.metadata)
    write_csv(jpg_root / CHEXPERT_NAME, tables.chexpert)
    write_csv(jpg_root / SPLIT_NAME, tables.split)
    write_csv(out / HOSP_FOLDER / PATIENTS_NAME, tables.patients)
    write_csv(out / HOSP_FOLDER / ADMISSIONS_NAME, tables.admissions)
    truth = phantom_truth(tables, seed=seed, image_size=image_size, bias=bias)
    write_json(out / TRUTH_NAME, truth)
    return truth


_OUTPUT_ENTRIES = {JPG_FOLDER, HOSP_FOLDER.parts[0], TRUTH_NAME, REGIONS_FOLDER}


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


def _remove_stale_images(files: Path, *, keep: set[str], suffix: str) -> None:
    """A rerun into an old phantom folder must not leave the old run's images (or regions) behind."""
    for folder, _, names in os.walk(files):
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith(suffix) and path not in keep:
                os.unlink(path)


def _default_workers() -> int:
    """All the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
