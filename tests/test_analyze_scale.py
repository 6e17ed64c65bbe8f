"""The shared-resample kernels equal the image-level computation they replace, and the
per-task summary of the report counts flagged models right."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr_fast.analyze import subgroup_table
from cxr_fast.analyze.bootstrap import point_and_resamples
from cxr_fast.analyze.consistency import kappa_arrays, task_consistency
from cxr_fast.analyze.report import task_summary
from cxr_fast.analyze.resampled import metric_values, resampled_tasks
from cxr_fast.analyze.simulate import PlantedMiss
from cxr_fast.metrics import metric_matrix
from pred_fixtures import simulate_predictions

B = 40


@pytest.fixture(scope="module")
def predictions():
    frame = simulate_predictions(tasks=("edema", "effusion"), archs=("a", "b", "c", "d"), n_images=500, seed=5)
    frame["prob"] = frame["prob"].round(2)  # ties between positives and negatives
    frame["pred"] = (frame["prob"] >= 0.5).astype(int)
    return frame.assign(source=frame["recipe"])


def test_metric_values_equal_metric_matrix_on_image_weights_bit_for_bit(predictions):
    for resampled in resampled_tasks(predictions=predictions, n_bootstrap=B, seed=2):
        data = resampled.data
        weights = point_and_resamples(subject_index=data.subject_index, n_resamples=B, seed=2, task=data.task)
        overall, by_group = metric_values(resampled)
        for m in range(len(data.archs)):
            np.testing.assert_array_equal(overall[m], metric_matrix(weights, data.label, data.prob[m], data.pred[m]).T)
            for g, (_, _, positions) in enumerate(resampled.groups):
                expected = metric_matrix(weights[:, positions], data.label[positions], data.prob[m, positions],
                                         data.pred[m, positions]).T
                np.testing.assert_array_equal(by_group[m, g], expected)


def test_consistency_from_subject_sums_equals_image_level_kappa(predictions):
    for resampled in resampled_tasks(predictions=predictions, n_bootstrap=B, seed=2):
        data = resampled.data
        weights = point_and_resamples(subject_index=data.subject_index, n_resamples=B, seed=2, task=data.task)
        blocks = task_consistency(resampled, level=0.95, min_count=30)
        scopes = [np.arange(data.label.size)] + [positions for _, _, positions in resampled.groups]
        for block, positions in zip(blocks, scopes):
            kappa = kappa_arrays(weights[:, positions], data.correct[:, positions])["kappa"]
            np.testing.assert_array_equal(block["kappa"][1:], kappa[0])


def test_task_summary_counts_the_flagged_models_of_each_task():
    # The planted miss hits the first half of the models only: 2 of 4 per task.
    frame = simulate_predictions(tasks=("edema", "effusion"), archs=("a", "b", "c", "d"), n_images=1500, seed=1,
                                 planted=PlantedMiss(shift=4.0, share_of_models=0.5))
    table = subgroup_table(predictions=frame.assign(source=frame["recipe"]), n_bootstrap=100)
    summary = task_summary(table).set_index(["task", "attribute", "group", "metric"])
    for task in ("edema", "effusion"):
        planted = summary.loc[(task, "race", "Black", "fnr")]
        assert (planted["models_flagged"], planted["models"]) == (2, 4)
        gaps = table.query("task == @task and attribute == 'race' and group == 'Black' and metric == 'fnr'")["gap_overall"]
        assert planted["median_gap"] == pytest.approx(gaps.median())
        assert (planted["min_gap"], planted["max_gap"]) == (gaps.min(), gaps.max())
    counted = summary["models_flagged"].sum()
    assert counted == table["flagged"].sum()


def _models_frame(n_models: int) -> pd.DataFrame:
    from cxr_fast.metrics import MODEL_METRICS

    return pd.DataFrame([{"task": task, "arch": f"arch{m}", "metric": metric, "value": 0.5 + m / 100, "ci_low": 0.4,
                          "ci_high": 0.9, "ci_reliable": True, "n": 100, "n_subjects": 40, "n_pos": 30, "note": ""}
                         for task in ("edema", "effusion") for m in range(n_models) for metric in MODEL_METRICS])


def test_the_models_table_collapses_per_task_only_for_many_models():
    from cxr_fast.analyze import figures
    from cxr_fast.analyze.report import _models_section

    few = _models_section(_models_frame(figures.MAX_MARKERS), roc_uri="data:,")
    assert "<details>" not in few and few.count("<tr") == 1 + 2 * figures.MAX_MARKERS
    many = _models_section(_models_frame(19), roc_uri="data:,")
    assert many.count("<details>") == 2
    assert "edema: 19 models, AUROC 0.500 to 0.680" in many and many.count("<tr") == 2 * (1 + 19)


def test_scope_auroc_equals_weighted_auroc_with_heavy_ties_and_one_class_groups():
    from cxr_fast.analyze.auroc_kernel import scope_auroc
    from cxr_fast.metrics import weighted_auroc

    rng = np.random.default_rng(3)
    n, n_subjects = 300, 120
    subject_index = rng.integers(0, n_subjects, n)
    label = rng.random(n) < 0.4
    score = rng.integers(0, 4, n).astype(float)  # four distinct scores: ties everywhere
    group = rng.integers(0, 3, n)
    group[label & (group == 2)] = 1  # group 2 has no positives: its AUROC is undefined
    weights = np.vstack([np.ones(n_subjects, np.int32), rng.poisson(1.0, (25, n_subjects)).astype(np.int32)])
    scopes = np.vstack([np.zeros(n, np.int64), 1 + group])
    got = scope_auroc(score=score, label=label, subject_index=subject_index, scopes=scopes, n_scopes=4,
                      subject_weights_t=np.ascontiguousarray(weights.T))
    image_weights = weights[:, subject_index].astype(float)
    np.testing.assert_allclose(got[0], weighted_auroc(image_weights, label, score), rtol=0, atol=1e-15)
    for g in range(3):
        member = group == g
        expected = weighted_auroc(image_weights[:, member], label[member], score[member])
        np.testing.assert_allclose(got[1 + g], expected, rtol=0, atol=1e-15)
    assert np.isnan(got[3]).all()


@pytest.mark.slow
def test_worker_processes_change_no_table_and_no_figure(tmp_path, monkeypatch):
    """At study size the case tables and the figures are made in worker processes: the same
    tables and the same report as in one process."""
    from cxr_fast.analyze import figures, parallel
    from cxr_fast.analyze.pipeline import Settings, analyze
    from cxr_fast.analyze.report import render_html
    from pred_fixtures import write_pred_dir

    pred_dir = write_pred_dir(tmp_path, tasks=("edema", "effusion"), archs=("a", "b", "c"), n_images=300, seed=4)
    settings = Settings(n_bootstrap=20)
    monkeypatch.setattr(parallel, "PROCESS_MIN_ROWS", 10**12)
    alone = analyze(pred_dir=pred_dir, settings=settings)
    monkeypatch.setattr(parallel, "PROCESS_MIN_ROWS", 0)
    monkeypatch.setattr(parallel, "workers", lambda: 2)
    monkeypatch.setattr(figures, "workers", lambda: 2)
    spread = analyze(pred_dir=pred_dir, settings=settings)
    assert list(spread.tables) == list(alone.tables)
    for name in alone.tables:
        pd.testing.assert_frame_equal(spread.tables[name], alone.tables[name])
    assert render_html(spread) == render_html(alone)


def test_a_long_roc_curve_is_drawn_as_its_staircase_on_a_grid():
    from cxr_fast.analyze.figures import ROC_DRAWN_POINTS, _drawn_roc
    from cxr_fast.metrics import roc_points

    rng = np.random.default_rng(0)
    label = rng.random(20_000) < 0.3
    points = roc_points(label=label, score=rng.normal(label * 1.0))
    fpr, tpr = points["fpr"].to_numpy(), points["tpr"].to_numpy()
    assert fpr.size > ROC_DRAWN_POINTS
    drawn_fpr, drawn_tpr = _drawn_roc(fpr, tpr)
    assert drawn_fpr.size < 2 * ROC_DRAWN_POINTS and drawn_fpr[0] == 0 and drawn_fpr[-1] == 1
    assert np.all(np.diff(drawn_fpr) >= 0) and np.all(np.diff(drawn_tpr) >= 0)
    # At each grid point the staircase is at the highest TPR the curve reaches by that FPR.
    for x, y in zip(drawn_fpr[::2], drawn_tpr[::2]):
        assert y == tpr[fpr <= x].max()
    few_fpr, few_tpr = fpr[:100], tpr[:100]
    assert _drawn_roc(few_fpr, few_tpr)[0] is few_fpr
