"""Ready-made NumPyro mixture-of-experts model definitions, runnable by name.

Installed as ``numpyro_moe.models``. Each model module has ``NAME``, ``DESCRIPTION``, ``load()``
(its data), ``model(x, y=None)`` (the NumPyro model definition) and
``run(quick=False, nuts=False, seed=0)``.

    python -m numpyro_moe.models list
    python -m numpyro_moe.models run motorcycle [--quick] [--nuts]

(or ``numpyro-moe models list`` / ``numpyro-moe models run motorcycle``).
"""

from . import diabetes, icml2019_synthetic, motorcycle

MODELS = {module.NAME: module for module in (icml2019_synthetic, motorcycle, diabetes)}

__all__ = ["MODELS"]
