"""The report's gallery, explain's files and the reader-study export, on trained tiny models."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_fast.analyze.__main__ import main as analyze_main
from cxr_fast.analyze.gallery import PER_ERROR
from cxr_fast.analyze.review import READER_COLUMNS, RATING_COLUMNS
from cxr_fast.errors import run_cli
from cxr_fast.explain.__main__ import main as explain_main
from cxr_fast.predict import predict
from cxr_fast.recipes import load_config
from cxr_fast.train import train


RECIPES = ("edema_test_resnet", "edema_test_convnext")
LOAD_SIZE = 73  # 64 px models read a 73 px square (eval crop 0.875)


@pytest.fixture(scope="module")
def study(phantom_shards, tmp_path_factory) -> Path:
    """Two trained edema models, their test predictions and their heatmaps."""
    root = tmp_path_factory.mktemp("gallery")
    for recipe in RECIPES:
        settings = [f"shards={phantom_shards}", f"weights_dir={root / 'weights'}", f"runs_dir={root / 'runs'}",
                    "epochs=1", "batch_size=32", "logger=none"]
        train(load_config(recipe, settings), progress_bar=False)
        predict(recipe, {"shards": str(phantom_shards), "weights_dir": str(root / "weights")}, out_dir=root / "pred")
    assert explain_main(["--pred-dir", str(root / "pred")]) == 0
    return root


def _report(study: Path, out: Path, *extra: str) -> str:
    assert analyze_main(["--pred-dir", str(study / "pred"), "--out", str(out), "--bootstrap", "20", *extra]) == 0
    return (out / "index.html").read_text()


def _shown(page: str, roles: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(key, role) for key, role in re.findall(r'data-key="([^"]+)" data-task="[^"]+" data-role="([^"]+)"', page)
            if role in roles]


@pytest.mark.slow
def test_explain_writes_one_array_of_the_image_shape_and_one_overlay_per_recipe_and_image(study):
    gallery_keys = set(pd.read_csv(study / "pred" / "explain" / "explained.csv")["recipe"])
    assert gallery_keys == set(RECIPES)
    for recipe in RECIPES:
        arrays = sorted((study / "pred" / "explain" / recipe).glob("*.npy"))
        assert arrays and len(arrays) == len(list((study / "pred" / "explain" / recipe).glob("*.png")))
        for path in arrays[:5]:
            heat = np.load(path, allow_pickle=False)
            assert heat.shape == (LOAD_SIZE, LOAD_SIZE) and heat.dtype == np.float32
            assert 0 <= heat.min() and heat.max() <= 1 + 1e-6
            assert Image.open(path.with_suffix(".png")).size == (LOAD_SIZE, LOAD_SIZE)
    pointing = pd.read_csv(study / "pred" / "explain" / "pointing.csv")  # the phantom's regions were found
    assert set(pointing["recipe"]) == set(RECIPES) and (pointing["n_images"] > 0).all()
    assert ((pointing["chance"] > 0) & (pointing["chance"] < 1)).all()


@pytest.mark.slow
def test_the_report_shows_the_systematic_images_with_heatmaps_and_the_data_use_warning(study, tmp_path):
    page = _report(study, tmp_path / "report")
    listed = pd.read_csv(tmp_path / "report" / "systematic_images.csv")
    expected = [(key, error) for _, part in listed.groupby(["task", "error"], sort=False)
                for key, error in zip(part["key"].head(PER_ERROR), part["error"].head(PER_ERROR))]
    shown = _shown(page, ("false_negative", "false_positive"))
    assert sorted(shown) == sorted(expected) and shown
    assert page.count('<img alt="radiograph') == len(set(key for key, _ in _shown(page, (
        "false_negative", "false_positive", "control_positive", "control_negative"))))
    assert 'alt="heatmap of test_resnet"' in page and 'alt="heatmap of test_convnext"' in page
    assert page.index('class="dua"') < page.index("<h2>Headline findings")
    assert "maximum inside the drawn finding" in page  # the pointing line on phantom data
    controls = pd.read_csv(tmp_path / "report" / "gallery.csv")
    for role, label in (("control_positive", 1), ("control_negative", 0)):
        assert (controls.loc[controls["role"] == role, "label"] == label).all()


@pytest.mark.slow
def test_no_images_leaves_every_radiograph_out(study, tmp_path):
    page = _report(study, tmp_path / "report", "--no-images")
    assert "<img alt=\"radiograph" not in page and "heatmap of" not in page and 'class="dua"' not in page
    assert "Radiographs left out (--no-images)." in page and _shown(page, ("false_negative", "false_positive"))


@pytest.mark.slow
def test_shards_that_cannot_be_found_cost_one_line_and_nothing_else(study, tmp_path):
    page = _report(study, tmp_path / "report", "--shards", str(tmp_path / "gone"))
    assert page.count("No radiographs: the shard folder was not found") == 1
    assert "<img alt=\"radiograph" not in page and "<h2>Adjusted for the other attributes</h2>" in page


@pytest.mark.slow
def test_export_review_keeps_labels_and_votes_away_from_the_readers(study, tmp_path):
    out = tmp_path / "review"
    assert analyze_main(["export-review", "--task", "edema", "--out", str(out), "--pred-dir", str(study / "pred")]) == 0
    readers = pd.read_csv(out / "readers" / "cases.csv")
    assert list(readers.columns) == READER_COLUMNS
    key = pd.read_csv(out / "key" / "cases.csv")
    assert {"label", "role", "prob_test_resnet", "vote_test_resnet", "prob_test_convnext", "vote_test_convnext"} <= set(key.columns)
    assert sorted(readers["dicom_id"]) == sorted(key["dicom_id"])
    sheet = pd.read_csv(out / "readers" / "rating_sheet.csv")
    assert list(sheet.columns) == RATING_COLUMNS and sheet.drop(columns="dicom_id").isna().all().all()
    images = sorted(path.stem for path in (out / "readers" / "images").glob("*.png"))
    assert images == sorted(readers["dicom_id"])
    assert Image.open(out / "readers" / "images" / f"{images[0]}.png").size == (80, 80)  # stored resolution
    assert {path.name for path in (out / "heatmaps" / images[0]).glob("*.png")} == {"test_resnet.png", "test_convnext.png"}
    assert sorted(path.name for path in out.iterdir()) == ["README.txt", "heatmaps", "key", "readers"]


@pytest.mark.slow
def test_export_review_of_an_unknown_task_is_one_line(study, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(analyze_main, ["export-review", "--task", "fracture", "--out", str(tmp_path / "x"),
                               "--pred-dir", str(study / "pred")])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert "no predictions for task 'fracture'" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_the_scale_bench_images_cover_every_key_and_feed_the_gallery(tmp_path):
    """Not slow: a tiny simulated study gets shards and heatmaps the gallery reads."""
    from cxr_fast.analyze.gallery import OVERLAYS_PER_IMAGE, build_gallery
    from cxr_fast.analyze.inputs import load_predictions, prediction_files, task_data
    from cxr_fast.analyze.scale_images import study_images
    from cxr_fast.analyze.simulate import PlantedMiss, simulate_predictions, write_prediction_files

    pred_dir = tmp_path / "pred"
    predictions = simulate_predictions(tasks=("effusion", "edema"), archs=("a1", "a2", "a3", "a4"), n_images=300,
                                       images_per_subject=2, planted=PlantedMiss(), seed=0)
    write_prediction_files(predictions=predictions, pred_dir=pred_dir)
    shards, explain = study_images(pred_dir, tmp_path, distinct=4, size=32)
    tasks = task_data(load_predictions(pred_dir=pred_dir))
    gallery = build_gallery(tasks=tasks, files=prediction_files(pred_dir), threshold=0.8, shards=shards,
                            explain_dir=explain)
    assert not gallery.note and len(gallery.shown)
    assert set(gallery.thumbnails) == set(gallery.shown["key"])
    assert all(len(gallery.overlays[task, key]) == min(OVERLAYS_PER_IMAGE, 4)
               for task, key in zip(gallery.shown["task"], gallery.shown["key"]))
    manifest = pd.read_parquet(shards / "manifest.parquet")
    assert set(manifest["key"]) == set(predictions["key"])


@pytest.mark.slow
def test_a_recipe_without_checkpoint_is_one_line_and_the_others_are_explained(study, tmp_path, capsys):
    from cxr_fast.io import parquet_metadata, write_parquet

    pred = tmp_path / "pred"
    pred.mkdir()
    source = study / "pred" / "edema_test_resnet.parquet"
    table = pd.read_parquet(source)
    write_parquet(pred / source.name, table, metadata=parquet_metadata(source))
    write_parquet(pred / "edema_test_efficientnet.parquet",
                  table.assign(arch="test_efficientnet", recipe="edema_test_efficientnet"), metadata=parquet_metadata(source))
    assert explain_main(["--pred-dir", str(pred)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("edema_test_efficientnet: not explained: no best checkpoint in ") for line in lines)
    explained = pd.read_csv(pred / "explain" / "explained.csv").set_index("recipe")
    assert explained.loc["edema_test_resnet", "status"] == "explained"
    assert not (pred / "explain" / "edema_test_efficientnet").exists()


def test_the_analysis_with_its_gallery_does_not_import_torch():
    """torch would add its memory to the analysis and to every worker process it forks."""
    import subprocess
    import sys

    code = ("import sys, cxr_fast.analyze.__main__, cxr_fast.analyze.gallery, cxr_fast.analyze.review, "
            "cxr_fast.loading.payloads; print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
