"""The tables' point estimates equal a direct pandas group-by (and sklearn) on the same rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from cxr_fast.analyze import (consistency_table, load_predictions, model_table, subgroup_table, systematic_images,
                              systematic_table)
from cxr_fast.analyze.inputs import task_data
from pred_fixtures import simulate_predictions, write_pred_dir

B = 30  # point estimates do not depend on the number of resamples; keep the tests fast


@pytest.fixture(scope="module")
def predictions() -> pd.DataFrame:
    frame = simulate_predictions(tasks=("edema", "effusion"), n_images=400, seed=3)
    # Ties in the scores and an intersection with one class only exercise the edge cases.
    frame["prob"] = frame["prob"].round(2)
    frame["pred"] = (frame["prob"] >= 0.5).astype(int)
    return frame.assign(source=frame["recipe"])


def direct_metrics(rows: pd.DataFrame) -> dict[str, float]:
    label, pred = rows["label"] == 1, rows["pred"] == 1
    tp, fn = (label & pred).sum(), (label & ~pred).sum()
    fp, tn = (~label & pred).sum(), (~label & ~pred).sum()
    ratio = lambda a, b: a / b if b else np.nan  # noqa: E731
    sens, spec = ratio(tp, tp + fn), ratio(tn, tn + fp)
    return {
        "prevalence": label.mean(), "sensitivity": sens, "specificity": spec, "fnr": ratio(fn, tp + fn),
        "fpr": ratio(fp, tn + fp), "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn),
        "balanced_accuracy": (sens + spec) / 2,
        "auroc": roc_auc_score(label, rows["prob"]) if label.nunique() == 2 else np.nan,
    }


def expected_subgroups(predictions: pd.DataFrame) -> pd.DataFrame:
    records = []
    for columns in (["sex"], ["age_group"], ["race"], ["view"], ["sex", "race"], ["sex", "age_group"]):
        for (task, arch, *values), rows in predictions.groupby(["task", "arch", *columns]):
            metrics = direct_metrics(rows)
            records += [{"task": task, "arch": arch, "attribute": " x ".join(columns), "group": " & ".join(values),
                         "metric": name, "expected": value, "expected_n": len(rows)} for name, value in metrics.items()]
    return pd.DataFrame(records)


def test_subgroup_table_equals_pandas_groupby(predictions):
    table = subgroup_table(predictions=predictions, n_bootstrap=B)
    merged = table.merge(expected_subgroups(predictions), on=["task", "arch", "attribute", "group", "metric"],
                         how="outer", indicator=True)
    assert (merged["_merge"] == "both").all(), "the table and the group-by must list the same groups"
    np.testing.assert_allclose(merged["value"], merged["expected"], rtol=1e-12, equal_nan=True)
    assert (merged["n"] == merged["expected_n"]).all()
    one_class = table[(table["n_pos"] == 0) | (table["n_neg"] == 0)]
    assert len(one_class) and one_class.loc[one_class["metric"] == "auroc", "value"].isna().all()
    assert one_class["note"].str.contains("undefined").all() and not one_class["eligible"].any()


def test_subgroup_gaps_are_group_minus_reference(predictions):
    table = subgroup_table(predictions=predictions, n_bootstrap=B)
    models = model_table(predictions=predictions, n_bootstrap=B)
    overall = models.set_index(["task", "arch", "metric"])["value"]
    rows = table[table["metric"].isin(overall.index.get_level_values("metric"))]
    np.testing.assert_allclose(rows["overall"], overall.loc[list(zip(rows["task"], rows["arch"], rows["metric"]))], rtol=1e-12)
    np.testing.assert_allclose(table["gap_overall"], table["value"] - table["overall"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(table["gap_best"], table["value"] - table["best_value"], rtol=1e-12, atol=1e-15)
    # The best group is the best eligible one: never worse than any eligible group of its attribute.
    fnr = table[(table["metric"] == "fnr") & table["eligible"]]
    assert (fnr["gap_best"] >= -1e-12).all()
    defined = table[table["value"].notna() & table["ci_low"].notna()]
    assert (defined["ci_low"] <= defined["value"] + 1e-12).mean() > 0.95  # CIs surround the estimate
    assert (defined["ci_high"] >= defined["value"] - 1e-12).mean() > 0.95


def test_model_table_equals_direct_metrics(predictions):
    table = model_table(predictions=predictions, n_bootstrap=B)
    for (task, arch), rows in predictions.groupby(["task", "arch"]):
        got = table[(table["task"] == task) & (table["arch"] == arch)].set_index("metric")["value"]
        for metric, expected in direct_metrics(rows).items():
            if metric in got:
                assert got[metric] == pytest.approx(expected, abs=1e-12), (task, arch, metric)


def test_consistency_table_equals_sklearn_kappa_per_group(predictions):
    table = consistency_table(predictions=predictions, n_bootstrap=B)
    wide = predictions.assign(correct=predictions["pred"] == predictions["label"]).pivot_table(
        index=["task", "key", "sex", "race"], columns="arch", values="correct").reset_index()
    pairs = table[(table["kind"] == "pair") & table["attribute"].isin(["overall", "sex x race"])]
    for row in pairs.itertuples():
        rows = wide[wide["task"] == row.task]
        if row.attribute != "overall":
            sex, race = row.group.split(" & ")
            rows = rows[(rows["sex"] == sex) & (rows["race"] == race)]
        assert row.n == len(rows)
        a, b = rows[row.model_a].astype(bool), rows[row.model_b].astype(bool)
        if np.isnan(row.kappa):
            assert a.all() and b.all() or not (a.any() or b.any())
        else:
            assert row.kappa == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
    means = table[table["kind"] == "mean"].set_index(["task", "attribute", "group"])["kappa"]
    pair_means = pairs.groupby(["task", "attribute", "group"])["kappa"].mean()
    np.testing.assert_allclose(means.loc[pair_means.index], pair_means, rtol=1e-12)


def test_systematic_table_counts_equal_pandas(predictions):
    threshold = 2 / 3
    table = systematic_table(predictions=predictions, threshold=threshold, min_count=10)
    share = predictions.assign(wrong=predictions["pred"] != predictions["label"]).groupby(
        ["task", "key", "label", "race"], as_index=False)["wrong"].mean()
    share["systematic"] = share["wrong"] >= threshold - 1e-9
    for error, label in (("false_negative", 1), ("false_positive", 0)):
        for (task, race), rows in share[share["label"] == label].groupby(["task", "race"]):
            row = table[(table["task"] == task) & (table["error"] == error) & (table["attribute"] == "race")
                        & (table["group"] == race)].iloc[0]
            in_class = share[(share["task"] == task) & (share["label"] == label)]
            assert row["n_class_group"] == len(rows) and row["n_systematic_group"] == rows["systematic"].sum()
            assert row["n_systematic"] == in_class["systematic"].sum()
            assert row["share_of_class"] == pytest.approx(len(rows) / len(in_class))
    images = systematic_images(predictions=predictions, threshold=threshold)
    assert len(images) == share["systematic"].sum()
    assert images.groupby("task")["share_wrong"].apply(lambda s: s.is_monotonic_decreasing).all()
    assert {"key", "dicom_id", "subject_id", "sex", "age_group", "race"} <= set(images.columns)


def test_nan_labels_are_dropped_and_models_aligned(tmp_path):
    pred_dir = write_pred_dir(tmp_path, tasks=("edema",), n_images=200, n_val_images=50, missing_label_rate=0.1, seed=1)
    loaded = load_predictions(pred_dir=pred_dir)
    assert loaded["label"].notna().all() and (loaded["split"] == "test").all()
    assert loaded.groupby("arch").size().nunique() == 1 and len(loaded) < 3 * 200
    (data,) = task_data(loaded)
    assert data.prob.shape == (3, len(loaded) // 3)
    assert (data.images["key"].to_numpy() == np.sort(data.images["key"].to_numpy())).all()


def test_edge_cases_run_end_to_end(tmp_path):
    """A model that is always right, a task with a single model, a group with one class only
    and heavily tied scores: reported (NaN where undefined, with a note), never a crash."""
    from cxr_fast.analyze import Settings, analyze, write_report

    frame = simulate_predictions(tasks=("edema", "fracture"), n_images=240, seed=5)
    frame.loc[frame["age_group"] == "0-20", "label"] = 0.0
    perfect = (frame["task"] == "edema") & (frame["arch"] == "resnet50")
    frame.loc[perfect, "pred"] = frame.loc[perfect, "label"].astype(int)
    frame.loc[perfect, "prob"] = frame.loc[perfect, "label"].astype(float)  # two distinct scores: all tied
    frame = frame[(frame["task"] == "edema") | (frame["arch"] == "densenet121")]  # fracture: one model
    pred_dir = tmp_path / "all_pred"
    for recipe, rows in frame.groupby("recipe"):
        pred_dir.mkdir(exist_ok=True)
        rows.to_parquet(pred_dir / f"{recipe}.parquet")
    analysis = analyze(pred_dir=pred_dir, settings=Settings(n_bootstrap=25))
    models = analysis.tables["models"].set_index(["recipe", "metric"])["value"]
    assert models[("edema_resnet50", "auroc")] == 1.0 and models[("edema_resnet50", "balanced_accuracy")] == 1.0
    consistency = analysis.tables["consistency"]
    assert set(consistency["task"]) == {"edema"}  # a single model has nobody to agree with
    with_perfect = consistency[(consistency["kind"] == "pair") & (consistency["attribute"] == "overall")
                               & ((consistency["model_a"] == "resnet50") | (consistency["model_b"] == "resnet50"))]
    assert (with_perfect["kappa"] == 0).all()  # always right: agreement is exactly chance
    young = analysis.tables["subgroups"]
    young = young[(young["attribute"] == "age_group") & (young["group"] == "0-20") & (young["metric"] == "auroc")]
    assert len(young) and young["value"].isna().all() and young["note"].str.contains("AUROC").all()
    assert not young["ci_reliable"].any()  # no positives: no patient carries AUROC here
    index = write_report(analysis=analysis, out=tmp_path / "report")
    assert "undefined" in index.read_text()
    from cxr_fast.analyze.report import UNRELIABLE_MARK

    assert UNRELIABLE_MARK in index.read_text()  # the report marks the intervals it cannot vouch for
