"""Multiple-testing correction and 2x2 odds ratios and exact tests, on arrays of tables.

The study tests thousands of 2x2 tables (groups x models x error kinds). Per-table library
calls (statsmodels `Table2x2`, scipy `fisher_exact`) cost 1.5 ms and 9 ms each there, which
at study scale is most of a minute; the same arithmetic on arrays takes milliseconds. Both
are checked against the per-table library calls in the tests.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """BH-adjusted q-values; NaN p-values stay NaN and are not counted in the family size."""
    p_values = np.asarray(p_values, dtype=float)
    q_values = np.full(p_values.shape, np.nan)
    tested = np.isfinite(p_values)
    if tested.any():
        q_values[tested] = multipletests(p_values[tested], method="fdr_bh")[1]
    return q_values


def odds_ratios_woolf(a, b, c, d, *, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Odds ratios (a d) / (b c) with Woolf's log CI, elementwise over arrays of 2x2 tables
    (rows group / rest, columns event / no event); Haldane-Anscombe: a table with a zero cell
    gets 0.5 added to every cell. Same numbers as statsmodels' Table2x2.oddsratio_confint."""
    cells = np.stack(np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (a, b, c, d))))
    cells = cells + 0.5 * (cells.min(axis=0) == 0)
    log_or = np.log(cells[0]) + np.log(cells[3]) - np.log(cells[1]) - np.log(cells[2])
    half_width = stats.norm.ppf(1 - (1 - level) / 2) * np.sqrt((1 / cells).sum(axis=0))
    return np.exp(log_or), np.exp(log_or - half_width), np.exp(log_or + half_width)


def odds_ratio_woolf(a: float, b: float, c: float, d: float, *, level: float = 0.95) -> tuple[float, float, float]:
    """odds_ratios_woolf of one table, as floats."""
    return tuple(float(value) for value in odds_ratios_woolf(a, b, c, d, level=level))  # type: ignore[return-value]


# Tables whose probability is within this factor of the observed one count as "as probable"
# (R's fisher.test uses the same 1 + 1e-7: it absorbs rounding in the log densities).
_AS_PROBABLE = np.log1p(1e-7)
# Tables less probable than the observed one by more than e^46 (~1e20) change no p-value:
# they are left out of the sums (the distribution is log-concave, so they lie past the ends
# of one interval around the mode).
_NEGLIGIBLE = 46.0
_CHUNK = 2_000_000  # support points evaluated at once (memory: a few arrays of this length)


def fisher_p_values(a, b, c, d) -> np.ndarray:
    """Two-sided Fisher exact p-values of arrays of 2x2 tables [[a, b], [c, d]]: the sum of
    the hypergeometric probabilities of all tables with the same margins that are at most as
    probable as the observed one (as scipy.stats.fisher_exact and R's fisher.test), summed
    in log space over the part of the support where they are not negligible."""
    a, b, c, d = (x.ravel() for x in np.broadcast_arrays(*(np.asarray(x, dtype=np.int64) for x in (a, b, c, d))))
    p_values = np.ones(a.shape)
    # A zero margin: every table with these margins is the observed one, p = 1 (as scipy).
    todo = np.flatnonzero((a + b > 0) & (c + d > 0) & (a + c > 0) & (b + d > 0))
    if todo.size:
        tables = _Hypergeometric(total=(a + b + c + d)[todo], row=(a + b)[todo], column=(a + c)[todo])
        p_values[todo] = tables.two_sided_p(a[todo])
    return p_values


class _Hypergeometric:
    """The number in the top-left cell of 2x2 tables with fixed margins, under independence."""

    def __init__(self, *, total: np.ndarray, row: np.ndarray, column: np.ndarray):
        self.total, self.row, self.column = total, row, column
        self.low = np.maximum(0, column - (total - row))
        self.high = np.minimum(row, column)
        self.mode = (column + 1) * (row + 1) // (total + 2)

    def logpmf(self, x: np.ndarray, at: np.ndarray) -> np.ndarray:
        return stats.hypergeom.logpmf(x, self.total[at], self.row[at], self.column[at])

    def two_sided_p(self, observed: np.ndarray) -> np.ndarray:
        everywhere = np.arange(observed.size)
        log_observed = self.logpmf(observed, everywhere)
        low, high = self._window(observed, log_observed)
        # Log-concavity: the window holds every table that matters iff its ends are negligible
        # (or are the support's ends); where they are not, sum over the whole support.
        ends_ok = ((low == self.low) | (self.logpmf(low, everywhere) < log_observed - _NEGLIGIBLE)) & (
            (high == self.high) | (self.logpmf(high, everywhere) < log_observed - _NEGLIGIBLE))
        low, high = np.where(ends_ok, low, self.low), np.where(ends_ok, high, self.high)
        relative = np.zeros(observed.size)  # p / P(observed table)
        for at in _chunks(high - low + 1, _CHUNK):
            relative[at] = self._relative_tail_sum(at, low[at], high[at], log_observed[at])
        return np.minimum(1.0, np.exp(log_observed) * relative)

    def _window(self, observed: np.ndarray, log_observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Around the mode, the tables within e^_NEGLIGIBLE of the observed one's probability
        by a normal approximation widened 1.5x (checked by the caller), and the observed one."""
        share = self.row / self.total
        variance = self.column * share * (1 - share) * (self.total - self.column) / np.maximum(self.total - 1, 1)
        log_mode = self.logpmf(self.mode, np.arange(observed.size))
        radius = np.ceil(1.5 * np.sqrt(2 * variance * (log_mode - log_observed + _NEGLIGIBLE))).astype(np.int64) + 10
        low = np.minimum(np.maximum(self.low, self.mode - radius), observed)
        high = np.maximum(np.minimum(self.high, self.mode + radius), observed)
        return low, high

    def _relative_tail_sum(self, at: np.ndarray, low: np.ndarray, high: np.ndarray, log_observed: np.ndarray
                           ) -> np.ndarray:
        lengths = high - low + 1
        starts = np.cumsum(lengths) - lengths
        table = np.repeat(np.arange(at.size), lengths)
        x = np.arange(int(lengths.sum())) - starts[table] + low[table]
        log_ratio = self.logpmf(x, at[table]) - log_observed[table]
        terms = np.where(log_ratio <= _AS_PROBABLE, np.exp(np.minimum(log_ratio, _AS_PROBABLE)), 0.0)
        return np.add.reduceat(terms, starts)


def _chunks(sizes: np.ndarray, limit: int) -> list[np.ndarray]:
    """Consecutive index ranges whose sizes sum to about `limit` (at least one index each)."""
    bounds = np.searchsorted(np.cumsum(sizes), np.arange(limit, int(sizes.sum()), limit), side="right")
    return [part for part in np.split(np.arange(sizes.size), np.unique(np.r_[bounds])) if part.size]


def fisher_p_value(a: int, b: int, c: int, d: int) -> float:
    """Two-sided Fisher exact test of the 2x2 table [[a, b], [c, d]]."""
    return float(fisher_p_values(a, b, c, d)[0])
