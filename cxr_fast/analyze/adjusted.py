"""Adjusted odds ratios of misclassification: who is over-represented among the errors once
the other attributes are held fixed.

Univariate comparisons (systematic.py: group vs rest) confound overlapping groups: a miss
planted in Black women also makes `sex = F` and every `F & <age>` look worse, since each
contains them. Here, for every task and error kind (false negatives among positives, false
positives among negatives), one logistic regression of "misclassified" on sex, age group, race
and view together, plus the sex x race and sex x age interactions, is fitted (statsmodels GLM,
Binomial, standard errors clustered by patient: images of one patient are not independent).
The outcome is "systematically misclassified" (scope `systematic`, >= threshold of the task's
models wrong) and, separately, each model's own error (scope `model`).

Coding (treatment): each attribute's reference is its largest level among the fitted images
(known levels before Unknown); a main-effect OR is the level vs the reference *within the
reference levels of the other attributes*, an interaction OR is how much more the
intersection's odds differ than the two main effects predict. So an effect confined to
`F & Black` shows as the `F & Black` interaction, not as `sex = F` or `race = Black`, as long
as neither F nor Black is a reference (with F the reference, it would show as `race = Black`
plus a protective `M & Black`): read a flag together with its reference column.

Where the data do not support a term (decided per outcome, before fitting):
- a main-effect level with fewer than `min_count` fitted images, or whose images are all
  misclassified or all right (perfect separation: the ML estimate is infinite), or with fewer
  than MIN_EVENTS misclassified (or right) images, is left out together with its images (a row
  with the reason, no estimate);
- an interaction cell likewise unsupported is left out (its images stay, fitted additively);
- with the cell in, a parent level's own coefficient is estimated from its images outside the
  cell; if those are unsupported (Black men without systematic errors, Black women with many),
  the parent gets no column (its images count as the attribute's reference) and the effect is
  the cell's, which is what such data say;
- any interaction column that still leaves the design rank-deficient is dropped, last first;
- after fitting, an interaction whose |log OR| exceeds SEPARATED_LOG_OR (quasi-separation the
  counts above did not catch) is left out and the model refitted.
A fit that fails, warns of separation or still has such a main effect yields rows with the
reason instead of estimates.

Tests: two-sided Wald p-values from the clustered covariance; Benjamini-Hochberg (statsmodels
`multipletests`) in one family per (scope, task, error kind), over every estimated term (all
models' terms together for scope `model`). Flagged = q <= fdr and adjusted OR > 1. Beside each
term: the univariate OR of the same group vs rest (Woolf CI, Fisher p, BH in the same family),
computed on the same images, so the two read side by side.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import statsmodels.api as sm
from statsmodels.tools.sm_exceptions import PerfectSeparationWarning

from cxr_fast.analyze.groups import attribute_name, group_name, ordered_levels
from cxr_fast.analyze.inputs import TaskData, task_data
from cxr_fast.analyze.stats import benjamini_hochberg, fisher_p_value, odds_ratio_woolf
from cxr_fast.analyze.systematic import ERRORS, is_systematic
from cxr_fast.analyze.threads import blas_single_threaded
from cxr_fast.schema import DEMOGRAPHICS, UNKNOWN, VIEW

ATTRIBUTES: tuple[str, ...] = (*DEMOGRAPHICS, VIEW)
INTERACTIONS: tuple[tuple[str, str], ...] = (("sex", "race"), ("sex", "age_group"))
SYSTEMATIC = "systematic"
# An odds ratio beyond e^10 (~22,000) in either direction means the likelihood has no finite
# maximum in practice (quasi-separation), not a real effect size.
SEPARATED_LOG_OR = 10.0
# A term needs this many misclassified and this many right images: with fewer, the clustered
# standard error is unreliable (sparse-data bias) and a single image decides the flag.
MIN_EVENTS = 5

COLUMNS = [
    "scope", "task", "error", "model", "attribute", "group", "reference", "n_fitted", "n_class_group",
    "n_errors_group", "odds_ratio", "ci_low", "ci_high", "p_value", "q_value", "flagged",
    "univariate_or", "univariate_ci_low", "univariate_ci_high", "univariate_p", "univariate_q", "univariate_flagged",
    "note",
]


@blas_single_threaded
def adjusted_table(
    *, predictions: pd.DataFrame, threshold: float = 0.8, min_count: int = 30, fdr: float = 0.05, level: float = 0.95,
) -> pd.DataFrame:
    """One row per (scope, task, error kind, model, term): adjusted OR beside univariate OR."""
    rows = []
    for data in task_data(predictions):
        systematic = is_systematic(data, threshold)
        for error, on_label in ERRORS.items():
            in_class = data.label == on_label
            outcomes = {SYSTEMATIC: systematic}
            outcomes.update({arch: ~data.correct[m] for m, arch in enumerate(data.archs)})
            for model, wrong in outcomes.items():
                rows += fit_rows(data, error, model, in_class, wrong[in_class], min_count=min_count, level=level)
    table = pd.DataFrame(rows, columns=COLUMNS)
    for column in ("q_value", "univariate_q"):
        table[column] = np.nan
    for _, family in table.groupby(["scope", "task", "error"], sort=False):
        table.loc[family.index, "q_value"] = benjamini_hochberg(family["p_value"].to_numpy(float))
        table.loc[family.index, "univariate_q"] = benjamini_hochberg(
            family["univariate_p"].where(family["p_value"].notna()).to_numpy(float))
    table["flagged"] = (table["q_value"] <= fdr) & (table["odds_ratio"] > 1)
    table["univariate_flagged"] = (table["univariate_q"] <= fdr) & (table["univariate_or"] > 1)
    return table


def fit_rows(data: TaskData, error: str, model: str, in_class: np.ndarray, wrong: np.ndarray, *,
             min_count: int, level: float) -> list[dict]:
    """Fit one outcome (over the images of one class) and return its term rows."""
    images = data.images.loc[in_class].reset_index(drop=True)
    subjects = data.subject_index[in_class]
    design = build_design(images, wrong, min_count=min_count)
    keep = design.keep
    base = {"scope": SYSTEMATIC if model == SYSTEMATIC else "model", "task": data.task, "error": error,
            "model": model, "n_fitted": int(keep.sum())}
    estimates, fit_note = _fit_without_separation(design, wrong[keep], subjects[keep], level=level)
    rows = []
    for (attribute, group), member in design.terms.items():
        univariate = _univariate(member, wrong, level)
        estimate = estimates.get(term_column(attribute, group), {})
        rows.append({**base, "attribute": attribute, "group": group, "reference": design.reference(attribute),
                     "n_class_group": int(member.sum()), "n_errors_group": int((member & wrong).sum()),
                     **estimate, **univariate, "note": design.notes.get((attribute, group), "" if estimate else fit_note)})
    return rows


def _fit_without_separation(design: Design, outcome: np.ndarray, clusters: np.ndarray, *, level: float
                            ) -> tuple[dict[str, dict], str]:
    while True:
        estimates, note = fit_clustered(design.matrix, outcome, clusters, level=level)
        unbounded = [name for name, estimate in estimates.items()
                     if abs(np.log(estimate["odds_ratio"])) > SEPARATED_LOG_OR]
        if not unbounded:
            return estimates, note
        interactions = [name for name in unbounded if " x " in name.split("=")[0]]
        if not interactions:
            return {}, f"not fitted: quasi-separation (|log OR| > {SEPARATED_LOG_OR:g}) for {', '.join(unbounded)}"
        for name in interactions:
            del design.columns[name]
            design.notes[tuple(name.split("=", 1))] = "left out (fitted additively): quasi-separation after fitting"


def term_column(attribute: str, group: str) -> str:
    return f"{attribute}={group}"


class Design:
    """The regression design of one outcome: `matrix` (constant + one column per kept term)
    over the `keep` images, every candidate term's members and why a term was left out."""

    def __init__(self, references: dict[str, str]):
        self.references = references
        self.terms: dict[tuple[str, str], np.ndarray] = {}   # (attribute, group) -> members (all class images)
        self.notes: dict[tuple[str, str], str] = {}          # left-out term -> reason
        self.columns: dict[str, np.ndarray] = {}             # kept term column -> members
        self.keep = np.ones(0, bool)

    def reference(self, attribute: str) -> str:
        return group_name(tuple(self.references.get(column, "") for column in attribute.split(" x ")))

    @property
    def matrix(self) -> pd.DataFrame:
        columns = {"const": np.ones(int(self.keep.sum()))}
        columns.update({name: member[self.keep].astype(float) for name, member in self.columns.items()})
        return pd.DataFrame(columns)


def build_design(images: pd.DataFrame, wrong: np.ndarray, *, min_count: int) -> Design:
    values = {column: images[column].to_numpy(dtype=str) for column in ATTRIBUTES}
    design = Design({column: _reference(column, values[column]) for column in ATTRIBUTES})
    keep = np.ones(len(images), bool)
    levels = {column: [level for level in ordered_levels(column, values[column]) if level != design.references[column]]
              for column in ATTRIBUTES}
    main = {}
    for column in ATTRIBUTES:
        for level in levels[column]:
            member = values[column] == level
            design.terms[(column, level)] = member
            reason = _unsupported(member, wrong, min_count)
            if reason:
                design.notes[(column, level)] = f"left out with its images: {reason}"
                keep &= ~member
            else:
                main[(column, level)] = member
    design.keep = keep
    design.columns = {term_column(*term): member for term, member in main.items()}
    for first, second in INTERACTIONS:
        for level_a in levels[first]:
            for level_b in levels[second]:
                term = (attribute_name((first, second)), group_name((level_a, level_b)))
                cell = (values[first] == level_a) & (values[second] == level_b)
                design.terms[term] = cell
                if (first, level_a) not in main or (second, level_b) not in main:
                    design.notes[term] = "left out: a parent level is left out"
                    continue
                reason = _unsupported(cell & keep, wrong, min_count)
                if reason:
                    design.notes[term] = f"left out (fitted additively): {reason}"
                    continue
                design.columns[term_column(*term)] = cell
                # With the cell in the model, a parent level's coefficient is estimated from the
                # parent's images outside the cell. If those cannot support it (e.g. Black men
                # without systematic errors while Black women have many), the parent gets no
                # column of its own: the effect is the cell's, and that is what the data say.
                for parent in ((first, level_a), (second, level_b)):
                    why = _unsupported(main[parent] & ~cell & keep, wrong, min_count)
                    if why and design.columns.pop(term_column(*parent), None) is not None:
                        design.notes[parent] = (f"no column of its own (fitted as the reference): outside "
                                                f"{term[1]}, {why}")
    _drop_collinear_interactions(design)
    return design


def _drop_collinear_interactions(design: Design) -> None:
    interactions = [name for name in design.columns if " x " in name.split("=")[0]]
    while interactions and _rank_deficient(design.matrix.to_numpy()):
        name = interactions.pop()
        attribute, group = name.split("=", 1)
        del design.columns[name]
        design.notes[(attribute, group)] = "left out (fitted additively): collinear with the other terms"


def _rank_deficient(matrix: np.ndarray) -> bool:
    # The rank of X equals the rank of the small Gram matrix X'X (columns x columns).
    return np.linalg.matrix_rank(matrix.T @ matrix) < matrix.shape[1]


def _unsupported(member: np.ndarray, wrong: np.ndarray, min_count: int) -> str:
    n, errors = int(member.sum()), int((member & wrong).sum())
    if n < max(min_count, 1):
        return f"{n} image(s) < min_count {min_count}"
    if errors in (0, n):
        return f"{'no' if errors == 0 else 'every'} image misclassified (perfect separation)"
    if min(errors, n - errors) < MIN_EVENTS:
        return f"{min(errors, n - errors)} {'misclassified' if errors < n - errors else 'right'} image(s) < {MIN_EVENTS}"
    return ""


def _reference(column: str, values: np.ndarray) -> str:
    """The largest level, known levels first (an Unknown reference would be unreadable);
    ties go to the level shown first."""
    counts = pd.Series(values).value_counts()
    known = counts.drop(UNKNOWN, errors="ignore")
    counts = known if len(known) else counts
    order = ordered_levels(column, values)
    return str(min(counts.index, key=lambda level: (-counts[level], order.index(level))))


def fit_clustered(matrix: pd.DataFrame, outcome: np.ndarray, clusters: np.ndarray, *, level: float
                  ) -> tuple[dict[str, dict], str]:
    """Logistic regression with patient-clustered (sandwich) standard errors: per column its
    OR, CI and Wald p; or no estimates and the reason the fit is not usable."""
    if matrix.empty or outcome.min() == outcome.max():
        return {}, "not fitted: no variation in the outcome"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerfectSeparationWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            result = sm.GLM(outcome.astype(float), matrix, family=sm.families.Binomial()).fit(
                cov_type="cluster", cov_kwds={"groups": pd.factorize(clusters)[0]})
        except (PerfectSeparationWarning, np.linalg.LinAlgError, ValueError) as error:
            return {}, f"not fitted: {type(error).__name__}: {str(error).splitlines()[0]}"
    if not result.converged:
        return {}, "not fitted: the regression did not converge"
    interval = np.exp(result.conf_int(alpha=1 - level))
    return {name: {"odds_ratio": float(np.exp(result.params[name])), "ci_low": float(interval.loc[name, 0]),
                   "ci_high": float(interval.loc[name, 1]), "p_value": float(result.pvalues[name])}
            for name in matrix.columns if name != "const"}, ""


def _univariate(member: np.ndarray, wrong: np.ndarray, level: float) -> dict:
    a, b = int((member & wrong).sum()), int((member & ~wrong).sum())
    c, d = int((~member & wrong).sum()), int((~member & ~wrong).sum())
    odds_ratio, low, high = odds_ratio_woolf(a, b, c, d, level=level)
    return {"univariate_or": odds_ratio, "univariate_ci_low": low, "univariate_ci_high": high,
            "univariate_p": fisher_p_value(a, b, c, d)}
