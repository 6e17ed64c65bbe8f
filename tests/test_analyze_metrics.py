"""Every metric, kappa and test statistic against scikit-learn / scipy on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.stats.contingency import odds_ratio
from sklearn.metrics import (balanced_accuracy_score, cohen_kappa_score, precision_score, recall_score,
                             roc_auc_score)

from cxr_fast.analyze.bootstrap import expanded_p_value, percentile_interval, subject_counts, wald_z
from cxr_fast.analyze.consistency import error_consistency
from cxr_fast.analyze.stats import benjamini_hochberg, odds_ratio_woolf
from cxr_fast.metrics import binary_metrics


def random_case(rng: np.random.Generator, n: int, *, ties: bool = False):
    label = rng.random(n) < rng.uniform(0.2, 0.8)
    label[:2] = [True, False]  # both classes present
    prob = np.clip(0.3 * label + rng.random(n) * 0.7, 0, 1)
    if ties:
        prob = np.round(prob, 1)  # few distinct values: many ties, also across classes
    pred = prob >= 0.5
    return label, prob, pred


def sklearn_metrics(label, prob, pred, weight=None) -> dict[str, float]:
    kwargs = {"sample_weight": weight}
    return {
        "auroc": roc_auc_score(label, prob, **kwargs),
        "balanced_accuracy": balanced_accuracy_score(label, pred, **kwargs),
        "sensitivity": recall_score(label, pred, **kwargs),
        "specificity": recall_score(label, pred, pos_label=0, **kwargs),
        "ppv": precision_score(label, pred, zero_division=np.nan, **kwargs),
        "npv": precision_score(label, pred, pos_label=0, zero_division=np.nan, **kwargs),
        "prevalence": np.average(label, weights=weight),
    }


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_metrics_equal_sklearn(ties, weighted):
    rng = np.random.default_rng(7 + ties + 2 * weighted)
    for _ in range(20):
        n = int(rng.integers(10, 300))
        label, prob, pred = random_case(rng, n, ties=ties)
        weight = rng.integers(0, 4, n).astype(float) if weighted else None
        if weighted:
            weight[:2] = 1.0
        ours = binary_metrics(label=label, prob=prob, pred=pred, sample_weight=weight).iloc[0]
        for name, expected in sklearn_metrics(label, prob, pred, weight).items():
            assert ours[name] == pytest.approx(expected, abs=1e-12, nan_ok=True), name
        assert ours["fnr"] == pytest.approx(1 - ours["sensitivity"])
        assert ours["fpr"] == pytest.approx(1 - ours["specificity"])


def test_weight_matrix_rows_are_independent_weightings():
    rng = np.random.default_rng(3)
    label, prob, pred = random_case(rng, 120, ties=True)
    weights = rng.integers(0, 3, size=(5, 120)).astype(float)
    weights[:, :2] = 1
    together = binary_metrics(label=label, prob=prob, pred=pred, sample_weight=weights)
    for r in range(5):
        alone = binary_metrics(label=label, prob=prob, pred=pred, sample_weight=weights[r])
        np.testing.assert_allclose(together.iloc[r].to_numpy(float), alone.iloc[0].to_numpy(float), rtol=1e-12)


def test_one_class_gives_nan_auroc_not_an_error():
    prob = np.array([0.1, 0.4, 0.8])
    only_negatives = binary_metrics(label=np.zeros(3, bool), prob=prob, pred=prob > 0.5).iloc[0]
    assert np.isnan(only_negatives["auroc"]) and np.isnan(only_negatives["sensitivity"])
    assert np.isnan(only_negatives["balanced_accuracy"])  # sens undefined -> mean undefined
    assert only_negatives["specificity"] == pytest.approx(2 / 3)
    empty = binary_metrics(label=np.zeros(0, bool), prob=np.zeros(0), pred=np.zeros(0, bool)).iloc[0]
    assert empty.isna().all()


def test_all_scores_tied_is_auroc_one_half():
    label = np.array([True, False, True, False])
    assert binary_metrics(label=label, prob=np.full(4, 0.3), pred=np.zeros(4, bool)).iloc[0]["auroc"] == 0.5


@pytest.mark.parametrize("weighted", [False, True])
def test_kappa_equals_cohen_kappa_of_correctness(weighted):
    rng = np.random.default_rng(11)
    for _ in range(20):
        n = int(rng.integers(20, 200))
        correct = rng.random((4, n)) < rng.uniform(0.5, 0.95, size=(4, 1))
        weight = rng.integers(0, 4, n).astype(float) if weighted else None
        table = error_consistency(correct=correct, sample_weight=weight)
        assert len(table) == 6
        for row in table.itertuples():
            a, b = int(row.model_a[-1]), int(row.model_b[-1])
            expected = cohen_kappa_score(correct[a], correct[b], sample_weight=weight)
            assert row.kappa == pytest.approx(expected, abs=1e-12)


def test_kappa_degenerate_cases():
    always_right = np.ones(50, bool)
    sometimes = np.r_[np.ones(40, bool), np.zeros(10, bool)]
    table = error_consistency(correct=np.stack([always_right, sometimes, always_right]), names=("a", "b", "c"))
    by_pair = table.set_index(["model_a", "model_b"])
    # One model always right: agreement is exactly what chance predicts -> 0 (as sklearn).
    assert by_pair.loc[("a", "b"), "kappa"] == 0.0 == cohen_kappa_score(always_right, sometimes)
    # Both always right: c_exp = 1, nothing to be consistent about -> NaN (as sklearn).
    assert by_pair.loc[("a", "c"), "c_exp"] == 1.0 and np.isnan(by_pair.loc[("a", "c"), "kappa"])
    with pytest.warns(Warning):
        assert np.isnan(cohen_kappa_score(always_right, always_right))


def test_benjamini_hochberg_equals_scipy_and_skips_nan():
    rng = np.random.default_rng(5)
    p = rng.random(200) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p), rtol=1e-12)
    with_nan = np.r_[p[:50], np.nan, np.nan]
    q = benjamini_hochberg(with_nan)
    assert np.isnan(q[-2:]).all()
    np.testing.assert_allclose(q[:50], stats.false_discovery_control(p[:50]), rtol=1e-12)


def test_odds_ratio_woolf_equals_scipy_and_haldane_for_zero_cells():
    result = odds_ratio([[10, 20], [5, 40]], kind="sample")
    ci = result.confidence_interval(0.95)
    assert odds_ratio_woolf(10, 20, 5, 40) == pytest.approx((result.statistic, ci.low, ci.high), rel=1e-12)
    estimate, low, high = odds_ratio_woolf(0, 20, 5, 40)
    assert estimate == pytest.approx((0.5 * 40.5) / (20.5 * 5.5)) and 0 < low < estimate < high


def test_percentile_interval_equals_numpy_and_ignores_nan():
    rng = np.random.default_rng(2)
    samples = rng.normal(size=(999, 7))
    low, high = percentile_interval(samples, level=0.9)
    np.testing.assert_allclose(low, np.percentile(samples, 5, axis=0))
    np.testing.assert_allclose(high, np.percentile(samples, 95, axis=0))
    samples[:100, 0] = np.nan
    samples[:600, 1] = np.nan  # fewer than half defined: no honest interval
    low, high = percentile_interval(samples)
    assert low[0] == pytest.approx(np.nanpercentile(samples[:, 0], 2.5)) and np.isnan(low[1]) and np.isnan(high[1])


def test_wald_z_and_its_p_value():
    """The bootstrap Wald test behind every flag: z = estimate / bootstrap SE; with many
    informative patients its p on the report's (t) scale is the normal one."""
    rng = np.random.default_rng(4)
    samples = rng.normal(0.1, 0.05, size=(2000, 1))
    many = np.array([10 ** 6])
    z = wald_z(np.array([0.1]), samples)
    assert expanded_p_value(z, many)[0] == pytest.approx(2 * stats.norm.sf(2), rel=0.05)
    zero = wald_z(np.array([0.0]), np.zeros((100, 1)))
    assert expanded_p_value(zero, many)[0] == 1.0  # no gap in any resample


def test_subject_counts_are_seeded_resamples_with_replacement():
    counts = subject_counts(n_subjects=40, n_resamples=300, seed=1, stream=9)
    assert counts.shape == (300, 40) and (counts.sum(axis=1) == 40).all()
    np.testing.assert_array_equal(counts, subject_counts(n_subjects=40, n_resamples=300, seed=1, stream=9))
    assert not np.array_equal(counts, subject_counts(n_subjects=40, n_resamples=300, seed=2, stream=9))
    # Each subject is drawn Binomial(40, 1/40) times: mean 1, variance 39/40.
    assert counts.mean() == pytest.approx(1.0) and counts.var() == pytest.approx(39 / 40, rel=0.1)
