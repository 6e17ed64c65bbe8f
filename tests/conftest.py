"""Shared fixtures: one small phantom data set and its shards, built once per test session.

Sizes follow the CPU budget: a few hundred images drawn at 128 px, shards at 80 px, models
at 64 px (`load_size` 73 with the default 0.875 eval crop).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")

PHANTOM_IMAGES = 500
SHARD_PIXELS = 80


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    from cxr_fast.data.phantom import generate_phantom

    root = tmp_path_factory.mktemp("phantom")
    generate_phantom(root, n_images=PHANTOM_IMAGES, seed=0, image_size=128, workers=2)
    return root


def shard_arguments(phantom_root: Path, out: Path, *extra: str) -> list[str]:
    return ["--source", "mimic", "--root", str(phantom_root / "mimic-cxr-jpg"),
            "--demographics", str(phantom_root / "mimic-iv"), "--out", str(out),
            "--size", str(SHARD_PIXELS), "--shard-size", "64", "--workers", "2", "--no-progress", *extra]


@pytest.fixture(scope="session")
def phantom_shards(phantom_root, tmp_path_factory) -> Path:
    from cxr_fast.data import shard_dataset

    out = tmp_path_factory.mktemp("shards")
    assert shard_dataset.main(shard_arguments(phantom_root, out)) == 0
    return out
