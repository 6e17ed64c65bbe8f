"""The patient-level bootstrap CI covers the true value at about the nominal rate, and
resampling patients (not images) is what makes it do so on clustered data."""

from __future__ import annotations

import numpy as np
from scipy import stats

from cxr_fast.analyze.bootstrap import percentile_interval, point_and_resamples
from cxr_fast.metrics import METRICS, metric_matrix

N_DATASETS, N_RESAMPLES, N_SUBJECTS = 200, 200, 100
A, B_SUBJECT = 1.0, 1.5  # P(detected | positive, subject effect u) = Phi(A + B u), u ~ N(0, 1)
TRUE_SENSITIVITY = stats.norm.cdf(A / np.sqrt(1 + B_SUBJECT**2))  # integrating u out


def clustered_dataset(rng: np.random.Generator):
    """Subjects with ~4 images; labels and detections both correlated within a subject."""
    images_per_subject = 1 + rng.poisson(3.0, N_SUBJECTS)
    subject = np.repeat(np.arange(N_SUBJECTS), images_per_subject)
    label_effect, detect_effect = rng.normal(size=(2, N_SUBJECTS))
    label = rng.random(subject.size) < 1 / (1 + np.exp(-(-0.3 + label_effect[subject])))
    detected = A + B_SUBJECT * detect_effect[subject] + rng.normal(size=subject.size) > 0
    pred = np.where(label, detected, rng.random(subject.size) < 0.1)
    return subject, label, pred


def covers(cluster_index: np.ndarray, label: np.ndarray, pred: np.ndarray, seed: int) -> bool:
    weights = point_and_resamples(subject_index=cluster_index, n_resamples=N_RESAMPLES, seed=seed, task="sim")
    sensitivity = metric_matrix(weights, label, pred.astype(float), pred)[1:, METRICS.index("sensitivity")]
    low, high = percentile_interval(sensitivity[:, None])
    return bool(low[0] <= TRUE_SENSITIVITY <= high[0])


def test_cluster_bootstrap_ci_covers_true_sensitivity_near_nominal_rate():
    rng = np.random.default_rng(2024)
    by_subject = by_image = 0
    for dataset in range(N_DATASETS):
        subject, label, pred = clustered_dataset(rng)
        by_subject += covers(subject, label, pred, dataset)
        by_image += covers(np.arange(subject.size), label, pred, dataset)  # the naive bootstrap
    assert 0.88 <= by_subject / N_DATASETS <= 0.99
    # Measured 0.935 vs 0.83: treating a patient's images as independent understates the CI.
    assert by_image / N_DATASETS < by_subject / N_DATASETS - 0.05
