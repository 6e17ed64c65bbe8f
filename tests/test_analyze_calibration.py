"""Calibration by group: bins equal sklearn's calibration_curve, slope and intercept a statsmodels
logistic fit, resamples a refit; a group whose probabilities are shifted is flagged, none otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm
from sklearn.calibration import calibration_curve

from cxr_fast.analyze.calibration import (
    CALIBRATION_METRICS, ECE_BINS, calibration_table, calibration_values, logit, recalibration_fit, reliability_bins)
from cxr_fast.analyze.inputs import task_data
from cxr_fast.analyze.resampled import resample
from cxr_fast.analyze.simulate import PlantedShift, simulate_predictions

SCENARIO = dict(tasks=("effusion",), n_images=3000, prevalence=0.35, signal=0.8, noise=1.2)


@pytest.fixture(scope="module")
def task():
    data = task_data(simulate_predictions(**SCENARIO, seed=4))[0]
    resampled = resample(data, n_bootstrap=50, seed=0)
    return resampled, calibration_values(resampled)


def test_bins_and_ece_equal_sklearn_calibration_curve(task):
    resampled, values = task
    data = resampled.data
    for s, positions in enumerate(resampled.scopes[:8]):
        for m in range(len(data.archs)):
            label, prob = data.label[positions], data.prob[m, positions]
            observed, predicted = calibration_curve(label, prob, n_bins=ECE_BINS, strategy="uniform")
            bins = reliability_bins(label, prob)
            np.testing.assert_allclose(bins["observed"], observed, rtol=1e-12)
            np.testing.assert_allclose(bins["mean_predicted"], predicted, rtol=1e-12)
            ece = np.sum(bins["n"] / label.size * np.abs(predicted - observed))
            ece_at = CALIBRATION_METRICS.index("ece")
            np.testing.assert_allclose(values[m, s, ece_at, 0], ece, rtol=1e-10)
            citl_at = CALIBRATION_METRICS.index("citl")
            np.testing.assert_allclose(values[m, s, citl_at, 0], prob.mean() - label.mean(), rtol=1e-10, atol=1e-14)


def test_an_edge_probability_falls_in_the_lower_bin_as_in_sklearn():
    label, prob = np.array([0, 1, 1, 0]), np.array([0.1, 0.2, 0.5, 0.95])
    observed, predicted = calibration_curve(label, prob, n_bins=ECE_BINS)
    bins = reliability_bins(label, prob)
    np.testing.assert_allclose(bins["mean_predicted"], predicted)
    np.testing.assert_allclose(bins["observed"], observed)
    assert bins["bin"].tolist() == [0, 1, 4, 9]


def test_slope_and_intercept_equal_a_statsmodels_logistic_fit(task):
    resampled, values = task
    data = resampled.data
    slope_at, intercept_at = CALIBRATION_METRICS.index("slope"), CALIBRATION_METRICS.index("intercept")
    for s, positions in enumerate(resampled.scopes[:6]):
        for m in range(len(data.archs)):
            x = logit(data.prob[m, positions])
            fit = sm.GLM(data.label[positions].astype(float), sm.add_constant(x), family=sm.families.Binomial()).fit()
            np.testing.assert_allclose(values[m, s, [intercept_at, slope_at], 0], fit.params, rtol=1e-7)


def test_a_resample_is_close_to_the_refit_with_its_patient_weights(task):
    """The one-step resample (Newton from the point fit) against the full weighted refit."""
    resampled, values = task
    data = resampled.data
    slope_at = CALIBRATION_METRICS.index("slope")
    image_weights = resampled.weights[:, data.subject_index].astype(float)
    steps = []
    for r in (1, 2, 3):
        x = logit(data.prob[0])
        fit = sm.GLM(data.label.astype(float), sm.add_constant(x), family=sm.families.Binomial(),
                     freq_weights=image_weights[r]).fit()
        steps.append((values[0, 0, slope_at, r] - fit.params[1], values[0, 0, slope_at, r] - values[0, 0, slope_at, 0]))
    for error, move in steps:
        assert abs(error) < 0.05 * abs(move) + 1e-3, steps  # the one-step error is second order


def test_recalibration_of_one_class_is_undefined():
    assert np.isnan(recalibration_fit(np.array([[0.1, 0.5, 2.0]]), np.array([1.0, 1.0, 1.0]))).all()


def test_a_group_whose_probabilities_are_shifted_is_flagged_and_nothing_else():
    predictions = simulate_predictions(**SCENARIO, shifted=PlantedShift(attribute="race", group="Black", shift=1.0), seed=1)
    table = calibration_table(predictions=predictions, n_bootstrap=200)
    flagged = table[table["flagged"]]
    black = (table["attribute"] == "race") & (table["group"] == "Black") & (table["metric"] == "citl")
    assert table.loc[black, "flagged"].all() and (table.loc[black, "direction"] == "over-predicts risk").all()
    # Every other flag is a group of Black patients over-predicted, or its mirror: a group without
    # them is under-predicted relative to an overall that contains them.
    with_black = flagged["group"].str.contains("Black")
    assert (flagged.loc[with_black, "direction"] == "over-predicts risk").all()
    assert (flagged.loc[~with_black, "direction"] == "under-predicts risk").all()


def test_nothing_is_flagged_without_a_shift():
    table = calibration_table(predictions=simulate_predictions(**SCENARIO, seed=1), n_bootstrap=200)
    assert table["tested"].sum() > 50  # there was something to test
    assert table["flagged"].sum() <= 1, table[table["flagged"]][["arch", "attribute", "group", "metric", "q_value"]]
