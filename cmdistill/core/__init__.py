"""The numerical core: torch only, no file or network I/O, no config objects.

Everything here works in EDM / variance-exploding space (``x_sigma = x0 + sigma z``) over one contract, the
denoiser ``D(x, sigma, **cond) -> x0`` with ``sigma_min``, ``sigma_max`` and ``sigma_data``. Modules never import
from :mod:`cmdistill.training`, :mod:`cmdistill.export` or :mod:`cmdistill.evaluation` (a test enforces it).
"""
