"""Tests of matrix_factorization.buffered_toeplitz: closed forms vs brute force."""

import itertools

import numpy as np
import pytest

from jax_privacy.matrix_factorization import buffered_toeplitz as blt_lib
from jax_privacy.matrix_factorization import toeplitz

BLT = blt_lib.BufferedToeplitz(
    buf_decay=(0.95, 0.6, 0.2), output_scale=(0.25, 0.2, 0.1)
)


def _brute_force_sensitivity_squared(matrix, min_sep, max_participations):
  n = matrix.shape[1]
  best = 0.0
  for count in range(1, max_participations + 1):
    for pattern in itertools.combinations(range(n), count):
      if all(b - a >= min_sep for a, b in zip(pattern, pattern[1:])):
        best = max(best, float(np.sum(matrix[:, pattern].sum(axis=1) ** 2)))
  return best


def _max_error_by_materialisation(matrix, min_sep, max_participations):
  n = matrix.shape[0]
  noise = np.tril(np.ones((n, n))) @ np.linalg.inv(matrix)
  variance = np.max(np.sum(noise**2, axis=1))
  return variance * _brute_force_sensitivity_squared(
      matrix, min_sep, max_participations
  )


def test_toeplitz_coefficients_match_definition_and_streaming():
  n = 12
  coef = BLT.toeplitz_coefs(n)
  expected = [1.0] + [
      sum(w * d ** (k - 1) for d, w in zip(BLT.buf_decay, BLT.output_scale))
      for k in range(1, n)
  ]
  np.testing.assert_allclose(coef, expected, rtol=1e-12)
  np.testing.assert_allclose(
      BLT.as_streaming_matrix().materialize(n), BLT.materialize(n), atol=1e-6
  )


def test_inverse_is_a_blt_and_inverts():
  n = 40
  inverse = BLT.inverse()
  assert len(inverse.buf_decay) == 3
  np.testing.assert_allclose(
      inverse.materialize(n) @ BLT.materialize(n), np.eye(n), atol=1e-10
  )
  np.testing.assert_allclose(
      BLT.inverse_as_streaming_matrix().materialize(n),
      np.linalg.inv(BLT.materialize(n)),
      atol=1e-5,
  )
  np.testing.assert_allclose(
      inverse.inverse().materialize(n), BLT.materialize(n), atol=1e-9
  )


@pytest.mark.parametrize(
    'min_sep, max_participations', [(1, 1), (3, 3), (2, 5)]
)
def test_sensitivity_and_max_error_match_brute_force(
    min_sep, max_participations
):
  n = 10
  matrix = BLT.materialize(n)
  assert blt_lib.sensitivity_squared(
      BLT, n, min_sep=min_sep, max_participations=max_participations
  ) == pytest.approx(
      _brute_force_sensitivity_squared(matrix, min_sep, max_participations)
  )
  assert blt_lib.max_error(
      BLT, n, min_sep=min_sep, max_participations=max_participations
  ) == pytest.approx(
      _max_error_by_materialisation(matrix, min_sep, max_participations),
      rel=1e-9,
  )


def test_limit_max_error_is_the_growth_rate():
  n = 200_000
  assert blt_lib.max_error(BLT, n) / n == pytest.approx(
      blt_lib.limit_max_error(BLT), rel=1e-3
  )


@pytest.mark.slow
def test_optimize_small_beats_identity_and_is_near_optimal_toeplitz():
  n = 64
  strategy = blt_lib.optimize(n=n, num_buffers=2, max_optimizer_steps=40)
  assert all(0 < d < 1 for d in strategy.buf_decay)
  assert (
      all(w > 0 for w in strategy.output_scale)
      and sum(strategy.output_scale) < 1
  )
  value = blt_lib.max_error(strategy, n)
  optimal = float(toeplitz.loss(toeplitz.optimal_max_error_strategy_coefs(n)))
  assert value < 0.5 * n  # identity (DP-SGD) max error is n.
  assert value < 1.1 * optimal


@pytest.mark.parametrize(
    'kwargs, field',
    [
        ({'buf_decay': (1.2,), 'output_scale': (0.1,)}, 'buf_decay'),
        ({'buf_decay': (-0.1,), 'output_scale': (0.1,)}, 'buf_decay'),
        ({'buf_decay': (0.5, 0.2), 'output_scale': (0.1,)}, 'output_scale'),
        ({'buf_decay': (np.nan,), 'output_scale': (0.1,)}, 'buf_decay'),
    ],
)
def test_bad_parameters_raise(kwargs, field):
  with pytest.raises(ValueError, match=field):
    blt_lib.BufferedToeplitz(**kwargs)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match='n'):
    BLT.toeplitz_coefs(0)
  with pytest.raises(ValueError, match='error'):
    blt_lib.optimize(n=8, error='median')
  with pytest.raises(ValueError, match='coef'):
    blt_lib.sensitivity_squared(
        blt_lib.BufferedToeplitz(buf_decay=(0.5,), output_scale=(1.5,)),
        8,
        min_sep=2,
        max_participations=2,
    )
