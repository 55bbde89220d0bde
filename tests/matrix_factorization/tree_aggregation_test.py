"""Tests of matrix_factorization.tree_aggregation (DP-FTRL binary tree)."""

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jax_privacy.matrix_factorization import tree_aggregation as tree


def test_streaming_matches_dense_and_inverse():
  n = 21
  matrix = tree.materialize(n)
  np.testing.assert_array_equal(
      tree.strategy_as_streaming_matrix(n).materialize(n), matrix
  )
  np.testing.assert_allclose(
      tree.inverse_as_streaming_matrix(n).materialize(n),
      np.linalg.inv(matrix),
      atol=1e-6,
  )


def test_prefix_noise_is_a_sum_of_dyadic_blocks():
  n = 16
  noise = np.tril(np.ones((n, n))) @ np.linalg.inv(tree.materialize(n))
  np.testing.assert_allclose(noise, np.round(noise), atol=1e-9)
  assert set(np.round(noise).ravel()) <= {0.0, 1.0}
  # Query t adds one block noise per set bit of t + 1.
  np.testing.assert_array_equal(
      noise.sum(axis=1), [bin(t + 1).count('1') for t in range(n)]
  )


@pytest.mark.parametrize('n', [1, 7, 8, 20])
def test_single_participation_sensitivity(n):
  matrix = tree.materialize(n)
  expected = np.max(np.sum(matrix**2, axis=0))
  assert tree.sensitivity_squared(n) == expected
  assert expected <= math.ceil(math.log2(n + 1))


def test_multi_participation_sensitivity_matches_brute_force():
  n, min_sep, k = 12, 3, 3
  matrix = tree.materialize(n)
  best = max(
      float(np.sum(matrix[:, list(p)].sum(axis=1) ** 2))
      for count in range(1, k + 1)
      for p in itertools.combinations(range(n), count)
      if all(b - a >= min_sep for a, b in zip(p, p[1:]))
  )
  assert (
      tree.sensitivity_squared(n, min_sep=min_sep, max_participations=k) == best
  )


def test_steps_past_n_are_nan_and_bad_n_raises():
  outputs = tree.inverse_as_streaming_matrix(3).init_multiply(jnp.zeros(2))
  matrix = tree.inverse_as_streaming_matrix(3)
  state = outputs
  for _ in range(3):
    y, state = matrix.multiply_next(jnp.ones(2), state)
    assert np.all(np.isfinite(y))
  y, _ = matrix.multiply_next(jnp.ones(2), state)
  assert np.all(np.isnan(y))
  with pytest.raises(ValueError, match='n'):
    tree.materialize(0)
