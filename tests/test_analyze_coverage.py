"""The coverage study's pieces (python -m cxr_fast.analyze.coverage_bench; the study itself runs
in `make bench`): its patients have the prevalence asked for, its statistics are the report's
numbers, and a tiny cell is summarised and rendered."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_fast.analyze import coverage_bench as bench
from cxr_fast.analyze.bootstrap import subject_weights
from cxr_fast.analyze.resampled import Resampled


@pytest.mark.parametrize("prevalence", [0.02, 0.35])
def test_drawn_patients_have_the_prevalence_and_clustering_asked_for(prevalence):
    rng = np.random.default_rng(0)
    subject, label, score = bench.draw_patients(rng, 100_000, intercept=bench.label_intercept(prevalence), shift=0.0)
    assert label.mean() == pytest.approx(prevalence, abs=0.003)
    assert subject.size / 100_000 == pytest.approx(2.5, abs=0.02)
    # The patient effect: a patient's images share their label far more often than chance.
    first = np.r_[True, subject[1:] != subject[:-1]]
    second = ~first & np.r_[True, first[:-1]]
    together = label[second] & label[np.flatnonzero(second) - 1]
    assert together.mean() > 1.2 * prevalence ** 2  # independent images: prevalence ** 2
    assert score.shape == (2, subject.size)


def test_statistics_are_the_group_numbers_computed_directly():
    rng = np.random.default_rng(1)
    data = bench.draw_task(rng, 120, intercept=bench.label_intercept(0.1))
    weights = subject_weights(n_subjects=data.n_subjects, n_resamples=20, seed=0, task=data.task)
    result = bench.statistics(Resampled(data=data, groups=bench.cell_groups(data, 120), weights=weights))
    in_group = data.subject_index < 120
    label, pred = data.label, data.pred[0]
    sensitivity = lambda rows: (label & pred & rows).sum() / (label & rows).sum()  # noqa: E731
    assert result["sensitivity"].row[0] == pytest.approx(sensitivity(in_group))
    assert result["gap_fnr"].row[0] == pytest.approx(sensitivity(np.ones_like(in_group)) - sensitivity(in_group))
    patients_with = lambda rows: np.unique(data.subject_index[in_group & rows]).size  # noqa: E731
    assert result["sensitivity"].informative == result["gap_fnr"].informative == patients_with(label)
    assert result["sensitivity"].t_patients == patients_with(label)
    assert result["npv"].informative == patients_with(~pred)
    assert result["auroc"].informative == result["auroc"].t_patients == min(patients_with(label), patients_with(~label))
    # Balanced accuracy and the gaps count the patients of both halves / sides (Welch-Satterthwaite).
    assert result["balanced_accuracy"].t_patients > result["balanced_accuracy"].informative
    assert patients_with(label) < result["gap_fnr"].t_patients < np.unique(data.subject_index[label]).size
    assert all(statistic.row.shape == (21,) for statistic in result.values())
    specificity = lambda rows: (~label & ~pred & rows).sum() / (~label & rows).sum()  # noqa: E731
    assert result["gap_fpr"].row[0] == pytest.approx(specificity(np.ones_like(in_group)) - specificity(in_group))
    assert result["gap_balanced_accuracy"].row[0] == pytest.approx(
        (sensitivity(in_group) + specificity(in_group) - sensitivity(np.ones_like(in_group))
         - specificity(np.ones_like(in_group))) / 2)


def test_the_study_measures_every_gap_that_can_raise_a_flag():
    from cxr_fast.analyze.performance import FLAG_METRICS

    assert set(bench.GAPS.values()) == set(FLAG_METRICS)
    assert set(bench.GAPS) <= set(bench.STATISTICS)


def test_a_tiny_cell_is_summarised_and_rendered():
    cell = bench.run_cell(60, 0.35, replicates=4, bootstrap=30, truth_patients=20_000)
    assert set(cell["statistics"]) == set(bench.STATISTICS)
    for row in cell["statistics"].values():
        assert 0 <= row["defined_share"] <= 1 and row["reliable_share"] <= row["defined_share"]
        assert row["percentile"] is None or 0 <= row["percentile"] <= 1
        assert sum(n for n, _ in row["report_by_patients"].values()) == round(row["defined_share"] * 4)
    result = {"cells": [cell]}
    table = bench.markdown_table(result)
    assert all(f"| {name} | 60 | 35% |" in table for name in bench.STATISTICS)
    assert set(bench.pooled_by_patients(result)) == set(bench.STATISTICS)


def test_the_benchmark_scores_the_reports_own_intervals():
    from cxr_fast.analyze.performance import value_interval
    from cxr_fast.metrics import METRICS

    rng = np.random.default_rng(2)
    rows = np.vstack([np.full((1, len(METRICS)), 0.8), rng.normal(0.8, 0.05, (300, len(METRICS)))])  # estimate, resamples
    patients = np.full(len(METRICS), 30)
    low, high = value_interval(rows[0], rows[1:], patients, level=0.95)
    for name in ("sensitivity", "npv", "auroc", "balanced_accuracy"):
        k = METRICS.index(name)
        bench_low, bench_high = bench.report_interval(name, rows[:, k], np.array([30]))
        assert (bench_low[0], bench_high[0]) == pytest.approx((low[k], high[k]), rel=1e-12)
