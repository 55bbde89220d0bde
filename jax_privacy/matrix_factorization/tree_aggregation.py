"""The binary-tree (DP-FTRL) strategy as a square streaming factorization.

The tree mechanism releases a noisy sum for every dyadic block of steps and
answers prefix sum ``t`` from the blocks of the binary decomposition of
``t + 1``. Only blocks that end such a decomposition are ever used: the
block ending at step ``e`` has length ``2^v`` with ``v`` the number of
trailing zeros of ``e + 1``. Releasing exactly those blocks is the square
lower-triangular strategy ``C[e, s] = 1`` for ``s`` in ``[e - 2^v + 1, e]``,
with ``A = B C`` for the prefix sums ``A`` (``B`` adds the blocks of a
decomposition). Both ``C`` and ``C^{-1}`` stream with a binary counter of
``ceil(log2(n + 1))`` model-sized buffers.

References:
  Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private
  (Deep) Learning without Sampling or Shuffling", 2021, arXiv:2103.00039.
  Honaker, "Efficient Use of Differentially Private Binary Trees", 2015.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_privacy.matrix_factorization import checks
from jax_privacy.matrix_factorization import sensitivity
from jax_privacy.matrix_factorization import streaming_matrix

__all__ = [
    'inverse_as_streaming_matrix',
    'materialize',
    'sensitivity_squared',
    'strategy_as_streaming_matrix',
]


def _levels(n: int) -> int:
  return max(1, math.ceil(math.log2(n + 1)))


def _trailing_zeros(value: jax.Array) -> jax.Array:
  return jax.lax.population_count((value & -value) - 1)


def _binary_counter(n: int, inverse: bool) -> streaming_matrix.StreamingMatrix:
  n = checks.check_positive_int('n', n)
  levels = _levels(n)

  def init_multiply(example):
    # One array per level, updated elementwise (no dynamic indexing into a
    # stacked array), so a step is one fused pass over the buffers.
    stacks = jax.tree.map(
        lambda x: tuple(jnp.zeros(x.shape, x.dtype) for _ in range(levels)),
        example,
    )
    return stacks, jnp.zeros([], jnp.int32)

  def multiply_next(x, state):
    stacks, step = state
    level = _trailing_zeros(step + 1)
    valid = step < n

    def leaf(x_leaf, stack):
      pending = sum(
          (jnp.where(i < level, block, 0) for i, block in enumerate(stack)),
          jnp.zeros_like(x_leaf),
      )
      y = x_leaf - pending if inverse else x_leaf + pending
      y = jax.lax.optimization_barrier(y)
      new_block = x_leaf if inverse else y
      stack = tuple(
          jnp.where(i == level, new_block, jnp.where(i < level, 0, block))
          for i, block in enumerate(stack)
      )
      return jnp.where(valid, y, jnp.nan).astype(x_leaf.dtype), stack

    y, stacks = streaming_matrix.map_with_state(leaf, x, stacks)
    return y, (stacks, step + 1)

  return streaming_matrix.StreamingMatrix(init_multiply, multiply_next)


def strategy_as_streaming_matrix(n: int) -> streaming_matrix.StreamingMatrix:
  """The tree strategy ``C`` for ``n`` steps: output ``e`` is the block sum.

  Steps past ``n`` output NaN (the counter has only ``ceil(log2(n + 1))``
  levels).
  """
  return _binary_counter(n, inverse=False)


def inverse_as_streaming_matrix(n: int) -> streaming_matrix.StreamingMatrix:
  """``C^{-1}`` of the tree strategy: the per-step noise of tree DP-FTRL.

  Fed i.i.d. Gaussian block noises ``z_e``, output ``t`` is the difference
  of the tree's noise on prefix sums ``t`` and ``t - 1``: ``y_t = z_t -``
  (the noises of the blocks merged into the block ending at ``t``). Its
  prefix sums are exactly the tree mechanism's prefix-sum noise.
  """
  return _binary_counter(n, inverse=True)


def materialize(n: int) -> np.ndarray:
  """The dense ``n x n`` 0/1 tree strategy ``C``."""
  n = checks.check_positive_int('n', n)
  matrix = np.zeros((n, n))
  for end in range(n):
    length = (end + 1) & -(end + 1)
    matrix[end, end - length + 1 : end + 1] = 1.0
  return matrix


def sensitivity_squared(
    n: int, *, min_sep: int = 1, max_participations: int | None = 1
) -> float:
  """Squared sensitivity of the tree strategy for ``n`` steps.

  ``C`` has non-negative entries, so every entry of ``X = C^T C`` is
  non-negative and the squared sensitivity is the max over participation
  patterns of ``sum_{i, j in pattern} X[i, j]``. One participation: the
  number of blocks containing a step (at most ``ceil(log2(n + 1))``).
  Several: exact by a search over all patterns for ``n <= 24``, otherwise
  the upper bound of :func:`sensitivity.minsep_sensitivity_squared`
  (pessimistic: never below the true value).

  Privacy:
    Assumes each example participates at most ``max_participations`` times,
    at least ``min_sep`` steps apart.
  """
  matrix = materialize(n)
  count_limit = 1 if max_participations is None else max_participations
  if min_sep >= n or count_limit == 1:
    return float(np.max(np.sum(matrix, axis=0)))
  return sensitivity.minsep_sensitivity_squared(
      matrix,
      min_sep=min_sep,
      max_participations=max_participations,
      exact=n <= sensitivity.MAX_EXACT_N,
  )
