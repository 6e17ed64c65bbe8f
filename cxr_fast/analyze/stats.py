"""Multiple-testing correction and 2x2 odds ratios (statsmodels does the arithmetic)."""

from __future__ import annotations

import numpy as np
from scipy import stats
from statsmodels.stats.contingency_tables import Table2x2
from statsmodels.stats.multitest import multipletests


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """BH-adjusted q-values; NaN p-values stay NaN and are not counted in the family size."""
    p_values = np.asarray(p_values, dtype=float)
    q_values = np.full(p_values.shape, np.nan)
    tested = np.isfinite(p_values)
    if tested.any():
        q_values[tested] = multipletests(p_values[tested], method="fdr_bh")[1]
    return q_values


def odds_ratio_woolf(a: float, b: float, c: float, d: float, *, level: float = 0.95) -> tuple[float, float, float]:
    """Odds ratio (a d) / (b c) with Woolf's log CI; Haldane: add 0.5 to every cell if any is 0.

    Table: rows group / rest, columns event / no event.
    """
    cells = np.array([[a, b], [c, d]], dtype=float)
    # Haldane-Anscombe by hand: Table2x2(shift_zeros=True) replaces only the zero cells by 0.5.
    table = Table2x2(cells + 0.5 if cells.min() == 0 else cells)
    low, high = table.oddsratio_confint(alpha=1 - level)
    return float(table.oddsratio), float(low), float(high)


def fisher_p_value(a: int, b: int, c: int, d: int) -> float:
    """Two-sided Fisher exact test of the 2x2 table [[a, b], [c, d]]."""
    return float(stats.fisher_exact([[a, b], [c, d]], alternative="two-sided").pvalue)
