"""JAX Privacy: differentially private training of machine-learning models in JAX.

The building blocks of a DP training run, one submodule each:

* ``batch_selection``: which examples take part in each step (host, NumPy).
* ``clipping``: per-example gradients of bounded L2 norm (device, JAX).
* ``noise_addition``: Gaussian or correlated (matrix-factorization) noise as
  an ``optax.GradientTransformation``.
* ``matrix_factorization``: correlated-noise strategies (BLT, banded,
  Toeplitz, dense, tree aggregation).
* ``accounting``: (epsilon, delta) of a run and calibration of its settings.
* ``dp_sgd``: the gradient-computer API of the "JAX & Flax" guide.
* ``auditing``: empirical privacy: canaries, membership inference, epsilon
  lower bounds.
* ``adaptive_clipping``: a clip norm that follows a quantile of the
  per-example norms, privately (Andrew et al.).
* ``secure_noise``: the exact discrete Gaussian from the OS CSPRNG, behind
  ``gaussian_privatizer(..., secure=True)``.

``keras_api`` is not imported here so that Keras stays an optional dependency.
"""

__version__ = "0.1.0"

from jax_privacy import accounting
from jax_privacy import adaptive_clipping
from jax_privacy import auditing
from jax_privacy import batch_selection
from jax_privacy import clipping
from jax_privacy import experimental
from jax_privacy import matrix_factorization
from jax_privacy import noise_addition
from jax_privacy import secure_noise
from jax_privacy.clipping import clipped_grad

__all__ = [
    "accounting",
    "adaptive_clipping",
    "auditing",
    "batch_selection",
    "clipping",
    "clipped_grad",
    "experimental",
    "matrix_factorization",
    "noise_addition",
    "secure_noise",
]
