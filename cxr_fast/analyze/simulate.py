"""Simulated prediction files (the `all_pred/<recipe>.parquet` schema) for tests and demos.

The generative story, so that results are predictable:
- subjects have 1+ images; demographics are per subject; labels are correlated within a
  subject (a subject-level latent), so the patient-level bootstrap matters;
- every image has a "hardness" shared by all models, pushing its score to the wrong side:
  this is what makes errors consistent across models (kappa > 0) and creates systematic
  errors even when no group is treated differently;
- `planted` (one PlantedMiss or several) lowers the score of one group's positives for a
  share of the models: a group
  whose positives are systematically missed, which the analysis must find (the group may be
  an intersection, e.g. attribute "sex x race", group "F & Black");
- `agreement` makes one group's images harder or easier by the same amount for every model
  (more image-level hardness, less model noise): its errors coincide across models (higher
  kappa) without a planted miss;
- `shifted` moves every score of one group by the same amount in every model, whatever the
  label: the models rank the group as well as before but its probabilities mean another risk
  (a group the calibration table must flag);
- `view` (AP/PA) is drawn per image from its own random stream, independently of the rest,
  so adding it left every other simulated value of a seed unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast.io import write_parquet
from cxr_fast.schema import PREDICTION_COLUMNS, age_group

SEX_P = {"F": 0.49, "M": 0.49, "Unknown": 0.02}
RACE_P = {"White": 0.6, "Black": 0.15, "Asian": 0.05, "Hispanic/Latino": 0.06, "Other": 0.06, "Unknown": 0.08}


@dataclass(frozen=True)
class PlantedMiss:
    """Positives of `attribute == group` get their score lowered by `shift` (logit units) in
    the first ceil(share_of_models * n_models) models, in `tasks` (every task when empty)."""

    attribute: str = "race"
    group: str = "Black"
    shift: float = 3.0
    share_of_models: float = 1.0
    tasks: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlantedAgreement:
    """Images of `attribute == group`: hardness scaled by `hardness_scale`, model noise by
    `noise_scale`, so that every model errs on the same images of the group."""

    attribute: str = "race"
    group: str = "Asian"
    hardness_scale: float = 2.5
    noise_scale: float = 0.1


@dataclass(frozen=True)
class PlantedShift:
    """Every score of `attribute == group` moved by `shift` (logit units) in every model."""

    attribute: str = "race"
    group: str = "Black"
    shift: float = 1.0


P_AP = 0.55  # frontal films that are AP (portable), as in the phantom


def _members(images: pd.DataFrame, attribute: str, group: str) -> np.ndarray:
    """Rows in `group` of `attribute` ("race" / "Black", or "sex x race" / "F & Black")."""
    columns, levels = attribute.split(" x "), group.split(" & ")
    return np.logical_and.reduce([images[c].to_numpy() == level for c, level in zip(columns, levels)])


def _quota_draw(rng: np.random.Generator, n: int, probabilities: dict[str, float]) -> np.ndarray:
    """n values in exact proportions (largest remainder), shuffled."""
    expected = np.array(list(probabilities.values())) * n
    counts = np.floor(expected).astype(int)
    counts[np.argsort(counts - expected)[: n - counts.sum()]] += 1
    return rng.permutation(np.repeat(list(probabilities), counts))


def _demographics(rng: np.random.Generator, n_subjects: int) -> pd.DataFrame:
    age = np.clip(rng.normal(60, 18, n_subjects), 1, 100).round()
    age[rng.random(n_subjects) < 0.02] = np.nan
    people = pd.DataFrame({
        "subject_id": 10_000_000 + np.arange(n_subjects),
        "sex": rng.choice(list(SEX_P), n_subjects, p=list(SEX_P.values())),
        "age": age,
        "age_group": age_group(pd.Series(age)).to_numpy(),
    })
    # Race in exact proportions within every sex x age cell: a planted race effect then does
    # not leak into the sex or age results through a chance imbalance in who is in them.
    people["race"] = ""
    for positions in people.groupby(["sex", "age_group"]).indices.values():
        people.loc[people.index[positions], "race"] = _quota_draw(rng, len(positions), RACE_P)
    return people


def _images(rng: np.random.Generator, n_images: int, images_per_subject: float, split: str, first: int) -> pd.DataFrame:
    n_subjects = max(1, min(n_images, round(n_images / images_per_subject)))
    # Every subject has at least one image; the rest are spread at random (1, 2, 3+ images).
    subject = np.r_[np.arange(n_subjects), rng.integers(0, n_subjects, n_images - n_subjects)]
    people = _demographics(rng, n_subjects)
    images = people.iloc[subject].reset_index(drop=True)
    images["subject_id"] = images["subject_id"] + first * 10  # val and test subjects never overlap
    number = first + np.arange(n_images)
    images.insert(0, "key", [f"img{i:06d}" for i in number])
    images.insert(1, "dicom_id", [f"dcm-{i:06d}" for i in number])
    images.insert(3, "study_id", 50_000_000 + number)
    images["split"] = split
    images["subject_latent"] = rng.normal(size=n_subjects)[subject]
    return images


def _views(seed: int, n: int) -> np.ndarray:
    return np.where(np.random.default_rng([seed, 1]).random(n) < P_AP, "AP", "PA")


def simulate_predictions(
    *, tasks: tuple[str, ...] = ("effusion",), archs: tuple[str, ...] = ("resnet50", "densenet121", "convnext_tiny"),
    n_images: int = 800, n_val_images: int = 0, images_per_subject: float = 1.6, prevalence: float = 0.35,
    signal: float = 1.6, hardness: float = 1.0, noise: float = 0.8, missing_label_rate: float = 0.0,
    planted: PlantedMiss | tuple[PlantedMiss, ...] | None = None, agreement: PlantedAgreement | None = None,
    shifted: PlantedShift | None = None, seed: int = 0,
) -> pd.DataFrame:
    """All models' predictions stacked (one row per model x image), in the prediction schema."""
    rng = np.random.default_rng(seed)
    plants = (planted,) if isinstance(planted, PlantedMiss) else tuple(planted or ())
    images = pd.concat([
        _images(rng, n_images, images_per_subject, "test", first=0),
        _images(rng, n_val_images, images_per_subject, "val", first=n_images) if n_val_images else None,
    ], ignore_index=True)
    images["view"] = _views(seed, len(images))
    agreeing = _members(images, agreement.attribute, agreement.group) if agreement else np.zeros(len(images), bool)
    hardness_scale = np.where(agreeing, agreement.hardness_scale if agreement else 1.0, 1.0)
    noise_scale = np.where(agreeing, agreement.noise_scale if agreement else 1.0, 1.0)
    score_shift = shifted.shift * _members(images, shifted.attribute, shifted.group) if shifted else 0.0
    frames = []
    for task in tasks:
        logit = np.log(prevalence / (1 - prevalence)) + 0.8 * images["subject_latent"].to_numpy()
        label = (rng.random(len(images)) < 1 / (1 + np.exp(-logit))).astype(float)
        sign = 2 * label - 1
        image_hardness = hardness * rng.normal(size=len(images)) * hardness_scale
        # Per model, how much its positives' scores are lowered (the plants add up).
        lowered = np.zeros((len(archs), len(images)))
        for plant in plants:
            if not plant.tasks or task in plant.tasks:
                n_planted_models = int(np.ceil(plant.share_of_models * len(archs)))
                lowered[:n_planted_models] += plant.shift * (_members(images, plant.attribute, plant.group) & (label == 1))
        label[rng.random(len(images)) < missing_label_rate] = np.nan
        for m, arch in enumerate(archs):
            model_signal = signal * (1 + 0.3 * m / max(1, len(archs) - 1))  # archs differ a little in skill
            score = sign * (model_signal - image_hardness) + noise * noise_scale * rng.normal(size=len(images))
            score = score - lowered[m] + score_shift
            prob = 1 / (1 + np.exp(-score))
            frames.append(images.drop(columns="subject_latent").assign(
                task=task, arch=arch, recipe=f"{task}_{arch}", label=label, prob=prob,
                pred=(prob >= 0.5).astype(int), threshold=0.5,
            ))
    return pd.concat(frames, ignore_index=True)[list(PREDICTION_COLUMNS)]


def write_prediction_files(*, predictions: pd.DataFrame, pred_dir: str | Path) -> list[Path]:
    """Write one `<recipe>.parquet` per model (atomically), as the predict step does."""
    paths = []
    for recipe, rows in predictions.groupby("recipe", sort=True):
        path = Path(pred_dir) / f"{recipe}.parquet"
        write_parquet(path, rows.reset_index(drop=True))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """`python -m cxr_fast.analyze.simulate --pred-dir DIR`: demo/benchmark prediction files."""
    import argparse

    from cxr_fast.tasks import TASKS

    parser = argparse.ArgumentParser(prog="python -m cxr_fast.analyze.simulate", description=main.__doc__)
    parser.add_argument("--pred-dir", required=True)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--archs", nargs="+", default=["resnet50", "densenet121", "convnext_tiny"])
    parser.add_argument("--images", type=int, default=800, help="test images per task (default: %(default)s)")
    parser.add_argument("--plant", metavar="ATTRIBUTE=GROUP", help="e.g. race=Black: most models miss its positives")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    planted = None
    if args.plant:
        attribute, _, group = args.plant.partition("=")
        planted = PlantedMiss(attribute=attribute, group=group)
    predictions = simulate_predictions(tasks=tuple(args.tasks), archs=tuple(args.archs), n_images=args.images,
                                       planted=planted, seed=args.seed)
    for path in write_prediction_files(predictions=predictions, pred_dir=args.pred_dir):
        print(path)
    return 0


if __name__ == "__main__":
    from cxr_fast.errors import run_cli

    run_cli(main)
