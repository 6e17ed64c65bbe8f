"""Binary classification metrics for many weightings of the same images at once.

Every function takes a weight matrix `weights` of shape (R, n_images): row r is one weighting
of the images (all ones = the plain estimate, bootstrap counts = one resample). A metric is
then a weighted sum, so R resamples cost one matrix product or one cumulative sum along the
contiguous image axis, instead of R Python-level passes.
Undefined values (a rate with an empty denominator, AUROC with one class) are NaN, never an
exception: a small subgroup without positives is a fact to report, not a crash.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

METRICS: tuple[str, ...] = (
    "prevalence", "auroc", "balanced_accuracy", "sensitivity", "specificity",
    "ppv", "npv", "fnr", "fpr",
)
# Metrics reported per model (FNR/FPR are 1 - sensitivity/specificity; the subgroup table
# spells them out because "who is missed" reads better as a miss rate).
MODEL_METRICS: tuple[str, ...] = METRICS[:7]

# The metrics that are a share of images (a binomial proportion, clustered by patient): their
# intervals are Wilson's (analyze.bootstrap.wilson_interval); AUROC and balanced accuracy are not.
PROPORTIONS: tuple[str, ...] = ("prevalence", "sensitivity", "specificity", "ppv", "npv", "fnr", "fpr")

# +1: larger is better, -1: smaller is better, 0: no direction (prevalence is not a quality).
DIRECTION: dict[str, int] = {
    "prevalence": 0, "auroc": 1, "balanced_accuracy": 1, "sensitivity": 1, "specificity": 1,
    "ppv": 1, "npv": 1, "fnr": -1, "fpr": -1,
}


def as_weight_matrix(weights: np.ndarray | None, n: int) -> np.ndarray:
    """None -> one row of ones; a 1-D sample weight -> one row; (R, n) stays as it is."""
    if weights is None:
        return np.ones((1, n))
    weights = np.asarray(weights, dtype=float)
    return weights[None, :] if weights.ndim == 1 else weights


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def confusion_weights(weights: np.ndarray, label: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(R, 4) weighted counts TP, FN, FP, TN: one matrix product for all R weightings."""
    label = np.asarray(label, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    cells = np.stack([label & pred, label & ~pred, ~label & pred, ~label & ~pred], axis=1)
    return weights @ cells.astype(float)


def weighted_auroc(weights: np.ndarray, label: np.ndarray, score: np.ndarray) -> np.ndarray:
    """AUROC per weight row, ties counted half (= sklearn roc_auc_score with sample_weight).

    AUROC = P(score of a positive > score of a negative) + 0.5 P(equal). Sort the negatives
    by score once (the order does not depend on the weights) and take the cumulative negative
    weight C (C[k] = weight of the k lowest negatives). A positive with kl negatives scoring
    strictly below it and kr scoring <= it is credited 0.5 (C[kl] + C[kr]): the weight below
    plus half the tied weight. Only gathers and one cumulative sum over the negatives.
    """
    label = np.asarray(label, dtype=bool)
    score = np.asarray(score, dtype=float)
    negatives = np.flatnonzero(~label)
    positives = np.flatnonzero(label)
    negatives = negatives[np.argsort(score[negatives], kind="stable")]
    neg_score = score[negatives]
    cumulative = np.zeros((weights.shape[0], negatives.size + 1))
    np.cumsum(weights[:, negatives], axis=1, out=cumulative[:, 1:])
    below = np.searchsorted(neg_score, score[positives], side="left")
    below_or_tied = np.searchsorted(neg_score, score[positives], side="right")
    credit = cumulative[:, below]
    if (below_or_tied != below).any():  # ties between a positive and negatives
        credit = 0.5 * (credit + cumulative[:, below_or_tied])
    pos_weights = weights[:, positives]
    concordant = np.einsum("rn,rn->r", pos_weights, credit)
    return _ratio(concordant, pos_weights.sum(axis=1) * cumulative[:, -1])


def metric_matrix(weights: np.ndarray, label: np.ndarray, prob: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(R, len(METRICS)) array, columns in METRICS order. The fast path used by the tables."""
    tp, fn, fp, tn = confusion_weights(weights, label, pred).T
    return metrics_from_confusion(tp, fn, fp, tn, weighted_auroc(weights, label, prob))


def metrics_from_confusion(tp: np.ndarray, fn: np.ndarray, fp: np.ndarray, tn: np.ndarray, auroc: np.ndarray) -> np.ndarray:
    """(..., len(METRICS)) array from weighted confusion counts (any shape) and the AUROC."""
    positives, negatives = tp + fn, fp + tn
    sensitivity = _ratio(tp, positives)
    specificity = _ratio(tn, negatives)
    columns = {
        "prevalence": _ratio(positives, positives + negatives),
        "auroc": auroc,
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "fnr": 1 - sensitivity,
        "fpr": 1 - specificity,
    }
    return np.stack([columns[name] for name in METRICS], axis=-1)


def binary_metrics(
    *, label: np.ndarray, prob: np.ndarray, pred: np.ndarray, sample_weight: np.ndarray | None = None
) -> pd.DataFrame:
    """All METRICS as a DataFrame: one row per weighting (one row for None or a 1-D weight;
    a 2-D sample_weight is (n_weightings, n_images)).

    Balanced accuracy is the mean of sensitivity and specificity, so it is NaN when either
    class is absent (sklearn would silently average over the classes present).
    """
    label = np.asarray(label, dtype=bool)
    weights = as_weight_matrix(sample_weight, label.size)
    return pd.DataFrame(metric_matrix(weights, label, np.asarray(prob, float), np.asarray(pred)), columns=list(METRICS))


def roc_points(*, label: np.ndarray, score: np.ndarray) -> pd.DataFrame:
    """ROC curve vertices (fpr, tpr, threshold), from (0, 0) to (1, 1), one per distinct score."""
    label = np.asarray(label, dtype=bool)
    score = np.asarray(score, dtype=float)
    order = np.argsort(-score)  # tied scores end up in one vertex: their order does not matter
    sorted_score = score[order]
    last_of_block = np.r_[sorted_score[1:] != sorted_score[:-1], True]
    tps = np.cumsum(label[order])[last_of_block]
    fps = np.cumsum(~label[order])[last_of_block]
    n_pos, n_neg = max(label.sum(), 1), max((~label).sum(), 1)
    return pd.DataFrame({
        "fpr": np.r_[0.0, fps / n_neg],
        "tpr": np.r_[0.0, tps / n_pos],
        "threshold": np.r_[np.inf, sorted_score[last_of_block]],
    })
