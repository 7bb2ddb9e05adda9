"""Ready-made NumPyro mixture-of-experts model definitions, runnable by name.

Each model module has ``NAME``, ``DESCRIPTION``, ``load()`` (its data), ``model(x, y=None)`` (the
NumPyro model definition) and ``run(quick=False, nuts=False, seed=0)``.

    python -m models list
    python -m models run motorcycle [--quick] [--nuts]
"""

from models import diabetes, icml2019_synthetic, motorcycle

MODELS = {module.NAME: module for module in (icml2019_synthetic, motorcycle, diabetes)}

__all__ = ["MODELS"]
