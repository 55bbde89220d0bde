"""Lower-triangular Toeplitz strategies: algebra, errors, optimisation.

A lower-triangular Toeplitz matrix is given by its first column ``c``:
``C[i, j] = c[i - j]`` for ``i >= j`` and 0 above the diagonal. Products and
inverses of such matrices are again lower-triangular Toeplitz, so all the
algebra works on coefficient vectors of length ``n`` (``O(n^2)`` at most)
instead of ``n x n`` matrices. A strategy with ``b`` nonzero coefficients is
``b``-banded and streams with ``b - 1`` buffers.

Conventions: ``strategy_coef`` are the coefficients of the strategy ``C``
(whose sensitivity matters), ``noising_coef`` those of ``C^{-1}`` (what the
privatizer multiplies the Gaussian stream by), and the workload is the
prefix sum ``A`` (all-ones lower triangle) unless ``workload_coef`` says
otherwise. The error of query ``t`` is the variance of the ``t``-th entry of
``A C^{-1} Z`` for ``Z`` standard normal, to be multiplied by the squared
sensitivity of ``C`` (and by the squared noise multiplier).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_privacy.matrix_factorization import checks
from jax_privacy.matrix_factorization import optimization
from jax_privacy.matrix_factorization import streaming_matrix

__all__ = [
    'inverse_as_streaming_matrix',
    'inverse_coef',
    'loss',
    'materialize_lower_triangular',
    'minsep_sensitivity_squared',
    'multiply',
    'optimal_max_error_noising_coefs',
    'optimal_max_error_strategy_coefs',
    'optimize_banded_toeplitz',
    'optimize_coefs_for_amplifications',
    'pad_coefs_to_n',
    'per_query_error',
    'sensitivity_squared',
    'solve_banded',
]


def _coefs(name: str, coef, n: int | None = None) -> jax.Array:
  coef = jnp.asarray(coef)
  if coef.ndim != 1 or coef.shape[0] == 0:
    raise ValueError(
        f'{name} must be a non-empty 1-D array, got shape {coef.shape}'
    )
  if n is not None:
    coef = pad_coefs_to_n(coef, n)
  return coef


def _float64_on_host(fun):
  """Runs ``fun`` in float64 (returning NumPy) unless an argument is traced.

  On the host, sensitivities and errors are computed in float64 so that
  rounding never under-reports a sensitivity; inside an optimiser the
  traced float64 (or float32) values pass through unchanged.
  """

  @functools.wraps(fun)
  def wrapper(*args, **kwargs):
    leaves = jax.tree.leaves((args, kwargs))
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
      return fun(*args, **kwargs)
    with jax.enable_x64(True):
      result = fun(*args, **kwargs)
      return jax.tree.map(lambda x: np.asarray(x, np.float64), result)

  return wrapper


def _is_concrete(array) -> bool:
  try:
    float(array[0])
  except jax.errors.ConcretizationTypeError:
    return False
  return True


@_float64_on_host
def pad_coefs_to_n(coef, n: int) -> jax.Array:
  """The first ``n`` coefficients, padding with zeros (a banded matrix)."""
  n = checks.check_positive_int('n', n)
  coef = jnp.asarray(coef)
  if coef.shape[0] >= n:
    return coef[:n]
  return jnp.concatenate([coef, jnp.zeros(n - coef.shape[0], coef.dtype)])


@_float64_on_host
def materialize_lower_triangular(coef, n: int | None = None) -> jax.Array:
  """The ``n x n`` matrix ``C[i, j] = coef[i - j]`` (default ``len(coef)``)."""
  coef = _coefs('coef', coef, n)
  size = coef.shape[0]
  lag = jnp.arange(size)[:, None] - jnp.arange(size)[None, :]
  return jnp.where(lag >= 0, coef[jnp.clip(lag, 0, size - 1)], 0.0)


@_float64_on_host
def multiply(a, b, n: int | None = None) -> jax.Array:
  """Coefficients of the product of two lower-triangular Toeplitz matrices."""
  a, b = _coefs('a', a), _coefs('b', b)
  n = max(a.shape[0], b.shape[0]) if n is None else n
  return pad_coefs_to_n(jnp.convolve(a, b), n)


@_float64_on_host
def inverse_coef(coef, n: int | None = None) -> jax.Array:
  """Coefficients of ``C^{-1}``: ``b_0 = 1 / c_0``, ``b_k = -(sum_{j=1}^k c_j
  b_{k-j}) / c_0``. Differentiable; ``O(n^2)``.

  Raises:
    ValueError: if ``coef[0]`` is zero (a singular matrix), when concrete.
  """
  coef = _coefs('coef', coef, n)
  size = coef.shape[0]
  if _is_concrete(coef) and float(coef[0]) == 0.0:
    raise ValueError('coef[0] must be nonzero: the Toeplitz matrix is singular')
  reversed_padded = jnp.concatenate([jnp.zeros(size, coef.dtype), coef])[::-1]

  def body(k, inverse):
    window = jax.lax.dynamic_slice(reversed_padded, (size - 1 - k,), (size,))
    value = jnp.where(k == 0, 1.0, -jnp.dot(inverse, window)) / coef[0]
    return inverse.at[k].set(value)

  return jax.lax.fori_loop(0, size, body, jnp.zeros_like(coef))


def solve_banded(coef, rhs) -> jax.Array:
  """Solves ``C x = rhs`` for a banded lower-triangular Toeplitz ``C``.

  Args:
    coef: the ``b`` band coefficients of ``C`` (``coef[0] != 0``).
    rhs: shape ``(n, ...)``.

  Returns:
    ``x`` of the shape of ``rhs``, by forward substitution in ``O(n b)``.
  """
  return streaming_matrix.multiply_array(inverse_as_streaming_matrix(coef), rhs)


@_float64_on_host
def sensitivity_squared(coef, n: int | None = None) -> float:
  """Squared L2 sensitivity under single participation: ``sum_k c_k^2``.

  The first column of a lower-triangular Toeplitz matrix is its longest,
  so it has the largest norm.
  """
  coef = _coefs('coef', coef, n)
  return jnp.sum(jnp.square(coef))


def num_participations(
    n: int, min_sep: int, max_participations: int | None
) -> int:
  """Most participations of one example in ``n`` steps ``min_sep`` apart."""
  n = checks.check_positive_int('n', n)
  min_sep = checks.check_positive_int('min_sep', min_sep)
  possible = -(-n // min_sep)
  if max_participations is None:
    return possible
  return min(
      possible,
      checks.check_positive_int('max_participations', max_participations),
  )


@_float64_on_host
def minsep_sensitivity_squared(
    coef,
    *,
    min_sep: int,
    max_participations: int | None = None,
    n: int | None = None,
    skip_checks: bool = False,
):
  """Squared sensitivity when participations are ``>= min_sep`` steps apart.

  For non-negative, non-increasing coefficients every entry of ``X = C^T
  C`` is non-negative and ``X[i, i + d]`` does not grow with ``i`` or
  ``d``, so the worst pattern participates as early and as densely as
  allowed: steps ``0, min_sep, 2 min_sep, ...``. The value is then
  ``||sum_k C[:, k min_sep]||^2``, exact.

  Privacy:
    Exact only for non-negative, non-increasing coefficients, which is
    checked unless ``skip_checks`` (for traced values inside an
    optimiser whose parametrisation guarantees it).

  Args:
    coef: the strategy coefficients.
    min_sep: minimum number of steps between two participations.
    max_participations: at most this many participations (``None``: as
      many as ``min_sep`` allows).
    n: number of steps (``len(coef)`` by default).
    skip_checks: do not verify the monotonicity assumption.

  Returns:
    The squared sensitivity.

  References:
    Choquette-Choo et al., "(Amplified) Banded Matrix Factorization",
    2023, arXiv:2306.08153. McKenna, "Scaling up the Banded Matrix
    Factorization Mechanism", 2024, arXiv:2405.15913.
  """
  coef = _coefs('coef', coef, n)
  size = coef.shape[0]
  count = num_participations(size, min_sep, max_participations)
  if not skip_checks:
    host = np.asarray(coef, np.float64)
    if np.any(host < 0) or np.any(np.diff(host) > 1e-12 * np.max(np.abs(host))):
      raise ValueError(
          'coef must be non-negative and non-increasing for the exact '
          'min-separation sensitivity; use sensitivity.minsep_sensitivity_'
          'squared for a general strategy'
      )
  if count == 1:
    return jnp.sum(jnp.square(coef))
  comb = jnp.zeros(size, coef.dtype).at[jnp.arange(count) * min_sep].set(1.0)
  column_sum = jnp.convolve(coef, comb)[:size]
  return jnp.sum(jnp.square(column_sum))


@_float64_on_host
def per_query_error(
    *,
    strategy_coef=None,
    noising_coef=None,
    n: int | None = None,
    workload_coef=None,
) -> jax.Array:
  """Variance of each query's noise, ``||(A C^{-1})[t, :]||^2`` for all t.

  Give exactly one of ``strategy_coef`` (``C``) or ``noising_coef``
  (``C^{-1}``). ``A`` is the prefix sum unless ``workload_coef`` is given.
  Multiply by the squared sensitivity and noise multiplier for the error.
  """
  if (strategy_coef is None) == (noising_coef is None):
    raise ValueError('give exactly one of strategy_coef and noising_coef')
  if noising_coef is None:
    noising_coef = inverse_coef(strategy_coef, n)
  noising_coef = _coefs('noising_coef', noising_coef, n)
  size = noising_coef.shape[0]
  if workload_coef is None:
    noise_coef = jnp.cumsum(noising_coef)
  else:
    noise_coef = multiply(workload_coef, noising_coef, size)
  return jnp.cumsum(jnp.square(noise_coef))


def _check_error(error: str) -> str:
  if error not in ('max', 'mean'):
    raise ValueError(f"error must be 'max' or 'mean', got {error!r}")
  return error


@_float64_on_host
def loss(
    strategy_coef,
    *,
    n: int | None = None,
    min_sep: int = 1,
    max_participations: int | None = 1,
    error: str = 'max',
    skip_checks: bool = False,
):
  """Squared sensitivity times the max (or mean) per-query error.

  The expected squared error of the prefix sums per unit noise multiplier:
  the quantity strategies are optimised for. ``min_sep = 1`` and
  ``max_participations = 1`` is single participation.
  """
  _check_error(error)
  coef = _coefs('strategy_coef', strategy_coef, n)
  errors = per_query_error(strategy_coef=coef)
  sens = minsep_sensitivity_squared(
      coef,
      min_sep=min_sep,
      max_participations=max_participations,
      skip_checks=skip_checks,
  )
  return sens * (jnp.max(errors) if error == 'max' else jnp.mean(errors))


def optimal_max_error_strategy_coefs(n: int) -> np.ndarray:
  """Coefficients of ``A^{1/2}``, the optimal Toeplitz strategy for prefix sums.

  ``c_k = binom(2k, k) / 4^k``, the Taylor coefficients of ``(1 - x)^(-1/2)``:
  positive, decreasing like ``1 / sqrt(pi k)``. With ``C = A^{1/2}`` the
  max error grows like ``(log n)^2 / pi^2`` (with the squared sensitivity),
  optimal up to lower-order terms among all factorizations.

  References:
    Fichtenberger, Henzinger, Upadhyay, "Constant Matters: Fine-grained
    Error Bound on Differentially Private Continual Observation", 2023,
    arXiv:2202.11205.
  """
  n = checks.check_positive_int('n', n)
  k = np.arange(1, n)
  return np.concatenate([[1.0], np.cumprod((2 * k - 1) / (2 * k))])


def optimal_max_error_noising_coefs(n: int) -> np.ndarray:
  """Coefficients of ``A^{-1/2}`` (``(1 - x)^(1/2)``), the inverse of the above.

  ``b_0 = 1`` and ``b_k = -binom(2k, k) / (4^k (2k - 1))`` for ``k >= 1``.
  """
  strategy = optimal_max_error_strategy_coefs(n)
  k = np.arange(n)
  return np.where(k == 0, 1.0, -strategy / np.maximum(2 * k - 1, 1))


def inverse_as_streaming_matrix(coef) -> streaming_matrix.StreamingMatrix:
  """``C^{-1}`` of a ``b``-banded Toeplitz ``C``, with ``b - 1`` buffers.

  ``y_t = (x_t - sum_{j=1}^{b-1} c_j y_{t-j}) / c_0``.
  """
  coef = checks.check_finite('coef', coef)
  if coef.ndim != 1 or coef.shape[0] == 0 or coef[0] == 0.0:
    raise ValueError(
        'coef must be a non-empty 1-D array with coef[0] != 0 (else the '
        f'matrix is singular), got {coef!r}'
    )
  history = coef.shape[0] - 1

  def init_multiply(example):
    # The last outputs, newest first, one array each: shifting the tuple
    # costs nothing and every update is elementwise.
    return jax.tree.map(
        lambda x: tuple(jnp.zeros(x.shape, x.dtype) for _ in range(history)),
        example,
    )

  def multiply_next(x, buffers):
    def leaf(x_leaf, past_outputs):
      past = sum(
          (float(c) * b for c, b in zip(coef[1:], past_outputs)),
          jnp.zeros_like(x_leaf),
      )
      y = ((x_leaf - past) / coef[0]).astype(x_leaf.dtype)
      return y, ((y,) + past_outputs[:-1]) if history else ()

    return streaming_matrix.map_with_state(leaf, x, buffers)

  return streaming_matrix.StreamingMatrix(init_multiply, multiply_next)


def optimize_banded_toeplitz(
    n: int,
    bands: int,
    *,
    min_sep: int = 1,
    max_participations: int | None = 1,
    error: str = 'max',
    max_optimizer_steps: int = 200,
) -> np.ndarray:
  """Optimal ``bands``-banded Toeplitz strategy for the prefix-sum workload.

  Minimises squared sensitivity times max (or mean) error over the band
  coefficients with L-BFGS in float64, from the optimal (unbanded)
  coefficients truncated to ``bands``. With more than one participation
  ``bands <= min_sep`` is required: then the columns one example touches
  never overlap and the squared sensitivity is exactly ``k ||c||^2`` for
  ``k`` participations, whatever the signs of the coefficients.

  Privacy:
    The returned strategy's sensitivity must be computed under the same
    participation assumption (``min_sep``, ``max_participations``) that
    the batch selection really enforces.

  Returns:
    The ``bands`` coefficients, normalised to ``c_0 = 1`` (float64).

  References:
    Choquette-Choo et al., "(Amplified) Banded Matrix Factorization",
    2023, arXiv:2306.08153.
  """
  n = checks.check_positive_int('n', n)
  bands = checks.check_positive_int('bands', bands)
  if bands > n:
    raise ValueError(f'bands must be <= n = {n}, got {bands}')
  count = num_participations(n, min_sep, max_participations)
  if count > 1 and bands > min_sep:
    raise ValueError(
        f'bands must be <= min_sep = {min_sep} with multiple participations, '
        f'got {bands}'
    )
  _check_error(error)
  init = optimal_max_error_strategy_coefs(bands)

  def objective(params):
    coef = jnp.concatenate([jnp.ones(1, params.dtype), params])
    errors = per_query_error(strategy_coef=pad_coefs_to_n(coef, n))
    value = jnp.max(errors) if error == 'max' else jnp.mean(errors)
    return count * jnp.sum(jnp.square(coef)) * value

  if bands == 1:
    return np.ones(1)
  params = optimization.optimize(
      objective, init[1:], max_optimizer_steps=max_optimizer_steps
  )
  return np.concatenate([[1.0], np.asarray(params, np.float64)])


def optimize_coefs_for_amplifications(
    n: int,
    *,
    dataset_size: int,
    expected_batch_size: int,
    epsilon: float,
    delta: float,
    max_bands: int | None = None,
    error: str = 'max',
    max_optimizer_steps: int = 100,
) -> tuple[np.ndarray, float]:
  """Picks the number of bands and coefficients for amplified BandMF.

  More bands correlate the noise better but leave fewer groups to sample
  from (cyclic Poisson sampling with ``b`` groups samples each group with
  probability ``expected_batch_size * b / dataset_size``), so less
  amplification and a larger noise multiplier. For every power of two
  ``b`` up to ``max_bands`` this calibrates the noise multiplier ``sigma_b``
  of ``experimental.accounting.amplified_bandmf_event`` to ``(epsilon,
  delta)`` with the PLD accountant, optimises the banded Toeplitz
  coefficients, and keeps the ``b`` minimising ``sigma_b^2 ||c||^2
  error(c)`` (column norm = per-participation sensitivity).

  Privacy:
    The result is private at ``(epsilon, delta)`` only with cyclic Poisson
    sampling over ``len(coefs)`` groups
    (``batch_selection.CyclicPoissonSampling(cycle_length=len(coefs))``),
    the noise multiplier returned, and the strategy's noise scaled by its
    column norm ``||coefs||``.

  Returns:
    ``(coefs, noise_multiplier)``: the band coefficients (``c_0 = 1``) and
    the calibrated noise multiplier.

  References:
    Choquette-Choo et al., "(Amplified) Banded Matrix Factorization",
    2023, arXiv:2306.08153. McKenna, "Scaling up the Banded Matrix
    Factorization Mechanism for Differentially Private ML", 2024,
    arXiv:2405.15913.
  """
  import dp_accounting  # pylint: disable=g-import-not-at-top
  # Imported here: experimental imports noise_addition, which imports us.
  from jax_privacy.experimental import accounting  # pylint: disable=g-import-not-at-top

  n = checks.check_positive_int('n', n)
  dataset_size = checks.check_positive_int('dataset_size', dataset_size)
  expected_batch_size = checks.check_positive_int(
      'expected_batch_size', expected_batch_size
  )
  if expected_batch_size > dataset_size:
    raise ValueError(
        f'expected_batch_size must be <= dataset_size = {dataset_size}, got '
        f'{expected_batch_size}'
    )
  largest = min(n, dataset_size // expected_batch_size)
  if max_bands is not None:
    largest = min(largest, checks.check_positive_int('max_bands', max_bands))
  _check_error(error)
  best = None
  bands = 1
  while bands <= largest:
    sampling_prob = expected_batch_size * bands / dataset_size

    def make_event(sigma, bands=bands, sampling_prob=sampling_prob):
      return accounting.amplified_bandmf_event(
          sigma, n, num_bands=bands, sampling_prob=sampling_prob
      )

    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: dp_accounting.pld.PLDAccountant(
            value_discretization_interval=1e-3
        ),
        make_event,
        epsilon,
        delta,
        dp_accounting.LowerEndpointAndGuess(0.3, 1.0),
        tol=1e-3,
    )
    coefs = optimize_banded_toeplitz(
        n, bands, error=error, max_optimizer_steps=max_optimizer_steps
    )
    value = sigma**2 * float(loss(coefs, n=n, error=error, skip_checks=True))
    if best is None or value < best[0]:
      best = (value, coefs, float(sigma))
    bands *= 2
  return best[1], best[2]
