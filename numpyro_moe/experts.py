"""The experts stage in detail: the ICML 2019 tensor method's parts and diagnostics, and the
AISTATS 2020 expert loss. `estimate_experts` (in the top-level namespace) is the entry point.
"""

from numpyro_moe._design import MixtureDesign, fit_mixture_design
from numpyro_moe._experts import (
    ExpertDiagnostics,
    ExpertEstimate,
    NumExpertsSuggestion,
    bootstrap_standard_errors,
    estimate_experts,
    suggest_num_experts,
)
from numpyro_moe._landscape import FourthOrderTransform, LandscapeResult, fourth_order_transform, landscape_experts
from numpyro_moe._second_moment import Standardization
from numpyro_moe._tensor import TensorDecomposition, decompose_symmetric_tensor
from numpyro_moe._transforms import OutputTransforms, output_transforms

__all__ = [
    "ExpertDiagnostics",
    "ExpertEstimate",
    "FourthOrderTransform",
    "LandscapeResult",
    "MixtureDesign",
    "NumExpertsSuggestion",
    "OutputTransforms",
    "Standardization",
    "TensorDecomposition",
    "bootstrap_standard_errors",
    "decompose_symmetric_tensor",
    "estimate_experts",
    "fit_mixture_design",
    "fourth_order_transform",
    "landscape_experts",
    "output_transforms",
    "suggest_num_experts",
]
