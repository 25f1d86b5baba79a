"""The 95% intervals every stage reports: the normal quantile and percentile intervals.

numpy and the standard library only, so the evaluation environments (which have no scipy)
share it with the fit stage.
"""

from __future__ import annotations

import warnings

import numpy as np

# The normal distribution's 97.5% quantile, as scipy.stats.norm.ppf(0.975) gives it.
Z_95 = 1.959963984540054
TAILS_95 = (2.5, 97.5)


def percentile_interval(
    samples: np.ndarray, axis: int = 0, tails: tuple[float, float] = TAILS_95
) -> tuple[np.ndarray, np.ndarray]:
    """The percentiles ``tails`` of ``samples`` along ``axis``, leaving NaNs out (NaN where
    no sample is finite)."""
    samples = np.asarray(samples, dtype=float)
    if samples.shape[axis] == 0:
        nothing = np.full(np.delete(samples.shape, axis), np.nan)
        return nothing, nothing.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(samples, tails, axis=axis)
    return low, high
