"""Write the analysis: index.html (one self-contained file), summary.json and one CSV per table.

The folder is built beside `out` and swapped in whole (cxr_fast.io.atomic_folder), so a crashed
run leaves the old report, never half of one.
"""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast.analyze import figures
from cxr_fast.analyze.bootstrap import MIN_INFORMATIVE
from cxr_fast.analyze.gallery import Gallery
from cxr_fast.analyze.gallery_html import DUA_WARNING, GALLERY_CSS, gallery_section
from cxr_fast.analyze.groups import group_sort_key, iter_groups
from cxr_fast.analyze.headline import METRIC_LABELS, headline, ranked_calibration_groups
from cxr_fast.analyze.pipeline import DEFINITIONS, Analysis, versions
from cxr_fast.errors import CxrError
from cxr_fast.io import atomic_folder, write_bytes, write_csv, write_json
from cxr_fast.metrics import MODEL_METRICS
from cxr_fast.schema import DEMOGRAPHICS

TOP_IMAGES = 25

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0}th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}tr.flag td{background:#fdecea}
.headline li{margin:.3em 0}.note{color:#555;font-size:.9em}.box{background:#f7f9fb;border-left:4px solid #5b8def;padding:.6em 1em}
img{max-width:100%;height:auto}details{margin:.6em 0}summary{cursor:pointer;font-weight:600}
"""


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "NaN"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else ""
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return f"{value:.2e}" if 0 < abs(value) < 10 ** -digits else f"{value:.{digits}f}"
    return html.escape(str(value))


UNRELIABLE_MARK = "\u2020"  # a dagger after an interval that rests on too few patients to keep its level


def _with_ci(value, low, high, reliable=True) -> str:
    return f"{_number(value)} [{_number(low)}, {_number(high)}]" + ("" if reliable else UNRELIABLE_MARK)


def _table(frame: pd.DataFrame, *, flag_column: str | None = None, left: tuple[str, ...] = ()) -> str:
    """A plain HTML table; text columns left-aligned; rows with flag_column True highlighted."""
    head = "".join(f'<th class="{"l" if c in left else ""}">{html.escape(str(c))}</th>' for c in frame.columns)
    # Format column by column (iterrows is the slow part for tables of thousands of rows).
    cells = [[f'<td class="{"l" if column in left else ""}">{_number(value)}</td>' for value in frame[column].tolist()]
             for column in frame.columns]
    flags = frame[flag_column].tolist() if flag_column in frame else [False] * len(frame)
    body = "".join(f'<tr class="{"flag" if flag is True else ""}">{"".join(row)}</tr>'
                   for flag, row in zip(flags, zip(*cells)))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(uri: str, alt: str) -> str:
    return f'<figure><img alt="{html.escape(alt)}" src="{uri}"></figure>'


# --- headline findings ----------------------------------------------------------------------

def models_per_task(analysis: Analysis) -> dict[str, int]:
    return {data.task: len(data.archs) for data in analysis.tasks}


def headline_findings(analysis: Analysis) -> list[str]:
    """Plain-language sentences, most important first (plain text; the HTML escapes them)."""
    return headline_and_findings(analysis)[0]


def headline_and_findings(analysis: Analysis) -> tuple[list[str], dict[str, list[dict]]]:
    settings, tables = analysis.settings, analysis.tables
    lines, structured = headline(tables, models_per_task=models_per_task(analysis), fdr=settings.fdr,
                                 threshold=settings.systematic_threshold)
    means = tables["consistency"]
    means = means[(means["kind"] == "mean") & (means["attribute"] == "overall")]
    if not means.empty:
        lines.append("Mean error consistency between models (kappa; 0 = independent errors, 1 = identical errors): " + ", ".join(
            f"{row.task} {row.kappa:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}]" for row in means.itertuples()) + ".")
    subgroups = tables["subgroups"]
    undefined = subgroups[(subgroups["metric"] == "auroc") & subgroups["value"].isna()]
    if len(undefined):
        groups = sorted(set(zip(undefined["task"], undefined["attribute"], undefined["group"])))
        lines.append(f"AUROC is undefined (NaN) for {len(groups)} task/group combination(s) with one class only, e.g. "
                     + ", ".join(f"{t}: {a} = {g}" for t, a, g in groups[:4]) + ".")
    return lines, structured


# --- HTML sections --------------------------------------------------------------------------

HOW_TO_READ = """
<div class="box"><b>How to read this report.</b>
Every number comes with a 95% confidence interval from a patient-level bootstrap: patients (not
images) are resampled, because images of one patient are not independent. The interval is widened
to a t quantile on the patients the number rests on (those with a positive image for sensitivity,
...; both halves of balanced accuracy and both sides of a gap count), and a proportion's is
Wilson's on the images discounted for patient clustering, which keeps its 95% in small groups; an
interval marked &dagger; rests on fewer than {min_informative} such patients (for PPV and NPV, or
of either class) and does not keep its 95% (unreliable: such gaps are never tested).
A <b>gap</b> is the group's value minus the model's value on the whole test set (gap to overall), or
minus the best-served group of the same attribute (gap to best). For FNR and FPR a positive gap
is worse; for AUROC, balanced accuracy, sensitivity, specificity, PPV and NPV a negative gap is worse.
A row is <b>flagged</b> (highlighted) when its gap to overall is harmful and remains significant after
Benjamini&ndash;Hochberg correction over the whole table (false discovery rate q = {fdr}); groups with
fewer than {min_count} positives or negatives are shown but never tested.
<b>Error consistency</b> (Cohen's kappa of two models' right/wrong vectors) says whether models err on
the same images more than their accuracies alone would predict. An image is <b>systematically
misclassified</b> when at least {threshold:.0%} of the models of its task get it wrong; the composition
charts compare who those images belong to with who is in the test set.
NaN means undefined (for example AUROC of a group with one class only), not zero.</div>
"""


def _models_section(models: pd.DataFrame, roc_uri: str) -> str:
    wide = []
    for (task, arch), rows in models.groupby(["task", "arch"], sort=True):
        by_metric = rows.set_index("metric")
        first = rows.iloc[0]
        record = {"task": task, "model": arch, "n": first["n"], "patients": first["n_subjects"], "positives": first["n_pos"]}
        for metric in MODEL_METRICS:
            m = by_metric.loc[metric]
            record[METRIC_LABELS[metric]] = _with_ci(m["value"], m["ci_low"], m["ci_high"], m["ci_reliable"])
        record["note"] = first["note"]
        wide.append(record)
    wide = pd.DataFrame(wide)
    left = ("task", "model", "note")
    if wide.groupby("task").size().max() <= figures.MAX_MARKERS:
        tables = _table(wide, left=left)
    else:  # a study's 19 models per task: one line per task, its table one click away
        auroc = models[models["metric"] == "auroc"].groupby("task")["value"]
        tables = "<p class=note>One collapsed table per task; every number is in models.csv.</p>" + "".join(
            f"<details><summary>{html.escape(str(task))}: {len(rows)} models, AUROC {_number(auroc.min()[task])} "
            f"to {_number(auroc.max()[task])}</summary>{_table(rows, left=left)}</details>"
            for task, rows in wide.groupby("task", sort=True))
    return "<h2>Models</h2>" + tables + "<h3>ROC curves</h3>" + _figure(roc_uri, "ROC curves per task")


def _subgroup_display(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "task": rows["task"], "model": rows["arch"], "attribute": rows["attribute"], "group": rows["group"],
        "n": rows["n"], "pos": rows["n_pos"], "neg": rows["n_neg"], "metric": rows["metric"].map(METRIC_LABELS),
        "value [95% CI]": [_with_ci(*v) for v in zip(rows["value"], rows["ci_low"], rows["ci_high"], rows["ci_reliable"])],
        "overall": rows["overall"],
        "gap to overall [95% CI]": [_with_ci(*v) for v in zip(rows["gap_overall"], rows["gap_overall_ci_low"],
                                                               rows["gap_overall_ci_high"], rows["gap_overall_ci_reliable"])],
        "p (harm, 1-sided)": rows["p_harm"], "q": rows["q_value"], "flagged": rows["flagged"],
        "gap to best [95% CI]": [_with_ci(*v) for v in zip(rows["gap_best"], rows["gap_best_ci_low"], rows["gap_best_ci_high"],
                                                            rows["gap_best_ci_reliable"])],
        "best group": rows["best_group"], "note": rows["note"],
    })


def task_summary(subgroups: pd.DataFrame) -> pd.DataFrame:
    """Per task, group and flag metric with at least one flagged model: how many of the task's
    models are flagged, and the gap to overall across all of the task's models (median, range)."""
    tested = subgroups[subgroups["tested"]]
    records = []
    for (task, attribute, group, metric), rows in tested.groupby(["task", "attribute", "group", "metric"], sort=False):
        n_flagged = int(rows["flagged"].sum())
        if n_flagged:
            gaps = rows["gap_overall"]
            records.append({"task": task, "attribute": attribute, "group": group, "metric": metric,
                            "models_flagged": n_flagged, "models": int(rows["arch"].nunique()),
                            "median_gap": float(gaps.median()), "min_gap": float(gaps.min()), "max_gap": float(gaps.max())})
    columns = ["task", "attribute", "group", "metric", "models_flagged", "models", "median_gap", "min_gap", "max_gap"]
    table = pd.DataFrame(records, columns=columns)
    order = [group_sort_key(a, g) for a, g in zip(table["attribute"], table["group"])]
    return (table.assign(_order=order).sort_values(["task", "models_flagged", "_order"], ascending=[True, False, True], kind="stable")
            .drop(columns="_order").reset_index(drop=True))


def _summary_display(summary: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "task": summary["task"], "attribute": summary["attribute"], "group": summary["group"],
        "metric": summary["metric"].map(METRIC_LABELS),
        "models flagged": [f"{f} of {n}" for f, n in zip(summary["models_flagged"], summary["models"])],
        "median gap to overall": summary["median_gap"],
        "range over models": [f"{_number(low)} to {_number(high)}" for low, high in zip(summary["min_gap"], summary["max_gap"])],
    })


def _subgroups_section(subgroups: pd.DataFrame, forest_uris: dict[str, str]) -> str:
    left = ("task", "model", "attribute", "group", "metric", "value [95% CI]", "gap to overall [95% CI]",
            "gap to best [95% CI]", "best group", "note")
    summary = task_summary(subgroups)
    parts = ["<h2>Subgroups</h2>",
             f"<p>{DEFINITIONS['subgroup_family']}</p>",
             "<h3>Per task: groups with flagged models</h3>",
             "<p class=note>For each task, group and metric with at least one flagged model: how many of the task's "
             "models are flagged, and the gap to overall across all the task's models (median and range). "
             "Per-model rows are in the collapsed sections below and, for every group and metric, in subgroups.csv.</p>",
             _table(_summary_display(summary), left=("task", "attribute", "group", "metric", "models flagged", "range over models"))
             if len(summary) else "<p>No flagged gap.</p>"]
    for task, uri in forest_uris.items():
        flagged = subgroups[(subgroups["task"] == task) & subgroups["flagged"]]
        flagged = flagged.assign(_order=[group_sort_key(a, g) for a, g in zip(flagged["attribute"], flagged["group"])])
        flagged = flagged.sort_values(["_order", "metric", "arch"], kind="stable")
        parts.append(f"<h3>{html.escape(task)}</h3>" + _figure(uri, f"forest plot of subgroup gaps, {task}"))
        parts.append(f"<details><summary>{html.escape(task)}: flagged gaps per model ({len(flagged)} rows)</summary>"
                     + (_table(_subgroup_display(flagged), flag_column="flagged", left=left) if len(flagged) else "<p>None.</p>")
                     + "</details>")
    return "".join(parts)


def _consistency_section(consistency: pd.DataFrame, kappa_uri: str | None, mean_uri: str | None) -> str:
    if consistency.empty:
        return "<h2>Error consistency</h2><p>No task has two or more models: nothing to compare.</p>"
    means = consistency[consistency["kind"] == "mean"]
    wide = means.assign(cell=[_with_ci(*v) for v in zip(means["kappa"], means["ci_low"], means["ci_high"], means["ci_reliable"])])
    wide = wide.pivot_table(index=["attribute", "group"], columns="task", values="cell", aggfunc="first")
    wide = wide.reindex(sorted(wide.index, key=lambda ag: (-1,) if ag[0] == "overall" else group_sort_key(*ag))).reset_index()
    gaps = means[means["eligible"].astype(bool)].sort_values(["flagged", "q_value"], ascending=[False, True], kind="stable")
    gaps = gaps[gaps["flagged"].astype(bool)]
    gap_table = pd.DataFrame({
        "task": gaps["task"], "attribute": gaps["attribute"], "group": gaps["group"], "n": gaps["n"], "kappa": gaps["kappa"],
        "gap to overall [95% CI]": [_with_ci(*v) for v in zip(gaps["gap_overall"], gaps["gap_ci_low"], gaps["gap_ci_high"])],
        "p (1-sided)": gaps["p_agree"], "q": gaps["q_value"], "flagged": gaps["flagged"],
    })
    pairs = consistency[(consistency["kind"] == "pair") & (consistency["attribute"] == "overall")]
    pair_table = pairs[["task", "model_a", "model_b", "n", "p_correct_a", "p_correct_b", "c_obs", "c_exp", "kappa", "ci_low", "ci_high", "note"]]
    return ("<h2>Error consistency</h2>"
            f"<p>{DEFINITIONS['kappa']}</p>"
            + (_figure(kappa_uri, "pairwise kappa heatmaps") if kappa_uri else "")
            + (_figure(mean_uri, "mean kappa per group and task") if mean_uri else "")
            + "<h3>Mean kappa over model pairs [95% CI]</h3>" + _table(wide, left=("attribute", "group") + tuple(wide.columns))
            + f"<h3>Groups whose errors models share more than overall</h3><p>{DEFINITIONS['kappa_gap']}</p>"
            + (_table(gap_table, flag_column="flagged", left=("task", "attribute", "group", "gap to overall [95% CI]"))
               if len(gap_table) else "<p>None.</p>")
            + "<details><summary>Every model pair on all test images</summary>"
            + _table(pair_table, left=("task", "model_a", "model_b", "note")) + "</details>")


def _systematic_section(systematic: pd.DataFrame, images: pd.DataFrame, composition_uris: list[str], threshold: float) -> str:
    rows = systematic.sort_values(["flagged", "q_value"], ascending=[False, True], kind="stable")
    rows = rows[rows["tested"] | rows["flagged"]]
    shown = rows[["task", "error", "attribute", "group", "n_class_group", "n_systematic_group", "n_systematic",
                  "share_of_class", "share_of_systematic", "odds_ratio", "or_ci_low", "or_ci_high", "p_value", "q_value", "flagged"]]
    top = images.groupby("task", sort=True).head(TOP_IMAGES)
    return ("<h2>Systematic misclassification</h2>"
            f"<p>{DEFINITIONS['systematic']} (here {threshold:.0%}). {DEFINITIONS['systematic_family']}</p>"
            + "".join(_figure(uri, "composition of systematic errors") for uri in composition_uris)
            + "<h3>Over-representation among systematic errors (tested groups)</h3>"
            + _table(shown.reset_index(drop=True), flag_column="flagged", left=("task", "error", "attribute", "group"))
            + f"<h3>Most consistently misclassified images (top {TOP_IMAGES} per task; all in systematic_images.csv)</h3>"
            + (_table(top.reset_index(drop=True), left=("task", "key", "dicom_id", "subject_id", "study_id", "error", "sex", "age_group", "race"))
               if len(top) else "<p>No image reaches the threshold.</p>"))


def _calibration_section(calibration: pd.DataFrame, reliability_uris: dict[str, str]) -> str:
    summary = task_summary(calibration)
    shown = calibration[calibration["attribute"] == "overall"]
    overall = shown.assign(cell=[_with_ci(*v) for v in zip(shown["value"], shown["ci_low"], shown["ci_high"],
                                                           shown["ci_reliable"])]).pivot_table(
        index=["task", "arch"], columns="metric", values="cell", aggfunc="first").reset_index()
    overall = overall.rename(columns={"arch": "model", **METRIC_LABELS})
    parts = ["<h2>Calibration</h2>", f"<p>{DEFINITIONS['calibration']}</p>",
             "<h3>Per task: groups with flagged calibration gaps</h3>",
             _table(_summary_display(summary), left=("task", "attribute", "group", "metric", "models flagged", "range over models"))
             if len(summary) else "<p>No flagged calibration gap.</p>",
             "<details><summary>Every model on all test images [95% CI]</summary>"
             + _table(overall, left=tuple(overall.columns)) + "</details>"]
    for task, uri in reliability_uris.items():
        flagged = calibration[(calibration["task"] == task) & calibration["flagged"]]
        parts.append(f"<h3>{html.escape(task)}: reliability diagram</h3>"
                     + _figure(uri, f"reliability diagram, {task}: all test images and flagged groups")
                     + f"<p class=note>Also reliability_{html.escape(task)}.png beside this page.</p>")
        if len(flagged):
            parts.append(f"<details><summary>{html.escape(task)}: flagged calibration gaps per model ({len(flagged)} rows)"
                         "</summary>" + _table(_calibration_display(flagged), flag_column="flagged",
                                               left=("model", "attribute", "group", "metric", "value [95% CI]",
                                                     "gap to overall [95% CI]", "direction")) + "</details>")
    return "".join(parts)


def _calibration_display(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "model": rows["arch"], "attribute": rows["attribute"], "group": rows["group"], "n": rows["n"],
        "metric": rows["metric"].map(METRIC_LABELS),
        "value [95% CI]": [_with_ci(*v) for v in zip(rows["value"], rows["ci_low"], rows["ci_high"], rows["ci_reliable"])],
        "overall": rows["overall"],
        "gap to overall [95% CI]": [_with_ci(*v) for v in zip(rows["gap_overall"], rows["gap_overall_ci_low"],
                                                               rows["gap_overall_ci_high"], rows["ci_reliable"])],
        "direction": rows["direction"], "q": rows["q_value"], "flagged": rows["flagged"],
    })


def _adjusted_display(adjusted: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, error, group) flagged by either analysis: the systematic-error
    regression beside the univariate OR, and how many models' own errors flag the group."""
    per_model = adjusted[adjusted["scope"] == "model"].groupby(["task", "error", "attribute", "group"], sort=False).agg(
        n_models=("model", "nunique"), adjusted_flags=("flagged", "sum"), univariate_flags=("univariate_flagged", "sum"))
    systematic = adjusted[adjusted["scope"] == "systematic"].set_index(["task", "error", "attribute", "group"])
    both = per_model.join(systematic, how="outer")
    either = (both["flagged"].fillna(False).astype(bool) | both["univariate_flagged"].fillna(False).astype(bool)
              | (both["adjusted_flags"] > 0) | (both["univariate_flags"] > 0))
    rows = both[either].reset_index()
    return pd.DataFrame({
        "task": rows["task"], "error": rows["error"], "attribute": rows["attribute"], "group": rows["group"],
        "reference": rows["reference"],
        "adjusted OR [95% CI]": [_with_ci(*v) for v in zip(rows["odds_ratio"], rows["ci_low"], rows["ci_high"])],
        "q": rows["q_value"],
        "univariate OR [95% CI]": [_with_ci(*v) for v in zip(rows["univariate_or"], rows["univariate_ci_low"], rows["univariate_ci_high"])],
        "q (univariate)": rows["univariate_q"],
        "models flagged: adjusted": [f"{a:.0f} of {n:.0f}" for a, n in zip(rows["adjusted_flags"], rows["n_models"])],
        "univariate": [f"{u:.0f} of {n:.0f}" for u, n in zip(rows["univariate_flags"], rows["n_models"])],
        "flagged": rows["flagged"].fillna(False).astype(bool), "note": rows["note"],
    })


def _adjusted_section(adjusted: pd.DataFrame) -> str:
    shown = _adjusted_display(adjusted)
    return ("<h2>Adjusted for the other attributes</h2>"
            f"<p>{DEFINITIONS['adjusted']} Shown: groups flagged by either analysis, for systematic errors or for "
            "any model's own errors (every term in adjusted.csv).</p>"
            + (_table(shown, flag_column="flagged", left=("task", "error", "attribute", "group", "reference", "adjusted OR [95% CI]",
                                                         "univariate OR [95% CI]", "models flagged: adjusted", "univariate", "note"))
               if len(shown) else "<p>No group is flagged by either analysis.</p>"))


def figure_jobs(analysis: Analysis) -> figures.Jobs:
    """The report's figures: name -> (figure function, its keyword arguments)."""
    tables, tasks = analysis.tables, analysis.tasks
    consistency, subgroups = tables["consistency"], tables["subgroups"]
    jobs: figures.Jobs = {"roc": (figures.roc_figure, dict(tasks=tasks))}
    jobs |= {("forest", data.task): (figures.forest_figure, dict(subgroups=subgroups[subgroups["task"] == data.task],
                                                                 task=data.task)) for data in tasks}
    if not consistency.empty:
        jobs |= {"kappa": (figures.kappa_figure, dict(consistency=consistency)),
                 "mean_kappa": (figures.mean_kappa_figure, dict(consistency=consistency))}
    jobs |= {("composition", a): (figures.composition_figure, dict(systematic=tables["systematic"], attribute=a))
             for a in DEMOGRAPHICS}
    jobs |= {("reliability", data.task): (figures.reliability_figure, dict(data=data, groups=flagged_calibration_groups(
        tables["calibration"], data))) for data in tasks}
    return jobs


def flagged_calibration_groups(calibration: pd.DataFrame, data) -> list[tuple[str, str, np.ndarray]]:
    """The task's groups with a flagged calibration gap, in the headline's order
    (headline.ranked_calibration_groups), with their image positions (the reliability
    diagram's panels)."""
    flagged = calibration[(calibration["task"] == data.task) & calibration["flagged"]]
    ranked = ranked_calibration_groups(flagged, len(data.archs))
    positions = {(a, g): p for a, g, p in iter_groups(data.images)} if ranked else {}
    return [(group.attribute, group.group, positions[group.attribute, group.group])
            for group in ranked[: figures.MAX_RELIABILITY_PANELS - 1]]


def render_html(analysis: Analysis, uris: dict | None = None, gallery: Gallery | None = None) -> str:
    """The report page; `uris` are the drawn figure_jobs (drawn here when not given); `gallery`
    the images of the systematic section (none without it)."""
    settings, tables = analysis.settings, analysis.tables
    tasks = analysis.tasks
    consistency = tables["consistency"]
    inputs = analysis.inputs
    if uris is None:
        uris = figures.draw_all(figure_jobs(analysis), rows=len(analysis.predictions))
    forest_uris = {data.task: uris["forest", data.task] for data in tasks}
    kappa_uri, mean_uri = uris.get("kappa"), uris.get("mean_kappa")
    composition_uris = [uris["composition", a] for a in DEMOGRAPHICS]
    headline = "".join(f"<li>{html.escape(line)}</li>" for line in headline_findings(analysis))
    settings_line = (f"split <b>{html.escape(settings.split)}</b>, {len(inputs)} prediction files, "
                     f"{settings.n_bootstrap} patient-level bootstrap resamples (seed {settings.seed}), "
                     f"systematic threshold {settings.systematic_threshold}, min count {settings.min_count}, "
                     f"FDR q = {settings.fdr}")
    body = "".join([
        "<h1>cxr_fast: who do the models get wrong?</h1>",
        DUA_WARNING if gallery is not None and gallery.has_images else "",
        f"<p class=note>{settings_line}</p>",
        f'<h2>Headline findings</h2><ul class="headline">{headline}</ul>',
        HOW_TO_READ.format(fdr=settings.fdr, min_count=settings.min_count, threshold=settings.systematic_threshold,
                           min_informative=MIN_INFORMATIVE),
        _models_section(tables["models"], uris["roc"]),
        _subgroups_section(tables["subgroups"], forest_uris),
        _calibration_section(tables["calibration"], {data.task: uris["reliability", data.task] for data in tasks}),
        _consistency_section(consistency, kappa_uri, mean_uri),
        _systematic_section(tables["systematic"], tables["systematic_images"], composition_uris, settings.systematic_threshold),
        gallery_section(gallery),
        _adjusted_section(tables["adjusted"]),
        "<h2>Inputs</h2>", _table(inputs, left=("file", "task", "arch", "recipe")),
        f"<p class=note>{html.escape(', '.join(f'{k} {v}' for k, v in versions().items()))}</p>",
    ])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>cxr_fast analysis</title>'
            f"<style>{CSS}{GALLERY_CSS}</style></head><body>{body}</body></html>\n")


# --- files ----------------------------------------------------------------------------------

def _records(frame: pd.DataFrame) -> list[dict]:
    """JSON-ready rows: NaN -> null (strict JSON has no NaN)."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _records_of(structured: dict[str, list[dict]]) -> dict[str, list[dict]]:
    return {name: _records(pd.DataFrame(rows)) for name, rows in structured.items()}


def summary(analysis: Analysis) -> dict:
    lines, structured = headline_and_findings(analysis)
    return {
        "settings": dataclasses.asdict(analysis.settings),
        "pred_dir": str(analysis.pred_dir),
        "inputs": _records(analysis.inputs),
        "definitions": DEFINITIONS,
        "headline": lines,
        # What the headline is made of: findings that hold after adjustment, univariate flags
        # the adjusted model explains (and by which finding), those it could not estimate.
        "findings": _records_of(structured),
        # The tables themselves are the CSVs next to this file; here only what they do not say.
        "files": {f"{name}.csv": len(table) for name, table in analysis.tables.items()},
        "task_summary": _records(task_summary(analysis.tables["subgroups"])),
        "calibration_summary": _records(task_summary(analysis.tables["calibration"])),
        "versions": versions(),
    }


REPORT_MARKER = "summary.json"  # what makes an existing folder a report that may be replaced


def write_report(*, analysis: Analysis, out: str | Path, gallery: Gallery | None = None) -> Path:
    """Write every CSV, summary.json and index.html into `out`; return the index.html path.

    The report is built in a temporary sibling folder and swapped in whole: a failure midway
    leaves the previous report untouched, never new CSVs beside an old index.html. `out` is
    the report's own folder: an existing one is replaced only if it holds a report (or
    nothing), so a mistyped `--out .` cannot delete unrelated files."""
    out = Path(out)
    _check_replaceable(out)
    # The figures are drawn (in worker processes at study size) while the tables are written.
    with figures.drawing(figure_jobs(analysis), rows=len(analysis.predictions)) as drawn, atomic_folder(out) as folder:
        for name, table in analysis.tables.items():
            write_csv(folder / f"{name}.csv", table)
        if gallery is not None:
            write_csv(folder / "gallery.csv", gallery.shown)
        write_json(folder / REPORT_MARKER, summary(analysis))
        uris = drawn()
        for data in analysis.tasks:  # the reliability diagrams also as files of their own
            write_bytes(folder / f"reliability_{data.task}.png", figures.png_bytes(uris["reliability", data.task]))
        write_bytes(folder / "index.html", render_html(analysis, uris, gallery).encode("utf-8"))
    return out / "index.html"


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CxrError(f"{out}: --out must be a folder for the report, this is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_MARKER).is_file():
        raise CxrError(f"{out}: not empty and not a previous report (no {REPORT_MARKER}); the report replaces "
                       "its folder whole, so give a new or empty folder")
