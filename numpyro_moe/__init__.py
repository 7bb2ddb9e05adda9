"""numpyro-moe: learnable, trustworthy mixture-of-experts regression in NumPyro.

The building blocks for your own NumPyro models (`MixtureOfExperts`, `moe_priors`,
`init_to_params`), the ready-made `moe_regression`, experts by the method of moments
(`estimate_experts`, Makkuva, Kannan, Oh, Viswanath, ICML 2019), point fits (`fit_em`, `fit_map`,
`fit_moe`, `select_num_experts`, `select_expert_prior_scale`) and the Bayesian layer around NumPyro's MCMC. Public submodules: `baselines`,
`experts`, `io`, `metrics`, `simulation`.

The names load on first use (PEP 562): importing the package, or ``numpyro-moe --help``, does not
wait for JAX and NumPyro. Importing it turns on JAX's persistent compilation cache
(``NUMPYRO_MOE_CACHE`` moves it or, set to ``0``, turns it off; see the README).
"""

import ast
import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from numpyro_moe._compilation_cache import use_compilation_cache

if TYPE_CHECKING:  # the public API; at run time each name is imported from here on first use
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
    from numpyro_moe._select import select_expert_prior_scale, select_num_experts
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
    "select_expert_prior_scale",
    "select_num_experts",
    "sites_to_params",
    "suggest_num_experts",
    "to_datatree",
]

use_compilation_cache()

_sources: dict[str, tuple[str, str | None]] | None = None


def _lazy_sources() -> dict[str, tuple[str, str | None]]:
    """Public name -> (module, attribute or None for a submodule), read once from the
    ``TYPE_CHECKING`` imports above, so that the API is listed in one place."""
    global _sources
    if _sources is None:
        tree = ast.parse(Path(__file__).read_text())
        (block,) = [
            node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        ]
        _sources = {}
        for node in block.body:
            for alias in node.names:
                if node.module == __name__:
                    _sources[alias.asname or alias.name] = (f"{__name__}.{alias.name}", None)
                else:
                    _sources[alias.asname or alias.name] = (node.module, alias.name)
    return _sources


def __getattr__(name: str):
    source = _lazy_sources().get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(source[0])
    value = module if source[1] is None else getattr(module, source[1])
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_lazy_sources()})
