"""The report's headline: what a reader should act on, most important first.

Univariate flags (subgroups.csv, systematic.csv) confound overlapping groups: a miss planted in
Black women makes `sex = F`, `race = Black` and every `F & <age>` look worse too. So the
headline leads with the groups the adjusted regressions (adjusted.csv) flag, each with its
adjusted OR and how many of its task's models agree; a group flagged only univariately follows
in one line per task naming the adjusted finding that accounts for it (the findings it
overlaps). A group the adjusted model could not estimate (left out, separation, a failed fit)
keeps its univariate sentence, marked as unadjusted, with the reason. Then calibration,
systematic-error composition of the same unadjusted groups, error consistency.

A finding "holds after adjustment" in a task when its term is flagged (adjusted q <= fdr, OR > 1)
in the fits of more than half of the task's models' own errors; its OR is that of the fit of the
task's systematic errors (the median over the models' fits where that one has none). Why not the
systematic fit alone: it is one fit of a threshold outcome, and in a small cell (34 Asian women)
a chance excess flags there while 1 of 3 models agrees. Every count of models is out of the
task's own models.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from cxr_fast.analyze.groups import group_sort_key

METRIC_LABELS = {
    "prevalence": "prevalence", "auroc": "AUROC", "balanced_accuracy": "balanced accuracy",
    "sensitivity": "sensitivity", "specificity": "specificity", "ppv": "PPV", "npv": "NPV", "fnr": "FNR", "fpr": "FPR",
    "citl": "calibration-in-the-large", "slope": "calibration slope", "intercept": "calibration intercept",
    "ece": "ECE",
}
HARM_WORDS = {
    "fnr": "misses more positives (higher FNR)", "fpr": "more false alarms (higher FPR)",
    "balanced_accuracy": "lower balanced accuracy", "auroc": "lower AUROC",
}
ERROR_WORDS = {"false_negative": ("misses more of its positives", "fnr"),
               "false_positive": ("raises more false alarms", "fpr")}
# Below this a q-value has underflowed (to 0 or a subnormal): print a bound, not "q <= 0".
SMALLEST_Q = 1e-300
MAX_CALIBRATION_GROUPS = 6  # per task in the headline; every one is in calibration.csv


def format_q(q: float) -> str:
    """`q <= 0.0012`, or `q < 1e-300` for a q-value that underflowed."""
    return f"q < {SMALLEST_Q:g}" if q < SMALLEST_Q else f"q <= {q:.2g}"


def _span(values: pd.Series, fmt: str = "{:.2f}") -> str:
    low, high = values.min(), values.max()
    if fmt.format(low) == fmt.format(high):
        return fmt.format(low)
    return f"{fmt.format(low)}{' to ' if low < 0 else '-'}{fmt.format(high)}"  # "-0.19 to -0.16", not "-0.19--0.16"


def _name(attribute: str, group: str) -> str:
    return f"{attribute} = {group}"


def overlaps(first: tuple[str, str], second: tuple[str, str]) -> bool:
    """Whether two groups can share patients: they give no common attribute different levels
    (`sex = F` and `F & Black` overlap, `M & Black` and `F & Black` do not)."""
    levels = [dict(zip(attribute.split(" x "), group.split(" & "))) for attribute, group in (first, second)]
    return all(levels[1].get(column, level) == level for column, level in levels[0].items())


# --- what holds after adjustment --------------------------------------------------------------

def adjusted_findings(adjusted: pd.DataFrame, *, models_per_task: dict[str, int]) -> pd.DataFrame:
    """One row per (task, error, attribute, group) that holds after adjustment: the
    systematic-error fit's adjusted OR where that fit flags it too (else the median over the
    models' fits and their median q), and how many of the task's models' own fits flag it."""
    keys = ["task", "error", "attribute", "group"]
    per_model = adjusted[adjusted["scope"] == "model"].groupby(keys, sort=False).agg(
        models_flagged=("flagged", "sum"), model_or=("odds_ratio", "median"), model_q=("q_value", "median"))
    systematic = adjusted[adjusted["scope"] == "systematic"].set_index(keys)[
        ["odds_ratio", "ci_low", "ci_high", "q_value", "flagged"]]
    table = per_model.join(systematic, how="outer").reset_index()
    table["models"] = table["task"].map(models_per_task).fillna(0).astype(int)
    table["models_flagged"] = table["models_flagged"].fillna(0).astype(int)
    holds = 2 * table["models_flagged"] > table["models"]
    table = table[holds].copy()
    # The systematic-error fit speaks for the finding only where it flags it too: an OR of 1.06
    # with q 0.96 beside "holds after adjustment" would contradict the sentence it stands in.
    from_models = table["odds_ratio"].isna() | ~table["flagged"].fillna(False).astype(bool)
    table.loc[from_models, "odds_ratio"] = table.loc[from_models, "model_or"]
    table.loc[from_models, "q_value"] = table.loc[from_models, "model_q"]
    table.loc[from_models, ["ci_low", "ci_high"]] = np.nan  # a median of the fits has no interval of its own
    table["or_source"] = np.where(from_models, "median over the models' fits", "systematic errors")
    table = table.sort_values(["models_flagged", "q_value"], ascending=[False, True], kind="stable")
    return table[keys + ["odds_ratio", "ci_low", "ci_high", "q_value", "or_source", "models_flagged", "models"]
                 ].reset_index(drop=True)


def univariate_groups(subgroups: pd.DataFrame, systematic: pd.DataFrame) -> pd.DataFrame:
    """(task, attribute, group) flagged by a univariate analysis: a subgroup gap or an
    over-representation among systematic errors."""
    keys = ["task", "attribute", "group"]
    both = pd.concat([subgroups.loc[subgroups["flagged"], keys], systematic.loc[systematic["flagged"], keys]])
    return both.drop_duplicates().reset_index(drop=True)


def split_univariate(univariate: pd.DataFrame, findings: pd.DataFrame, adjusted: pd.DataFrame
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The univariate groups that are not adjusted findings, split into those the adjusted
    model estimated and did not flag (explained: with the findings of their task they
    overlap) and those it could not estimate (unadjusted: with the reason)."""
    found = set(zip(findings["task"], findings["attribute"], findings["group"]))
    estimated = _estimated_groups(adjusted)
    reasons = (adjusted[adjusted["scope"] == "systematic"].groupby(["task", "attribute", "group"])["note"]
               .agg(lambda notes: "; ".join(sorted(set(filter(None, notes))))))
    explained, unadjusted = [], []
    for task, attribute, group in univariate.itertuples(index=False):
        key = (task, attribute, group)
        if key in found:
            continue
        if estimated(key):
            task_findings = findings[findings["task"] == task]
            by = [_name(a, g) for a, g in zip(task_findings["attribute"], task_findings["group"])
                  if overlaps((attribute, group), (a, g))]
            explained.append({"task": task, "attribute": attribute, "group": group, "explained_by": list(dict.fromkeys(by))})
        else:
            unadjusted.append({"task": task, "attribute": attribute, "group": group,
                               "reason": reasons.get(key, "") or "no adjusted estimate"})
    columns = ["task", "attribute", "group"]
    return (pd.DataFrame(explained, columns=columns + ["explained_by"]),
            pd.DataFrame(unadjusted, columns=columns + ["reason"]))


def _estimated_groups(adjusted: pd.DataFrame):
    """(task, attribute, group) -> whether the adjusted model estimated the group's effect.
    A group without a term of its own is a combination with reference levels (F & 60-80
    with 60-80 the reference is the `sex = F` term): estimated when its other levels are."""
    terms = set(zip(adjusted["task"], adjusted["attribute"], adjusted["group"]))
    rows = adjusted[adjusted["odds_ratio"].notna()]
    estimated = set(zip(rows["task"], rows["attribute"], rows["group"]))
    references = {(task, column): reference for task, attribute, reference in
                  zip(adjusted["task"], adjusted["attribute"], adjusted["reference"]) if " x " not in attribute
                  for column in [attribute]}

    def check(key: tuple[str, str, str]) -> bool:
        task, attribute, group = key
        if key in terms:
            return key in estimated
        levels = [(column, level) for column, level in zip(attribute.split(" x "), group.split(" & "))
                  if references.get((task, column)) != level]
        return len(levels) < len(attribute.split(" x ")) and all((task, *level) in estimated for level in levels)

    return check


# --- sentences --------------------------------------------------------------------------------

def _finding_line(row, subgroups: pd.DataFrame) -> str:
    words, metric = ERROR_WORDS[row.error]
    interval = (f" [{row.ci_low:.2f}, {row.ci_high:.2f}]" if np.isfinite(row.ci_low) and np.isfinite(row.ci_high) else "")
    cell = subgroups[(subgroups["task"] == row.task) & (subgroups["attribute"] == row.attribute)
                     & (subgroups["group"] == row.group) & (subgroups["metric"] == metric)]
    detail = (f"; {METRIC_LABELS[metric]} {_span(cell['value'])} vs overall {_span(cell['overall'])}"
              if len(cell) and cell["value"].notna().any() else "")
    return (f"{row.task}: {_name(row.attribute, row.group)} {words}, after adjustment for sex, age, race and view: "
            f"adjusted OR {row.odds_ratio:.2f}{interval} ({row.or_source}, {format_q(row.q_value)}); "
            f"{row.models_flagged} of {row.models} of the task's models agree{detail}.")


def _explained_lines(explained: pd.DataFrame) -> list[str]:
    lines = []
    for task, rows in explained.groupby("task", sort=True):
        rows = rows.assign(_order=[group_sort_key(a, g) for a, g in zip(rows["attribute"], rows["group"])]).sort_values("_order")
        by_attribute = rows.groupby("attribute", sort=False)["group"].agg(list)
        names = _join([f"{attribute} = {', '.join(groups)}" for attribute, groups in by_attribute.items()])
        by = list(dict.fromkeys(name for names_by in rows["explained_by"] for name in names_by))
        reason = (f"once {_join(by)} {'is' if len(by) == 1 else 'are'} in the model" if by
                  else "once sex, age, race and view are in the model together")
        lines.append(f"{task}: {names}: flagged univariately; after adjustment not significant for most of the "
                     f"task's models {reason}.")
    return lines


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _unadjusted_lines(subgroups: pd.DataFrame, unadjusted: pd.DataFrame, models_per_task: dict[str, int]) -> list[str]:
    """The univariate sentence of each group the adjusted model could not estimate."""
    lines = []
    flagged = subgroups[subgroups["flagged"]]
    for row in unadjusted.itertuples(index=False):
        rows = flagged[(flagged["task"] == row.task) & (flagged["attribute"] == row.attribute) & (flagged["group"] == row.group)]
        parts = [f"{HARM_WORDS[metric]} for {cell['arch'].nunique()} of {models_per_task[row.task]} of the task's models "
                 f"({METRIC_LABELS[metric]} {_span(cell['value'])} vs overall {_span(cell['overall'])})"
                 for metric, cell in rows.groupby("metric", sort=False)]
        if parts:  # a group flagged only among systematic errors has its own sentence (_systematic_lines)
            lines.append(f"{row.task}: {_name(row.attribute, row.group)} (unadjusted: the adjusted model could not "
                         f"estimate it, {row.reason}): " + "; ".join(parts) + ".")
    return lines


class CalibrationGroup(NamedTuple):
    """A group with a flagged calibration gap for one task: the metric it is named by (citl or
    slope, flagged for more than half of the task's models), None where no metric is, and the
    flagged rows it is counted and described by (the named metric's, else all)."""

    attribute: str
    group: str
    metric: str | None
    rows: pd.DataFrame


def ranked_calibration_groups(flagged: pd.DataFrame, n_models: int) -> list[CalibrationGroup]:
    """One task's flagged calibration rows by group, in the order the headline names them and
    the reliability diagram draws them: named groups first, citl before slope (the
    probabilities mean another risk), then most models, then the largest median gap; groups
    flagged for at most half of the models last, in the same order."""
    ranked = []
    for (attribute, group), cell in flagged.groupby(["attribute", "group"], sort=False):
        by_metric = dict(tuple(cell.groupby("metric")))
        named = next((metric for metric in ("citl", "slope") if metric in by_metric
                      and 2 * by_metric[metric]["arch"].nunique() > n_models), None)
        rows = by_metric[named] if named else cell
        leading = named or ("citl" if "citl" in by_metric else "slope")
        key = (named is None, leading != "citl", -rows["arch"].nunique(), -rows["gap_overall"].abs().median())
        ranked.append((key, CalibrationGroup(str(attribute), str(group), named, rows)))
    return [group for _, group in sorted(ranked, key=lambda item: item[0])]


def calibration_lines(calibration: pd.DataFrame, models_per_task: dict[str, int]) -> list[str]:
    """One line per task with flagged calibration gaps, its groups in ranked_calibration_groups'
    order: the named ones (count, direction and values are the named metric's); the rest are
    counted."""
    flagged = calibration[calibration["flagged"]]
    lines = []
    for task, rows in flagged.groupby("task", sort=True):
        ranked = ranked_calibration_groups(rows, models_per_task[task])
        named = [group for group in ranked if group.metric]
        minority = len(ranked) - len(named)
        shown = [_calibration_phrase(group, models_per_task[task]) for group in named[:MAX_CALIBRATION_GROUPS]]
        rest = [f"{len(named) - len(shown)} more" if len(named) > len(shown) else "",
                f"{minority} flagged for at most half of the models" if minority else ""]
        rest = " and ".join(filter(None, rest))
        if shown:
            lines.append(f"{task}: the probabilities mean another risk than overall (calibration gap flagged) for "
                         + "; ".join(shown) + (f"; {rest} (calibration.csv)" if rest else "") + ".")
        else:
            lines.append(f"{task}: calibration gaps flagged only for at most half of the task's models "
                         f"({minority} group(s), calibration.csv).")
    return lines


def _calibration_phrase(group: CalibrationGroup, n_models: int) -> str:
    directions = group.rows["direction"].unique()
    direction = directions[0] if len(directions) == 1 else "in different directions for different models"
    return (f"{_name(group.attribute, group.group)} ({direction}, {group.rows['arch'].nunique()} of {n_models} models; "
            f"{METRIC_LABELS[group.metric]} {_span(group.rows['value'])} vs overall {_span(group.rows['overall'])})")


def _systematic_lines(systematic: pd.DataFrame, unadjusted: pd.DataFrame, *, threshold: float) -> list[str]:
    """Over-representation among systematic errors, for the unadjusted groups."""
    reasons = dict(zip(zip(unadjusted["task"], unadjusted["attribute"], unadjusted["group"]), unadjusted["reason"]))
    flagged = systematic[systematic["flagged"]]
    flagged = flagged.loc[np.array([key in reasons for key in zip(flagged["task"], flagged["attribute"], flagged["group"])],
                                   dtype=bool)]
    lines = []
    for row in flagged.sort_values("q_value", kind="stable").itertuples(index=False):
        kind, base = (("systematically missed positives (false negatives)", "positives") if row.error == "false_negative"
                      else ("systematic false positives", "negatives"))
        reason = reasons[(row.task, row.attribute, row.group)]
        lines.append(f"{row.task}: {_name(row.attribute, row.group)} (unadjusted: the adjusted model could not estimate it, "
                     f"{reason}) is over-represented among {kind} "
                     f"(>= {threshold:.0%} of models wrong): {row.share_of_systematic:.0%} of them vs "
                     f"{row.share_of_class:.0%} of all {base} (odds ratio {row.odds_ratio:.1f}, {format_q(row.q_value)}).")
    return lines


def headline(tables: dict[str, pd.DataFrame], *, models_per_task: dict[str, int], fdr: float, threshold: float
             ) -> tuple[list[str], dict[str, list[dict]]]:
    """The headline's sentences and, for summary.json, the findings they are made of."""
    subgroups, systematic, adjusted = tables["subgroups"], tables["systematic"], tables["adjusted"]
    findings = adjusted_findings(adjusted, models_per_task=models_per_task)
    explained, unadjusted = split_univariate(univariate_groups(subgroups, systematic), findings, adjusted)
    lines = [_finding_line(row, subgroups) for row in findings.itertuples(index=False)]
    lines += _explained_lines(explained)
    lines += _unadjusted_lines(subgroups, unadjusted, models_per_task)
    lines += _systematic_lines(systematic, unadjusted, threshold=threshold)
    if not lines:
        lines.append(f"No group is flagged after adjustment for most of its task's models, and no subgroup gap or "
                     f"over-representation among systematic errors survives Benjamini-Hochberg correction at q = {fdr}.")
    lines += calibration_lines(tables["calibration"], models_per_task)
    structured = {"adjusted": findings.to_dict("records"), "explained": explained.to_dict("records"),
                  "unadjusted": unadjusted.to_dict("records")}
    return lines, structured
