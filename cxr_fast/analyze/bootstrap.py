"""Patient-level cluster bootstrap, drawn once per task and shared by every table.

Images of one patient are correlated (same anatomy, same devices, often the same label), so
resampling images would understate the uncertainty. We resample *subjects* with replacement;
an image's weight in a resample is how many times its subject was drawn. The draw depends only
on (seed, task, the task's subjects), so the model table, the subgroup gaps and the kappas of a
task all see the same resamples: differences between models or groups are paired.
"""

from __future__ import annotations

import zlib

import numpy as np
from scipy import stats


def task_stream(task: str) -> int:
    """A stable integer per task name (Python's hash() is salted per process)."""
    return zlib.crc32(task.encode())


def subject_counts(*, n_subjects: int, n_resamples: int, seed: int, stream: int = 0) -> np.ndarray:
    """(n_resamples, n_subjects) counts: how often each subject is drawn in each resample."""
    rng = np.random.default_rng([seed, stream])
    draws = rng.integers(0, n_subjects, size=(n_resamples, n_subjects))
    offsets = np.arange(n_resamples)[:, None] * n_subjects
    counts = np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_subjects)
    return counts.reshape(n_resamples, n_subjects)


def percentile_interval(
    samples: np.ndarray, *, level: float = 0.95, min_valid: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CI along axis 0, ignoring NaN resamples (a resample of a small group can
    lack positives). Fewer than `min_valid` finite resamples -> NaN: no honest interval.

    Vectorised over the other axes (numpy's nanpercentile loops in Python per column).
    The report's intervals are expanded_interval's; this is the plain one it widens.
    """
    alpha = (1 - level) / 2
    return quantile_interval(samples, np.asarray(alpha), np.asarray(1 - alpha), min_valid=min_valid)


def quantile_interval(samples: np.ndarray, low_q: np.ndarray, high_q: np.ndarray, *, min_valid: float = 0.5
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The `low_q` and `high_q` quantiles (arrays broadcast to samples.shape[1:]) along axis 0,
    over the finite resamples; NaN where fewer than `min_valid` of them are finite."""
    samples = np.asarray(samples, dtype=float)
    ordered = np.sort(samples, axis=0)  # NaN sorts last
    n_finite = np.isfinite(samples).sum(axis=0)
    last = np.maximum(n_finite - 1, 0)

    def quantile(q: np.ndarray) -> np.ndarray:
        position = np.broadcast_to(q, last.shape) * last
        below = np.floor(position).astype(int)
        above = np.minimum(below + 1, last)
        low_value = np.take_along_axis(ordered, below[None], axis=0)[0]
        high_value = np.take_along_axis(ordered, above[None], axis=0)[0]
        return low_value + (position - below) * (high_value - low_value)

    enough = n_finite >= max(1, min_valid * samples.shape[0])
    with np.errstate(invalid="ignore"):
        return np.where(enough, quantile(low_q), np.nan), np.where(enough, quantile(high_q), np.nan)


# Below this many informative patients (those who carry the metric: patients with a positive
# image for sensitivity, ...) no interval covers at its level: measured by
# cxr_fast.analyze.coverage_bench, see DECISIONS.md. Such intervals are printed as unreliable.
MIN_INFORMATIVE = 10


def expanded_z(informative: np.ndarray, *, level: float = 0.95) -> np.ndarray:
    """The normal quantile widened for n informative patients: sqrt(n / (n - 1)) t_{n-1}
    (Hesterberg's expanded percentile); +inf below 2 patients (no interval at all)."""
    n = np.asarray(informative, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.sqrt(n / (n - 1)) * stats.t.ppf(1 - (1 - level) / 2, np.maximum(n - 1, 1))
    return np.where(n >= 2, z, np.inf)


def expanded_interval(samples: np.ndarray, informative: np.ndarray, *, level: float = 0.95, min_valid: float = 0.5
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The report's CI: the percentile interval at the levels Phi(-/+ expanded_z), i.e. as
    wide as a t interval on the metric's informative patients would make it.

    Why (measured by cxr_fast.analyze.coverage_bench, DECISIONS.md): the plain percentile
    interval treats the bootstrap spread as known, which with tens of informative patients it
    is not; 95% percentile intervals covered 0.92-0.94 in groups of 120 patients. Widening to
    the t quantile of the patients that carry the metric brings every metric to 0.95 +- 0.015
    wherever there are at least MIN_INFORMATIVE of them, at no cost beyond the resamples."""
    z = expanded_z(informative, level=level)
    low, high = quantile_interval(samples, stats.norm.cdf(-z), stats.norm.cdf(z), min_valid=min_valid)
    no_interval = ~np.isfinite(z)  # fewer than 2 informative patients: not even the resamples' range
    return np.where(no_interval, np.nan, low), np.where(no_interval, np.nan, high)


def wilson_interval(estimate: np.ndarray, samples: np.ndarray, informative: np.ndarray, *, level: float = 0.95,
                    min_valid: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The report's CI of a proportion (sensitivity, specificity, PPV, NPV, FNR, FPR,
    prevalence): Wilson's score interval at the effective sample size n_eff = p (1 - p) /
    (the bootstrap variance of p), i.e. the images discounted by the patients' clustering
    (the design effect, as survey statistics does: Korn and Graubard). `estimate` is the
    point estimate (broadcast to samples.shape[1:]); an estimate of 0 or 1, whose resamples
    cannot vary, uses the `informative` (denominator) patients as n_eff.

    Why (cxr_fast.analyze.coverage_bench, DECISIONS.md): a percentile interval of a proportion
    near 0 or 1 collapses onto the few patients with the rarer outcome (NPV with 11 patients
    with a false negative covered 0.92), and widening it to a t quantile on those patients
    over-covered (0.97-0.99). Wilson's interval bends towards 1/2 by itself. NaN below 2
    informative patients and where fewer than `min_valid` resamples are defined."""
    samples = np.asarray(samples, dtype=float)
    p = np.broadcast_to(np.asarray(estimate, dtype=float), samples.shape[1:])
    n = np.asarray(informative, dtype=float)
    variance, n_finite = bootstrap_variance(samples)
    with np.errstate(invalid="ignore", divide="ignore"):
        n_eff = np.where(variance > 0, p * (1 - p) / variance, n)
        n_eff = np.where(n_eff > 0, n_eff, n)
        z = stats.norm.ppf(1 - (1 - level) / 2)
        centre = (p + z * z / (2 * n_eff)) / (1 + z * z / n_eff)
        half = z * np.sqrt(p * (1 - p) / n_eff + z * z / (4 * n_eff * n_eff)) / (1 + z * z / n_eff)
    ok = np.isfinite(p) & (n >= 2) & (n_finite >= max(1, min_valid * samples.shape[0]))
    return np.where(ok, np.clip(centre - half, 0.0, 1.0), np.nan), np.where(ok, np.clip(centre + half, 0.0, 1.0), np.nan)


def expanded_p_value(z: np.ndarray, informative: np.ndarray, *, one_sided: bool = False) -> np.ndarray:
    """p-value of a bootstrap Wald z (wald_z) on expanded_interval's scale: |z| shrunk by
    sqrt((n - 1) / n) against Student's t with n - 1 degrees of freedom, so that a two-sided
    p < 1 - level exactly when the expanded normal-theory interval excludes 0. One-sided: the
    upper tail of z (a large z is evidence). NaN below 2 informative patients."""
    n = np.asarray(informative, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        statistic = np.asarray(z, dtype=float) * np.sqrt((n - 1) / n)
        p = stats.t.sf(statistic if one_sided else np.abs(statistic), np.maximum(n - 1, 1))
    p = p if one_sided else 2 * p
    return np.where(n >= 2, p, np.nan)


def satterthwaite_patients(variances: list[np.ndarray], patients: list[np.ndarray]) -> np.ndarray:
    """The patients a t quantile should count for a statistic made of independent parts (the
    two halves of balanced accuracy, the two sides of a gap): 1 + the Welch-Satterthwaite
    degrees of freedom (sum V_i)^2 / sum(V_i^2 / (n_i - 1)) of parts with bootstrap variances
    V_i, each resting on n_i patients. It lies between the fewest part's n_i (one part carries
    all the variance) and their sum (the parts carry it equally). The fewest patients where a
    part has fewer than 2 or no part varies.

    Why (coverage_bench, DECISIONS.md): balanced accuracy's t quantile on the fewer of its
    patients with a positive and with a negative image covered 0.968 in groups of 60 patients
    at 10% prevalence, where the specificity half on ~58 patients carries a third of the variance."""
    v = np.stack(np.broadcast_arrays(*variances)).astype(float)
    n = np.stack(np.broadcast_arrays(*patients)).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        nu = v.sum(axis=0) ** 2 / np.where(v > 0, v * v / (n - 1), 0.0).sum(axis=0)
    usable = (n >= 2).all(axis=0) & np.isfinite(nu) & (np.nan_to_num(v).sum(axis=0) > 0)
    return np.where(usable, 1 + nu, n.min(axis=0))


def reliable(informative: np.ndarray) -> np.ndarray:
    """Whether an interval resting on `informative` patients keeps its coverage (MIN_INFORMATIVE)."""
    return np.asarray(informative) >= MIN_INFORMATIVE


def bootstrap_variance(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The variance over the finite resamples along axis 0 (n - 1 in the denominator), and how
    many resamples are finite."""
    finite = np.isfinite(samples)
    n_finite = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(finite, samples, 0.0).sum(axis=0) / np.maximum(n_finite, 1)
        variance = (np.where(finite, samples - mean, 0.0) ** 2).sum(axis=0) / np.maximum(n_finite - 1, 1)
    return variance, n_finite


def wald_z(estimate: np.ndarray, samples: np.ndarray, *, min_valid: float = 0.5) -> np.ndarray:
    """z = estimate / bootstrap standard error (NaN resamples ignored; NaN when fewer than
    `min_valid` resamples are defined). A statistic that is exactly 0 in the estimate and in
    every resample (e.g. the gap of a group that is everybody) gets z = 0: no evidence.

    Why not the share of resamples beyond zero as p-value: with 1,000 resamples it cannot go
    below ~0.002, and after Benjamini-Hochberg over thousands of subgroup tests nothing could
    ever be flagged. The bootstrap SE gives a continuous p-value from the same resamples.
    """
    samples = np.asarray(samples, dtype=float)
    estimate = np.asarray(estimate, dtype=float)
    variance, n_finite = bootstrap_variance(samples)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = estimate / np.sqrt(variance)
    z = np.where((variance == 0) & (estimate == 0), 0.0, z)
    ok = np.isfinite(estimate) & (n_finite >= max(2, min_valid * samples.shape[0])) & np.isfinite(z)
    return np.where(ok, z, np.nan)


def point_and_resamples(*, subject_index: np.ndarray, n_resamples: int, seed: int, task: str) -> np.ndarray:
    """(1 + n_resamples, n_images): row 0 is all ones (the point estimate), then the resamples.

    Keeping the estimate as row 0 lets every metric run once over estimate and resamples.
    """
    n_subjects = int(subject_index.max()) + 1 if subject_index.size else 0
    return subject_weights(n_subjects=n_subjects, n_resamples=n_resamples, seed=seed, task=task)[:, subject_index].astype(float)


def subject_weights(*, n_subjects: int, n_resamples: int, seed: int, task: str) -> np.ndarray:
    """(1 + n_resamples, n_subjects) int32: row 0 all ones, then each subject's count per resample.

    The same draws as point_and_resamples, kept per subject: an image's weight is its
    subject's, so any sum of image indicators is (subject weights) @ (per-subject sums), a
    product over patients instead of images. Counts are small integers, so every such sum
    is exact in float32 and float64 alike.
    """
    weights = np.ones((1 + n_resamples, n_subjects), dtype=np.int32)
    weights[1:] = subject_counts(n_subjects=n_subjects, n_resamples=n_resamples, seed=seed, stream=task_stream(task))
    return weights
