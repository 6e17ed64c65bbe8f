"""`python -m cxr_fast.analyze export-review --task T --out DIR`: the gallery's images for a reader study.

    DIR/readers/images/<dicom_id>.png     each image at its stored resolution, named by dicom_id only
    DIR/readers/cases.csv                 dicom_id, demographics, view (no label, no model output), in
                                          an order that does not follow the gallery's roles
    DIR/readers/rating_sheet.csv          one blank row per image: reader_label, confidence (1-5),
                                          image_quality (1-5), comments
    DIR/heatmaps/<dicom_id>/<arch>.png    the models' heatmaps, where explain has run
    DIR/key/cases.csv                     for the analysis, not the readers: label, gallery role,
                                          demographics and every model's probability and vote
    DIR/README.txt                        what to hand to whom

Hand readers/ to the readers and nothing else: they rate blind to the label and to the models.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
from pathlib import Path

import pandas as pd

from cxr_fast.analyze.gallery import EXPLAIN_FOLDER, read_images, recorded_shards, select_gallery
from cxr_fast.analyze.inputs import TaskData, load_predictions, prediction_files, task_data
from cxr_fast.errors import CxrError
from cxr_fast.io import atomic_folder, write_csv

READER_COLUMNS = ["dicom_id", "sex", "age", "age_group", "race", "view"]
RATING_COLUMNS = ["dicom_id", "reader_label", "confidence", "image_quality", "comments"]
MARKER = "README.txt"


def _blind_order(frame: pd.DataFrame) -> pd.DataFrame:
    """An order fixed by the dicom_ids alone, unrelated to role or rank."""
    digest = frame["dicom_id"].map(lambda d: hashlib.sha256(str(d).encode()).hexdigest())
    return frame.assign(_order=digest).sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def answer_key(data: TaskData, shown: pd.DataFrame) -> pd.DataFrame:
    """Per shown image: label, role, demographics and each model's probability and vote."""
    position = pd.Series(range(len(data.images)), index=data.images["key"])[shown["key"]].to_numpy()
    key = shown.drop(columns=["rank"]).reset_index(drop=True)
    for index, arch in enumerate(data.archs):
        key[f"prob_{arch}"] = data.prob[index, position]
        key[f"vote_{arch}"] = data.pred[index, position].astype(int)
    return key


def _png(jpeg: bytes) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    with Image.open(io.BytesIO(jpeg)) as image:
        image.save(out, format="PNG")
    return out.getvalue()


def export_review(*, pred_dir: str | Path, task: str, out: str | Path, shards: str | Path | None = None,
                  explain_dir: str | Path | None = None, threshold: float = 0.8, split: str = "test") -> Path:
    pred_dir, out = Path(pred_dir), Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise CxrError(f"{out}: not empty and not a previous export (no {MARKER}); give a new or empty folder")
    tasks = {data.task: data for data in task_data(load_predictions(pred_dir=pred_dir, split=split))}
    if task not in tasks:
        raise CxrError(f"{pred_dir}: no predictions for task {task!r} (tasks: {', '.join(sorted(tasks))})")
    data = tasks[task]
    shown, _ = select_gallery([data], threshold=threshold)
    shown = shown.drop_duplicates("key").reset_index(drop=True)
    if shown.empty:
        raise CxrError(f"{pred_dir}: task {task!r} has no systematically misclassified image to review")
    folder = Path(shards) if shards else recorded_shards(prediction_files(pred_dir))
    if folder is None or not (folder / "manifest.parquet").is_file():
        raise CxrError(f"{folder or pred_dir}: shard folder of the images not found; give it with --shards")
    stored = read_images(shown["key"].tolist(), folder)
    explain_dir = Path(explain_dir) if explain_dir else pred_dir / EXPLAIN_FOLDER
    with atomic_folder(out) as tmp:
        (tmp / "readers" / "images").mkdir(parents=True)
        for key, dicom_id in zip(shown["key"], shown["dicom_id"]):
            if key not in stored:
                raise CxrError(f"{folder / 'manifest.parquet'}: image {key!r} not found; give the right --shards")
            (tmp / "readers" / "images" / f"{dicom_id}.png").write_bytes(_png(stored[key]))
            for recipe, arch in zip(data.recipes, data.archs):
                heatmap = explain_dir / recipe / f"{key}.png"
                if heatmap.is_file():
                    (tmp / "heatmaps" / str(dicom_id)).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(heatmap, tmp / "heatmaps" / str(dicom_id) / f"{arch}.png")
        readers = _blind_order(shown[READER_COLUMNS])
        write_csv(tmp / "readers" / "cases.csv", readers)
        write_csv(tmp / "readers" / "rating_sheet.csv",
                  pd.DataFrame({"dicom_id": readers["dicom_id"]}).reindex(columns=RATING_COLUMNS))
        write_csv(tmp / "key" / "cases.csv", answer_key(data, shown))
        (tmp / MARKER).write_text(__doc__.split("\n", 2)[2])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_fast.analyze export-review", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help="the task whose gallery to export (e.g. effusion)")
    parser.add_argument("--out", required=True, help="the export folder")
    parser.add_argument("--pred-dir", default="all_pred", help="prediction files (default: %(default)s)")
    parser.add_argument("--shards", help="shard folder of the images (default: the one the prediction files record)")
    parser.add_argument("--explain-dir", help="heatmaps (default: PRED_DIR/explain)")
    parser.add_argument("--systematic-threshold", type=float, default=0.8, help="as for the report (default: %(default)s)")
    parser.add_argument("--split", default="test", help="split (default: %(default)s)")
    args = parser.parse_args(argv)
    out = export_review(pred_dir=args.pred_dir, task=args.task, out=args.out, shards=args.shards,
                        explain_dir=args.explain_dir, threshold=args.systematic_threshold, split=args.split)
    print(f"reader study -> {out} (hand {out / 'readers'} to the readers)")
    return 0
