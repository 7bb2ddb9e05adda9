"""Diabetes progression (Efron, Hastie, Johnstone, Tibshirani 2004, "Least angle regression";
as bundled with scikit-learn): one-year disease progression against ten baseline variables
(age, sex, body-mass index, blood pressure, six serum measurements), 442 patients.

Two linear experts with a softmax gate: does a gated mixture predict held-out patients better
than one linear regression?
"""

from __future__ import annotations

import numpy as np

import numpyro_moe as moe
from ._common import DATA, run_dataset

NAME = "diabetes"
DESCRIPTION = "diabetes progression: 2 linear experts over 10 baseline variables, 442 patients"
NUM_EXPERTS = 2
LINK = "linear"


def load():
    """``(x, y, feature_names)`` in the file's units."""
    table = np.genfromtxt(DATA / "diabetes.csv", delimiter=",", names=True)
    names = [name for name in table.dtype.names if name != "progression"]
    return np.column_stack([table[name] for name in names]), table["progression"], names


def model(x, y=None):
    """The NumPyro model definition used for this data set."""
    return moe.moe_regression(x, y, num_experts=NUM_EXPERTS, link=LINK, intercepts=True)


def run(*, quick=False, nuts=False, seed=0):
    x, y, names = load()
    return run_dataset(x, y, names, num_experts=NUM_EXPERTS, link=LINK, quick=quick, nuts=nuts, seed=seed)
