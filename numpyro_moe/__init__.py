"""numpyro-moe: learnable, trustworthy mixture-of-experts regression in NumPyro."""

from numpyro_moe._links import LINKS, Link, resolve_link
from numpyro_moe._metrics import (
    ExpertMatch,
    expert_error,
    gating_error,
    heldout_log_likelihood,
    match_experts,
    mean_squared_error,
)
from numpyro_moe._model import (
    moe_regression,
    moe_regression_enumerated,
    params_to_sites,
    sites_to_params,
)
from numpyro_moe._params import (
    MoEParams,
    expert_means,
    gate_probabilities,
    normalize_gates,
    pointwise_log_likelihood,
    predictive_mean,
)
from numpyro_moe._simulate import SimulatedData, sample_data, simulate, true_params

__version__ = "0.1.0"

__all__ = [
    "LINKS",
    "ExpertMatch",
    "Link",
    "MoEParams",
    "SimulatedData",
    "expert_error",
    "expert_means",
    "gate_probabilities",
    "gating_error",
    "heldout_log_likelihood",
    "match_experts",
    "mean_squared_error",
    "moe_regression",
    "moe_regression_enumerated",
    "normalize_gates",
    "params_to_sites",
    "pointwise_log_likelihood",
    "predictive_mean",
    "resolve_link",
    "sample_data",
    "simulate",
    "sites_to_params",
    "true_params",
]
