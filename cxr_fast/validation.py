"""Per-epoch validation: AUROC and balanced accuracy at the threshold that maximises it."""

from __future__ import annotations

import math

import numpy as np

from cxr_fast.metrics import binary_metrics, roc_points


def best_threshold(label: np.ndarray, prob: np.ndarray) -> float:
    """The probability cut (predict positive when prob >= cut) with the best balanced accuracy.

    Candidates are the ROC vertices; the first (highest) cut wins ties, so the threshold is
    reproducible. With one class present there is nothing to balance: 0.5.
    """
    label = np.asarray(label, dtype=bool)
    if label.all() or not label.any():
        return 0.5
    roc = roc_points(label=label, score=prob).iloc[1:]  # drop the (0, 0) vertex at +inf
    balanced = (roc["tpr"] + 1 - roc["fpr"]) / 2
    return float(roc["threshold"].iloc[int(np.argmax(balanced.to_numpy()))])


def validation_metrics(label: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    label = np.asarray(label, dtype=bool)
    prob = np.asarray(prob, dtype=float)
    threshold = best_threshold(label, prob)
    metrics = binary_metrics(label=label, prob=prob, pred=prob >= threshold).iloc[0]
    return {
        "auroc": _plain(metrics["auroc"]),
        "balanced_accuracy": _plain(metrics["balanced_accuracy"]),
        "sensitivity": _plain(metrics["sensitivity"]),
        "specificity": _plain(metrics["specificity"]),
        "threshold": threshold,
        "n": int(label.size),
        "positives": int(label.sum()),
    }


def _plain(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value
