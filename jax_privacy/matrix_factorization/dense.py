"""Dense strategies for multi-epoch training, optimised over all of ``C``.

The strategy is any invertible lower-triangular ``C``; its Gram matrix
``X = C^T C`` determines both the error, ``(A X^{-1} A^T)[t, t]`` for query
``t``, and the sensitivity. With a fixed data order over ``epochs`` epochs
(``b = n / epochs`` steps per epoch), example ``r`` participates in steps
``r, r + b, ...`` and the squared sensitivity is at most ``max_r sum_{i, j
in P_r} |X[i, j]|`` (exact when those entries are non-negative).

Optimisation minimises that sensitivity times the mean error over the
lower-triangular ``C`` (optionally banded, optionally with equal column
norms) with L-BFGS in float64, ``O(n^3)`` per step: meant for ``n`` up to a
few hundred. ``get_orthogonal_mask`` marks the entries of ``X`` that the
multi-epoch constraint of Choquette-Choo et al. sets to zero.

References:
  Choquette-Choo, McMahan, Rush, Thakurta, "Multi-Epoch Matrix
  Factorization Mechanisms for Private Machine Learning", 2023,
  arXiv:2211.06530.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jax_privacy.matrix_factorization import checks
from jax_privacy.matrix_factorization import optimization
from jax_privacy.matrix_factorization import toeplitz

__all__ = [
    'get_orthogonal_mask',
    'optimize',
    'per_query_error',
    'strategy_from_X',
]


def _steps_per_epoch(n: int, epochs: int) -> int:
  n = checks.check_positive_int('n', n)
  epochs = checks.check_positive_int('epochs', epochs)
  if n % epochs:
    raise ValueError(f'epochs must divide n = {n}, got {epochs}')
  return n // epochs


def get_orthogonal_mask(n: int, epochs: int = 1) -> np.ndarray:
  """Boolean ``n x n``: False where ``X[i, j]`` must be 0 for orthogonality.

  Entries ``i != j`` with ``i = j mod (n / epochs)`` couple two
  participations of the same example; making them zero makes those columns
  of ``C`` orthogonal and the squared sensitivity ``max`` of the summed
  diagonal over a pattern.
  """
  steps = _steps_per_epoch(n, epochs)
  index = np.arange(n)
  same_pattern = (index[:, None] % steps) == (index[None, :] % steps)
  return ~same_pattern | np.eye(n, dtype=bool)


def strategy_from_X(X) -> np.ndarray:  # pylint: disable=invalid-name
  """The lower-triangular ``C`` with ``C^T C = X`` (``X`` positive definite).

  With ``J`` the exchange matrix, ``J X J = L L^T`` (Cholesky) gives
  ``C = J L^T J``.
  """
  matrix = checks.check_square('X', X)
  if not np.allclose(matrix, matrix.T, rtol=1e-10, atol=1e-12):
    raise ValueError('X must be symmetric')
  try:
    lower = np.linalg.cholesky(matrix[::-1, ::-1])
  except np.linalg.LinAlgError as e:
    raise ValueError('X must be positive definite') from e
  return lower.T[::-1, ::-1].copy()


def per_query_error(  # pylint: disable=invalid-name
    *, strategy=None, X=None, A=None
) -> np.ndarray:
  """``(A X^{-1} A^T)[t, t]`` for every query ``t`` (prefix sums by default).

  Give exactly one of ``strategy`` (``C``, lower-triangular) or ``X``.
  """
  if (strategy is None) == (X is None):
    raise ValueError('give exactly one of strategy and X')
  if strategy is not None:
    strategy = checks.check_invertible_lower_triangular('strategy', strategy)
    n = strategy.shape[0]
  else:
    n = checks.check_square('X', X).shape[0]
    strategy = strategy_from_X(X)
  workload = (
      np.tril(np.ones((n, n))) if A is None else checks.check_finite('A', A)
  )
  if workload.ndim != 2 or workload.shape[1] != n:
    raise ValueError(f'A must have {n} columns, got shape {workload.shape}')
  noise = np.linalg.solve(strategy.T, workload.T).T
  return np.sum(np.square(noise), axis=1)


def optimize(
    n: int,
    *,
    epochs: int = 1,
    bands: int | None = None,
    equal_norm: bool = False,
    A=None,
    max_optimizer_steps: int = 200,  # pylint: disable=invalid-name
) -> np.ndarray:
  """An optimised ``X = C^T C`` for ``epochs`` passes in a fixed order.

  Minimises ``sens^2 * mean_t (A X^{-1} A^T)[t, t]`` with ``sens^2 =
  max_r sum_{i, j in P_r} |X[i, j]|`` (see the module docstring) over
  lower-triangular ``C``, from the optimal Toeplitz strategy.

  Privacy:
    Use the returned ``X`` with ``strategy_from_X`` and the same fixed
    order of ``epochs`` epochs; the sensitivity of another participation
    pattern must be computed again (``sensitivity``).

  Args:
    n: number of steps.
    epochs: number of epochs; must divide ``n``.
    bands: ``None`` (dense) or the number of bands of ``C`` (``<= n``).
    equal_norm: normalise every column of ``C`` to unit norm.
    A: the workload, ``n x n`` (default prefix sums).
    max_optimizer_steps: L-BFGS steps.

  Returns:
    ``X`` (``n x n``, float64, symmetric positive definite).
  """
  steps = _steps_per_epoch(n, epochs)
  if bands is not None:
    bands = checks.check_positive_int('bands', bands)
    if bands > n:
      raise ValueError(f'bands must be <= n = {n}, got {bands}')
  workload = (
      np.tril(np.ones((n, n))) if A is None else checks.check_square('A', A)
  )
  if workload.shape[0] != n:
    raise ValueError(f'A must be {n} x {n}, got shape {workload.shape}')
  lag = np.arange(n)[:, None] - np.arange(n)[None, :]
  mask = (lag >= 0) & (lag < (n if bands is None else bands))
  start = (
      np.asarray(
          toeplitz.materialize_lower_triangular(
              toeplitz.optimal_max_error_strategy_coefs(n)
          ),
          np.float64,
      )
      * mask
  )
  same_pattern = (np.arange(n)[:, None] % steps) == (
      np.arange(n)[None, :] % steps
  )
  pattern_indicator = np.stack(
      [(np.arange(n) % steps) == r for r in range(steps)]
  )

  def to_strategy(params):
    strategy = jnp.where(mask, params, 0.0)
    if equal_norm:
      strategy = strategy / jnp.linalg.norm(strategy, axis=0, keepdims=True)
    return strategy

  def objective(params):
    strategy = to_strategy(params)
    gram = jnp.abs(strategy.T @ strategy) * same_pattern
    sens = jnp.max(
        jnp.einsum('ri,ij,rj->r', pattern_indicator, gram, pattern_indicator)
    )
    noise = jax.scipy.linalg.solve_triangular(
        strategy.T, workload.T, lower=False
    ).T
    return sens * jnp.mean(jnp.sum(jnp.square(noise), axis=1))

  params = optimization.optimize(
      objective, start, max_optimizer_steps=max_optimizer_steps
  )
  with jax.enable_x64(True):
    strategy = np.asarray(to_strategy(jnp.asarray(params)))
  return strategy.T @ strategy
