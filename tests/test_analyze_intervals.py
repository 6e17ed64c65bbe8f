"""The report's intervals: the percentile interval widened to a t quantile on the patients a
number rests on, p-values on the same scale, and an unreliable mark where too few patients carry
it. Their coverage is measured by cxr_fast.analyze.coverage_bench (make bench)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cxr_fast.analyze import consistency_table, model_table, subgroup_table
from cxr_fast.analyze.bootstrap import (MIN_INFORMATIVE, expanded_interval, expanded_p_value, expanded_z,
                                        percentile_interval)
from cxr_fast.analyze.resampled import gap_informative_patients, informative_patients, resampled_tasks
from cxr_fast.metrics import METRICS
from pred_fixtures import simulate_predictions


def test_expanded_interval_is_the_percentile_interval_at_t_widened_levels():
    samples = np.random.default_rng(0).normal(size=(4000, 3))
    patients = np.array([3, 12, 10**7])
    low, high = expanded_interval(samples, patients)
    for j, n in enumerate(patients):
        z = np.sqrt(n / (n - 1)) * stats.t.ppf(0.975, n - 1)
        expected = np.quantile(samples[:, j], [stats.norm.cdf(-z), stats.norm.cdf(z)])
        np.testing.assert_allclose([low[j], high[j]], expected, rtol=1e-12)
    plain_low, plain_high = percentile_interval(samples)
    assert high[0] - low[0] > high[1] - low[1] > plain_high[1] - plain_low[1]  # fewer patients, wider
    assert high[2] - low[2] == pytest.approx(plain_high[2] - plain_low[2], rel=1e-3)  # many: the percentile one


def test_expanded_p_value_is_the_level_where_the_expanded_interval_touches_zero():
    patients = np.array([4, 15, 200])
    z = expanded_z(patients)  # a Wald z this large puts the expanded interval's end at zero
    np.testing.assert_allclose(expanded_p_value(z, patients), 0.05, rtol=1e-10)
    np.testing.assert_allclose(expanded_p_value(z, patients, one_sided=True), 0.025, rtol=1e-10)
    plain = 2 * stats.norm.sf(2.5)
    assert (expanded_p_value(np.full(3, 2.5), patients) > plain).all()  # few patients: less evidence
    assert np.isnan(expanded_p_value(np.array([3.0]), np.array([1]))).all()


@pytest.fixture(scope="module")
def predictions() -> pd.DataFrame:
    frame = simulate_predictions(tasks=("edema",), archs=("a", "b", "c"), n_images=700, prevalence=0.15, seed=4)
    return frame.assign(source=frame["recipe"])


def test_informative_patients_are_the_patients_with_the_rarer_outcome(predictions):
    (resampled,) = resampled_tasks(predictions=predictions, n_bootstrap=5, seed=0)
    data, counts = resampled.data, informative_patients(resampled.tallies)        # (M, S, K)
    gap_counts = gap_informative_patients(resampled.tallies)
    for s, positions in enumerate(resampled.scopes):
        subject, label = data.subject_index[positions], data.label[positions]
        patients = lambda rows: np.unique(subject[rows]).size  # noqa: E731
        assert resampled.tallies.patients["erring"][s] == patients((~data.correct[:, positions]).any(axis=0))
        for m in range(len(data.archs)):
            pred = data.pred[m, positions]
            tp, fn, fp, tn = (patients(label & pred), patients(label & ~pred), patients(~label & pred),
                              patients(~label & ~pred))
            expected = {"prevalence": min(patients(label), patients(~label)), "sensitivity": min(tp, fn),
                        "fnr": min(tp, fn), "specificity": min(tn, fp), "fpr": min(tn, fp), "ppv": min(tp, fp),
                        "npv": min(tn, fn), "auroc": min(patients(label), patients(~label)),
                        "balanced_accuracy": min(tp, fn, tn, fp)}
            assert dict(zip(METRICS, counts[m, s].tolist())) == expected
            gap = dict(zip(METRICS, gap_counts[m, s].tolist()))  # a gap: the metric's denominator patients
            assert (gap["fnr"], gap["fpr"], gap["npv"]) == (patients(label), patients(~label), patients(~pred))


def test_intervals_on_too_few_patients_are_marked_unreliable_and_never_tested(predictions):
    table = subgroup_table(predictions=predictions, n_bootstrap=60, min_count=0)
    few = table["n_informative"] < MIN_INFORMATIVE
    assert few.any() and (~few).any()
    assert (table["ci_reliable"] == ~few).all()
    few_for_gap = table["gap_n_informative"] < MIN_INFORMATIVE
    assert few_for_gap.any() and (table["gap_ci_reliable"] == ~few_for_gap).all()
    assert not table.loc[few_for_gap, "tested"].any()
    assert table.loc[~few_for_gap & table["metric"].isin(["fnr", "auroc"]) & table["p_harm"].notna(), "tested"].all()
    models = model_table(predictions=predictions, n_bootstrap=60)
    assert (models["ci_reliable"] == (models["n_informative"] >= MIN_INFORMATIVE)).all()
    assert models.loc[models["metric"] == "auroc", "ci_reliable"].all()  # 700 images: AUROC rests on many
    kappas = consistency_table(predictions=predictions, n_bootstrap=60, min_count=0)
    assert (kappas["ci_reliable"] == (kappas["n_informative"] >= MIN_INFORMATIVE)).all()
    assert not kappas.loc[~kappas["ci_reliable"], "eligible"].any()


def test_with_no_group_differing_the_flagged_share_stays_within_the_fdr():
    """Under the null (the simulator plants nothing: groups differ by chance only), over
    several data sets the share of tested rows flagged stays at or below the FDR level, for
    the subgroup gaps and the kappa gaps; so do the one-sided p-values' false alarms."""
    fdr, flagged, tested, small_p = 0.05, 0, 0, []
    for seed in range(4):
        frame = simulate_predictions(tasks=("edema", "effusion"), archs=("a", "b", "c", "d"), n_images=1500, seed=seed)
        frame = frame.assign(source=frame["recipe"])
        table = subgroup_table(predictions=frame, n_bootstrap=200, fdr=fdr, min_count=20)
        kappas = consistency_table(predictions=frame, n_bootstrap=200, fdr=fdr, min_count=20)
        flagged += int(table["flagged"].sum() + kappas["flagged"].sum())
        tested += int(table["tested"].sum() + kappas["eligible"].sum())
        small_p.append(table.loc[table["tested"], "p_harm"] < 0.05)
    assert tested > 1000
    assert flagged / tested <= fdr
    assert pd.concat(small_p).mean() <= 0.05 + 0.01  # one-sided p-values not anti-conservative


def test_below_two_informative_patients_there_is_no_interval_at_all():
    samples = np.random.default_rng(0).normal(size=(200, 2))
    low, high = expanded_interval(samples, np.array([1, 5]))
    assert np.isnan(low[0]) and np.isnan(high[0])  # not the resamples' range
    assert np.isfinite(low[1]) and low[1] < high[1]
