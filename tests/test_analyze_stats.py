"""The array forms of the 2x2 statistics equal the per-table library calls they replace."""

from __future__ import annotations

import numpy as np
from scipy import stats
from statsmodels.stats.contingency_tables import Table2x2

from cxr_fast.analyze.stats import fisher_p_values, odds_ratios_woolf


def _tables() -> np.ndarray:
    rng = np.random.default_rng(0)
    random = [rng.integers(0, scale, size=(60, 4)) for scale in (3, 12, 60, 400, 5000)]
    # As in the study: a group's misclassified / right images against the rest's.
    skewed = np.column_stack([rng.integers(0, 40, 80), rng.integers(0, 3000, 80),
                              rng.integers(0, 600, 80), rng.integers(0, 20000, 80)])
    edges = np.array([[0, 0, 0, 0], [0, 5, 0, 7], [5, 0, 7, 0], [1, 1, 1, 1], [0, 10, 10, 0], [10, 0, 0, 10],
                      [7, 3, 3, 7], [3000, 10, 10, 3000], [500, 500, 500, 500], [2, 9, 9, 2]])
    return np.concatenate(random + [skewed, edges])


def test_fisher_p_values_equal_scipy_per_table():
    tables = _tables()
    expected = np.array([stats.fisher_exact(table.reshape(2, 2)).pvalue for table in tables])
    # Below ~1e-300 both are denormal noise.
    np.testing.assert_allclose(fisher_p_values(*tables.T), expected, rtol=1e-9, atol=1e-300)
    assert (expected == 1).sum() >= 3 and (expected < 1e-10).sum() >= 10  # ties, margins, tails all tested


def test_woolf_odds_ratios_equal_statsmodels_table2x2_per_table():
    tables = _tables()
    odds_ratio, low, high = odds_ratios_woolf(*tables.T, level=0.9)
    for table, estimate in zip(tables, np.column_stack([odds_ratio, low, high])):
        cells = table.reshape(2, 2).astype(float)
        library = Table2x2(cells + 0.5 if cells.min() == 0 else cells)
        np.testing.assert_allclose(estimate, [library.oddsratio, *library.oddsratio_confint(alpha=0.1)], rtol=1e-12)
