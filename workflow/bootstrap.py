"""The parametric bootstrap every law's interval comes from: resampled fit points.

Each replicate adds to every measurement a normal draw whose sd is the one its 95% interval
implies, (ci_high - ci_low) / (2 x 1.96); a measurement without an interval (the released error
averages and accuracies have none) gets the sd of its law's residuals, sqrt(SSR / (n - p)), the
law being the first form, in registry order, that fitted that evaluation. Every form of the
quantity is refitted on the same replicates, each warm-started from its best fit, and the loss
of the error law's x is drawn once per replicate and used both for its loss fit and as the
error law's x, so error and accuracy intervals carry the loss uncertainty too. The interval is
the 2.5-97.5 percentile of the replicates' predictions (a refit that does not converge is left
out and counted in the log): it covers evaluation noise of the fit points, not seed-to-seed
training variance, nor a wrong functional form (compare the forms for that).
"""

from __future__ import annotations

import numpy as np

from workflow.intervals import Z_95


def measurement_sd(interval_width: np.ndarray, residuals: np.ndarray, n_params: int) -> np.ndarray:
    """Each measurement's sd: from its 95% interval's width, else sqrt(SSR / (n - p)) of the
    law's residuals at its fit points (zero when there are no more points than parameters)."""
    dof = len(residuals) - n_params
    residual_sd = np.sqrt(np.sum(residuals**2) / dof) if dof > 0 else 0.0
    return np.where(np.isfinite(interval_width), interval_width / (2 * Z_95), residual_sd)


def resample(
    values: np.ndarray, sd: np.ndarray, replicates: int, rng: np.random.Generator
) -> np.ndarray:
    """``replicates`` bootstrap samples of ``values`` (replicates x values)."""
    return values + rng.standard_normal((replicates, len(values))) * sd
