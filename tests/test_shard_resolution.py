"""Which shard folder a recipe reads: the smallest listed one stored at >= its load size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_fast.errors import CxrError
from cxr_fast.loading import with_shards_resolved
from cxr_fast.shard_folders import resolve_shards, stored_size
from cxr_fast.recipes import load_config


def sharded(folder: Path, size: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.parquet").write_bytes(b"")
    (folder / "meta.json").write_text(json.dumps({"arguments": {"size": size}}))
    return folder


def listing(*folders: Path) -> str:
    return ",".join(str(folder) for folder in folders)


def test_smallest_folder_that_is_large_enough(tmp_path):
    small, large = sharded(tmp_path / "s256", 256), sharded(tmp_path / "s448", 448)
    assert resolve_shards(listing(large, small), 73) == small
    assert resolve_shards(listing(large, small), 256) == small
    assert resolve_shards(listing(small, large), 257) == large
    assert resolve_shards(listing(small, large), 439) == large


def test_too_small_shards_are_refused_naming_the_size_to_shard_at(tmp_path):
    small = sharded(tmp_path / "s256", 256)
    with pytest.raises(CxrError) as error:
        resolve_shards(listing(small, tmp_path / "missing-448"), 439)
    message = str(error.value)
    assert "\n" not in message and "256 px" in message and "--size 439" in message and "shard_dataset.py" in message


def test_missing_folders_are_passed_over_until_none_is_left(tmp_path):
    large = sharded(tmp_path / "s448", 448)
    assert resolve_shards(listing(tmp_path / "absent", large), 100) == large
    with pytest.raises(CxrError, match="absent.*no shards found"):
        resolve_shards(listing(tmp_path / "absent"), 100)


def test_stored_size_falls_back_to_the_plan(tmp_path):
    folder = tmp_path / "shards"
    (folder / ".parts").mkdir(parents=True)
    (folder / ".parts" / "plan.json").write_text(json.dumps({"size": 320, "quality": 90, "shard_size": 10}))
    assert stored_size(folder) == 320
    assert stored_size(tmp_path / "nothing") is None


def test_recipes_resolve_by_their_load_size(tmp_path):
    small, large = sharded(tmp_path / "s256", 256), sharded(tmp_path / "s448", 448)
    both = listing(small, large)
    assert with_shards_resolved(load_config("effusion_convnext_base_384", {"shards": both})).shards == str(large)
    assert with_shards_resolved(load_config("effusion_mobilevit_xs", {"shards": both})).shards == str(large)
    assert with_shards_resolved(load_config("effusion_resnet50", {"shards": both})).shards == str(small)
    assert with_shards_resolved(load_config("effusion_test_resnet", {"shards": both, "image_size": 64})).shards == str(small)
    with pytest.raises(CxrError, match="--size 439"):
        with_shards_resolved(load_config("effusion_convnext_base_384", {"shards": str(small)}))


def test_training_refuses_shards_smaller_than_the_recipe(phantom_shards, tmp_path):
    from cxr_fast.train import train

    config = load_config("effusion_test_resnet", {"shards": str(phantom_shards), "image_size": 512, "logger": "none",
                                                   "weights_dir": str(tmp_path / "w"), "runs_dir": str(tmp_path / "r")})
    with pytest.raises(CxrError, match=r"--size 585"):
        train(config, progress_bar=False)
