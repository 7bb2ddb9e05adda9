"""numpyro-moe: learnable, trustworthy mixture-of-experts regression in NumPyro."""

from numpyro_moe._baselines import (
    RestartsResult,
    fit_em_restarts,
    fit_likelihood_gd,
    fit_squared_loss_gd,
    random_start,
)
from numpyro_moe._bayes import (
    ComparisonResult,
    NutsResult,
    Prediction,
    chain_init_params,
    compare_num_experts,
    init_to_estimate,
    laplace_inverse_mass_matrix,
    loo,
    posterior_params,
    predict,
    relabel_draws,
    run_nuts,
)
from numpyro_moe._em import EMResult
from numpyro_moe._experts import (
    ExpertDiagnostics,
    ExpertEstimate,
    NumExpertsSuggestion,
    Standardization,
    bootstrap_standard_errors,
    estimate_experts,
    suggest_num_experts,
)
from numpyro_moe._fit import fit_em, fit_gating
from numpyro_moe._io import load_params, load_result, output_folder, save_params, save_result
from numpyro_moe._landscape import (
    FourthOrderTransform,
    LandscapeResult,
    fourth_order_transform,
    landscape_experts,
)
from numpyro_moe._links import LINKS, Link, resolve_link
from numpyro_moe._map import MapResult, fit_map
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
    joint_log_probs,
    normalize_gates,
    pointwise_log_likelihood,
    predictive_mean,
    responsibilities,
)
from numpyro_moe._pipeline import MoEFit, fit_moe
from numpyro_moe._simulate import SimulatedData, sample_data, sample_response, simulate, true_params
from numpyro_moe._tensor import TensorDecomposition, decompose_symmetric_tensor
from numpyro_moe._transforms import OutputTransforms, output_transforms
from numpyro_moe._validation import ReliabilityWarning
from numpyro_moe._workflow import CsvData, fit_csv, read_csv

__version__ = "0.1.0"

__all__ = [
    "LINKS",
    "EMResult",
    "ExpertDiagnostics",
    "ExpertEstimate",
    "MapResult",
    "MoEFit",
    "NumExpertsSuggestion",
    "OutputTransforms",
    "ReliabilityWarning",
    "RestartsResult",
    "Standardization",
    "TensorDecomposition",
    "bootstrap_standard_errors",
    "chain_init_params",
    "compare_num_experts",
    "decompose_symmetric_tensor",
    "estimate_experts",
    "fit_csv",
    "fit_em",
    "fit_em_restarts",
    "fit_gating",
    "fit_likelihood_gd",
    "fit_map",
    "fit_moe",
    "fit_squared_loss_gd",
    "joint_log_probs",
    "landscape_experts",
    "random_start",
    "read_csv",
    "relabel_draws",
    "run_nuts",
    "responsibilities",
    "load_params",
    "load_result",
    "loo",
    "output_folder",
    "output_transforms",
    "save_params",
    "save_result",
    "suggest_num_experts",
    "ComparisonResult",
    "CsvData",
    "ExpertMatch",
    "FourthOrderTransform",
    "LandscapeResult",
    "Link",
    "MoEParams",
    "NutsResult",
    "Prediction",
    "SimulatedData",
    "expert_error",
    "expert_means",
    "fourth_order_transform",
    "gate_probabilities",
    "gating_error",
    "init_to_estimate",
    "laplace_inverse_mass_matrix",
    "heldout_log_likelihood",
    "match_experts",
    "mean_squared_error",
    "moe_regression",
    "moe_regression_enumerated",
    "normalize_gates",
    "params_to_sites",
    "pointwise_log_likelihood",
    "posterior_params",
    "predict",
    "predictive_mean",
    "resolve_link",
    "sample_data",
    "sample_response",
    "simulate",
    "sites_to_params",
    "true_params",
]
