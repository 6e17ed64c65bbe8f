"""Predict with a trained recipe: `python -m cxr_fast.predict --recipe R [--split test|val|all]`.

Also the original form `python -m cxr_fast.predict 1 convnext_large`. Loads
`weights/R/best.safetensors` and the threshold chosen on validation (`best.json`) and writes
`all_pred/R.parquet`, one row per labelled image of the split(s):
key, dicom_id, subject_id, study_id, split, task, arch, recipe, label, prob, pred, threshold,
sex, age, age_group, race, view (AP/PA/...: an attribute of the subgroup analysis); the file's
metadata records the shard folder read and the weights folder (cxr_fast.io.parquet_metadata).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr_fast.checkpoint import load_safetensors
from cxr_fast.engine import compile_model, eval_batch_size, loader_budget_bytes, make_accelerator, predict_probs
from cxr_fast.errors import CxrError, run_cli
from cxr_fast.io import read_json, write_parquet
from cxr_fast.loading import choose_loader, make_loader, with_shards_resolved
from cxr_fast.loading.augment import AugmentSettings
from cxr_fast.loading.payloads import read_manifest
from cxr_fast.models import build_model
from cxr_fast.recipes import Config, load_config, parse_overrides, recipe_from_legacy
from cxr_fast.schema import DEMOGRAPHICS, PREDICTION_COLUMNS, SPLITS, VIEW

SPLIT_CHOICES = (*SPLITS, "all")


BEST_RECORD_FIELDS = ("config", "threshold")  # what prediction reads from best.json


def load_best(folder: Path, recipe: str) -> tuple[dict, dict]:
    record_path, weights_path = folder / "best.json", folder / "best.safetensors"
    for path in (record_path, weights_path):
        if not path.is_file():
            raise CxrError(f"{path}: not found; train first: python -m cxr_fast.train --recipe {recipe}")
    record = read_json(record_path)
    missing = [name for name in BEST_RECORD_FIELDS if not isinstance(record, dict) or name not in record]
    if missing:
        raise CxrError(f"{record_path}: not a best-epoch record (missing {', '.join(missing)})")
    return record, load_safetensors(weights_path)


def load_trained(recipe: str, overrides: dict | None = None) -> tuple[Config, dict, torch.nn.Module]:
    """A recipe's best checkpoint: its settings (those saved at training time, then `overrides`;
    shards resolved), its best.json record and the model on the CPU with the weights loaded."""
    overrides = dict(overrides or {})
    weights_dir = Path(overrides.get("weights_dir", load_config(recipe).weights_dir))
    record, weights = load_best(weights_dir / recipe, recipe)
    saved = {key: value for key, value in record["config"].items() if key not in ("recipe", "task", "arch")}
    # One pass over a split does not repay a compilation: compile only when asked (compile=on).
    trained = with_shards_resolved(load_config(recipe, saved | {"compile": "off"} | overrides))
    model = build_model(trained.arch, pretrained=False, image_size=AugmentSettings.from_config(trained).image_size)
    model.load_state_dict(weights)
    return trained, record, model


def predict(recipe: str, overrides: dict | None = None, *, split: str = "test", out_dir: Path = Path("all_pred")) -> Path:
    """Predict with the best checkpoint; `overrides` (e.g. shards=, weights_dir=, loader=) replace
    the settings saved at training time, which otherwise describe the model exactly."""
    trained, record, model = load_trained(recipe, overrides)
    accelerator = make_accelerator(trained.precision)
    device = accelerator.device

    manifest = read_manifest(trained.shards)
    chosen = manifest if split == "all" else manifest[manifest["split"] == split]
    rows = chosen[chosen[trained.task].notna()].reset_index(drop=True)
    if rows.empty:
        raise CxrError(f"{Path(trained.shards) / 'manifest.parquet'}: no labelled {split} images for task {trained.task!r}")

    settings = AugmentSettings.from_config(trained)
    if trained.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = accelerator.prepare(model)
    kind = choose_loader(trained.loader, n_images=len(rows), settings=settings,
                         budget_bytes=lambda: loader_budget_bytes(model, trained, accelerator, settings.image_size,
                                                                  training=False))
    loader = make_loader(kind, rows, Path(trained.shards), settings, device=device,
                         batch_size=eval_batch_size(trained), seed=trained.seed, threads=trained.decode_threads,
                         cache=trained.decoded_cache)
    probs = predict_probs(compile_model(model, trained, device), model, loader, np.arange(len(rows)), accelerator)

    threshold = float(record["threshold"])
    table = prediction_table(rows, probs, config=trained, threshold=threshold)
    path = Path(out_dir) / f"{trained.recipe}.parquet"
    # Where the images and the model came from, so that explain and the report's gallery find
    # them without being told (PREDICTION_METADATA).
    write_parquet(path, table, metadata={"shards": str(Path(trained.shards).resolve()),
                                         "weights_dir": str(Path(trained.weights_dir).resolve())})
    return path


def prediction_table(rows: pd.DataFrame, probs: np.ndarray, *, config: Config, threshold: float) -> pd.DataFrame:
    table = rows[["key", "dicom_id", "subject_id", "study_id", "split"]].copy()
    table["task"] = config.task
    table["arch"] = config.arch
    table["recipe"] = config.recipe
    table["label"] = rows[config.task].astype("float32")
    table["prob"] = probs.astype("float32")
    table["pred"] = (probs >= threshold).astype("int8")
    table["threshold"] = np.float32(threshold)
    for column in ("age", *DEMOGRAPHICS, VIEW):
        table[column] = rows[column]
    return table[list(PREDICTION_COLUMNS)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_fast.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", help="{task}_{arch}; repeat it for several recipes")
    parser.add_argument("--all", action="store_true", help="every recipe with a best checkpoint under weights_dir")
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="test")
    parser.add_argument("--out-dir", type=Path, default=Path("all_pred"))
    parser.add_argument("rest", nargs="*", help="`<label_index> <arch>` and/or key=value (shards=, weights_dir=, loader=, compile=on)")
    args = parser.parse_intermixed_args(argv)
    positional = [item for item in args.rest if "=" not in item]
    overrides = [item for item in args.rest if "=" in item]
    settings = parse_overrides(overrides)
    if args.all:
        recipes = trained_recipes(Path(settings.get("weights_dir", Config.weights_dir)))
    elif args.recipe and not positional:
        recipes = args.recipe
    elif len(positional) == 2 and not args.recipe:
        recipes = [recipe_from_legacy(*positional)]
    else:
        raise CxrError("give --recipe {task}_{arch} (repeatable), `<label_index> <arch>`, or --all")
    for recipe in recipes:
        path = predict(recipe, settings, split=args.split, out_dir=args.out_dir)
        print(f"{recipe}: predictions -> {path}")
    return 0


def trained_recipes(weights_dir: Path) -> list[str]:
    recipes = sorted(path.parent.name for path in weights_dir.glob("*/best.safetensors"))
    if not recipes:
        raise CxrError(f"{weights_dir}: no trained recipe (no */best.safetensors); train first")
    return recipes


if __name__ == "__main__":
    run_cli(main)
