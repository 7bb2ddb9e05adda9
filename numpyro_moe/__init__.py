"""numpyro-moe: learnable, trustworthy mixture-of-experts regression in NumPyro.

The building blocks for your own NumPyro models (`MixtureOfExperts`, `moe_priors`,
`init_to_params`), the ready-made `moe_regression`, experts by the method of moments
(`estimate_experts`, Makkuva, Kannan, Oh, Viswanath, ICML 2019), point fits (`fit_em`, `fit_map`,
`fit_moe`, `select_num_experts`) and the Bayesian layer around NumPyro's MCMC. Public submodules: `baselines`,
`experts`, `io`, `metrics`, `simulation`.
"""

from numpyro_moe import baselines as baselines
from numpyro_moe import experts as experts
from numpyro_moe import io as io
from numpyro_moe import metrics as metrics
from numpyro_moe import simulation as simulation
from numpyro_moe._bayes import (
    chain_init_params,
    compare_num_experts,
    laplace_inverse_mass_matrix,
    loo,
    posterior_params,
    predict,
    relabel,
    run_nuts,
    to_datatree,
)
from numpyro_moe._distribution import MixtureOfExperts
from numpyro_moe._experts import ExpertEstimate, estimate_experts, suggest_num_experts
from numpyro_moe._fit import Fit, fit_em, fit_map, fit_moe, random_starts
from numpyro_moe._model import (
    init_to_params,
    moe_priors,
    moe_regression,
    moe_regression_enumerated,
    params_to_sites,
    sites_to_params,
)
from numpyro_moe._params import MoEParams
from numpyro_moe._select import select_num_experts
from numpyro_moe._validation import ReliabilityWarning

__version__ = "0.1.0"

__all__ = [
    "ExpertEstimate",
    "Fit",
    "MixtureOfExperts",
    "MoEParams",
    "ReliabilityWarning",
    "chain_init_params",
    "compare_num_experts",
    "estimate_experts",
    "fit_em",
    "fit_map",
    "fit_moe",
    "init_to_params",
    "laplace_inverse_mass_matrix",
    "loo",
    "moe_priors",
    "moe_regression",
    "moe_regression_enumerated",
    "params_to_sites",
    "posterior_params",
    "predict",
    "random_starts",
    "relabel",
    "run_nuts",
    "select_num_experts",
    "sites_to_params",
    "suggest_num_experts",
    "to_datatree",
]
