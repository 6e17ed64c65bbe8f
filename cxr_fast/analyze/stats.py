"""Multiple-testing correction and 2x2 odds ratios."""

from __future__ import annotations

import numpy as np
from scipy import stats


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """BH-adjusted q-values; NaN p-values stay NaN and are not counted in the family size."""
    p_values = np.asarray(p_values, dtype=float)
    q_values = np.full(p_values.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p_values))
    if tested.size == 0:
        return q_values
    order = tested[np.argsort(p_values[tested], kind="stable")]
    ranked = p_values[order] * tested.size / np.arange(1, tested.size + 1)
    q_values[order] = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
    return q_values


def odds_ratio_woolf(a: float, b: float, c: float, d: float, *, level: float = 0.95) -> tuple[float, float, float]:
    """Odds ratio (a d) / (b c) with Woolf's log CI; Haldane: add 0.5 to every cell if any is 0.

    Table: rows group / rest, columns event / no event.
    """
    if min(a, b, c, d) == 0:
        a, b, c, d = a + 0.5, b + 0.5, c + 0.5, d + 0.5
    log_or = np.log(a * d / (b * c))
    half_width = stats.norm.ppf(0.5 + level / 2) * np.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
    return float(np.exp(log_or)), float(np.exp(log_or - half_width)), float(np.exp(log_or + half_width))


def fisher_p_value(a: int, b: int, c: int, d: int) -> float:
    """Two-sided Fisher exact test of the 2x2 table [[a, b], [c, d]]."""
    return float(stats.fisher_exact([[a, b], [c, d]], alternative="two-sided").pvalue)
