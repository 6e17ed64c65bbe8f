"""Per-model metrics and per-subgroup gaps, each with a patient-level bootstrap CI.

Tables are tidy: one row per (model, [attribute, group,] metric), in the spirit of fairlearn's
MetricFrame: `value` is the group's metric (by_group), `overall` the model's metric on all test
images, `gap_overall` their difference (group - overall), `gap_best` the difference to the best
eligible group of the same attribute. Gaps are signed as "group minus reference", so for FNR
and FPR a positive gap is worse, for the other metrics a negative gap is worse.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxr_fast.analyze.bootstrap import (bootstrap_variance, expanded_interval, expanded_p_value, reliable,
                                        satterthwaite_patients, wald_z, wilson_interval)
from cxr_fast.analyze.inputs import TaskData
from cxr_fast.analyze.resampled import (Resampled, informative_patients, metric_values,
                                        resampled_tasks)
from cxr_fast.analyze.stats import benjamini_hochberg
from cxr_fast.analyze.parallel import blas_single_threaded
from cxr_fast.metrics import DIRECTION, METRICS, MODEL_METRICS, PROPORTIONS

# Gaps (group vs overall) that can raise a flag. Together they say "misses more of this
# group's positives" (FNR), "raises more false alarms" (FPR), "is worse at the operating
# threshold" (balanced accuracy) and "ranks this group's images worse" (AUROC). Sensitivity,
# specificity, PPV and NPV are reported but not tested: they restate FNR/FPR or depend on the
# group's prevalence.
FLAG_METRICS: tuple[str, ...] = ("fnr", "fpr", "balanced_accuracy", "auroc")

_DIRECTION = np.array([DIRECTION[name] for name in METRICS])


@blas_single_threaded
def model_table(*, predictions: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """One row per (model, metric): value and expanded CI from the patient-level bootstrap."""
    frames = []
    for resampled in resampled_tasks(predictions=predictions, n_bootstrap=n_bootstrap, seed=seed):
        overall, _ = metric_values(resampled)
        frames.append(model_rows(resampled, overall, level=level))
    return pd.concat(frames, ignore_index=True)


@blas_single_threaded
def subgroup_table(
    *, predictions: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0, min_count: int = 30,
    fdr: float = 0.05, level: float = 0.95, flag_metrics: tuple[str, ...] = FLAG_METRICS,
) -> pd.DataFrame:
    """One row per (model, attribute, group, metric) with gaps, CIs, p-values and flags.

    Tests: `p_gap_overall` is two-sided (gap != 0, matching the CI); `p_harm` is one-sided
    (H0: the group is served no worse than overall), both from z = gap / bootstrap SE on the
    expanded intervals' scale (bootstrap.expanded_p_value: Student's t with `gap_overall_df`
    degrees of freedom, Welch-Satterthwaite's over the group and the overall).
    Multiple testing: ONE Benjamini-Hochberg family per table over `p_harm` = every
    gap-to-overall test of a metric in `flag_metrics`, over all tasks, models, attributes and
    groups, restricted to groups with >= min_count positives and >= min_count negatives and a
    reliable gap (`gap_overall_ci_reliable`: at least MIN_INFORMATIVE informative patients in
    the group; others are reported with `tested` False). Flagged = q_value <= fdr.
    Why one-sided: only harm is a finding to act on, and two-sided p-values of groups doing
    *better* (small groups with a near-zero error rate have a small bootstrap SE) would
    otherwise fill the BH ranking and lower the bar for everything else.
    """
    frames = [subgroup_rows(resampled, *metric_values(resampled), min_count=min_count, level=level)
              for resampled in resampled_tasks(predictions=predictions, n_bootstrap=n_bootstrap, seed=seed)]
    return flag_subgroups(pd.concat(frames, ignore_index=True), fdr=fdr, flag_metrics=flag_metrics)


def flag_subgroups(table: pd.DataFrame, *, fdr: float, flag_metrics: tuple[str, ...] = FLAG_METRICS) -> pd.DataFrame:
    """Add tested / q_value / flagged: one BH family over the whole (all tasks) table."""
    table["tested"] = (table["eligible"] & table["gap_overall_ci_reliable"] & table["metric"].isin(flag_metrics)
                       & table["p_harm"].notna())
    table["q_value"] = benjamini_hochberg(table["p_harm"].where(table["tested"]).to_numpy(float))
    table["flagged"] = table["tested"] & (table["q_value"] <= fdr) & (table["direction"] == "worse")
    return table


def model_rows(resampled: Resampled, overall: np.ndarray, *, level: float) -> pd.DataFrame:
    """The model table's rows of one task from metric_values' overall (M, K, 1 + R)."""
    data = resampled.data
    counts = _counts(data, np.arange(data.label.size))
    informative = informative_patients(resampled.tallies)[:, 0]                          # (M, K)
    estimate, samples = overall[:, :, 0], np.moveaxis(overall[:, :, 1:], 2, 0)
    patients = t_patients(bootstrap_variance(samples)[0], informative)
    low, high = value_interval(estimate, samples, patients, level=level)                 # (M, K)
    keep = np.isin(METRICS, MODEL_METRICS)
    n_models, n_metrics = len(data.archs), int(keep.sum())
    frame = pd.DataFrame({
        "task": data.task, "arch": np.repeat(data.archs, n_metrics), "recipe": np.repeat(data.recipes, n_metrics),
        **counts, "metric": np.tile(np.array(METRICS)[keep], n_models),
        "value": overall[:, keep, 0].ravel(), "ci_low": low[:, keep].ravel(), "ci_high": high[:, keep].ravel(),
        "n_informative": informative[:, keep].ravel(), "df": interval_df(patients)[:, keep].ravel(),
        "ci_reliable": value_reliable(informative)[:, keep].ravel(), "note": _class_note(counts),
    })
    return frame[["task", "arch", "recipe", "n", "n_subjects", "n_pos", "n_neg", "metric", "value", "ci_low", "ci_high",
                  "n_informative", "df", "ci_reliable", "note"]]


def _counts(data: TaskData, positions: np.ndarray) -> dict[str, int]:
    label = data.label[positions]
    return {"n": int(label.size), "n_subjects": int(np.unique(data.subject_index[positions]).size),
            "n_pos": int(label.sum()), "n_neg": int((~label).sum())}


def _class_note(counts: dict[str, int]) -> str:
    if counts["n_pos"] == 0 or counts["n_neg"] == 0:
        missing = "positives" if counts["n_pos"] == 0 else "negatives"
        return f"no {missing}: AUROC and balanced accuracy undefined (NaN)"
    return ""


def subgroup_rows(resampled: Resampled, overall_values: np.ndarray, group_values: np.ndarray, *,
                  min_count: int, level: float) -> pd.DataFrame:
    """The subgroup table's rows of one task (before the table-wide BH step) from
    metric_values' overall (M, K, 1 + R) and per group (M, G, K, 1 + R)."""
    data, groups = resampled.data, resampled.groups
    group_info = pd.DataFrame([{"attribute": attribute, "group": group, **_counts(data, positions)}
                               for attribute, group, positions in groups])
    group_info["eligible"] = (group_info["n_pos"] >= min_count) & (group_info["n_neg"] >= min_count)
    group_info = group_info.loc[group_info.index.repeat(len(METRICS))].reset_index(drop=True)  # one row per metric
    eligible = group_info["eligible"].to_numpy()[:: len(METRICS)]
    attributes = np.array([attribute for attribute, _, _ in groups])
    informative = informative_patients(resampled.tallies)                                # (M, S, K)
    frames = []
    for m, (arch, recipe) in enumerate(zip(data.archs, data.recipes)):
        overall, values = overall_values[m], group_values[m]                               # (K, R), (G, K, R)
        best = _best_group(values[:, :, 0], attributes, eligible)                         # (G, K)
        at_best = (np.maximum(best, 0), np.arange(len(METRICS)))
        best_values = np.where((best >= 0)[:, :, None], values[at_best], np.nan)
        group, everybody = informative[m, 1:], informative[m, 0]                           # (G, K), (K,)
        patients, variance = interval_sides(values, overall, group, everybody)
        # A gap's t quantile counts the patients of both its sides (Welch-Satterthwaite): the
        # group and the overall, or the group and the best group. Its reliability, the group's
        # patients; to best, the fewer of the two groups'.
        t_counts = {
            "value": patients["group"], "gap_overall": patients["gap_overall"],
            "gap_best": np.where(best >= 0, satterthwaite_patients([variance["group"], variance["group"][at_best]],
                                                                   [patients["group"], patients["group"][at_best]]),
                                 patients["group"])}
        frame = _rows(values, values - overall[None], values - best_values, t_counts, level=level)
        frame["n_informative"] = group.ravel()
        frame["df"] = interval_df(patients["group"]).ravel()
        frame["ci_reliable"] = value_reliable(group).ravel()
        frame["gap_overall_df"] = (t_counts["gap_overall"] - 1).ravel()
        frame["gap_overall_ci_reliable"] = reliable(group).ravel()
        frame["gap_best_df"] = (t_counts["gap_best"] - 1).ravel()
        frame["gap_best_ci_reliable"] = reliable(np.where(best >= 0, np.minimum(group, group[at_best]), group)).ravel()
        frame["overall"] = np.tile(overall[:, 0], len(groups))
        frame["best_group"] = [groups[b][1] if b >= 0 else "" for b in best.ravel()]
        frame["best_value"] = best_values[:, :, 0].ravel()
        frames.append(pd.concat([group_info, frame], axis=1).assign(task=data.task, arch=arch, recipe=recipe))
    table = pd.concat(frames, ignore_index=True)
    table["direction"] = _harm_direction(table)
    table["note"] = _subgroup_notes(table, min_count)
    return table[_SUBGROUP_COLUMNS]


_SUBGROUP_COLUMNS = [
    "task", "arch", "recipe", "attribute", "group", "n", "n_subjects", "n_pos", "n_neg", "eligible",
    "metric", "value", "ci_low", "ci_high", "n_informative", "df", "ci_reliable", "overall",
    "gap_overall", "gap_overall_ci_low", "gap_overall_ci_high", "gap_overall_df", "gap_overall_ci_reliable",
    "p_gap_overall", "p_harm", "direction",
    "best_group", "best_value", "gap_best", "gap_best_ci_low", "gap_best_ci_high", "gap_best_df", "gap_best_ci_reliable",
    "p_gap_best",
    "note",
]


def _best_group(point: np.ndarray, attributes: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """(G, K) index of the best eligible group of the same attribute, -1 when there is none
    (or when the metric has no better/worse direction, i.e. prevalence)."""
    best = np.full(point.shape, -1)
    for attribute in np.unique(attributes):
        members = np.flatnonzero((attributes == attribute) & eligible)
        for k, direction in enumerate(_DIRECTION):
            scores = point[members, k] * direction
            if direction == 0 or not np.isfinite(scores).any():
                continue
            best[attributes == attribute, k] = members[np.nanargmax(scores)]
    return best


def _rows(values: np.ndarray, gap_overall: np.ndarray, gap_best: np.ndarray, patients: dict[str, np.ndarray], *,
          level: float) -> pd.DataFrame:
    """Flatten (G, K, 1 + B) arrays into G*K rows: estimate (resample 0), CI, p-value; the CI
    and p-value of each on the t quantile of its (G, K) `patients` (1 + degrees of freedom)."""
    columns = {"metric": np.tile(METRICS, values.shape[0])}
    for prefix, array in (("", values), ("gap_overall", gap_overall), ("gap_best", gap_best)):
        samples = np.moveaxis(array[:, :, 1:], 2, 0)
        informative = patients[prefix or "value"]
        if prefix:
            low, high = expanded_interval(samples, informative, level=level)
        else:
            low, high = value_interval(array[:, :, 0], samples, informative, level=level)
        name = prefix or "value"
        columns[name] = array[:, :, 0].ravel()
        columns[f"{prefix}_ci_low" if prefix else "ci_low"] = low.ravel()
        columns[f"{prefix}_ci_high" if prefix else "ci_high"] = high.ravel()
        if prefix:
            z = wald_z(array[:, :, 0], samples)
            columns[f"p_{prefix}"] = expanded_p_value(z, informative).ravel()
            if prefix == "gap_overall":
                # Harm is a negative gap for higher-is-better metrics, positive for FNR/FPR.
                harm_z = np.where(_DIRECTION == 0, np.nan, -_DIRECTION * z)
                columns["p_harm"] = expanded_p_value(harm_z, informative, one_sided=True).ravel()
    return pd.DataFrame(columns)


def value_interval(estimate: np.ndarray, samples: np.ndarray, patients: np.ndarray, *, level: float,
                   metrics: tuple[str, ...] = METRICS) -> tuple[np.ndarray, np.ndarray]:
    """The CI of each metric's value (`metrics` on the last axis; samples with the resamples
    first; `patients` from t_patients): Wilson's interval on the effective sample size for a
    proportion, the expanded percentile interval for AUROC and balanced accuracy (bootstrap.py;
    chosen by coverage_bench, DECISIONS.md). Gaps between groups keep the expanded interval."""
    proportion = np.isin(metrics, PROPORTIONS)
    low, high = expanded_interval(samples, patients, level=level)
    wilson_low, wilson_high = wilson_interval(estimate, samples, patients, level=level)
    return np.where(proportion, wilson_low, low), np.where(proportion, wilson_high, high)


def t_patients(variance: np.ndarray, informative: np.ndarray) -> np.ndarray:
    """(..., K) the patients each METRIC's t quantile counts, from the values' bootstrap
    variances (..., K): its informative patients, except balanced accuracy, the mean of
    sensitivity (on the patients with a positive image) and specificity (on those with a
    negative one): Welch-Satterthwaite over its two halves (bootstrap.satterthwaite_patients)."""
    at = {name: METRICS.index(name) for name in ("sensitivity", "specificity", "balanced_accuracy")}
    patients = np.array(informative, dtype=float)
    patients[..., at["balanced_accuracy"]] = satterthwaite_patients(
        [variance[..., at["sensitivity"]], variance[..., at["specificity"]]],
        [informative[..., at["sensitivity"]], informative[..., at["specificity"]]])
    return patients


def interval_sides(values: np.ndarray, overall: np.ndarray, group: np.ndarray, everybody: np.ndarray
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """t_patients and bootstrap variances of the groups' (G, K, 1 + R) and the overall (K, 1 + R)
    values, from their informative patients `group` (G, K) and `everybody` (K,), and the patients
    the t quantile of each gap to overall counts: Welch-Satterthwaite's over its two sides (the
    overall holds the group; a stand-in for the rest, measured in coverage_bench)."""
    group_samples, overall_samples = np.moveaxis(values[:, :, 1:], 2, 0), overall[:, 1:].T
    variance = {"group": bootstrap_variance(group_samples)[0], "overall": bootstrap_variance(overall_samples)[0]}
    patients = {"group": t_patients(variance["group"], group), "overall": t_patients(variance["overall"], everybody)}
    patients["gap_overall"] = satterthwaite_patients([variance["group"], variance["overall"]],
                                                     [patients["group"], patients["overall"]])
    return patients, variance


def interval_df(patients: np.ndarray, metrics: tuple[str, ...] = METRICS) -> np.ndarray:
    """The degrees of freedom of each value's t quantile (NaN for a proportion: Wilson's interval has none)."""
    return np.where(np.isin(metrics, PROPORTIONS), np.nan, np.asarray(patients, dtype=float) - 1)


# PPV and NPV depend on the prevalence: one of their outcomes comes from a single class (a
# false negative, counted against NPV, only from patients with a positive image).
PREDICTIVE_VALUES: tuple[str, ...] = ("ppv", "npv")


def value_reliable(informative: np.ndarray, metrics: tuple[str, ...] = METRICS) -> np.ndarray:
    """(..., K) whether a value's interval keeps its coverage: at least MIN_INFORMATIVE
    informative patients (bootstrap.reliable); for PPV and NPV also at least as many with a
    positive and with a negative image (the prevalence's informative patients, min of the two).

    Why (coverage_bench, DECISIONS.md): NPV with ~5 patients with a positive image, two of them
    missed, covered 0.968. Its interval then turns on a count of one or two, where any interval
    for a proportion swings around its level (Wilson's covers 0.97 at 2 expected events).
    Counting the class, not the missed patients, does not pick intervals by their outcome."""
    classes = np.asarray(informative)[..., [metrics.index("prevalence")]]
    predictive = np.isin(metrics, PREDICTIVE_VALUES)
    return reliable(informative) & (~predictive | reliable(classes))


def _harm_direction(table: pd.DataFrame) -> np.ndarray:
    sign = table["metric"].map(DIRECTION).to_numpy() * np.sign(table["gap_overall"].to_numpy())
    return np.select([sign < 0, sign > 0], ["worse", "better"], default="")


def _subgroup_notes(table: pd.DataFrame, min_count: int) -> list[str]:
    notes = []
    for n_pos, n_neg, eligible in zip(table["n_pos"], table["n_neg"], table["eligible"]):
        note = _class_note({"n_pos": n_pos, "n_neg": n_neg})
        if not eligible:
            note = "; ".join(filter(None, [note, f"fewer than {min_count} positives or negatives: reported, not tested"]))
        notes.append(note)
    return notes
