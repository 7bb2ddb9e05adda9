"""Applications built on the library: the ``numpyro-moe`` command line, the CSV workflow, the demo
and their plots. The library never imports from here; errors here may speak in CLI flags and
these modules print.
"""
