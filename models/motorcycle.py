"""Motorcycle crash data (Silverman 1985; R package MASS, ``mcycle``): head acceleration (g)
against time after impact (ms), 133 points. A classic mixture-of-experts example: a flat regime,
a steep dip and a damped rebound, each its own expert over a cubic basis of time.

The design is not Gaussian (a polynomial basis of one variable), so the tensor estimate comes with
a warning and serves as one start among several for EM.
"""

from __future__ import annotations

import numpy as np

import numpyro_moe as moe
from ._common import DATA, run_dataset, standardise

NAME = "motorcycle"
DESCRIPTION = "mcycle: acceleration against time after impact, 3 linear experts over a cubic basis"
NUM_EXPERTS = 3
LINK = "linear"


def load():
    """``(x, y, feature_names)``: x holds time, time^2, time^3 (time standardised first)."""
    table = np.genfromtxt(DATA / "mcycle.csv", delimiter=",", names=True)
    time = standardise(table["times"][:, None])[:, 0]
    x = np.column_stack([time, time**2, time**3])
    return x, table["accel"], ["time", "time^2", "time^3"]


def model(x, y=None):
    """The NumPyro model definition used for this data set."""
    return moe.moe_regression(x, y, num_experts=NUM_EXPERTS, link=LINK, intercepts=True)


def run(*, quick=False, nuts=False, seed=0):
    x, y, names = load()
    return run_dataset(x, y, names, num_experts=NUM_EXPERTS, link=LINK, quick=quick, nuts=nuts, seed=seed)
