"""The whole analysis as one call: prediction files in, every table out (nothing written)."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cxr_fast.analyze.adjusted import adjusted_table
from cxr_fast.analyze.bootstrap import MIN_INFORMATIVE
from cxr_fast.analyze.calibration import ECE_BINS, calibration_rows, calibration_values, flag_calibration
from cxr_fast.analyze.consistency import consistency_frame, task_consistency
from cxr_fast.analyze.inputs import TaskData, load_predictions, task_data
from cxr_fast.analyze.performance import FLAG_METRICS, flag_subgroups, model_rows, subgroup_rows
from cxr_fast.analyze.resampled import metric_values, resample
from cxr_fast.analyze.systematic import systematic_images, systematic_table
from cxr_fast.analyze.parallel import blas_single_threaded, process_pool, processes_pay, workers
from cxr_fast.errors import CxrError
from cxr_fast.io import package_versions


@dataclass(frozen=True)
class Settings:
    split: str = "test"
    n_bootstrap: int = 1000
    seed: int = 0
    systematic_threshold: float = 0.8
    min_count: int = 30
    fdr: float = 0.05
    ci_level: float = 0.95

    def validate(self) -> None:
        if self.n_bootstrap < 1:
            raise CxrError(f"--bootstrap must be >= 1 (got {self.n_bootstrap})")
        if not 0 < self.systematic_threshold <= 1:
            raise CxrError(f"--systematic-threshold must be in (0, 1] (got {self.systematic_threshold})")
        if self.min_count < 0:
            raise CxrError(f"--min-count must be >= 0 (got {self.min_count})")
        if not 0 < self.fdr < 1:
            raise CxrError(f"--fdr must be in (0, 1) (got {self.fdr})")


@dataclass(frozen=True)
class Analysis:
    settings: Settings
    pred_dir: Path
    predictions: pd.DataFrame            # the stacked, validated input rows
    tasks: list[TaskData]                # the same rows as per-task arrays (built once, shared)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # name -> table (= CSV stem)

    @functools.cached_property
    def inputs(self) -> pd.DataFrame:
        """One row per input file: which model it is and how many rows were analysed."""
        return (self.predictions.groupby("source", sort=True)
                .agg(task=("task", "first"), arch=("arch", "first"), recipe=("recipe", "first"), n_rows=("key", "size"))
                .reset_index().rename(columns={"source": "file"}))


# What the flags mean, written into summary.json and the report.
DEFINITIONS = {
    "subgroup_family": (
        "One Benjamini-Hochberg family for the whole subgroup table: every gap-to-overall test of "
        f"{', '.join(FLAG_METRICS)} over all tasks, models, attributes (sex, age_group, race, view, "
        "sex x race, sex x age_group) and groups with >= min_count positives and >= min_count negatives "
        "and a reliable gap (gap_overall_ci_reliable: >= the minimum of informative patients in the group). "
        "Test: one-sided (H0: the group is served no worse than overall), z = gap / bootstrap standard error, "
        "referred to Student's t on gap_overall_df degrees of freedom, the expanded CI's scale "
        "(p_harm); p_gap_overall is the two-sided version, matching the CI. Flagged = q_value <= fdr, i.e. "
        "FNR/FPR significantly higher or balanced accuracy/AUROC significantly lower than overall."
    ),
    "systematic_family": (
        "One Benjamini-Hochberg family per (task, error kind): every group with >= min_count images of the "
        "relevant class (positives for false negatives, negatives for false positives) in the group and in the "
        "rest. Fisher exact test of group vs rest x systematically misclassified or not; odds ratio with "
        "Woolf log CI (Haldane 0.5 correction for zero cells). Flagged = q <= fdr and odds ratio > 1."
    ),
    "bootstrap": (
        "Patient-level cluster bootstrap: subjects resampled with replacement, one resample matrix per task "
        "(seeded by seed and task name), shared by all models, groups and pairs of the task (paired CIs). "
        "95% intervals over resamples where the statistic is defined (NaN if under half are). A proportion "
        "(sensitivity, specificity, PPV, NPV, FNR, FPR, prevalence): Wilson's score interval at the effective "
        "sample size p(1-p) / bootstrap variance (the images discounted for patient clustering). AUROC, balanced "
        "accuracy, kappa and every gap: the expanded percentile interval, the percentile interval at the levels "
        "Phi(-/+ sqrt((df+1)/df) t_{df, 0.975}) (columns df, gap_overall_df, gap_best_df). n_informative = the "
        "patients a value rests on: those in the metric's denominator (with a positive image for sensitivity/FNR, "
        "a negative one for specificity/FPR, a predicted positive / negative for PPV / NPV), the fewer of the "
        "patients with a positive and with a negative image for AUROC, balanced accuracy and prevalence, the "
        "patients with an image some model gets wrong for kappa; df = n_informative - 1, except for balanced "
        "accuracy: Welch-Satterthwaite's (sum V)^2 / sum(V^2 / (n - 1)) over its sensitivity and specificity "
        "halves (bootstrap variances V, patients n). A gap's df: Welch-Satterthwaite's over its two sides (the "
        "group and the overall; the group and the best group). ci_reliable is False below "
        f"{MIN_INFORMATIVE} informative patients, and for PPV and NPV also below {MIN_INFORMATIVE} patients of "
        "either class; gap_overall_ci_reliable and gap_best_ci_reliable below that many in the group (either "
        "group): there no interval keeps its coverage (cxr_fast.analyze.coverage_bench)."
    ),
    "kappa": (
        "Error consistency: Cohen's kappa of two models' correct/incorrect vectors, "
        "(c_obs - c_exp) / (1 - c_exp), c_exp = p1 p2 + (1 - p1)(1 - p2); NaN when c_exp = 1 "
        "(both models always right, or both always wrong)."
    ),
    "adjusted": (
        "Adjusted odds ratios: per task and error kind, one logistic regression of misclassified (systematically, "
        "or by each model) on sex, age group, race and view together plus sex x race and sex x age interactions "
        "where the data support them; reference = each attribute's largest level; standard errors clustered by "
        "patient; Wald p, one Benjamini-Hochberg family per (scope, task, error kind). Flagged = q <= fdr and "
        "adjusted OR > 1. The univariate OR (group vs rest, Fisher p) of the same images stands beside it."
    ),
    "kappa_gap": (
        "Group mean kappa minus the task's overall mean kappa, paired bootstrap CI; one-sided test (H0: models "
        "agree no more on whom they fail in the group; z = gap / bootstrap SE on the expanded CI's scale), one "
        "Benjamini-Hochberg family over groups with >= min_count positives and negatives and a reliable "
        "interval. Flagged = q <= fdr and gap > 0."
    ),
    "calibration": (
        "Calibration per model and group: calibration-in-the-large (citl = mean predicted probability minus observed "
        "rate), slope and intercept of the logistic recalibration label ~ intercept + slope * logit(p) (perfect: 0 "
        f"and 1; slope < 1: probabilities too extreme), expected calibration error (ece) over {ECE_BINS} equal-width "
        "bins of [0, 1] (a probability on a bin edge counts in the lower bin). Intervals and tests as for the "
        "subgroup gaps, from the same patient resamples (slope and intercept per resample by one Newton step from "
        "the fit), with n_informative - 1 degrees of freedom for the values and the gaps alike. One Benjamini-Hochberg family for the whole table over the two-sided gap-to-overall tests of "
        "citl and slope in groups with >= min_count positives and negatives and a reliable interval (ci_reliable); "
        "flagged = q <= fdr. ECE and the intercept are reported, not tested (ECE grows as a group shrinks; the "
        "intercept restates citl)."
    ),
    "systematic": "An image is systematically misclassified when share of models wrong >= systematic_threshold.",
    "undefined": "AUROC and balanced accuracy are NaN for a group with one class only; PPV/NPV NaN with no predicted positives/negatives.",
}


@blas_single_threaded
def analyze(*, pred_dir: str | Path, settings: Settings = Settings()) -> Analysis:
    """Load every prediction file of `pred_dir` and compute all tables.

    The predictions are split into per-task arrays once, shared by every table; each task's
    resample weights are built once and shared by the model, subgroup and consistency tables.
    With more than one core and a study-sized input the case tables (systematic, adjusted:
    Python-bound statsmodels fits) run in a process beside the threads of the resampled tables."""
    settings.validate()
    predictions = load_predictions(pred_dir=pred_dir, split=settings.split)
    tasks = task_data(predictions)
    if processes_pay(len(predictions)):
        with process_pool(1, preload=(__name__,)) as pool:
            case = pool.submit(case_tables, tasks, settings)
            tables = resampled_tables(tasks, settings)
            tables.update(case.result())
    else:
        tables = resampled_tables(tasks, settings) | case_tables(tasks, settings)
    return Analysis(settings=settings, pred_dir=Path(pred_dir), predictions=predictions, tasks=tasks, tables=tables)


def resampled_tables(tasks: list[TaskData], settings: Settings) -> dict[str, pd.DataFrame]:
    """The tables built on each task's bootstrap resamples: models, subgroups, consistency.
    Tasks run in threads: their arithmetic is numpy and the AUROC kernel, which release the GIL.
    Each thread draws its task's weights, so only the running tasks' weights are in memory."""

    def one_task(data: TaskData) -> tuple[pd.DataFrame, pd.DataFrame, list, pd.DataFrame]:
        resampled = resample(data, n_bootstrap=settings.n_bootstrap, seed=settings.seed)
        overall, by_group = metric_values(resampled)
        return (model_rows(resampled, overall, level=settings.ci_level),
                subgroup_rows(resampled, overall, by_group, min_count=settings.min_count, level=settings.ci_level),
                task_consistency(resampled, level=settings.ci_level, min_count=settings.min_count),
                calibration_rows(resampled, calibration_values(resampled), min_count=settings.min_count,
                                 level=settings.ci_level))

    with ThreadPoolExecutor(max_workers=workers()) as pool:
        models, subgroups, consistency, calibration = zip(*pool.map(one_task, tasks))
    return {
        "models": pd.concat(models, ignore_index=True),
        "subgroups": flag_subgroups(pd.concat(subgroups, ignore_index=True), fdr=settings.fdr),
        "consistency": consistency_frame(list(consistency), fdr=settings.fdr),
        "calibration": flag_calibration(pd.concat(calibration, ignore_index=True), fdr=settings.fdr),
    }


@blas_single_threaded
def case_tables(tasks: list[TaskData], settings: Settings) -> dict[str, pd.DataFrame]:
    """The tables about which images are misclassified: systematic (univariate) and adjusted."""
    threshold = settings.systematic_threshold
    return {
        "systematic": systematic_table(tasks=tasks, threshold=threshold, min_count=settings.min_count,
                                       fdr=settings.fdr, level=settings.ci_level),
        "systematic_images": systematic_images(tasks=tasks, threshold=threshold),
        "adjusted": adjusted_table(tasks=tasks, threshold=threshold, min_count=settings.min_count,
                                   fdr=settings.fdr, level=settings.ci_level),
    }


def versions() -> dict[str, str | None]:
    return package_versions(("cxr_fast", "numpy", "pandas", "scipy", "statsmodels", "matplotlib"))
