"""Secure noise: the exact discrete Gaussian, its sampler and its accounting.

The mechanism is switched on with
``noise_addition.gaussian_privatizer(stddev=..., secure=True)``; this module
gives the pieces around it: the exact sampler (from the OS CSPRNG), its pmf,
the grid sensitivity after rounding, the noise multiplier the mechanism is
worth, and its (epsilon, delta) by zCDP. See ``docs/secure_noise.md`` for
the threat model and the cost.

Privacy:
  ``rho = Delta_grid^2 / (2 sigma^2)``-zCDP per release (Canonne, Kamath,
  Steinke 2020), converted with their bound; amplification by subsampling is
  not claimed for the discrete mechanism.

References:
  Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential
  Privacy", 2020. arXiv:2004.00010.
  Mironov, "On Significance of the Least Significant Bits for Differential
  Privacy", CCS 2012.
"""

from jax_privacy._discrete_gaussian import DEFAULT_SIGMA_SQUARED
from jax_privacy._discrete_gaussian import discrete_gaussian_epsilon
from jax_privacy._discrete_gaussian import discrete_gaussian_pmf
from jax_privacy._discrete_gaussian import effective_noise_multiplier
from jax_privacy._discrete_gaussian import rounded_sensitivity
from jax_privacy._discrete_gaussian import sample_discrete_gaussian
from jax_privacy._discrete_gaussian import secure_gaussian_privatizer
from jax_privacy._discrete_gaussian import zcdp_epsilon

__all__ = [
    'DEFAULT_SIGMA_SQUARED',
    'discrete_gaussian_epsilon',
    'discrete_gaussian_pmf',
    'effective_noise_multiplier',
    'rounded_sensitivity',
    'sample_discrete_gaussian',
    'secure_gaussian_privatizer',
    'zcdp_epsilon',
]
