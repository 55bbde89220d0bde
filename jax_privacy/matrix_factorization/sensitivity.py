"""L2 sensitivity of a strategy matrix ``C`` under participation patterns.

An example that participates in the steps of a pattern ``P`` changes
``C x`` by ``C u`` with ``u`` supported on ``P`` and entries of norm at most
one (the clip norm), so the squared sensitivity is the max over patterns of
``max_u ||C u||^2``. For the usual case of gradients that can point the
same way at every participation, this is ``sum_{i, j in P} X[i, j]`` with
``X = C^T C`` when ``X >= 0`` elementwise, and ``sum |X[i, j]|`` bounds it
in general. All functions are host-side NumPy in float64 and return the
SQUARED sensitivity (multiply the clip norm squared in).

References:
  Choquette-Choo et al., "Multi-Epoch Matrix Factorization Mechanisms for
  Private Machine Learning", 2023, arXiv:2211.06530.
  Choquette-Choo et al., "(Amplified) Banded Matrix Factorization", 2023,
  arXiv:2306.08153.
"""

import numpy as np

from jax_privacy.matrix_factorization import checks

__all__ = [
    'MAX_EXACT_N',
    'banded_sensitivity_squared',
    'bandwidth',
    'fixed_epoch_sensitivity_squared',
    'minsep_sensitivity_squared',
    'single_participation_sensitivity_squared',
]

MAX_EXACT_N = 24


def _gram(strategy) -> np.ndarray:
  matrix = checks.check_finite('strategy', strategy)
  if matrix.ndim != 2:
    raise ValueError(f'strategy must be a 2-D matrix, got shape {matrix.shape}')
  return matrix.T @ matrix


def single_participation_sensitivity_squared(strategy) -> float:
  """The largest squared column norm, ``max_j X[j, j]``."""
  return float(np.max(np.diag(_gram(strategy))))


def bandwidth(strategy) -> int:
  """Number of nonzero diagonals (``b`` for a ``b``-banded lower triangle)."""
  matrix = checks.check_lower_triangular('strategy', strategy)
  n = matrix.shape[0]
  nonzero = [k for k in range(n) if np.any(np.diag(matrix, -k) != 0)]
  return max(nonzero, default=0) + 1


def fixed_epoch_sensitivity_squared(strategy, epochs: int) -> float:
  """Exact squared sensitivity for a fixed order over ``epochs`` epochs.

  Example ``r`` is in the steps ``t`` with ``t = r mod (n / epochs)``.

  With a fixed data order every example participates once per epoch at the
  same position, so the patterns are ``{r, r + b, r + 2b, ...}`` for ``b =
  n / epochs``; the value is ``max_r ||sum_k C[:, r + k b]||^2``, exact
  when gradients may align (the worst case).
  """
  matrix = checks.check_finite('strategy', strategy)
  n = matrix.shape[1]
  epochs = checks.check_positive_int('epochs', epochs)
  if n % epochs:
    raise ValueError(f'epochs must divide n = {n}, got {epochs}')
  steps_per_epoch = n // epochs
  sums = matrix.reshape(matrix.shape[0], epochs, steps_per_epoch).sum(axis=1)
  return float(np.max(np.sum(np.square(sums), axis=0)))


def _count(n, min_sep, max_participations):
  possible = -(-n // checks.check_positive_int('min_sep', min_sep))
  if max_participations is None:
    return possible
  return min(
      possible,
      checks.check_positive_int('max_participations', max_participations),
  )


def banded_sensitivity_squared(
    strategy, *, min_sep: int, max_participations: int | None = None
) -> float:
  """Exact squared sensitivity of a ``b``-banded strategy with ``b <= min_sep``.

  Participations ``>= b`` steps apart touch disjoint rows, so ``X[i, j] =
  0`` inside a pattern and the value is the best sum of squared column
  norms over patterns, found by dynamic programming in ``O(n k)``.

  Raises:
    ValueError: if the strategy's bandwidth exceeds ``min_sep``.
  """
  matrix = checks.check_lower_triangular('strategy', strategy)
  bands = bandwidth(matrix)
  if bands > min_sep:
    raise ValueError(
        f'strategy bandwidth must be <= min_sep = {min_sep}, got {bands}'
    )
  norms = np.sum(np.square(matrix), axis=0)
  return _best_pattern_sum(
      norms, min_sep, _count(norms.shape[0], min_sep, max_participations)
  )


def _best_pattern_sum(values: np.ndarray, min_sep: int, count: int) -> float:
  """Max of ``sum_{i in P} values[i]``, ``P`` separated, ``|P| <= count``."""
  n = values.shape[0]
  # best[k][i]: best total of at most k participations, all at steps >= i.
  best = np.zeros((count + 1, n + min_sep))
  for k in range(1, count + 1):
    for i in range(n - 1, -1, -1):
      best[k, i] = max(best[k, i + 1], values[i] + best[k - 1, i + min_sep])
  return float(best[count, 0])


def _patterns(n, min_sep, count):
  def extend(prefix):
    yield prefix
    if len(prefix) == count:
      return
    start = prefix[-1] + min_sep if prefix else 0
    for i in range(start, n):
      yield from extend(prefix + (i,))

  return (p for p in extend(()) if p)


def minsep_sensitivity_squared(
    strategy,
    *,
    min_sep: int,
    max_participations: int | None = None,
    exact: bool = False,
) -> float:
  """Squared sensitivity under ``min_sep``-separated participations.

  Exact for banded strategies with bandwidth ``<= min_sep`` (see
  :func:`banded_sensitivity_squared`). Otherwise, with ``exact=True``
  (``n <= 24``), the max over all patterns of ``sum_{i, j in P} |X[i,
  j]|``, which is exact when ``X >= 0``; with ``exact=False`` an upper
  bound: every row ``i`` of a pattern contributes at most ``|X[i, i]|``
  plus its ``k - 1`` largest ``|X[i, j]|`` with ``|i - j| >= min_sep``,
  and the best separated pattern of those row totals is found exactly.

  Privacy:
    Never under-reports: each branch is exact or an upper bound for
    gradients of norm at most one per participation.
  """
  matrix = checks.check_lower_triangular('strategy', strategy)
  n = matrix.shape[0]
  count = _count(n, min_sep, max_participations)
  if bandwidth(matrix) <= min_sep:
    return banded_sensitivity_squared(
        matrix, min_sep=min_sep, max_participations=max_participations
    )
  gram = np.abs(matrix.T @ matrix)
  if exact:
    if n > MAX_EXACT_N:
      raise ValueError(f'exact=True needs n <= {MAX_EXACT_N}, got n = {n}')
    return float(
        max(gram[np.ix_(p, p)].sum() for p in _patterns(n, min_sep, count))
    )
  # Row i of a pattern contributes X[i, i] plus at most count - 1 entries
  # X[i, j] with |i - j| >= min_sep; the best such row totals, over a
  # separated pattern, bound the pattern's sum.
  distance = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :])
  far = np.where(distance >= min_sep, gram, 0.0)
  top = -np.sort(-far, axis=1)[:, : count - 1]
  row_bound = np.diag(gram) + np.sum(top, axis=1)
  return _best_pattern_sum(row_bound, min_sep, count)
