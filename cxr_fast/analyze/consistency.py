"""Error consistency between models (Geirhos et al., 2020, "Beyond accuracy").

Two models' correct/incorrect vectors on the same images agree with probability c_obs. If they
erred independently at their own accuracies p1, p2, they would agree with probability
c_exp = p1 p2 + (1 - p1)(1 - p2). Error consistency is Cohen's kappa of the two vectors,
kappa = (c_obs - c_exp) / (1 - c_exp): 0 = independent errors, 1 = the same errors.

Degenerate case: c_exp = 1 happens only when both models are always right (or both always
wrong) on the images, so there is no error to be consistent about: kappa is NaN (sklearn's
cohen_kappa_score says the same). One model always right and the other not gives kappa = 0.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from cxr_fast.analyze.bootstrap import expanded_interval, expanded_p_value, reliable, wald_z
from cxr_fast.analyze.resampled import Resampled, pairs, resampled_tasks
from cxr_fast.analyze.stats import benjamini_hochberg
from cxr_fast.analyze.parallel import blas_single_threaded
from cxr_fast.metrics import as_weight_matrix

DEGENERATE_NOTE = "both models always right (or both always wrong) here: c_exp = 1, kappa undefined (NaN)"


def kappa_arrays(weights: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """For (R, n) weights and (M, n) correctness: p_correct (R, M), c_obs/c_exp/kappa (R, P)
    over the P = M(M-1)/2 model pairs in itertools.combinations order."""
    first, second = pairs(correct.shape[0])
    agree = (correct[first] == correct[second]).T.astype(float)               # (n, P)
    return kappa_from_sums(weights.sum(axis=1), weights @ correct.T.astype(float), weights @ agree)


def kappa_from_sums(total: np.ndarray, n_correct: np.ndarray, n_agree: np.ndarray) -> dict[str, np.ndarray]:
    """kappa_arrays from weighted sums: total (R,), correct per model (R, M), agreeing per pair (R, P)."""
    first, second = pairs(n_correct.shape[1])
    total = total[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        p_correct = n_correct / total
        c_obs = n_agree / total
        p1, p2 = p_correct[:, first], p_correct[:, second]
        c_exp = p1 * p2 + (1 - p1) * (1 - p2)
        undefined = (1 - c_exp) <= 1e-12
        kappa = np.where(undefined, np.nan, (c_obs - c_exp) / np.where(undefined, 1, 1 - c_exp))
    return {"p_correct": p_correct, "c_obs": c_obs, "c_exp": c_exp, "kappa": kappa}


def error_consistency(
    *, correct: np.ndarray, names: tuple[str, ...] | None = None, sample_weight: np.ndarray | None = None
) -> pd.DataFrame:
    """Kappa for every pair of rows of the (models, images) boolean matrix `correct`."""
    correct = np.asarray(correct, dtype=bool)
    names = names or tuple(f"model_{m}" for m in range(correct.shape[0]))
    arrays = kappa_arrays(as_weight_matrix(sample_weight, correct.shape[1]), correct)
    first, second = pairs(correct.shape[0])
    return pd.DataFrame({
        "model_a": [names[i] for i in first], "model_b": [names[j] for j in second],
        "p_correct_a": arrays["p_correct"][0, first], "p_correct_b": arrays["p_correct"][0, second],
        "c_obs": arrays["c_obs"][0], "c_exp": arrays["c_exp"][0], "kappa": arrays["kappa"][0],
    })


@blas_single_threaded
def consistency_table(*, predictions: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95,
                      min_count: int = 30, fdr: float = 0.05) -> pd.DataFrame:
    """Per task, kappa of every model pair and their mean (`kind` = pair / mean), on all test
    images (attribute "overall") and within every subgroup, with paired bootstrap CIs.

    The mean is over pairs with a defined kappa, recomputed in every resample for its CI.
    Tasks with a single model have no pairs and no rows.

    Gap to overall (mean rows of groups): the group's mean kappa minus the task's, with a
    paired bootstrap CI (same resamples). Test: one-sided, H0: models agree no more on whom
    they fail in the group than overall, z = gap / bootstrap SE (`p_agree`, on the expanded
    intervals' scale); one Benjamini-Hochberg family over every group with >= min_count
    positives and negatives and a reliable interval, all tasks. Flagged = q_value <= fdr and
    gap > 0: "models agree more on whom they fail here".
    Intervals: bootstrap.expanded_interval on the scope's patients with an image some model
    gets wrong (kappa is made of errors); `ci_reliable` False below MIN_INFORMATIVE of them.
    """
    return consistency_frame([task_consistency(resampled, level=level, min_count=min_count)
                              for resampled in resampled_tasks(predictions=predictions, n_bootstrap=n_bootstrap, seed=seed)],
                             fdr=fdr)


def task_consistency(resampled: Resampled, *, level: float, min_count: int) -> list[dict[str, np.ndarray]]:
    """One task's blocks of rows (overall, then every group) as columns; none with < 2 models."""
    data = resampled.data
    if len(data.archs) < 2:
        return []
    blocks = []
    scopes = [("overall", "all", np.arange(data.label.size))] + resampled.groups
    tallies = resampled.tallies
    total, correct = tallies.positives + tallies.negatives, tallies.correct
    overall_mean = None
    for s, (attribute, group, positions) in enumerate(scopes):
        arrays = kappa_from_sums(total[s], correct[:, s].T, tallies.agreeing[s])
        mean = _mean_kappa(arrays["kappa"])
        overall_mean = mean if overall_mean is None else overall_mean
        erring = tallies.patients["erring"][s]
        block = _scope_rows(arrays, mean, data.archs, level, erring)
        rows = len(block["kind"])
        block.update({name: np.full(rows, value, dtype=object)
                      for name, value in (("task", data.task), ("attribute", attribute), ("group", group))})
        block["n"] = np.full(rows, positions.size)
        block["n_subjects"] = np.full(rows, np.unique(data.subject_index[positions]).size)
        n_pos = int(data.label[positions].sum())
        eligible = attribute != "overall" and min(n_pos, positions.size - n_pos) >= min_count and bool(reliable(erring))
        block.update(_gap_columns(mean - overall_mean, rows, eligible=eligible, level=level, informative=erring))
        blocks.append(block)
    return blocks


def consistency_frame(task_blocks: list[list[dict[str, np.ndarray]]], *, fdr: float) -> pd.DataFrame:
    """The table from every task's blocks, with the one BH family over all tasks."""
    blocks = [block for blocks in task_blocks for block in blocks]
    if not blocks:
        return pd.DataFrame(columns=_COLUMNS)
    # One DataFrame at the end: building one per subgroup costs more than the arithmetic.
    table = pd.DataFrame({name: np.concatenate([block[name] for block in blocks]) for name in _COLUMNS[:-2]})
    table["q_value"] = benjamini_hochberg(table["p_agree"].where(table["eligible"]).to_numpy(float))
    table["flagged"] = table["eligible"] & (table["q_value"] <= fdr) & (table["gap_overall"] > 0)
    return table


_COLUMNS = ["task", "attribute", "group", "n", "n_subjects", "kind", "model_a", "model_b", "p_correct_a",
            "p_correct_b", "c_obs", "c_exp", "kappa", "ci_low", "ci_high", "n_informative", "ci_reliable", "note",
            "eligible", "gap_overall", "gap_ci_low", "gap_ci_high", "p_agree", "q_value", "flagged"]
_TEXT = {"task", "attribute", "group", "kind", "model_a", "model_b", "note"}


def _mean_kappa(kappa: np.ndarray) -> np.ndarray:
    """(R,) mean over the pairs with a defined kappa, per resample row."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # every pair undefined -> NaN mean
        return np.nanmean(kappa, axis=1)


def _gap_columns(gap: np.ndarray, rows: int, *, eligible: bool, level: float, informative: int) -> dict[str, np.ndarray]:
    """Gap-to-overall columns: filled on the mean row (the first), NaN on the pair rows."""
    low, high = expanded_interval(gap[1:, None], np.array([informative]), level=level)
    p_agree = expanded_p_value(wald_z(gap[:1], gap[1:, None]), np.array([informative]), one_sided=True)[0]
    pad = np.full(rows - 1, np.nan)
    return {"eligible": np.r_[[eligible], np.zeros(rows - 1, bool)],
            "gap_overall": np.r_[gap[0], pad], "gap_ci_low": np.r_[low, pad], "gap_ci_high": np.r_[high, pad],
            "p_agree": np.r_[p_agree, pad]}


def _scope_rows(arrays: dict[str, np.ndarray], mean: np.ndarray, archs: tuple[str, ...], level: float,
                informative: int) -> dict[str, np.ndarray]:
    """The mean row then one row per pair, as columns (estimate = resample row 0)."""
    first, second = pairs(len(archs))
    kappa = arrays["kappa"]
    low, high = expanded_interval(np.column_stack([mean, kappa])[1:], np.full(1 + len(first), informative), level=level)
    n_defined = int(np.isfinite(kappa[0]).sum())
    mean_note = f"mean over {n_defined} of {kappa.shape[1]} pairs with a defined kappa" if n_defined < kappa.shape[1] else ""
    nan = np.array([np.nan])
    return {
        "kind": np.r_[["mean"], ["pair"] * len(first)],
        "model_a": np.r_[[""], [archs[i] for i in first]],
        "model_b": np.r_[[""], [archs[j] for j in second]],
        "p_correct_a": np.r_[nan, arrays["p_correct"][0, first]],
        "p_correct_b": np.r_[nan, arrays["p_correct"][0, second]],
        "c_obs": np.r_[nan, arrays["c_obs"][0]],
        "c_exp": np.r_[nan, arrays["c_exp"][0]],
        "kappa": np.r_[mean[0], kappa[0]],
        "ci_low": low, "ci_high": high,
        "n_informative": np.full(1 + len(first), informative), "ci_reliable": np.full(1 + len(first), bool(reliable(informative))),
        "note": np.r_[[mean_note], np.where(np.isnan(kappa[0]), DEGENERATE_NOTE, "")],
    }
