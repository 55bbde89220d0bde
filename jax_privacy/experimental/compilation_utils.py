"""Choosing the padded batch sizes a training step is compiled for.

Poisson sampling gives a different batch size every step. Compiling the step
for each size is slow; padding every batch to the largest size wastes
compute. :func:`optimal_physical_batch_sizes` picks, for a given number of
compilations, the padded sizes that minimise the total padding.
"""

from collections.abc import Iterable
import numbers

import numpy as np


def optimal_physical_batch_sizes(
    batch_sizes: Iterable[int], num_compilations: int
) -> set[int]:
  """The padded sizes that minimise total padding for ``num_compilations``.

  Each batch is padded to the smallest chosen size that holds it. The
  largest batch size is always chosen, so every batch fits. The optimum
  only ever uses observed sizes, and is found exactly by dynamic programming
  over the distinct sizes (O(num_compilations x distinct^2) time).

  Args:
    batch_sizes: the batch sizes to plan for, e.g. drawn in advance from the
      sampler (the sizes carry no private information: they depend only on
      the sampling randomness and the data set size).
    num_compilations: the largest number of distinct padded sizes, ``>= 1``.

  Returns:
    The set of padded sizes (at most ``num_compilations`` of them).

  Raises:
    ValueError: if ``batch_sizes`` is empty or holds a negative or
      non-integer value, or ``num_compilations < 1``.

  Example::

    >>> sorted(optimal_physical_batch_sizes([1, 2, 9, 10], 2))
    [2, 10]
  """
  if (
      isinstance(num_compilations, bool)
      or not isinstance(num_compilations, numbers.Integral)
      or num_compilations < 1
  ):
    raise ValueError(
        f'num_compilations must be an integer >= 1, got {num_compilations!r}'
    )
  sizes = np.asarray(list(batch_sizes))
  if sizes.size == 0:
    raise ValueError('batch_sizes must not be empty')
  if sizes.ndim != 1 or not np.issubdtype(sizes.dtype, np.integer):
    raise ValueError(
        f'batch_sizes must be integers, got dtype {sizes.dtype} and shape '
        f'{sizes.shape}'
    )
  if np.any(sizes < 0):
    raise ValueError(f'batch_sizes must be >= 0, got min {sizes.min()}')
  values, counts = np.unique(sizes, return_counts=True)
  values = values.astype(np.float64)
  num = len(values)
  k_max = min(int(num_compilations), num)
  # Padding all sizes in values[l+1 .. j] up to values[j]:
  # values[j] * (C[j+1] - C[l+1]) - (W[j+1] - W[l+1]).
  cum_count = np.concatenate([[0.0], np.cumsum(counts)])
  cum_weight = np.concatenate([[0.0], np.cumsum(counts * values)])

  def block_cost(first, last):  # first, last: arrays of inclusive bounds
    return values[last] * (cum_count[last + 1] - cum_count[first]) - (
        cum_weight[last + 1] - cum_weight[first]
    )

  idx = np.arange(num)
  # cost[k][j]: least padding for values[:j+1] with k+1 sizes, the last
  # being values[j]; parent[k][j]: the previous chosen index.
  cost = np.full((k_max, num), np.inf)
  parent = np.full((k_max, num), -1)
  cost[0] = block_cost(np.zeros(num, int), idx)
  for k in range(1, k_max):
    for j in range(k, num):
      previous = np.arange(k - 1, j)
      candidates = cost[k - 1, previous] + block_cost(
          previous + 1, np.full(len(previous), j)
      )
      best = int(np.argmin(candidates))
      cost[k, j] = candidates[best]
      parent[k, j] = previous[best]
  k = int(np.argmin(cost[:, num - 1]))
  chosen, j = set(), num - 1
  while j >= 0 and k >= 0:
    chosen.add(int(values[j]))
    j, k = parent[k, j], k - 1
  return chosen
