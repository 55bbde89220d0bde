"""Host-side checks of the matrices that define a matrix factorization.

A mechanism ``A = B C`` releases ``C x + Z`` and post-processes it with
``B = A C^{-1}``; the privatizer adds ``C^{-1} Z`` to the gradients. Every
check here raises ``ValueError`` naming the argument, before anything is
traced, so a wrong strategy never turns into a silently wrong noise.
"""

import numpy as np

__all__ = [
    'check_finite',
    'check_invertible_lower_triangular',
    'check_lower_triangular',
    'check_positive_int',
    'check_square',
]


def check_positive_int(name: str, value, minimum: int = 1) -> int:
  """Returns ``value`` as an ``int`` if it is an integer ``>= minimum``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
  if value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
  return int(value)


def check_finite(name: str, matrix) -> np.ndarray:
  """Returns ``matrix`` as a float64 array if all entries are finite."""
  array = np.asarray(matrix, dtype=np.float64)
  if not np.all(np.isfinite(array)):
    raise ValueError(f'{name} must have finite entries, found NaN or inf')
  return array


def check_square(name: str, matrix) -> np.ndarray:
  """Returns ``matrix`` as a finite float64 array if it is square 2-D."""
  array = check_finite(name, matrix)
  if array.ndim != 2 or array.shape[0] != array.shape[1]:
    raise ValueError(
        f'{name} must be a square 2-D matrix, got shape {array.shape}'
    )
  return array


def check_lower_triangular(name: str, matrix, atol: float = 0.0) -> np.ndarray:
  """Returns ``matrix`` if it is square and zero above the diagonal.

  Lower-triangular means causal: step ``t`` of the mechanism uses only the
  inputs of steps ``0..t``, which a streaming (online) release needs.
  """
  array = check_square(name, matrix)
  upper = np.triu(array, k=1)
  if np.any(np.abs(upper) > atol):
    i, j = np.unravel_index(np.argmax(np.abs(upper)), upper.shape)
    raise ValueError(
        f'{name} must be lower-triangular (causal), but entry [{i}, {j}] '
        f'above the diagonal is {array[i, j]!r}'
    )
  return array


def check_invertible_lower_triangular(name: str, matrix) -> np.ndarray:
  """Returns ``matrix`` if it is lower-triangular with a nonzero diagonal."""
  array = check_lower_triangular(name, matrix)
  diagonal = np.abs(np.diag(array))
  scale = max(float(np.max(np.abs(array))), np.finfo(np.float64).tiny)
  if np.any(diagonal <= 1e-12 * scale):
    index = int(np.argmin(diagonal))
    raise ValueError(
        f'{name} must be invertible (nonzero diagonal), but diagonal entry '
        f'{index} is {array[index, index]!r}'
    )
  return array
