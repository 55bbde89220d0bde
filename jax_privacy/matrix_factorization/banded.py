"""Column-normalized banded strategies (BandMF) and their optimisation.

A ``b``-banded lower-triangular strategy ``C`` has ``C[i, j] = 0`` unless
``0 <= i - j < b``. When every column has unit norm and participations are
at least ``b`` steps apart, one example's columns have disjoint supports,
so the squared sensitivity is exactly the number of participations ``k``
and the mechanism can be amplified by sampling (amplified BandMF). ``C^{-1}``
streams with ``b - 1`` buffers.

References:
  Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta, Xu, "(Amplified)
  Banded Matrix Factorization: A unified approach to private training",
  2023, arXiv:2306.08153.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_privacy.matrix_factorization import checks
from jax_privacy.matrix_factorization import optimization
from jax_privacy.matrix_factorization import sensitivity
from jax_privacy.matrix_factorization import streaming_matrix
from jax_privacy.matrix_factorization import toeplitz

__all__ = [
    'ColumnNormalizedBanded',
    'minsep_sensitivity_squared',
    'optimize',
    'per_query_error',
]


def _normalized_columns(params):
  """Band values ``(n, b)`` with out-of-range entries zeroed, unit columns."""
  n, bands = params.shape
  in_range = (jnp.arange(n)[:, None] + jnp.arange(bands)[None, :]) < n
  columns = jnp.where(in_range, params, 0.0)
  return columns / jnp.linalg.norm(columns, axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class ColumnNormalizedBanded:
  """A banded strategy whose columns are normalised to unit L2 norm.

  Attributes:
    params: shape ``(n, bands)``; ``params[j, k]`` is (before column
      normalisation) ``C[j + k, j]``. Entries with ``j + k >= n`` are
      ignored. ``params[j, 0]`` (the diagonal) must be nonzero.
  """

  params: np.ndarray

  def __post_init__(self):
    params = checks.check_finite('params', self.params)
    if (
        params.ndim != 2
        or params.shape[1] > params.shape[0]
        or 0 in params.shape
    ):
      raise ValueError(
          'params must have shape (n, bands) with 1 <= bands <= n, got '
          f'{params.shape}'
      )
    if np.any(params[:, 0] == 0.0):
      raise ValueError(
          'params[:, 0] (the diagonal) must be nonzero: C is singular'
      )
    object.__setattr__(self, 'params', params)

  @classmethod
  def from_banded_toeplitz(cls, n: int, coef) -> 'ColumnNormalizedBanded':
    """The banded Toeplitz strategy with these band coefficients."""
    n = checks.check_positive_int('n', n)
    coef = checks.check_finite('coef', coef)
    if coef.ndim != 1 or not 1 <= coef.shape[0] <= n:
      raise ValueError(
          f'coef must be 1-D with 1 <= bands <= n = {n}, got shape {coef.shape}'
      )
    return cls(np.tile(coef, (n, 1)))

  @classmethod
  def default(cls, n: int, bands: int) -> 'ColumnNormalizedBanded':
    """The optimal prefix-sum Toeplitz coefficients truncated to ``bands``."""
    if checks.check_positive_int('bands', bands) > checks.check_positive_int(
        'n', n
    ):
      raise ValueError(f'bands must be <= n = {n}, got {bands}')
    return cls.from_banded_toeplitz(
        n, toeplitz.optimal_max_error_strategy_coefs(bands)
    )

  @property
  def n(self) -> int:
    return self.params.shape[0]

  @property
  def bands(self) -> int:
    return self.params.shape[1]

  def columns(self) -> np.ndarray:
    """The normalised band values, ``(n, bands)``, float64."""
    with jax.enable_x64(True):
      return np.asarray(_normalized_columns(jnp.asarray(self.params)))

  def materialize(self) -> np.ndarray:
    """The dense ``n x n`` strategy ``C``."""
    columns = self.columns()
    matrix = np.zeros((self.n, self.n))
    for k in range(self.bands):
      rows = np.arange(k, self.n)
      matrix[rows, rows - k] = columns[: self.n - k, k]
    return matrix

  def inverse_as_streaming_matrix(self) -> streaming_matrix.StreamingMatrix:
    """``C^{-1}`` streaming with ``bands - 1`` buffers; NaN past step ``n``.

    ``y_t = (x_t - sum_{k=1}^{b-1} C[t, t-k] y_{t-k}) / C[t, t]``.
    """
    columns = self.columns()
    history = self.bands - 1
    # rows[t, k] = C[t, t - k].
    rows = np.zeros((self.n, self.bands))
    for k in range(self.bands):
      rows[k:, k] = columns[: self.n - k, k]

    def init_multiply(example):
      buffers = jax.tree.map(
          lambda x: tuple(jnp.zeros(x.shape, x.dtype) for _ in range(history)),
          example,
      )
      return buffers, jnp.zeros([], jnp.int32)

    def multiply_next(x, state):
      buffers, step = state
      row = jnp.asarray(rows)[jnp.minimum(step, self.n - 1)]
      row = jnp.where(step < self.n, row, jnp.nan)

      def leaf(x_leaf, past_outputs):
        weights = row.astype(x_leaf.dtype)
        past = sum(
            (weights[k + 1] * b for k, b in enumerate(past_outputs)),
            jnp.zeros_like(x_leaf),
        )
        y = ((x_leaf - past) / weights[0]).astype(x_leaf.dtype)
        return y, ((y,) + past_outputs[:-1]) if history else ()

      y, buffers = streaming_matrix.map_with_state(leaf, x, buffers)
      return y, (buffers, step + 1)

    return streaming_matrix.StreamingMatrix(init_multiply, multiply_next)


def minsep_sensitivity_squared(
    strategy: ColumnNormalizedBanded,
    *,
    min_sep: int,
    max_participations: int | None = None,
) -> float:
  """Squared sensitivity: ``k`` participations if ``bands <= min_sep``.

  Otherwise the general bound of :func:`sensitivity.minsep_sensitivity_squared`.
  """
  if strategy.bands <= checks.check_positive_int('min_sep', min_sep):
    return float(
        toeplitz.num_participations(strategy.n, min_sep, max_participations)
    )
  return sensitivity.minsep_sensitivity_squared(
      strategy.materialize(),
      min_sep=min_sep,
      max_participations=max_participations,
  )


def _errors(columns, workload):
  """Row norms squared of ``B = A C^{-1}``, solving ``B C = A`` by columns."""
  n, bands = columns.shape

  def step(carry, j):
    buffer, total = carry
    past = jnp.tensordot(columns[j, 1:], buffer, axes=1) if bands > 1 else 0.0
    column = (workload[:, j] - past) / columns[j, 0]
    if bands > 1:
      buffer = jnp.concatenate([column[None], buffer[:-1]], axis=0)
    return (buffer, total + jnp.square(column)), None

  init = (jnp.zeros((bands - 1, n), columns.dtype), jnp.zeros(n, columns.dtype))
  (_, total), _ = jax.lax.scan(step, init, jnp.arange(n - 1, -1, -1))
  return total


def _workload(n, workload):
  if workload is None:
    return jnp.tril(jnp.ones((n, n)))
  return jnp.asarray(checks.check_lower_triangular('workload', workload))


def per_query_error(
    strategy: ColumnNormalizedBanded, workload=None
) -> np.ndarray:
  """``||(A C^{-1})[t, :]||^2`` for every query ``t`` (prefix sums default).

  ``O(n^2 b)`` by back substitution; multiply by the squared sensitivity.
  """
  with jax.enable_x64(True):
    errors = _errors(
        jnp.asarray(strategy.columns()), _workload(strategy.n, workload)
    )
    return np.asarray(errors)


def optimize(
    n: int,
    *,
    bands: int,
    min_sep: int | None = None,
    max_participations: int | None = None,
    error: str = 'mean',
    workload=None,
    max_optimizer_steps: int = 200,
) -> ColumnNormalizedBanded:
  """Column-normalised ``bands``-banded strategy minimising max or mean error.

  With unit columns and ``bands <= min_sep`` the squared sensitivity is
  the constant ``k``, so only the error is optimised (L-BFGS, float64,
  ``O(n^2 b)`` per evaluation), from :meth:`ColumnNormalizedBanded.default`.

  Args:
    n: number of steps.
    bands: number of bands, ``1 <= bands <= n``.
    min_sep: minimum separation of participations (default ``bands``);
      must be ``>= bands``.
    max_participations: recorded for the caller; does not change the
      optimum (the sensitivity is a constant factor).
    error: ``'mean'`` or ``'max'``.
    workload: ``A``, dense lower-triangular (default prefix sums).
    max_optimizer_steps: L-BFGS steps.

  Returns:
    The optimised strategy.
  """
  n = checks.check_positive_int('n', n)
  bands = checks.check_positive_int('bands', bands)
  if bands > n:
    raise ValueError(f'bands must be <= n = {n}, got {bands}')
  min_sep = (
      bands
      if min_sep is None
      else checks.check_positive_int('min_sep', min_sep)
  )
  if bands > min_sep:
    raise ValueError(f'bands must be <= min_sep = {min_sep}, got {bands}')
  toeplitz.num_participations(n, min_sep, max_participations)
  if error not in ('max', 'mean'):
    raise ValueError(f"error must be 'max' or 'mean', got {error!r}")
  start = ColumnNormalizedBanded.default(n, bands)
  if bands == 1:
    return start
  with jax.enable_x64(True):
    target = _workload(n, workload)

  def objective(params):
    errors = _errors(_normalized_columns(params), target)
    return jnp.max(errors) if error == 'max' else jnp.mean(errors)

  params = optimization.optimize(
      objective, start.params, max_optimizer_steps=max_optimizer_steps
  )
  return ColumnNormalizedBanded(params)
