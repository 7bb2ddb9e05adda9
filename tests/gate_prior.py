"""A reference for the gate prior (SciPy only): a Normal(0, s) on each of the k experts' gate rows,
their common shift integrated out, is the law of the k - 1 contrasts with the last row, column by
column multivariate Normal with covariance s^2 (I + 1 1^T)."""

from __future__ import annotations

import numpy as np
from scipy.stats import multivariate_normal

GATE_SCALE = 2.5  # each expert's row's sd


def gate_contrast_logpdf(free, scale: float = GATE_SCALE) -> float:
    """Log density of the free rows (k - 1, ...) of gates whose last row is zero."""
    free = np.asarray(free, dtype=float)
    k1 = free.shape[0]
    columns = free.reshape(k1, -1)
    law = multivariate_normal(np.zeros(k1), scale**2 * (np.eye(k1) + np.ones((k1, k1))))
    return float(sum(law.logpdf(columns[:, a]) for a in range(columns.shape[1])))
