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

Speed (240 fits for 6 tasks x 19 models at study scale): the attribute values, references and
term members of a class are computed once and shared by its outcomes; each fit runs on the
distinct (covariate pattern, outcome) rows with frequency weights and statsmodels evaluates the
per-image model at those estimates for the clustered covariance (fit_clustered); the 2x2
statistics of all rows are computed at once on arrays (stats.py); tasks can run in processes.
"""

from __future__ import annotations

import functools
import itertools
import warnings

import numpy as np
import pandas as pd
import statsmodels.api as sm
from statsmodels.tools.sm_exceptions import PerfectSeparationWarning

from cxr_fast.analyze.groups import attribute_name, group_name, ordered_levels
from cxr_fast.analyze.inputs import TaskData, task_data
from cxr_fast.analyze.stats import benjamini_hochberg, fisher_p_values, odds_ratios_woolf
from cxr_fast.analyze.systematic import ERRORS, is_systematic
from cxr_fast.analyze.parallel import blas_single_threaded, process_pool
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
    *, predictions: pd.DataFrame | None = None, tasks: list[TaskData] | None = None, threshold: float = 0.8,
    min_count: int = 30, fdr: float = 0.05, level: float = 0.95, workers: int = 1,
) -> pd.DataFrame:
    """One row per (scope, task, error kind, model, term): adjusted OR beside univariate OR.

    `tasks` (task_data of the predictions) saves splitting `predictions` again. With
    `workers` > 1 the tasks are fitted in that many processes (the table does not depend on
    how many). Starting them costs seconds (a fresh interpreter imports the analysis, and the
    caller's main module must be import-safe): worth it on a many-core node, not on 2 shared
    cores, where one task takes ~2 s of CPU."""
    tasks = task_data(predictions) if tasks is None else tasks
    settings = dict(threshold=threshold, min_count=min_count, level=level)
    rows = [row for task_rows in _map(functools.partial(task_rows, **settings), tasks, workers) for row in task_rows]
    table = pd.DataFrame(rows, columns=COLUMNS + list(TABLE_2X2))
    table = add_univariate(table, level=level)
    for column in ("q_value", "univariate_q"):
        table[column] = np.nan
    for _, family in table.groupby(["scope", "task", "error"], sort=False):
        table.loc[family.index, "q_value"] = benjamini_hochberg(family["p_value"].to_numpy(float))
        table.loc[family.index, "univariate_q"] = benjamini_hochberg(
            family["univariate_p"].where(family["p_value"].notna()).to_numpy(float))
    table["flagged"] = (table["q_value"] <= fdr) & (table["odds_ratio"] > 1)
    table["univariate_flagged"] = (table["univariate_q"] <= fdr) & (table["univariate_or"] > 1)
    return table[COLUMNS]


def _map(function, items: list, workers: int) -> list:
    """function over items, in up to `workers` processes."""
    workers = min(len(items), workers)
    if workers <= 1:
        return [function(item) for item in items]
    with process_pool(workers, preload=(__name__,)) as pool:
        return list(pool.map(function, items))


@blas_single_threaded
def task_rows(data: TaskData, *, threshold: float, min_count: int, level: float) -> list[dict]:
    """Every fit of one task: systematic errors and each model's own, per error kind."""
    systematic = is_systematic(data, threshold)
    rows = []
    for error, on_label in ERRORS.items():
        in_class = data.label == on_label
        images = ClassImages(data.images.loc[in_class].reset_index(drop=True), data.subject_index[in_class])
        outcomes = {SYSTEMATIC: systematic}
        outcomes.update({arch: ~data.correct[m] for m, arch in enumerate(data.archs)})
        for model, wrong in outcomes.items():
            rows += fit_rows(data.task, error, model, images, wrong[in_class], min_count=min_count, level=level)
    return rows


# The univariate 2x2 table of each term: (group, rest) x (misclassified, right).
TABLE_2X2 = ("_group_wrong", "_group_right", "_rest_wrong", "_rest_right")


def fit_rows(task: str, error: str, model: str, images: ClassImages, wrong: np.ndarray, *,
             min_count: int, level: float) -> list[dict]:
    """Fit one outcome (over the images of one class) and return its term rows."""
    design = build_design(images, wrong, min_count=min_count)
    keep = design.keep
    base = {"scope": SYSTEMATIC if model == SYSTEMATIC else "model", "task": task, "error": error,
            "model": model, "n_fitted": int(keep.sum())}
    estimates, fit_note = _fit_without_separation(design, wrong[keep], images.clusters[keep],
                                                  images.patterns[keep], level=level)
    # (terms x images); no term at all when every attribute has one level among these images
    members = np.array(list(design.terms.values()), dtype=bool).reshape(len(design.terms), wrong.size)
    group_wrong = members @ wrong.astype(np.int64)
    group_size = members.sum(axis=1)
    n_wrong = int(wrong.sum())
    rows = []
    for (attribute, group), n_group, n_group_wrong in zip(design.terms, group_size, group_wrong):
        estimate = estimates.get(term_column(attribute, group), {})
        table = (n_group_wrong, n_group - n_group_wrong, n_wrong - n_group_wrong,
                 wrong.size - n_wrong - (n_group - n_group_wrong))
        rows.append({**base, "attribute": attribute, "group": group, "reference": design.reference(attribute),
                     "n_class_group": int(n_group), "n_errors_group": int(n_group_wrong), **estimate,
                     **dict(zip(TABLE_2X2, map(int, table))),
                     "note": design.notes.get((attribute, group), "" if estimate else fit_note)})
    return rows


def add_univariate(table: pd.DataFrame, *, level: float) -> pd.DataFrame:
    """The univariate OR (Woolf CI) and Fisher p of every row's 2x2 table, all rows at once."""
    cells = [table[column].to_numpy(np.int64) for column in TABLE_2X2]
    odds_ratio, low, high = odds_ratios_woolf(*cells, level=level)
    return table.assign(univariate_or=odds_ratio, univariate_ci_low=low, univariate_ci_high=high,
                        univariate_p=fisher_p_values(*cells))


def _fit_without_separation(design: Design, outcome: np.ndarray, clusters: np.ndarray, patterns: np.ndarray, *,
                            level: float) -> tuple[dict[str, dict], str]:
    while True:
        estimates, note = fit_clustered(design.matrix, design.names, outcome, clusters, patterns, level=level)
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


class ClassImages:
    """The images of one class (a task's positives or negatives) and what every outcome's
    design over them shares: attribute values, references, candidate terms and their members."""

    def __init__(self, images: pd.DataFrame, subject_index: np.ndarray):
        self.values = {column: images[column].to_numpy(dtype=str) for column in ATTRIBUTES}
        self.references = {column: _reference(column, self.values[column]) for column in ATTRIBUTES}
        self.clusters = subject_index
        # Every design column is an indicator of attribute levels: images with the same
        # levels of all attributes have the same design row (one covariate pattern).
        self.patterns = np.unique(np.column_stack([pd.factorize(self.values[column])[0] for column in ATTRIBUTES]),
                                  axis=0, return_inverse=True)[1].ravel()
        # Non-reference levels of each attribute, in display order.
        self.levels = {column: [level for level in ordered_levels(column, self.values[column])
                                if level != self.references[column]] for column in ATTRIBUTES}
        self.members: dict[tuple[str, str], np.ndarray] = {}  # every candidate term, main effects first
        for column in ATTRIBUTES:
            for level in self.levels[column]:
                self.members[(column, level)] = self.values[column] == level
        for first, second in INTERACTIONS:
            for level_a, level_b in itertools.product(self.levels[first], self.levels[second]):
                self.members[(attribute_name((first, second)), group_name((level_a, level_b)))] = (
                    self.members[(first, level_a)] & self.members[(second, level_b)])

    @property
    def size(self) -> int:
        return len(self.clusters)


class Design:
    """The regression design of one outcome: `matrix` (constant + one column per kept term,
    named by `names`) over the `keep` images, every candidate term's members and why a term
    was left out."""

    def __init__(self, references: dict[str, str]):
        self.references = references
        self.terms: dict[tuple[str, str], np.ndarray] = {}   # (attribute, group) -> members (all class images)
        self.notes: dict[tuple[str, str], str] = {}          # left-out term -> reason
        self.columns: dict[str, np.ndarray] = {}             # kept term column -> members
        self.keep = np.ones(0, bool)

    def reference(self, attribute: str) -> str:
        return group_name(tuple(self.references.get(column, "") for column in attribute.split(" x ")))

    @property
    def names(self) -> list[str]:
        return ["const", *self.columns]

    def fix_columns(self) -> None:
        """Build the matrix of the current columns over the kept images, once: columns are
        only dropped from here on, and `matrix`/`gram` then select from it."""
        indicators = np.column_stack([np.ones(len(self.keep), bool), *self.columns.values()])
        self._full = indicators[self.keep].astype(float)
        self._positions = {name: position for position, name in enumerate(self.names)}
        self._full_gram = self._full.T @ self._full

    def _selected(self) -> list[int] | None:
        positions = [self._positions[name] for name in self.names]
        return None if len(positions) == self._full.shape[1] else positions

    @property
    def matrix(self) -> np.ndarray:
        selected = self._selected()
        return self._full if selected is None else self._full[:, selected]

    @property
    def gram(self) -> np.ndarray:
        """X'X of `matrix` (indicator columns: exact integer counts)."""
        selected = self._selected()
        return self._full_gram if selected is None else self._full_gram[np.ix_(selected, selected)]


def build_design(images: ClassImages, wrong: np.ndarray, *, min_count: int) -> Design:
    design = Design(images.references)
    design.terms = images.members
    keep = np.ones(images.size, bool)
    main = {}
    for column in ATTRIBUTES:
        for level in images.levels[column]:
            member = images.members[(column, level)]
            reason = _unsupported(member, wrong, min_count)
            if reason:
                design.notes[(column, level)] = f"left out with its images: {reason}"
                keep &= ~member
            else:
                main[(column, level)] = member
    design.keep = keep
    design.columns = {term_column(*term): member for term, member in main.items()}
    for first, second in INTERACTIONS:
        for level_a, level_b in itertools.product(images.levels[first], images.levels[second]):
            term = (attribute_name((first, second)), group_name((level_a, level_b)))
            cell = images.members[term]
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
    design.fix_columns()
    _drop_collinear_interactions(design)
    return design


def _drop_collinear_interactions(design: Design) -> None:
    interactions = [name for name in design.columns if " x " in name.split("=")[0]]
    while interactions and _rank_deficient(design.gram):
        name = interactions.pop()
        attribute, group = name.split("=", 1)
        del design.columns[name]
        design.notes[(attribute, group)] = "left out (fitted additively): collinear with the other terms"


def _rank_deficient(gram: np.ndarray) -> bool:
    # The rank of X equals the rank of the small Gram matrix X'X (columns x columns).
    return np.linalg.matrix_rank(gram) < gram.shape[1]


def _unsupported(member: np.ndarray, wrong: np.ndarray, min_count: int) -> str:
    n, errors = int(np.count_nonzero(member)), int(np.count_nonzero(member & wrong))
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
    levels, sizes = np.unique(values, return_counts=True)
    counts = dict(zip(levels.tolist(), sizes.tolist()))
    known = {level: n for level, n in counts.items() if level != UNKNOWN}
    counts = known or counts
    order = ordered_levels(column, values)
    return str(min(counts, key=lambda level: (-counts[level], order.index(level))))


def fit_clustered(matrix: np.ndarray, names: list[str], outcome: np.ndarray, clusters: np.ndarray,
                  patterns: np.ndarray, *, level: float) -> tuple[dict[str, dict], str]:
    """Logistic regression with patient-clustered (sandwich) standard errors: per column
    (`names`, "const" first) its OR, CI and Wald p; or no estimates and the reason the fit is
    not usable. `patterns`: images with equal codes have equal rows of `matrix`.

    The design has only indicator columns, so the images are a few hundred distinct
    (covariate pattern, outcome) pairs: the fit on those, with their counts as frequency
    weights, has the same likelihood and the same IRLS steps as the fit on the images, in a
    fraction of the time. The clustered covariance needs every image's score: statsmodels
    evaluates the image-level model at those estimates (`maxiter=0`, its way of evaluating
    a GLM at given parameters) and computes it."""
    if matrix.size == 0 or outcome.min() == outcome.max():
        return {}, "not fitted: no variation in the outcome"
    outcome = outcome.astype(float)
    _, first, counts = np.unique(patterns * 2 + (outcome != 0), return_index=True, return_counts=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerfectSeparationWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            patterns = sm.GLM(outcome[first], matrix[first], family=sm.families.Binomial(),
                              freq_weights=counts.astype(float)).fit()
            if not patterns.converged:
                return {}, "not fitted: the regression did not converge"
            result = sm.GLM(outcome, matrix, family=sm.families.Binomial()).fit(
                start_params=patterns.params, maxiter=0, cov_type="cluster",
                cov_kwds={"groups": pd.factorize(clusters)[0]})
        except (PerfectSeparationWarning, np.linalg.LinAlgError, ValueError) as error:
            return {}, f"not fitted: {type(error).__name__}: {str(error).splitlines()[0]}"
    interval = np.exp(result.conf_int(alpha=1 - level))
    odds_ratios, p_values = np.exp(result.params), result.pvalues
    return {name: {"odds_ratio": float(odds_ratios[i]), "ci_low": float(interval[i, 0]),
                   "ci_high": float(interval[i, 1]), "p_value": float(p_values[i])}
            for i, name in enumerate(names) if name != "const"}, ""
