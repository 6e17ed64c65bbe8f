"""Heatmaps for the gallery's images: one .npy and one overlay PNG per (recipe, image).

    OUT/<recipe>/<key>.npy   float32 (L, L): the Grad-CAM of the model's positive logit on the
                             L x L square it reads (eval: the centre image_size crop of it; the
                             border the crop leaves out is 0), scaled to [0, 1] per image
    OUT/<recipe>/<key>.png   the same square in grey with the heatmap over it
    OUT/explained.csv        per recipe: explained or why not, the layer, how many images
    OUT/pointing.csv         per recipe, where the shards come from a phantom that recorded
                             where it drew each finding: the pointing score (pointing.py)

OUT defaults to <pred-dir>/explain, which `python -m cxr_fast.analyze` reads into its gallery.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr_fast.analyze.gallery import EXPLAIN_FOLDER, select_gallery
from cxr_fast.analyze.inputs import TaskData, load_predictions, task_data
from cxr_fast.data.phantom.regions import finding_mask, region_path, regions_root_of_shards
from cxr_fast.errors import CxrError, one_line
from cxr_fast.explain.cam import Explainer, Unexplainable
from cxr_fast.explain.pointing import crop_window, pointing_score
from cxr_fast.io import atomic_folder, parquet_metadata, write_csv
from cxr_fast.loading.augment import AugmentSettings, eval_transform
from cxr_fast.loading.decode import decode_rows
from cxr_fast.loading.payloads import read_manifest

POINTING_IMAGES = 48  # positives per recipe scored against the drawn regions (phantom only)
BATCH = 16


@dataclass(frozen=True)
class Source:
    recipe: str
    task: str
    arch: str
    file: str


def sources(predictions: pd.DataFrame) -> list[Source]:
    files = predictions.groupby("source", sort=True, observed=True).agg(
        recipe=("recipe", "first"), task=("task", "first"), arch=("arch", "first")).reset_index()
    return [Source(str(r.recipe), str(r.task), str(r.arch), str(r.source)) for r in files.itertuples()]


def squares(keys: list[str], shards: Path, load_size: int) -> torch.Tensor:
    """uint8 [N, 1, L, L]: the images as the model's loader holds them, in `keys` order."""
    manifest = read_manifest(shards).drop_duplicates("key").set_index("key", drop=False)
    missing = [key for key in keys if key not in manifest.index]
    if missing:
        raise CxrError(f"{shards / 'manifest.parquet'}: {len(missing)} image(s) of the predictions are not in "
                       f"these shards, e.g. {missing[0]!r}; give the shard folder they came from with --shards")
    rows = manifest.loc[keys].reset_index(drop=True)
    return decode_rows(rows, shards, load_size, torch.device("cpu"))


def heatmaps(explainer: Explainer, images: torch.Tensor, settings: AugmentSettings, device: torch.device) -> np.ndarray:
    """float32 [N, L, L]: each image's CAM placed on its L x L square (0 outside the crop)."""
    size, load = settings.image_size, images.shape[-1]
    out = np.zeros((len(images), load, load), dtype=np.float32)
    for start in range(0, len(images), BATCH):
        batch = eval_transform(images[start:start + BATCH].to(device), settings)
        crop_window(out[start:start + BATCH], size)[...] = explainer.heatmaps(batch)
    return out


def overlay_png(image: np.ndarray, heatmap: np.ndarray) -> bytes:
    """The grey square with the heatmap in colour over it (alpha grows with the heat)."""
    import io

    from matplotlib import colormaps
    from PIL import Image

    grey = np.repeat(image[..., None].astype(np.float32) / 255, 3, axis=-1)
    colour = colormaps["jet"](heatmap)[..., :3]
    alpha = 0.55 * heatmap[..., None]
    blended = np.clip((1 - alpha) * grey + alpha * colour, 0, 1)
    out = io.BytesIO()
    Image.fromarray((blended * 255).round().astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _safe_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def explain_recipe(source: Source, keys: list[str], data: TaskData, *, out: Path, overrides: dict,
                   shards: str | None, device: torch.device) -> tuple[dict, dict | None]:
    """Write one recipe's heatmaps; return its explained.csv row and its pointing row (or None)."""
    from cxr_fast.predict import load_trained
    from cxr_fast.recipes import load_config

    recorded = parquet_metadata(source.file)
    settings_over = dict(overrides)
    if "weights_dir" not in settings_over and recorded.get("weights_dir"):
        settings_over["weights_dir"] = recorded["weights_dir"]
    shard_folder = shards or recorded.get("shards")
    if not shard_folder:
        raise CxrError(f"{source.file}: records no shard folder (written before predict recorded it); give --shards")
    settings_over["shards"] = str(shard_folder)
    row = {"recipe": source.recipe, "task": source.task, "arch": source.arch, "layer": "", "n_images": 0, "status": ""}
    weights = Path(settings_over.get("weights_dir", load_config(source.recipe).weights_dir)) / source.recipe
    if not (weights / "best.safetensors").is_file():
        row["status"] = f"not explained: no best checkpoint in {weights}"
        return row, None
    config, _, model = load_trained(source.recipe, settings_over)
    settings = AugmentSettings.from_config(config)
    model = model.to(device).eval()
    folder_shards = Path(config.shards)
    images = squares(keys, folder_shards, settings.load_size)
    try:
        explainer = Explainer(model, settings.image_size, source.arch)
        row["layer"] = explainer.layer.name
        maps = heatmaps(explainer, images, settings, device)
    except (Unexplainable, RuntimeError, ValueError) as error:  # an arch whose layers do not map
        row["status"] = f"not explained: {one_line(error)}"
        return row, None
    with atomic_folder(out / source.recipe) as folder:
        for key, image, heat in zip(keys, images[:, 0].numpy(), maps):
            np.save(folder / f"{_safe_name(key)}.npy", heat, allow_pickle=False)
            (folder / f"{_safe_name(key)}.png").write_bytes(overlay_png(image, heat))
    row.update(n_images=len(keys), status="explained")
    return row, _pointing_row(source, data, explainer, folder_shards, settings, device)


def _pointing_row(source: Source, data: TaskData, explainer: Explainer, shards: Path,
                  settings: AugmentSettings, device: torch.device) -> dict | None:
    """The pointing score on up to POINTING_IMAGES positives, where the phantom drew regions."""
    rng = np.random.default_rng(zlib.crc32(source.task.encode()))
    positives = np.flatnonzero(data.label)
    chosen = np.sort(rng.choice(positives, size=min(POINTING_IMAGES, len(positives)), replace=False))
    score = score_pointing(explainer, data.images.iloc[chosen], source.task, shards, settings, device)
    return None if score is None else {"recipe": source.recipe, "task": source.task, "arch": source.arch, **score}


def score_pointing(explainer: Explainer, images: pd.DataFrame, task: str, shards: Path, settings: AugmentSettings,
                   device: torch.device) -> dict | None:
    """pointing.pointing_score of the heatmaps of `images` (rows with dicom_id and key) against
    the regions the phantom drew for `task`, on the part of the square the model sees; None
    where the shards come from no phantom with regions, or none of the images has one."""
    root = regions_root_of_shards(shards)
    if root is None:
        return None
    masks = [finding_mask(region_path(root, dicom_id), task) for dicom_id in images["dicom_id"]]
    keep = [i for i, mask in enumerate(masks) if mask is not None]
    if not keep:
        return None
    keys = images["key"].to_numpy()[keep].tolist()
    maps = heatmaps(explainer, squares(keys, shards, settings.load_size), settings, device)
    regions = [_resized(masks[i], maps.shape[-1]) for i in keep]
    return pointing_score([crop_window(m, settings.image_size) for m in maps],
                          [crop_window(r, settings.image_size) for r in regions])


def _resized(mask: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if mask.shape == (size, size):
        return mask
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))


def explain(*, pred_dir: str | Path, out: str | Path | None = None, recipes: list[str] | None = None,
            shards: str | None = None, overrides: dict | None = None, threshold: float = 0.8,
            device: str | None = None, log=print) -> Path:
    """Heatmaps for the gallery's images of every recipe in `pred_dir` (or those named)."""
    pred_dir = Path(pred_dir)
    out = Path(out) if out else pred_dir / EXPLAIN_FOLDER
    predictions = load_predictions(pred_dir=pred_dir, split="test")
    tasks = {data.task: data for data in task_data(predictions)}
    shown, _ = select_gallery(list(tasks.values()), threshold=threshold)
    chosen = [s for s in sources(predictions) if not recipes or s.recipe in recipes]
    unknown = sorted(set(recipes or ()) - {s.recipe for s in chosen})
    if unknown:
        raise CxrError(f"{pred_dir}: no prediction file for recipe(s) {', '.join(unknown)}")
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    explained, pointing = [], []
    for source in chosen:
        keys = shown.loc[shown["task"] == source.task, "key"].drop_duplicates().tolist()
        row, score = explain_recipe(source, keys, tasks[source.task], out=out, overrides=dict(overrides or {}),
                                    shards=shards, device=target)
        log(f"{source.recipe}: {row['status'] if row['status'] != 'explained' else f'{len(keys)} heatmaps'}")
        explained.append(row)
        if score:
            pointing.append(score)
    _write_tables(out, explained, pointing)
    return out


def _write_tables(out: Path, explained: list[dict], pointing: list[dict]) -> None:
    """Merge with the rows of recipes not explained this time (a run may name a few)."""
    for name, rows in (("explained", explained), ("pointing", pointing)):
        path = out / f"{name}.csv"
        table = pd.DataFrame(rows)
        if path.is_file() and len(table):
            old = pd.read_csv(path)
            table = pd.concat([old[~old["recipe"].isin(table["recipe"])], table], ignore_index=True)
        if len(table):
            write_csv(path, table.sort_values("recipe", kind="stable").reset_index(drop=True))
