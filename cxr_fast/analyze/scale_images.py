"""Images for the analysis at study size: a small shard set and heatmaps for the simulated study.

The simulated prediction files (scale_bench) have no radiographs behind them. So that the
benchmark measures the gallery as a study's report pays for it (reading thumbnails from the
shards by manifest offset, shrinking them, embedding them and a few models' heatmaps), this
writes, once per simulated study:

    FOLDER/shards/manifest.parquet   every simulated key, pointing into ...
    FOLDER/shards/images.bin         DISTINCT phantom radiographs at 256 px, concatenated JPEGs
    FOLDER/explain/<recipe>/<key>.png  overlays of the first OVERLAY_MODELS recipes of each task for
                                     the gallery's images (explain's own overlay, a drawn heatmap)

Each gallery image is a real 256 px JPEG and a real overlay PNG, so the report's size and the
gallery's time are those of a study's; only the pixels repeat (DISTINCT different ones).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

DISTINCT = 64
STORED_PX = 256
OVERLAY_MODELS = 3


def _jpegs(n: int, size: int) -> list[bytes]:
    from PIL import Image

    from cxr_fast.data.phantom import draw_radiograph

    out = []
    for index in range(n):
        pixels = draw_radiograph({"effusion": index % 2 == 0}, rng=np.random.default_rng([7, index]), size=size)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_shards(folder: Path, keys: list[str], jpegs: list[bytes]) -> Path:
    from cxr_fast.io import write_bytes, write_parquet

    offsets = np.cumsum([0] + [len(data) for data in jpegs])[:-1]
    pick = np.arange(len(keys)) % len(jpegs)
    write_bytes(folder / "images.bin", b"".join(jpegs))
    manifest = pd.DataFrame({"key": keys, "split": "test", "shard": "images.bin", "offset": offsets[pick].astype(np.int64),
                             "nbytes": np.array([len(data) for data in jpegs], dtype=np.int64)[pick]})
    write_parquet(folder / "manifest.parquet", manifest)
    return folder


def write_overlays(folder: Path, pred_dir: Path, jpegs: list[bytes], position: dict[str, int], *,
                   size: int = STORED_PX, threshold: float = 0.8) -> None:
    """The overlays the gallery would embed: the first OVERLAY_MODELS recipes of each task."""
    from PIL import Image

    from cxr_fast.analyze.gallery import select_gallery
    from cxr_fast.analyze.inputs import load_predictions, task_data
    from cxr_fast.explain.run import overlay_png

    tasks = task_data(load_predictions(pred_dir=pred_dir, split="test"))
    shown, _ = select_gallery(tasks, threshold=threshold)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for data in tasks:
        keys = shown.loc[shown["task"] == data.task, "key"].drop_duplicates().tolist()
        for recipe in sorted(data.recipes)[:OVERLAY_MODELS]:
            target = folder / recipe
            target.mkdir(parents=True, exist_ok=True)
            for number, key in enumerate(keys):
                image = np.asarray(Image.open(io.BytesIO(jpegs[position[key] % len(jpegs)])))
                centre = (0.3 + 0.4 * ((number * 7) % 5) / 4, 0.3 + 0.4 * ((number * 3) % 5) / 4)
                heat = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 0.02).astype(np.float32)
                (target / f"{key}.png").write_bytes(overlay_png(image, heat))


def study_images(pred_dir: Path, cache: Path, *, distinct: int = DISTINCT, size: int = STORED_PX) -> tuple[Path, Path]:
    """(shard folder, explain folder) for a simulated prediction folder, built once."""
    folder = cache / f"{pred_dir.name}-images"
    done = folder / ".complete"
    if not done.exists():
        from cxr_fast.analyze.inputs import prediction_files

        keys = sorted(pd.read_parquet(prediction_files(pred_dir)[0], columns=["key"])["key"])
        jpegs = _jpegs(distinct, size)
        write_shards(folder / "shards", keys, jpegs)
        write_overlays(folder / "explain", pred_dir, jpegs, {key: i for i, key in enumerate(keys)}, size=size)
        done.write_text("")
    return folder / "shards", folder / "explain"
