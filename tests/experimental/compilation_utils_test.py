"""Tests of experimental.compilation_utils against brute force."""

import itertools

import numpy as np
import pytest

from jax_privacy.experimental import compilation_utils


def _padding(sizes, chosen):
  chosen = sorted(chosen)
  return sum(min(c for c in chosen if c >= s) - s for s in sizes)


def _brute_force_padding(sizes, k):
  values = sorted(set(sizes))
  best = None
  for r in range(0, min(k, len(values)) ):
    for subset in itertools.combinations(values[:-1], r):
      cost = _padding(sizes, set(subset) | {values[-1]})
      best = cost if best is None else min(best, cost)
  return best


@pytest.mark.parametrize('seed', range(8))
@pytest.mark.parametrize('k', [1, 2, 3, 5])
def test_matches_brute_force(seed, k):
  rng = np.random.default_rng(seed)
  sizes = rng.binomial(40, 0.3, size=30).tolist()
  chosen = compilation_utils.optimal_physical_batch_sizes(sizes, k)
  assert len(chosen) <= k
  assert max(chosen) == max(sizes)
  assert _padding(sizes, chosen) == _brute_force_padding(sizes, k)


def test_examples():
  assert compilation_utils.optimal_physical_batch_sizes([1, 2, 9, 10], 2) == {2, 10}
  assert compilation_utils.optimal_physical_batch_sizes([5, 5, 5], 4) == {5}
  assert compilation_utils.optimal_physical_batch_sizes([0, 3], 1) == {3}
  many = list(range(100))
  assert compilation_utils.optimal_physical_batch_sizes(many, 100) == set(many)


@pytest.mark.parametrize(
    'sizes, k, field',
    [
        ([], 2, 'batch_sizes'),
        ([1.5, 2.0], 2, 'batch_sizes'),
        ([-1, 2], 2, 'batch_sizes'),
        ([1, 2], 0, 'num_compilations'),
        ([1, 2], 1.0, 'num_compilations'),
    ],
)
def test_bad_input(sizes, k, field):
  with pytest.raises(ValueError, match=field):
    compilation_utils.optimal_physical_batch_sizes(sizes, k)
