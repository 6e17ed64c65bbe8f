"""Calibration by group: do a model's probabilities mean the same risk for every group?

A model can rank every group equally well and still tell one group's patients 30% where 20%
of them have the finding. Per model and scope (everybody, then each group):

- `citl`, calibration-in-the-large: weighted mean predicted probability minus observed rate;
- `slope` and `intercept`: the logistic recalibration y ~ intercept + slope * logit(p)
  (perfect calibration: intercept 0, slope 1; slope < 1: probabilities too extreme);
- `ece`, expected calibration error: sum over ECE_BINS equal-width bins of [0, 1] of
  (bin share of images) * |mean predicted - observed rate| in the bin, a probability on the
  boundary of two bins belonging to the lower one (sklearn.calibration.calibration_curve's
  `strategy="uniform"` bins, its oracle in the tests).

Every value comes for the point estimate and every patient-level resample of the task
(Resampled.weights, the rows the other tables use) and goes through the same interval and
test functions as the subgroup gaps (bootstrap.expanded_interval and expanded_p_value, on the
scope's patients of the rarer class). Cheap at study size:
- ECE and citl are sums of (p - y) per bin: one column per bin and model, summed per patient
  (bincount) and then over patients with the subject weights (one float32 product per group,
  as the tallies);
- slope and intercept are refitted per resample by one Newton step from the point estimate
  (the one-step bootstrap, Davison, Hinkley & Schechtman 1986): the step needs the score and
  Hessian sums at the point estimate, which are again sums of per-image terms, so all 1,000
  resamples cost one product instead of 1,000 logistic fits. The point estimate itself is
  the exact fit (Newton to convergence, a statsmodels GLM fit in the tests).

Flags: one Benjamini-Hochberg family for the whole table over the two-sided gap-to-overall
tests of FLAG_METRICS in groups with >= min_count positives and negatives (as the subgroup
table's eligibility) and a reliable interval (`ci_reliable`). ECE is reported, not tested: it
is biased upwards in small groups (fewer images per bin, more noise), so its gap would test
the group's size, not its calibration.
The intercept of the joint fit restates citl given the slope: reported, not tested.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxr_fast.analyze.bootstrap import expanded_interval, expanded_p_value, reliable, wald_z
from cxr_fast.analyze.parallel import blas_single_threaded
from cxr_fast.analyze.resampled import Resampled, resampled_tasks
from cxr_fast.analyze.stats import benjamini_hochberg

ECE_BINS = 10
CALIBRATION_METRICS: tuple[str, ...] = ("citl", "slope", "intercept", "ece")
FLAG_METRICS: tuple[str, ...] = ("citl", "slope")
# Probabilities are clipped to [EPS, 1 - EPS] before the logit (a stored 0 or 1 has no logit).
EPS = 1e-6
_NEWTON_STEPS = 100


def logit(prob: np.ndarray) -> np.ndarray:
    prob = np.clip(np.asarray(prob, dtype=float), EPS, 1 - EPS)
    return np.log(prob) - np.log1p(-prob)


def bin_index(prob: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Equal-width bin of each probability, an edge belonging to the lower bin (as sklearn)."""
    return np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], prob)


def reliability_bins(label: np.ndarray, prob: np.ndarray, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """The non-empty bins: images, mean predicted probability, observed rate (the diagram's points)."""
    bins, count, predicted, observed = bin_points(label, prob, n_bins)
    return pd.DataFrame({"bin": bins, "n": count, "mean_predicted": predicted, "observed": observed})


def bin_points(label: np.ndarray, prob: np.ndarray, n_bins: int = ECE_BINS
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """reliability_bins as arrays: bin numbers, images, mean predicted, observed rate."""
    bins = bin_index(prob, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    predicted = np.bincount(bins, weights=prob, minlength=n_bins)
    observed = np.bincount(bins, weights=np.asarray(label, dtype=float), minlength=n_bins)
    filled = np.flatnonzero(count > 0)
    return filled, count[filled], predicted[filled] / count[filled], observed[filled] / count[filled]


def recalibration_fit(x: np.ndarray, y: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """(M, 2) maximum-likelihood (intercept, slope) of y ~ intercept + slope * x for each row
    of x (M, n) at once (Newton-Raphson from `start`, e.g. the fit on everybody for a group);
    NaN where y has one class or the fit diverges."""
    x = np.atleast_2d(np.asarray(x, dtype=float))
    y = np.asarray(y, dtype=float)
    theta = np.zeros((x.shape[0], 2))
    if y.size == 0 or y.min() == y.max():
        return np.full_like(theta, np.nan)
    theta[:, 0] = np.log(y.mean() / (1 - y.mean()))
    if start is not None:
        theta = np.where(np.isfinite(start), start, theta)
    for _ in range(_NEWTON_STEPS):
        mu = _sigmoid(theta[:, :1] + theta[:, 1:] * x)
        residual, variance = y - mu, mu * (1 - mu)
        variance_x = variance * x
        score = np.stack([residual.sum(1), (residual * x).sum(1)], axis=1)
        step = _solve_2x2(variance.sum(1), variance_x.sum(1), (variance_x * x).sum(1), score)
        theta += step
        if np.all(np.abs(step) < 1e-10) or not np.isfinite(theta).all():
            break
    converged = np.all(np.abs(step) < 1e-8, axis=1) & np.all(np.abs(theta) < 1e6, axis=1)
    return np.where(converged[:, None], theta, np.nan)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflows to inf for a diverging fit: mu = 0, as it should
        return 1 / (1 + np.exp(-z))


def _solve_2x2(h00: np.ndarray, h01: np.ndarray, h11: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve [[h00, h01], [h01, h11]] step = rhs elementwise (last axis of rhs: 2)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        determinant = h00 * h11 - h01 * h01
        return np.stack([(h11 * rhs[..., 0] - h01 * rhs[..., 1]) / determinant,
                         (h00 * rhs[..., 1] - h01 * rhs[..., 0]) / determinant], axis=-1)


def calibration_values(resampled: Resampled) -> np.ndarray:
    """(M, S, C, 1 + R): every CALIBRATION_METRICS value of every model in every scope
    (0 = everybody, then each group) and resample row (0 = the point estimate, in float64)."""
    data, tallies = resampled.data, resampled.tallies
    # Subjects as rows: a group's weights are then a gather of whole rows (contiguous copies).
    weights_t = np.ascontiguousarray(resampled.weights.T, dtype=np.float32)               # (subjects, 1 + R)
    x_all, bins_all = logit(data.prob), bin_index(data.prob).astype(np.int8)
    per_scope, overall_fit = [], None
    for s, positions in enumerate(resampled.scopes):
        y, prob, x = data.label[positions].astype(float), data.prob[:, positions], x_all[:, positions]
        bins = bins_all[:, positions]
        theta = recalibration_fit(x, y, start=overall_fit)                                  # (M, 2)
        overall_fit = theta if overall_fit is None else overall_fit  # a group's fit starts from everybody's
        subjects, inverse = np.unique(data.subject_index[positions], return_inverse=True)
        by_subject = _subject_terms(inverse, subjects.size, y, prob, x, bins, theta)       # (subjects, M * (B + 5))
        # Every subject (scope 0): the weights as they are, no gathered copy.
        scope_weights = weights_t if subjects.size == weights_t.shape[0] else weights_t[subjects]
        sums = (by_subject.T @ scope_weights).astype(np.float64)                            # (M * (B + 5), 1 + R)
        sums = sums.reshape(len(data.archs), ECE_BINS + 5, -1)                              # (M, B + 5, 1 + R)
        n = tallies.positives[s] + tallies.negatives[s]                                     # (1 + R,)
        with np.errstate(divide="ignore", invalid="ignore"):
            citl = sums[:, :ECE_BINS].sum(axis=1) / n
            ece = np.abs(sums[:, :ECE_BINS]).sum(axis=1) / n
        hessian = [sums[:, ECE_BINS + k] for k in (2, 3, 4)]
        one_step = theta[:, None, :] + _solve_2x2(*hessian, np.stack([sums[:, ECE_BINS], sums[:, ECE_BINS + 1]], axis=2))
        defined = (tallies.positives[s] > 0) & (tallies.negatives[s] > 0)
        one_step = np.where(defined[None, :, None], one_step, np.nan)
        values = np.stack([citl, one_step[..., 1], one_step[..., 0], ece], axis=1)          # (M, C, 1 + R)
        values[:, :, 0] = _point_values(y, prob, bins, theta)
        per_scope.append(values)
    return np.stack(per_scope, axis=1)


def _subject_terms(subject: np.ndarray, n_subjects: int, y: np.ndarray, prob: np.ndarray, x: np.ndarray,
                   bins: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """(n_subjects, M * (ECE_BINS + 5)) float32 per-subject sums of, per model: p - y in the
    column of its bin (ECE_BINS columns), then the one-step sums' terms at the point fit
    `theta`: the score (y - mu, (y - mu) x) and the Hessian (v, v x, v x^2), v = mu (1 - mu).
    One bincount over (subject, model, column) codes: no dense image-level matrix whose bin
    columns are mostly zero."""
    n_models = prob.shape[0]
    width = ECE_BINS + 5
    column = subject[None, :] * (n_models * width) + np.arange(n_models)[:, None] * width   # (M, n) first column
    mu = _sigmoid(theta[:, :1] + theta[:, 1:] * x)
    residual, variance = y - mu, mu * (1 - mu)
    terms = (residual, residual * x, variance, variance * x, variance * x * x)
    codes = np.stack([column + bins] + [column + ECE_BINS + k for k in range(len(terms))])
    values = np.stack([prob - y, *terms])
    sums = np.bincount(codes.ravel(), weights=values.ravel(), minlength=n_subjects * n_models * width)
    return sums.astype(np.float32).reshape(n_subjects, n_models * width)


def _point_values(y: np.ndarray, prob: np.ndarray, bins: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """(M, C) the CALIBRATION_METRICS of the images as they are, in float64."""
    if y.size == 0:
        return np.full((prob.shape[0], len(CALIBRATION_METRICS)), np.nan)
    bins = bins + ECE_BINS * np.arange(prob.shape[0])[:, None]
    per_bin = np.bincount(bins.ravel(), weights=(prob - y).ravel(), minlength=ECE_BINS * prob.shape[0])
    ece = np.abs(per_bin.reshape(prob.shape[0], ECE_BINS)).sum(axis=1) / y.size
    return np.column_stack([prob.mean(axis=1) - y.mean(), theta[:, 1], theta[:, 0], ece])


COLUMNS = [
    "task", "arch", "recipe", "attribute", "group", "n", "n_subjects", "n_pos", "n_neg", "eligible", "metric",
    "value", "ci_low", "ci_high", "n_informative", "ci_reliable", "overall", "gap_overall", "gap_overall_ci_low",
    "gap_overall_ci_high", "p_gap_overall", "direction", "note",
]
OVERALL = ("overall", "all")  # (attribute, group) of the rows about every test image


def calibration_rows(resampled: Resampled, values: np.ndarray, *, min_count: int, level: float) -> pd.DataFrame:
    """The calibration table's rows of one task (before the table-wide BH step) from
    calibration_values' (M, S, C, 1 + R): one row per model, scope and metric, the scope's
    value, its gap to the model's overall value, both with the same intervals and tests as
    the subgroup table's gaps."""
    data = resampled.data
    scopes = [(*OVERALL, np.arange(data.label.size)), *resampled.groups]
    info = pd.DataFrame([{"attribute": attribute, "group": group, "n": positions.size,
                          "n_subjects": int(np.unique(data.subject_index[positions]).size),
                          "n_pos": int(data.label[positions].sum()), "n_neg": int((~data.label[positions]).sum())}
                         for attribute, group, positions in scopes])
    info["eligible"] = (info["n_pos"] >= min_count) & (info["n_neg"] >= min_count) & (info["attribute"] != OVERALL[0])
    n_models, n_scopes, n_metrics = values.shape[:3]
    gaps = values - values[:, :1]
    gaps[:, 0] = np.nan  # everybody vs everybody: no gap
    # Every calibration metric compares predicted with observed risk in both classes: like AUROC
    # (and its gap), it rests on the fewer of the scope's patients with a positive image and with
    # a negative one; the expanded intervals and p-values are on that scale, gaps included (the
    # subgroup table's gaps count both sides, Welch-Satterthwaite; not measured here, see DECISIONS.md).
    carrying = resampled.tallies.patients
    informative = np.broadcast_to(np.minimum(carrying["positive"], carrying["negative"])[None, :, None],
                                  (n_models, n_scopes, n_metrics))
    columns = {}
    for prefix, array in (("", values), ("gap_overall_", gaps)):
        samples = np.moveaxis(array[..., 1:], 3, 0)
        low, high = expanded_interval(samples, informative, level=level)
        columns["value" if not prefix else "gap_overall"] = array[..., 0].ravel()
        columns[f"{prefix}ci_low"], columns[f"{prefix}ci_high"] = low.ravel(), high.ravel()
    columns["n_informative"] = informative.ravel()
    columns["ci_reliable"] = reliable(informative).ravel()
    columns["p_gap_overall"] = expanded_p_value(wald_z(gaps[..., 0], np.moveaxis(gaps[..., 1:], 3, 0)), informative).ravel()
    table = pd.DataFrame({
        "task": data.task,
        "arch": np.repeat(data.archs, n_scopes * n_metrics),
        "recipe": np.repeat(data.recipes, n_scopes * n_metrics),
        **{column: np.tile(np.repeat(info[column].to_numpy(), n_metrics), n_models) for column in info},
        "metric": np.tile(CALIBRATION_METRICS, n_models * n_scopes),
        "overall": np.repeat(values[:, 0, :, 0][:, None], n_scopes, axis=1).ravel(),
        **columns,
    })
    table["direction"] = _direction(table)
    table["note"] = np.where(table["eligible"] | (table["attribute"] == OVERALL[0]), "",
                             f"fewer than {min_count} positives or negatives: reported, not tested")
    return table[COLUMNS]


def _direction(table: pd.DataFrame) -> np.ndarray:
    """In words, how the group's probabilities differ from the model's overall ones."""
    gap, metric = table["gap_overall"].to_numpy(float), table["metric"].to_numpy()
    words = {("citl", 1): "over-predicts risk", ("citl", -1): "under-predicts risk",
             ("slope", 1): "less extreme probabilities", ("slope", -1): "more extreme probabilities",
             ("intercept", 1): "higher intercept", ("intercept", -1): "lower intercept",
             ("ece", 1): "larger ECE", ("ece", -1): "smaller ECE"}
    sign = np.sign(np.nan_to_num(gap)).astype(int)
    return np.array([words.get((m, s), "") for m, s in zip(metric, sign)], dtype=object)


def flag_calibration(table: pd.DataFrame, *, fdr: float) -> pd.DataFrame:
    """Add tested / q_value / flagged: one BH family over the whole (all tasks) table of
    two-sided gap-to-overall tests of FLAG_METRICS in eligible groups with a reliable interval."""
    table["tested"] = (table["eligible"] & table["ci_reliable"] & table["metric"].isin(FLAG_METRICS)
                       & table["p_gap_overall"].notna())
    table["q_value"] = benjamini_hochberg(table["p_gap_overall"].where(table["tested"]).to_numpy(float))
    table["flagged"] = table["tested"] & (table["q_value"] <= fdr)
    return table


@blas_single_threaded
def calibration_table(*, predictions: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0, min_count: int = 30,
                      fdr: float = 0.05, level: float = 0.95) -> pd.DataFrame:
    """One row per (model, scope, calibration metric): value, gap to overall, CIs, p, q, flag."""
    frames = [calibration_rows(resampled, calibration_values(resampled), min_count=min_count, level=level)
              for resampled in resampled_tasks(predictions=predictions, n_bootstrap=n_bootstrap, seed=seed)]
    return flag_calibration(pd.concat(frames, ignore_index=True), fdr=fdr)
