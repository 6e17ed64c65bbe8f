"""Adjusted inference: regression ORs equal a direct statsmodels fit; adjustment keeps a planted
intersection and drops its parents; kappa gaps flag only groups whose errors coincide."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from fairlearn.metrics import MetricFrame, false_negative_rate, false_positive_rate
from statsmodels.genmod.families import Binomial

from cxr_fast.analyze import consistency_table, subgroup_table
from cxr_fast.analyze.adjusted import ClassImages, adjusted_table, build_design, term_column
from cxr_fast.analyze.inputs import task_data
from cxr_fast.analyze.headline import format_q
from cxr_fast.analyze.simulate import PlantedAgreement, PlantedMiss, simulate_predictions
from cxr_fast.analyze.systematic import ERRORS

SCENARIO = dict(tasks=("effusion",), n_images=3000, prevalence=0.4)


def test_adjusted_odds_ratios_equal_a_direct_statsmodels_fit():
    predictions = simulate_predictions(tasks=("effusion",), archs=("resnet50", "densenet121"), n_images=1500,
                                       signal=0.5, seed=5)
    table = adjusted_table(predictions=predictions, min_count=30)
    rows = table[(table["model"] == "resnet50") & (table["error"] == "false_positive") & table["odds_ratio"].notna()]
    assert len(rows) >= 8 and rows["attribute"].str.contains(" x ").any()
    # The same fit written by hand: negatives of resnet50, clustered by patient.
    data = predictions[(predictions["arch"] == "resnet50") & (predictions["label"] == 0)].sort_values("key")
    data = data.assign(wrong=(data["pred"] == 1).astype(float))
    columns = {f"{a}={g}": ((data[a.split(' x ')[0]] == g.split(' & ')[0])
                            & (data[a.split(' x ')[-1]] == g.split(' & ')[-1])).astype(float).to_numpy()
               for a, g in zip(rows["attribute"], rows["group"])}
    left_out = table[(table["model"] == "resnet50") & (table["error"] == "false_positive")
                     & table["note"].str.startswith("left out with its images")]
    drop = np.zeros(len(data), bool)
    for attribute, group in zip(left_out["attribute"], left_out["group"]):
        drop |= (data[attribute] == group).to_numpy()
    design = pd.DataFrame({f"x{i}": v[~drop] for i, v in enumerate(columns.values())})
    design["wrong"] = data["wrong"].to_numpy()[~drop]
    formula = "wrong ~ " + " + ".join(c for c in design.columns if c != "wrong")
    direct = smf.glm(formula, design, family=Binomial()).fit(
        cov_type="cluster", cov_kwds={"groups": pd.factorize(data["subject_id"].to_numpy()[~drop])[0]})
    expected = np.exp(direct.params.iloc[1:].to_numpy())
    np.testing.assert_allclose(rows["odds_ratio"].to_numpy(), expected, rtol=1e-6)
    interval = np.exp(direct.conf_int().iloc[1:].to_numpy())
    np.testing.assert_allclose(rows[["ci_low", "ci_high"]].to_numpy(), interval, rtol=1e-6)
    np.testing.assert_allclose(rows["p_value"].to_numpy(), direct.pvalues.iloc[1:].to_numpy(), rtol=1e-6)


@pytest.fixture(scope="module")
def two_tasks():
    predictions = simulate_predictions(tasks=("effusion", "edema"), n_images=2500, images_per_subject=2.5,
                                       planted=PlantedMiss(attribute="sex x race", group="F & Black"), seed=3)
    return predictions, adjusted_table(predictions=predictions, workers=1)


def test_fits_from_covariate_patterns_equal_statsmodels_fits_on_the_images(two_tasks):
    predictions, table = two_tasks
    compared = 0
    for data in task_data(predictions):
        for error, on_label in ERRORS.items():
            in_class = data.label == on_label
            images = ClassImages(data.images.loc[in_class].reset_index(drop=True), data.subject_index[in_class])
            for m, arch in enumerate(data.archs):
                rows = table[(table["task"] == data.task) & (table["error"] == error) & (table["model"] == arch)]
                if rows["odds_ratio"].isna().all() or rows["note"].str.contains("after fitting").any():
                    continue
                wrong = ~data.correct[m][in_class]
                design = build_design(images, wrong, min_count=30)
                # The fit as statsmodels does it on every image, from its own starting values.
                direct = sm.GLM(wrong[design.keep].astype(float), design.matrix, family=sm.families.Binomial()).fit(
                    cov_type="cluster", cov_kwds={"groups": pd.factorize(images.clusters[design.keep])[0]})
                fitted = rows[rows["odds_ratio"].notna()]
                at = [design.names.index(term_column(a, g)) for a, g in zip(fitted["attribute"], fitted["group"])]
                np.testing.assert_allclose(fitted["odds_ratio"], np.exp(direct.params[at]), rtol=1e-6)
                np.testing.assert_allclose(fitted[["ci_low", "ci_high"]], np.exp(direct.conf_int()[at]), rtol=1e-6)
                np.testing.assert_allclose(fitted["p_value"], direct.pvalues[at], rtol=1e-6)
                compared += len(at)
    assert compared > 100


@pytest.mark.slow  # worker processes / a subprocess
def test_the_table_does_not_depend_on_the_number_of_worker_processes(two_tasks):
    predictions, table = two_tasks
    pd.testing.assert_frame_equal(adjusted_table(predictions=predictions, workers=2), table)


def _reference_sex(seed: int) -> str:
    sexes = simulate_predictions(**SCENARIO, archs=("resnet50",), seed=seed).query("label == 1")["sex"]
    return sexes[sexes != "Unknown"].value_counts().idxmax()


@pytest.fixture(scope="module")
def planted_intersection():
    seed = 2
    # The planted sex is the one that is not the reference: only then the cell is an interaction term.
    sex = "F" if _reference_sex(seed) == "M" else "M"
    group = f"{sex} & Black"
    predictions = simulate_predictions(**SCENARIO, planted=PlantedMiss(attribute="sex x race", group=group), seed=seed)
    return group, sex, adjusted_table(predictions=predictions)


def test_adjustment_flags_the_planted_intersection_and_not_its_parents(planted_intersection):
    group, sex, table = planted_intersection
    fn = table[table["error"] == "false_negative"]
    cell = fn[(fn["attribute"] == "sex x race") & (fn["group"] == group)]
    assert cell["flagged"].all() and len(cell) == 4  # the systematic errors and each of 3 models
    parents = fn["group"].isin([sex, "Black"]) | fn["group"].str.match(f"^{sex} & [0-9]")
    # Univariately the parents look worse (they contain the planted cell) ...
    assert fn.loc[parents, "univariate_flagged"].sum() >= 3
    # ... adjusted, none of them is.
    assert not fn.loc[parents, "flagged"].any(), fn.loc[parents & fn["flagged"], ["model", "attribute", "group"]]
    assert not table.loc[table["error"] == "false_positive", "flagged"].any()


def test_adjustment_flags_nothing_without_a_planted_group():
    table = adjusted_table(predictions=simulate_predictions(**SCENARIO, seed=0))
    assert table["odds_ratio"].notna().sum() > 40  # there was something to estimate
    assert table["flagged"].sum() <= 1, table[table["flagged"]][["model", "error", "attribute", "group", "q_value"]]


@pytest.mark.parametrize("planted", [True, False])
def test_kappa_gap_is_flagged_only_where_errors_are_planted_to_coincide(planted):
    agreement = PlantedAgreement(attribute="race", group="Asian") if planted else None
    predictions = simulate_predictions(tasks=("effusion",), n_images=1500, prevalence=0.4, agreement=agreement, seed=0)
    means = consistency_table(predictions=predictions, n_bootstrap=200).query("kind == 'mean'")
    flagged = means[means["flagged"]]
    assert means["eligible"].sum() > 15
    if planted:
        asian = means[(means["attribute"] == "race") & (means["group"] == "Asian")].iloc[0]
        assert asian["flagged"] and asian["gap_ci_low"] > 0
        assert flagged["group"].str.split(" & ").map(lambda levels: "Asian" in levels).all(), flagged["group"]
    else:
        assert flagged.empty, flagged[["attribute", "group", "q_value"]]


def test_per_group_error_rates_match_fairlearn():
    predictions = simulate_predictions(tasks=("effusion",), archs=("resnet50",), n_images=600, seed=1)
    ours = subgroup_table(predictions=predictions, n_bootstrap=5).query("attribute == 'race'")
    frame = MetricFrame(metrics={"fnr": false_negative_rate, "fpr": false_positive_rate},
                        y_true=predictions["label"].astype(int), y_pred=predictions["pred"],
                        sensitive_features=predictions["race"])
    for metric in ("fnr", "fpr"):
        got = ours[ours["metric"] == metric].set_index("group")["value"]
        np.testing.assert_allclose(got.sort_index(), frame.by_group[metric].sort_index(), rtol=1e-12)


def test_an_underflowed_q_value_prints_as_a_bound():
    assert format_q(0.0) == "q < 1e-300"
    assert format_q(5e-320) == "q < 1e-300"
    assert format_q(0.0123) == "q <= 0.012"


def test_a_class_whose_images_share_every_attribute_has_no_term_rows():
    """A small class (a tiny demo's positives) may hold one level of every attribute: no term to fit."""
    from cxr_fast.analyze.adjusted import ATTRIBUTES, fit_rows

    one_group = {"sex": "F", "age_group": "60-80", "race": "White", "view": "PA"}
    images = pd.DataFrame({column: [one_group.get(column, "x")] * 4 for column in ATTRIBUTES})
    rows = fit_rows("effusion", "false_negative", "m", ClassImages(images, np.arange(4)),
                    np.array([True, False, True, False]), min_count=1, level=0.95)
    assert rows == []
