"""Tests of matrix_factorization.toeplitz against materialised matrices."""

import itertools

import numpy as np
import pytest

from jax_privacy.matrix_factorization import toeplitz


def _brute_force_sensitivity_squared(matrix, min_sep, max_participations):
  """Max over all min_sep-separated patterns of ||sum of columns||^2."""
  n = matrix.shape[1]
  best = 0.0
  for count in range(1, max_participations + 1):
    for pattern in itertools.combinations(range(n), count):
      if all(b - a >= min_sep for a, b in zip(pattern, pattern[1:])):
        best = max(best, float(np.sum(matrix[:, pattern].sum(axis=1) ** 2)))
  return best


def _random_coefs(n, seed=0):
  rng = np.random.default_rng(seed)
  return np.concatenate([[1.5], rng.normal(size=n - 1)])


def test_inverse_and_product_match_matrices():
  coef = _random_coefs(9)
  matrix = np.asarray(toeplitz.materialize_lower_triangular(coef), np.float64)
  assert np.allclose(np.triu(matrix, 1), 0)
  assert matrix[5, 2] == pytest.approx(coef[3], rel=1e-6)
  inverse = np.asarray(
      toeplitz.materialize_lower_triangular(toeplitz.inverse_coef(coef))
  )
  np.testing.assert_allclose(inverse @ matrix, np.eye(9), atol=1e-4)
  other = _random_coefs(9, seed=1)
  product = toeplitz.materialize_lower_triangular(
      toeplitz.multiply(coef, other)
  )
  expected = matrix @ np.asarray(toeplitz.materialize_lower_triangular(other))
  np.testing.assert_allclose(product, expected, rtol=1e-5, atol=1e-5)


def test_optimal_coefficients_are_square_root_of_prefix_sum():
  n = 12
  root = np.asarray(
      toeplitz.materialize_lower_triangular(
          toeplitz.optimal_max_error_strategy_coefs(n)
      ),
      np.float64,
  )
  np.testing.assert_allclose(root @ root, np.tril(np.ones((n, n))), atol=1e-6)
  noising = np.asarray(
      toeplitz.materialize_lower_triangular(
          toeplitz.optimal_max_error_noising_coefs(n)
      ),
      np.float64,
  )
  np.testing.assert_allclose(noising @ root, np.eye(n), atol=1e-6)
  # binom(2k, k) / 4^k for k = 3 is 20 / 64.
  assert toeplitz.optimal_max_error_strategy_coefs(4)[3] == pytest.approx(
      20 / 64
  )


def test_errors_and_sensitivity_match_materialised():
  n = 10
  coef = _random_coefs(n)
  matrix = np.asarray(toeplitz.materialize_lower_triangular(coef), np.float64)
  noise = np.tril(np.ones((n, n))) @ np.linalg.inv(matrix)
  np.testing.assert_allclose(
      toeplitz.per_query_error(strategy_coef=coef),
      np.sum(noise**2, axis=1),
      rtol=1e-4,
  )
  np.testing.assert_allclose(
      toeplitz.sensitivity_squared(coef),
      np.max(np.sum(matrix**2, axis=0)),
      rtol=1e-5,
  )
  workload = np.array([1.0, 0.5, 0.25])
  dense_workload = np.asarray(
      toeplitz.materialize_lower_triangular(workload, n)
  )
  np.testing.assert_allclose(
      toeplitz.per_query_error(strategy_coef=coef, workload_coef=workload),
      np.sum((dense_workload @ np.linalg.inv(matrix)) ** 2, axis=1),
      rtol=1e-4,
  )


@pytest.mark.parametrize(
    'min_sep, max_participations', [(1, 3), (2, 2), (3, 4), (4, 1)]
)
def test_minsep_sensitivity_matches_brute_force(min_sep, max_participations):
  n = 9
  coef = toeplitz.optimal_max_error_strategy_coefs(n)
  matrix = np.asarray(toeplitz.materialize_lower_triangular(coef), np.float64)
  expected = _brute_force_sensitivity_squared(
      matrix, min_sep, max_participations
  )
  value = toeplitz.minsep_sensitivity_squared(
      coef, min_sep=min_sep, max_participations=max_participations
  )
  assert float(value) == pytest.approx(expected, rel=1e-5)


def test_minsep_refuses_non_monotone_coefficients():
  with pytest.raises(ValueError, match='coef'):
    toeplitz.minsep_sensitivity_squared([1.0, 1.5, 0.2], min_sep=1)
  with pytest.raises(ValueError, match='coef'):
    toeplitz.minsep_sensitivity_squared([1.0, -0.5], min_sep=1)


def test_loss_and_streaming_inverse_and_solve():
  n = 16
  coef = np.array([1.0, 0.6, 0.3])
  np.testing.assert_allclose(toeplitz.loss(np.ones(1), n=n), n, rtol=1e-6)
  matrix = np.asarray(
      toeplitz.materialize_lower_triangular(coef, n), np.float64
  )
  inverse = toeplitz.inverse_as_streaming_matrix(coef).materialize(n)
  np.testing.assert_allclose(inverse, np.linalg.inv(matrix), atol=1e-5)
  rhs = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
  np.testing.assert_allclose(
      toeplitz.solve_banded(coef, rhs),
      np.linalg.solve(matrix, rhs),
      rtol=1e-4,
      atol=1e-4,
  )


@pytest.mark.slow
def test_optimized_banded_toeplitz_beats_baselines():
  n, bands = 32, 4
  coef = toeplitz.optimize_banded_toeplitz(n, bands, max_optimizer_steps=60)
  assert coef.shape == (bands,) and coef[0] == 1.0
  optimized = float(toeplitz.loss(coef, n=n, skip_checks=True))
  truncated = float(
      toeplitz.loss(toeplitz.optimal_max_error_strategy_coefs(bands), n=n)
  )
  assert optimized < truncated < n  # n is the identity's (DP-SGD) loss.


@pytest.mark.slow
def test_optimized_banded_toeplitz_multi_participation():
  # bands <= min_sep: the sensitivity is k ||c||^2 exactly, whatever the signs.
  n, bands = 32, 4
  multi = toeplitz.optimize_banded_toeplitz(
      n, bands, min_sep=8, max_participations=None, max_optimizer_steps=30
  )
  matrix = np.asarray(
      toeplitz.materialize_lower_triangular(multi, n), np.float64
  )
  assert np.sum(matrix[:, ::8].sum(axis=1) ** 2) == pytest.approx(
      4 * np.sum(multi**2)
  )


@pytest.mark.parametrize(
    'call, field',
    [
        (lambda: toeplitz.optimize_banded_toeplitz(4, 5), 'bands'),
        (
            lambda: toeplitz.optimize_banded_toeplitz(
                16, 4, min_sep=2, max_participations=3
            ),
            'bands',
        ),
        (
            lambda: toeplitz.optimize_banded_toeplitz(16, 2, error='median'),
            'error',
        ),
        (lambda: toeplitz.inverse_coef([0.0, 1.0]), 'coef'),
        (lambda: toeplitz.inverse_as_streaming_matrix([0.0, 1.0]), 'coef'),
        (lambda: toeplitz.per_query_error(), 'strategy_coef'),
        (
            lambda: toeplitz.minsep_sensitivity_squared([1.0], min_sep=0),
            'min_sep',
        ),
    ],
)
def test_bad_input_raises(call, field):
  with pytest.raises(ValueError, match=field):
    call()


@pytest.mark.slow
def test_optimize_coefs_for_amplifications_meets_the_budget():
  import dp_accounting  # pylint: disable=g-import-not-at-top
  from jax_privacy.experimental import accounting  # pylint: disable=g-import-not-at-top

  n, dataset_size, batch = 64, 6400, 100
  coefs, sigma = toeplitz.optimize_coefs_for_amplifications(
      n,
      dataset_size=dataset_size,
      expected_batch_size=batch,
      epsilon=2.0,
      delta=1e-5,
      max_bands=4,
      max_optimizer_steps=15,
  )
  bands = len(coefs)
  assert bands in (1, 2, 4) and coefs[0] == 1.0
  event = accounting.amplified_bandmf_event(
      sigma, n, num_bands=bands, sampling_prob=batch * bands / dataset_size
  )
  epsilon = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(1e-5)
  assert epsilon <= 2.0 + 1e-2
  assert epsilon > 1.9  # calibrated, not needlessly noisy.
