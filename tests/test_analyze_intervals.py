"""The report's intervals: Wilson's on the effective sample size for a proportion, the percentile
interval widened to a t quantile on the patients a number rests on for the rest, p-values on the
same scale, and an unreliable mark where too few patients carry it. Their coverage is measured by
cxr_fast.analyze.coverage_bench (make bench)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cxr_fast.analyze import consistency_table, model_table, subgroup_table
from cxr_fast.analyze.bootstrap import (MIN_INFORMATIVE, bootstrap_variance, expanded_interval, expanded_p_value,
                                        expanded_z, percentile_interval, satterthwaite_patients, wilson_interval)
from cxr_fast.analyze.performance import t_patients, value_interval, value_reliable
from cxr_fast.analyze.resampled import informative_patients, resampled_tasks
from cxr_fast.metrics import METRICS, PROPORTIONS
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


def test_informative_patients_are_the_patients_in_the_metrics_denominator(predictions):
    (resampled,) = resampled_tasks(predictions=predictions, n_bootstrap=5, seed=0)
    data, counts = resampled.data, informative_patients(resampled.tallies)        # (M, S, K)
    for s, positions in enumerate(resampled.scopes):
        subject, label = data.subject_index[positions], data.label[positions]
        patients = lambda rows: np.unique(subject[rows]).size  # noqa: E731
        assert resampled.tallies.patients["erring"][s] == patients((~data.correct[:, positions]).any(axis=0))
        both = min(patients(label), patients(~label))
        for m in range(len(data.archs)):
            pred = data.pred[m, positions]
            expected = {"prevalence": both, "auroc": both, "balanced_accuracy": both,
                        "sensitivity": patients(label), "fnr": patients(label), "specificity": patients(~label),
                        "fpr": patients(~label), "ppv": patients(pred), "npv": patients(~pred)}
            assert dict(zip(METRICS, counts[m, s].tolist())) == expected


def test_wilson_interval_is_statsmodels_wilson_at_the_effective_sample_size():
    from statsmodels.stats.proportion import proportion_confint

    rng = np.random.default_rng(3)
    estimate = np.array([0.3, 0.92, 0.0, 1.0])
    samples = np.column_stack([rng.normal(0.3, 0.05, 3000), rng.normal(0.92, 0.03, 3000),
                               np.zeros(3000), np.ones(3000)])
    patients = np.array([40, 40, 25, 60])
    low, high = wilson_interval(estimate, samples, patients)
    n_eff = np.r_[estimate[:2] * (1 - estimate[:2]) / samples[:, :2].var(axis=0, ddof=1), patients[2:]]
    for j in range(4):
        expected = proportion_confint(estimate[j] * n_eff[j], n_eff[j], alpha=0.05, method="wilson")
        np.testing.assert_allclose([low[j], high[j]], expected, rtol=1e-9, atol=1e-12)
    # A proportion of 0 or 1 still gets an interval that reaches into (0, 1) on its patients.
    assert low[2] == pytest.approx(0, abs=1e-12) and 0 < high[2] < 0.2 and 0.9 < low[3] < 1 and high[3] == pytest.approx(1)
    one_patient = wilson_interval(np.array([0.5]), samples[:, :1], np.array([1]))
    assert np.isnan(one_patient).all()


def test_a_sensitivity_without_a_missed_patient_gets_a_reliable_interval_below_one(predictions):
    """40 patients with a positive image, none missed: the old rule (the rarer outcome's
    patients, here 0) printed no interval at all; the estimate of 1 is uncertain all the same."""
    samples = np.ones((200, len(METRICS)))
    estimate = np.ones(len(METRICS))
    patients = np.full(len(METRICS), 40)
    low, high = value_interval(estimate, samples, patients, level=0.95)
    sensitivity = METRICS.index("sensitivity")
    assert 0.85 < low[sensitivity] < 1 and high[sensitivity] == 1
    proportion = np.isin(METRICS, PROPORTIONS)
    assert np.isfinite(low[proportion]).all()
    np.testing.assert_array_equal(low[~proportion], 1.0)  # AUROC, balanced accuracy: the percentile interval


def test_intervals_on_too_few_patients_are_marked_unreliable_and_never_tested(predictions):
    table = subgroup_table(predictions=predictions, n_bootstrap=60, min_count=0)
    few = table["n_informative"] < MIN_INFORMATIVE
    assert few.any() and (~few).any()
    # PPV and NPV also need the patients of each class (prevalence's informative patients).
    classes = table.loc[table["metric"] == "prevalence"].set_index(["arch", "attribute", "group"])["n_informative"]
    rows_classes = classes.reindex(pd.MultiIndex.from_frame(table[["arch", "attribute", "group"]])).to_numpy()
    few_classes = table["metric"].isin(["ppv", "npv"]).to_numpy() & (rows_classes < MIN_INFORMATIVE)
    assert (few_classes & ~few).any()
    assert (table["ci_reliable"] == ~(few | few_classes)).all()
    assert (table["gap_overall_ci_reliable"] == ~few).all()
    assert not table.loc[few, "tested"].any()
    assert table.loc[~few & table["eligible"] & table["metric"].isin(["fnr", "auroc"]) & table["p_harm"].notna(),
                     "tested"].all()
    models = model_table(predictions=predictions, n_bootstrap=60)
    rates = models[~models["metric"].isin(["ppv", "npv"])]
    assert (rates["ci_reliable"] == (rates["n_informative"] >= MIN_INFORMATIVE)).all()
    assert models.loc[models["metric"] == "auroc", "ci_reliable"].all()  # 700 images: AUROC rests on many
    kappas = consistency_table(predictions=predictions, n_bootstrap=60, min_count=0)
    assert (kappas["ci_reliable"] == (kappas["n_informative"] >= MIN_INFORMATIVE)).all()
    assert not kappas.loc[~kappas["ci_reliable"], "eligible"].any()


def test_a_predictive_value_on_a_handful_of_positive_patients_is_unreliable():
    """NPV of a group with 100 patients predicted negative but 4 with a positive image: its
    misses come from those 4, and its interval turns on one or two of them."""
    informative = np.array([[4, 60, 60, 4, 100, 30, 100, 4, 100]])   # METRICS order
    assert METRICS == ("prevalence", "auroc", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv",
                       "fnr", "fpr")
    ok = dict(zip(METRICS, value_reliable(informative)[0].tolist()))
    assert not ok["npv"] and not ok["ppv"] and not ok["sensitivity"] and not ok["prevalence"]
    assert ok["specificity"] and ok["fpr"]
    informative[0, 0] = 12  # 12 patients of each class: the predictive values are reliable again
    assert value_reliable(informative)[0, METRICS.index("npv")]


def test_satterthwaite_patients_count_the_parts_that_carry_the_variance():
    n = (np.array([11.0]), np.array([41.0]))
    one_part = satterthwaite_patients([np.array([2.0]), np.array([0.0])], n)
    assert one_part[0] == pytest.approx(11)          # all variance in the part on 11 patients
    equal = satterthwaite_patients([np.array([1.0]), np.array([1.0])], n)
    assert equal[0] == pytest.approx(1 + 4 / (1 / 10 + 1 / 40))
    assert 11 < equal[0] < 11 + 41
    # Fewer than 2 patients in a part, or nothing varies: the fewest patients.
    assert satterthwaite_patients([np.array([1.0]), np.array([1.0])], (np.array([1.0]), np.array([40.0])))[0] == 1
    assert satterthwaite_patients([np.array([0.0]), np.array([np.nan])], n)[0] == 11


def test_balanced_accuracy_counts_the_patients_of_both_its_halves():
    """Its t quantile: Welch-Satterthwaite over sensitivity (13 patients with a positive image)
    and specificity (58 with a negative one), not the 13 alone, which covered 0.968."""
    rng = np.random.default_rng(5)
    at = {name: METRICS.index(name) for name in METRICS}
    informative = np.array([13, 13, 13, 13, 58, 28, 53, 13, 58], dtype=float)
    samples = rng.normal(0.6, 0.02, (2000, len(METRICS)))
    for spread, expected in ((0.0, 13.0), (0.02, None)):
        samples[:, at["specificity"]] = rng.normal(0.76, spread, 2000) if spread else 0.76
        patients = t_patients(bootstrap_variance(samples)[0], informative)
        variance = samples.var(axis=0, ddof=1)
        ws = (variance[at["sensitivity"]] + variance[at["specificity"]]) ** 2 / (
            variance[at["sensitivity"]] ** 2 / 12 + variance[at["specificity"]] ** 2 / 57)
        assert patients[at["balanced_accuracy"]] == pytest.approx(expected or 1 + ws)
        np.testing.assert_array_equal(np.delete(patients, at["balanced_accuracy"]),
                                      np.delete(informative, at["balanced_accuracy"]))
    assert 13 < patients[at["balanced_accuracy"]] < 13 + 58


def test_a_gaps_test_and_interval_use_its_satterthwaite_degrees_of_freedom(predictions):
    table = subgroup_table(predictions=predictions, n_bootstrap=200, min_count=0)
    rows = table[table["gap_overall_ci_reliable"] & table["p_harm"].notna()]
    # Both sides carry patients: at least the group's alone; the overall's count is the ceiling.
    group_df = np.where(rows["metric"] == "balanced_accuracy", rows["df"], rows["n_informative"] - 1)
    assert (rows["gap_overall_df"] >= group_df - 1e-9).all() and (rows["gap_overall_df"] > group_df + 1).any()
    # The p-value and the interval are on the same t scale: the z the p-value implies on those
    # degrees of freedom is the gap over the SE the interval's width implies at their quantile.
    df = rows["gap_overall_df"].to_numpy()
    z_from_p = stats.t.isf(rows["p_harm"].to_numpy(), df) / np.sqrt(df / (df + 1))
    se_from_width = (rows["gap_overall_ci_high"] - rows["gap_overall_ci_low"]).to_numpy() / (2 * expanded_z(df + 1))
    harm = np.where(rows["metric"].isin(["fnr", "fpr"]), 1, -1) * rows["gap_overall"].to_numpy()
    clear = np.abs(harm) > 0.5 * se_from_width
    assert clear.sum() > 20
    assert np.median(z_from_p[clear] / (harm / se_from_width)[clear]) == pytest.approx(1, abs=0.1)
    proportion = rows["metric"].isin(PROPORTIONS)
    assert rows.loc[proportion, "df"].isna().all() and rows.loc[~proportion, "df"].notna().all()


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
