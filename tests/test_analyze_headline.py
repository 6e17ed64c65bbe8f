"""The headline leads with what survives adjustment: a planted intersection leads alone (its
parents follow as explained), two independent main effects both lead and their intersection does
not; an unfitted adjusted model falls back to unadjusted findings; model counts are the task's."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from cxr_fast.analyze import Settings, analyze
from cxr_fast.analyze.headline import adjusted_findings, calibration_lines, headline, overlaps
from cxr_fast.analyze.report import flagged_calibration_groups, headline_and_findings, headline_findings
from cxr_fast.analyze.simulate import PlantedMiss, PlantedShift, simulate_predictions, write_prediction_files

SCENARIO = dict(tasks=("effusion",), n_images=3000, prevalence=0.4)
SETTINGS = Settings(n_bootstrap=100)


def _analysis(tmp_path, predictions):
    write_prediction_files(predictions=predictions, pred_dir=tmp_path / "pred")
    return analyze(pred_dir=tmp_path / "pred", settings=SETTINGS)


def _non_reference_sex(seed: int) -> str:
    """The planted sex must not be the regression's reference (the larger among positives):
    only then is an effect confined to it a term of its own (see adjusted.py)."""
    sexes = simulate_predictions(**SCENARIO, archs=("resnet50",), seed=seed).query("label == 1")["sex"]
    return "F" if sexes[sexes != "Unknown"].value_counts().idxmax() == "M" else "M"


@pytest.fixture(scope="module")
def intersection(tmp_path_factory):
    seed = 2
    group = f"{_non_reference_sex(seed)} & Black"
    predictions = simulate_predictions(**SCENARIO, planted=PlantedMiss(attribute="sex x race", group=group), seed=seed)
    return group, _analysis(tmp_path_factory.mktemp("intersection"), predictions)


def test_a_planted_intersection_leads_alone_and_its_parents_are_explained_by_it(intersection):
    group, analysis = intersection
    lines, findings = headline_and_findings(analysis)
    leading = {(row["attribute"], row["group"]) for row in findings["adjusted"]}
    assert leading == {("sex x race", group)}, findings["adjusted"]
    assert lines[0].startswith(f"effusion: sex x race = {group} misses more of its positives, after adjustment")
    explained = {(row["attribute"], row["group"]): row["explained_by"] for row in findings["explained"]}
    sex = group.split(" & ")[0]
    assert ("sex", sex) in explained and ("race", "Black") in explained  # univariately flagged, explained away
    assert all(by == [f"sex x race = {group}"] for by in explained.values()), explained
    # No explained group is listed as a finding of its own anywhere in the headline.
    for attribute, name in explained:
        assert not any(line.startswith(f"effusion: {attribute} = {name} ") for line in lines), lines


@pytest.fixture(scope="module")
def two_main_effects(tmp_path_factory):
    seed = 2
    sex = _non_reference_sex(seed)
    predictions = simulate_predictions(**SCENARIO, planted=(PlantedMiss(attribute="sex", group=sex, shift=1.5),
                                                            PlantedMiss(attribute="race", group="Black", shift=1.5)), seed=seed)
    return sex, _analysis(tmp_path_factory.mktemp("main_effects"), predictions)


def test_two_independent_main_effects_both_lead_and_their_intersection_does_not(two_main_effects):
    sex, analysis = two_main_effects
    lines, findings = headline_and_findings(analysis)
    leading = [(row["attribute"], row["group"]) for row in findings["adjusted"]]
    assert set(leading) == {("sex", sex), ("race", "Black")}, leading
    assert ("sex x race", f"{sex} & Black") not in leading
    assert not any(f"sex x race = {sex} & Black misses" in line for line in lines)


def test_an_adjusted_model_that_could_not_be_fitted_falls_back_to_unadjusted_findings(intersection):
    group, analysis = intersection
    adjusted = analysis.tables["adjusted"].copy()
    adjusted[["odds_ratio", "ci_low", "ci_high", "p_value", "q_value"]] = float("nan")
    adjusted["flagged"] = False
    adjusted["note"] = "not fitted: quasi-separation (|log OR| > 10) for race=Black"
    tables = {**analysis.tables, "adjusted": adjusted}
    lines, findings = headline(tables, models_per_task={"effusion": 3}, fdr=0.05, threshold=0.8)
    assert not findings["adjusted"] and not findings["explained"]
    unadjusted = {(row["attribute"], row["group"]) for row in findings["unadjusted"]}
    assert ("sex x race", group) in unadjusted
    line = next(line for line in lines if line.startswith(f"effusion: sex x race = {group} "))
    assert "(unadjusted: the adjusted model could not estimate it, not fitted: quasi-separation" in line
    assert not any("after adjustment" in line for line in lines)


def test_headline_counts_each_task_s_own_models(tmp_path):
    """Two tasks of 3 and 2 models: every "k of N models" says N = that task's models, not 5."""
    planted = PlantedMiss(attribute="race", group="Black")
    predictions = pd.concat([
        simulate_predictions(tasks=("effusion",), archs=("resnet50", "densenet121", "convnext_tiny"), n_images=1500,
                             planted=planted, seed=1),
        simulate_predictions(tasks=("edema",), archs=("resnet50", "densenet121"), n_images=1500, planted=planted, seed=2),
    ], ignore_index=True)
    lines = headline_findings(_analysis(tmp_path, predictions))
    counted = [(line.split(":")[0], int(n)) for line in lines for n in re.findall(r"\d+ of (\d+) (?:of the task's )?models", line)]
    assert counted and {task for task, _ in counted} == {"effusion", "edema"}, lines
    assert all(n == {"effusion": 3, "edema": 2}[task] for task, n in counted), counted


def test_the_headline_names_a_miscalibrated_group(tmp_path):
    predictions = simulate_predictions(**SCENARIO, signal=0.8, noise=1.2,
                                       shifted=PlantedShift(attribute="race", group="Black", shift=1.0), seed=1)
    analysis = _analysis(tmp_path, predictions)
    line = next(line for line in headline_findings(analysis) if "calibration gap flagged" in line)
    assert "race = Black (over-predicts risk, 3 of 3 models" in line
    # The reliability diagram's first group panel is the shifted group or a part of it (F & Black).
    panels = [(attribute, group) for attribute, group, _ in flagged_calibration_groups(analysis.tables["calibration"],
                                                                                     analysis.tasks[0])]
    assert "Black" in panels[0][1] and ("race", "Black") in panels, panels
    # The diagram draws the groups in the order the headline names them (one ranking for both).
    names = [f"{attribute} = {group}" for attribute, group in panels]
    named = [name for name in names if f"{name} (" in line]
    assert named and sorted(named, key=line.index) == named
    assert names[:len(named)] == named, (panels, line)


def test_groups_overlap_unless_they_differ_on_a_shared_attribute():
    assert overlaps(("sex", "F"), ("sex x race", "F & Black"))
    assert overlaps(("sex x age_group", "F & 20-40"), ("sex x race", "F & Black"))
    assert overlaps(("race", "Black"), ("sex x race", "F & Black"))
    assert not overlaps(("sex x race", "M & Black"), ("sex x race", "F & Black"))
    assert not overlaps(("race", "White"), ("sex x race", "F & Black"))


def test_a_finding_the_systematic_fit_does_not_flag_takes_the_models_own_odds_ratio():
    def row(scope, arch, odds_ratio, q_value, flagged):
        return {"task": "effusion", "error": "fn", "attribute": "age_group", "group": "80+", "scope": scope,
                "arch": arch, "odds_ratio": odds_ratio, "ci_low": odds_ratio / 2, "ci_high": odds_ratio * 2,
                "q_value": q_value, "flagged": flagged}

    adjusted = pd.DataFrame([row("model", "a", 3.0, 0.01, True), row("model", "b", 4.0, 0.02, True),
                             row("model", "c", 1.1, 0.80, False), row("systematic", "", 1.06, 0.96, False)])
    finding = adjusted_findings(adjusted, models_per_task={"effusion": 3}).iloc[0]
    assert (finding.odds_ratio, finding.q_value, finding.models_flagged) == (3.0, 0.02, 2)
    assert finding.or_source == "median over the models' fits" and pd.isna(finding.ci_low)
    adjusted.loc[3, ["odds_ratio", "ci_low", "q_value", "flagged"]] = [2.5, 1.25, 0.001, True]
    finding = adjusted_findings(adjusted, models_per_task={"effusion": 3}).iloc[0]
    assert (finding.odds_ratio, finding.ci_low, finding.or_source) == (2.5, 1.25, "systematic errors")


def test_a_calibration_line_counts_and_describes_the_metric_it_names():
    from cxr_fast.analyze.headline import calibration_lines

    def row(arch, metric, direction, gap):
        return {"task": "effusion", "arch": arch, "attribute": "race", "group": "Black", "metric": metric,
                "flagged": True, "direction": direction, "gap_overall": gap, "value": 0.5 + gap, "overall": 0.5}

    # All three models flag the slope, one the calibration-in-the-large: the slope is named, for 3 of 3.
    table = pd.DataFrame([row("a", "slope", "more extreme probabilities", -0.3),
                          row("b", "slope", "more extreme probabilities", -0.2),
                          row("c", "slope", "less extreme probabilities", 0.1),
                          row("a", "citl", "over-predicts risk", 0.05)])
    (line,) = calibration_lines(table, {"effusion": 3})
    assert "race = Black (in different directions for different models, 3 of 3 models; calibration slope" in line
    assert "over-predicts" not in line


def test_the_reliability_diagram_draws_groups_in_the_headlines_order():
    """Three models; `race = White` flagged on its slope by all three, `race = Black` on its
    calibration-in-the-large by two, `sex = F` on its calibration-in-the-large by one only. The
    headline names Black (citl) then White (slope) and counts F; the diagram's panels follow."""
    from cxr_fast.analyze.inputs import task_data

    predictions = simulate_predictions(tasks=("edema",), archs=("a", "b", "c"), n_images=600, seed=0)
    (data,) = task_data(predictions.assign(source=predictions["recipe"]))

    def rows(attribute, group, metric, archs, gap):
        return [{"task": "edema", "arch": arch, "attribute": attribute, "group": group, "metric": metric,
                 "flagged": True, "gap_overall": gap, "value": 0.5, "overall": 0.5, "direction": "over-predicts risk"}
                for arch in archs]

    calibration = pd.DataFrame(rows("race", "White", "slope", "abc", 0.4) + rows("race", "Black", "citl", "ab", 0.1)
                               + rows("sex", "F", "citl", "a", 0.3))
    line = next(line for line in calibration_lines(calibration, {"edema": 3}))
    assert line.index("race = Black (") < line.index("race = White (") and "1 flagged for at most half" in line
    panels = [(attribute, group) for attribute, group, _ in flagged_calibration_groups(calibration, data)]
    assert panels == [("race", "Black"), ("race", "White"), ("sex", "F")]
