"""`phantom_truth.json`: what was generated and planted, and the realised statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxr_fast.data.phantom.drawing import FINDING_CONTRAST_WHEN_HARD, FINDING_NOISE_SD_WHEN_HARD
from cxr_fast.data.phantom.population import (FINDINGS, HARDER_AGE_GROUP, HARDER_RACE, UNCERTAIN_STRENGTH,
                                               PhantomTables)
from cxr_fast.tasks import TASK_COLUMNS, TASKS


def phantom_truth(tables: PhantomTables, *, seed: int, image_size: int, bias: bool) -> dict:
    """What was generated and planted, and the realised label and group statistics."""
    images = tables.images
    has_findings = (images[list(FINDINGS)].to_numpy() > 0).any(axis=1)
    harder = images["harder"].to_numpy()
    frontal_labelled = ~images["lateral"].to_numpy() & images["labelled"].to_numpy()
    labels = images[["subject_id", "study_id"]].merge(tables.chexpert, on=["subject_id", "study_id"], how="left")
    subjects = images["subject_id"].unique()
    return {
        "generator": "cxr_fast.data.phantom",
        "seed": seed,
        "n_images": len(images),
        "n_subjects": len(subjects),
        "n_studies": tables.n_studies,
        "image_size": image_size,
        "bias": bias,
        "planted_disparity": {
            "race": HARDER_RACE,
            "age_group": HARDER_AGE_GROUP,
            "rule": "an image has hardness 1 if its subject's race (from admissions, as the cohort derives it) "
                    "is Black or its age group at the study is 80+; 0 otherwise",
            "contrast": FINDING_CONTRAST_WHEN_HARD,
            "noise_sd": FINDING_NOISE_SD_WHEN_HARD,
            "noise": "coarse (16x16 grain) Gaussian noise, only where findings are drawn",
            "n_images": int(harder.sum()),
            "n_images_with_drawn_findings": int((harder & has_findings).sum()),
        } if bias else None,
        "uncertain_labels": f"drawn at {UNCERTAIN_STRENGTH} of full strength",
        "prevalence": prevalence(labels[frontal_labelled]),
        "prevalence_in_harder_groups": prevalence(labels[frontal_labelled & harder]),
        "counts": {
            "frontal_labelled_images": int(frontal_labelled.sum()),
            "harder_images": int(harder.sum()),
            **{column: _counts(images[column]) for column in ("view", "sex", "age_group", "race")},
            "split": _counts(tables.split["split"]),
        },
        "structure": {
            "images_per_subject": round(len(images) / len(subjects), 3),
            "studies_per_subject": round(tables.n_studies / len(subjects), 3),
            "lateral_fraction": round(float(images["lateral"].mean()), 3),
            "studies_without_labels": tables.n_studies - len(tables.chexpert),
            "subjects_without_admissions": int((~np.isin(subjects, tables.admissions["subject_id"])).sum()),
            "subjects_missing_from_patients": int((~np.isin(subjects, tables.patients["subject_id"])).sum()),
        },
    }


def prevalence(labels: pd.DataFrame) -> dict[str, dict]:
    """Per task, as the cohort reads it: 1.0 positive, -1.0 uncertain (excluded), else negative."""
    result = {}
    for task in TASKS:
        values = labels[list(TASK_COLUMNS[task])].to_numpy()
        positive = (values == 1.0).any(axis=1)
        uncertain = ~positive & (values == -1.0).any(axis=1)
        negative = ~positive & ~uncertain
        counted = int(positive.sum() + negative.sum())
        result[task] = {"positive": int(positive.sum()), "negative": int(negative.sum()),
                        "uncertain": int(uncertain.sum()),
                        "prevalence": round(float(positive.sum()) / counted, 4) if counted else None}
    return result


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(key): int(count) for key, count in values.value_counts().sort_index().items()}

