"""Systematic misclassification: images that (almost) every model of a task gets wrong.

An image is systematically misclassified when the share of models that get it wrong is
>= threshold (0.8 by default; with 3 models that means all 3). For every subgroup we compare
its share among systematic false negatives with its share among all positives (and false
positives vs negatives) through an odds ratio, group vs rest:

                     systematically missed   not
    group positives          a                b
    rest positives           c                d

OR = ad / bc with Woolf's log CI (0.5 added to every cell when one is 0) and Fisher's exact
test. The test is per image: images of one patient count separately, which is the question
("is this group over-represented among the errors?") but makes p-values optimistic when
patients contribute many images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxr_fast.analyze.groups import iter_groups
from cxr_fast.analyze.inputs import TaskData, task_data
from cxr_fast.analyze.stats import benjamini_hochberg, fisher_p_value, odds_ratio_woolf

ERRORS: dict[str, bool] = {"false_negative": True, "false_positive": False}  # error -> label it happens on


def _share_wrong(data: TaskData) -> np.ndarray:
    return (~data.correct).mean(axis=0)


def is_systematic(data: TaskData, threshold: float) -> np.ndarray:
    # The tolerance keeps 4 of 5 models (0.8 in floating point) systematic at threshold 0.8.
    return _share_wrong(data) >= threshold - 1e-9


def systematic_images(*, predictions: pd.DataFrame | None = None, tasks: list[TaskData] | None = None,
                       threshold: float = 0.8) -> pd.DataFrame:
    """Every systematically misclassified image, most consistently (then most confidently)
    missed first, with its ids and demographics. `tasks` (task_data of the predictions) saves
    splitting `predictions` again."""
    frames = []
    for data in task_data(predictions) if tasks is None else tasks:
        share = _share_wrong(data)
        mean_prob = data.prob.mean(axis=0)
        frame = data.images.assign(
            task=data.task, error=np.where(data.label, "false_negative", "false_positive"),
            n_models=len(data.archs), n_wrong=(~data.correct).sum(axis=0), share_wrong=share,
            mean_prob=mean_prob, confidence_wrong=np.abs(mean_prob - data.label),
        )
        frames.append(frame[is_systematic(data, threshold)])
    columns = ["task", "key", "dicom_id", "subject_id", "study_id", "label", "error", "n_models", "n_wrong",
               "share_wrong", "mean_prob", "sex", "age", "age_group", "race"]
    table = pd.concat(frames, ignore_index=True)
    table = table.sort_values(["task", "share_wrong", "confidence_wrong"], ascending=[True, False, False], kind="stable")
    return table[columns].reset_index(drop=True)


def systematic_table(
    *, predictions: pd.DataFrame | None = None, tasks: list[TaskData] | None = None, threshold: float = 0.8, min_count: int = 30, fdr: float = 0.05, level: float = 0.95,
) -> pd.DataFrame:
    """One row per (task, error kind, attribute, group): composition, odds ratio, test, flag.

    BH families: one per (task, error kind), i.e. "which groups are over-represented among
    this task's systematic false negatives?"; within it every group (all attributes and
    intersections) with >= min_count images of the relevant class (positives for false
    negatives, negatives for false positives) in the group AND in the rest, when the task has
    at least one systematic error of that kind (else there is nothing to test). Flagged =
    q <= fdr and OR > 1 (the group is over-represented among systematic errors). `tasks` as
    for `systematic_images`.
    """
    rows = []
    for data in task_data(predictions) if tasks is None else tasks:
        systematic = is_systematic(data, threshold)
        for error, on_label in ERRORS.items():
            in_class = data.label == on_label
            hit = systematic & in_class
            for attribute, group, positions in iter_groups(data.images):
                member = np.zeros(data.label.size, dtype=bool)
                member[positions] = True
                rows.append(_composition_row(data, error, attribute, group, member, in_class, hit, min_count, level))
    table = pd.DataFrame(rows)
    table["q_value"] = np.nan
    for _, family in table.groupby(["task", "error"], sort=False):
        p_values = family["p_value"].where(family["tested"]).to_numpy(float)
        table.loc[family.index, "q_value"] = benjamini_hochberg(p_values)
    table["flagged"] = table["tested"] & (table["q_value"] <= fdr) & (table["odds_ratio"] > 1)
    return table


def _composition_row(data: TaskData, error: str, attribute: str, group: str, member: np.ndarray,
                     in_class: np.ndarray, hit: np.ndarray, min_count: int, level: float) -> dict:
    a = int((member & hit).sum())
    b = int((member & in_class & ~hit).sum())
    c = int((~member & hit).sum())
    d = int((~member & in_class & ~hit).sum())
    odds_ratio, low, high = odds_ratio_woolf(a, b, c, d, level=level)
    tested = min(a + b, c + d) >= min_count and a + c > 0
    note = ""
    if a + c == 0:
        note = "no systematic errors of this kind in the task: nothing to test"
    elif not tested:
        note = f"fewer than {min_count} {'positives' if error == 'false_negative' else 'negatives'} in the group or the rest: reported, not tested"
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "task": data.task, "error": error, "attribute": attribute, "group": group, "n_models": len(data.archs),
            "n_class_group": a + b, "n_class": a + b + c + d, "n_systematic_group": a, "n_systematic": a + c,
            "share_of_class": (a + b) / (a + b + c + d) if a + b + c + d else np.nan,
            "share_of_systematic": a / (a + c) if a + c else np.nan,
            "systematic_rate_group": a / (a + b) if a + b else np.nan,
            "systematic_rate_rest": c / (c + d) if c + d else np.nan,
            "odds_ratio": odds_ratio, "or_ci_low": low, "or_ci_high": high,
            "p_value": fisher_p_value(a, b, c, d), "tested": tested, "note": note,
        }
