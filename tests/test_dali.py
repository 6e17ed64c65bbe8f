"""The `dali` loader (CPU mode) against the `resident` loader, and the fallback without DALI.

Tolerances: both loaders decode with libjpeg-turbo (torchvision and DALI's CPU decoder), so
the decoded pixels are identical; they differ only where an antialiased resize to the
stored square rounds a float to uint8 (torch rounds half to even, DALI half away from
zero). Measured on the phantom shards: mean |difference| ~1e-5, maximum exactly one grey
level (1 / 255 / STD = 0.0174 in normalised units). The train path adds bilinear warps in
float32 (grid_sample vs fn.warp_affine) on top of that, ~1e-4 per pixel. The bounds below
allow twice that (two grey levels), so they would catch any geometric mistake (half a
pixel of shift is a mean difference of ~0.05) while not depending on rounding details.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

import cxr_fast.loading as loading
from cxr_fast.errors import CxrError
from cxr_fast.loading import choose_loader, dali_install_hint, make_loader
from cxr_fast.loading.augment import STD, AugmentSettings
from cxr_fast.loading.payloads import read_manifest
from cxr_fast.loading.resident import ResidentLoader

needs_dali = pytest.mark.skipif(not loading.dali_available(), reason="nvidia-dali is not installed")

GREY_LEVEL = 1 / 255 / STD   # one uint8 step in normalised units
CPU = torch.device("cpu")
SETTINGS = AugmentSettings(image_size=64)  # load_size 73 from 80 px shards: the resize path


def train_rows(shards) -> pd.DataFrame:
    manifest = pd.read_parquet(shards / "manifest.parquet")
    return manifest[manifest["split"] == "train"].reset_index(drop=True)


def both(rows, shards, settings=SETTINGS, batch_size=16, dali_mode="affine"):
    """The resident loader with its full (GPU) kernel, and the dali loader in CPU mode."""
    from cxr_fast.loading.dali import DaliLoader

    resident = ResidentLoader(rows, shards, settings, device=CPU, batch_size=batch_size, mode="affine")
    dali = DaliLoader(rows, shards, settings, device=CPU, batch_size=batch_size, threads=2, mode=dali_mode)
    return resident, dali


def assert_close(a: torch.Tensor, b: torch.Tensor, *, mean_levels: float, max_levels: float) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32 and a.device == b.device
    difference = (a - b).abs()
    assert float(difference.mean()) < mean_levels * GREY_LEVEL, float(difference.mean())
    assert float(difference.max()) <= max_levels * GREY_LEVEL + 1e-5, float(difference.max())


@needs_dali
@pytest.mark.parametrize("image_size", [64, 70])  # 70: load_size 80 = the shards' size, no resize
def test_eval_batches_match_resident(phantom_shards, image_size):
    rows = train_rows(phantom_shards)
    settings = AugmentSettings(image_size=image_size)
    resident, dali = both(rows, phantom_shards, settings)
    order = np.random.default_rng(0).permutation(len(rows))[:50]  # ragged last batch too
    a, b = list(resident.eval_batches(order)), list(dali.eval_batches(order))
    assert [x.shape for x in a] == [x.shape for x in b]
    assert b[0].shape == (16, 1, image_size, image_size) and b[-1].shape[0] == 50 % 16
    assert all(x.is_contiguous() for x in b)
    assert_close(torch.cat(a), torch.cat(b), mean_levels=0.05, max_levels=2)


@needs_dali
def test_train_batches_match_resident_affine_kernel(phantom_shards):
    """Same (seed, epoch, batch) -> same draws -> same crops, rotations and jitter."""
    rows = train_rows(phantom_shards)
    resident, dali = both(rows, phantom_shards)
    order = np.random.default_rng(1).permutation(len(rows))[:40]
    a, b = list(resident.train_batches(order, epoch=2)), list(dali.train_batches(order, epoch=2))
    assert len(a) == len(b) == 2  # full batches only
    assert_close(torch.cat(a), torch.cat(b), mean_levels=0.05, max_levels=2)


@needs_dali
@pytest.mark.parametrize("hflip", [False, True])
def test_crop_mode_is_the_affine_kernel_without_rotation(phantom_shards, hflip):
    """DALI's CPU default (`crop`: one ROI resize per sample) = augment._affine_crop at angle 0."""
    rows = train_rows(phantom_shards)
    settings = AugmentSettings(image_size=64, rotate_degrees=0.0, hflip=hflip)
    resident, dali = both(rows, phantom_shards, settings, dali_mode="crop")
    assert dali.mode == "crop"
    order = np.random.default_rng(2).permutation(len(rows))[:32]
    a, b = torch.cat(list(resident.train_batches(order, epoch=4))), torch.cat(list(dali.train_batches(order, epoch=4)))
    assert_close(a, b, mean_levels=0.05, max_levels=2)


@needs_dali
def test_default_modes_follow_the_device(phantom_shards):
    from cxr_fast.loading.dali import DaliLoader

    rows = train_rows(phantom_shards).head(4)
    assert DaliLoader(rows, phantom_shards, SETTINGS, device=CPU, batch_size=2).mode == "crop"
    with pytest.raises(ValueError, match="unknown augmentation mode"):
        DaliLoader(rows, phantom_shards, SETTINGS, device=CPU, batch_size=2, mode="warp")


@needs_dali
def test_train_batches_deterministic_per_epoch(phantom_shards):
    from cxr_fast.loading.dali import DaliLoader

    rows = train_rows(phantom_shards)
    dali = DaliLoader(rows, phantom_shards, SETTINGS, device=CPU, batch_size=16)  # CPU default: crop
    order = np.arange(48)
    first = torch.cat(list(dali.train_batches(order, epoch=0)))
    abandoned = dali.train_batches(order, epoch=5)
    next(abandoned)
    abandoned.close()  # a pass left half-way must not leak batches into the next one
    again = torch.cat(list(dali.train_batches(order, epoch=0)))
    other = torch.cat(list(dali.train_batches(order, epoch=1)))
    assert torch.equal(first, again)
    assert float((first - other).abs().mean()) > 0.05
    assert first.shape == (48, 1, 64, 64)


@needs_dali
def test_non_square_images_match_resident(tmp_path):
    """Stored square = short side to L + centre crop, also for portrait/landscape/upscaled images."""
    from PIL import Image

    blob, records = bytearray(), []
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate([(80, 97), (101, 80), (90, 123), (257, 80), (60, 64)]):
        yy, xx = np.mgrid[:height, :width]
        pixels = 127 + 60 * np.sin(xx / 7.0) * np.cos(yy / 5.0) + rng.normal(0, 10, (height, width))
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        blob += b"pad"  # payloads are read by offset alone: no tar needed for this test
        records.append({"key": f"k{i}", "split": "train", "shard": "blob.bin", "offset": len(blob),
                        "nbytes": len(buffer.getvalue()), "height": height, "width": width})
        blob += buffer.getvalue()
    (tmp_path / "blob.bin").write_bytes(bytes(blob))
    rows = pd.DataFrame(records)
    resident, dali = both(rows, tmp_path, batch_size=5)
    assert_close(torch.cat(list(resident.eval_batches(np.arange(5)))), torch.cat(list(dali.eval_batches(np.arange(5)))),
                 mean_levels=0.05, max_levels=2)
    assert_close(torch.cat(list(resident.train_batches(np.arange(5), epoch=0))),
                 torch.cat(list(dali.train_batches(np.arange(5), epoch=0))), mean_levels=0.05, max_levels=2)
    # Without height/width columns the loader reads them from the JPEG headers.
    from cxr_fast.loading.dali import DaliLoader

    headerless = DaliLoader(rows.drop(columns=["height", "width"]), tmp_path, SETTINGS, device=CPU, batch_size=5)
    assert np.allclose(headerless.roi_end, dali.roi_end)


@needs_dali
def test_truncated_shard_is_a_clear_error(tmp_path):
    from cxr_fast.loading.dali import DaliLoader

    (tmp_path / "short.tar").write_bytes(b"\0" * 100)
    rows = pd.DataFrame([{"key": "a", "shard": "short.tar", "offset": 50, "nbytes": 500, "height": 80, "width": 80}])
    loader = DaliLoader(rows, tmp_path, SETTINGS, device=CPU, batch_size=1)
    with pytest.raises(CxrError, match="truncated shard"):
        list(loader.eval_batches(np.arange(1)))
    with pytest.raises(CxrError, match="cannot open shard"):
        DaliLoader(rows.assign(shard="missing.tar"), tmp_path, SETTINGS, device=CPU, batch_size=1)


def training_config(shards, tmp_path, **overrides):
    from cxr_fast.recipes import load_config

    settings = {"shards": str(shards), "epochs": 3, "batch_size": 16, "image_size": 64, "lr": 3e-3,
                "warmup_epochs": 0.5, "precision": "fp32", "compile": "off", "logger": "none",
                "weights_dir": str(tmp_path / "weights"), "runs_dir": str(tmp_path / "runs")}
    return load_config("effusion_test_resnet", {**settings, **overrides})


@pytest.mark.slow
@needs_dali
def test_training_with_dali_loader_learns(phantom_shards, tmp_path):
    from cxr_fast.train import train

    result = train(training_config(phantom_shards, tmp_path, loader="dali"), progress_bar=False)
    assert result["loader"] == "dali" and result["epochs"] == 3
    losses = [record["train_loss"] for record in result["history"]]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses


def test_without_dali_auto_picks_host_and_dali_explains(phantom_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "dali_available", lambda: False)
    settings = AugmentSettings(image_size=64)
    # A budget far too small for resident would pick dali after host - but dali is missing.
    assert choose_loader("auto", n_images=1000, settings=settings, budget_bytes=lambda: 1) == "host"
    with pytest.raises(CxrError) as error:
        choose_loader("dali", n_images=10, settings=settings, budget_bytes=lambda: 10**12)
    assert str(error.value) == dali_install_hint()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "pip install nvidia-dali-cuda120 " in dali_install_hint()  # the wheel for torch's CUDA major
    rows = read_manifest(phantom_shards).head(4)
    with pytest.raises(CxrError, match="pip install nvidia-dali"):
        make_loader("dali", rows, phantom_shards, settings, device=CPU, batch_size=2)

    from cxr_fast.train import train

    with pytest.raises(CxrError, match="pip install nvidia-dali"):
        train(training_config(phantom_shards, tmp_path, loader="dali"), progress_bar=False)
    summary = train(training_config(phantom_shards, tmp_path, loader="auto", epochs=1, device_memory_budget=1e-9),
                    progress_bar=False)
    assert summary["loader"] == "host"  # the split fits the host, not the (tiny) device budget
