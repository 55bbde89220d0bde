"""Tests of matrix_factorization.banded (column-normalized BandMF)."""

import itertools

import numpy as np
import pytest

from jax_privacy.matrix_factorization import banded


def _strategy(n=10, bands=3, seed=0):
  rng = np.random.default_rng(seed)
  params = rng.normal(size=(n, bands))
  params[:, 0] = 2.0 + np.abs(params[:, 0])
  return banded.ColumnNormalizedBanded(params)


def test_materialize_is_banded_with_unit_columns():
  strategy = _strategy()
  matrix = strategy.materialize()
  np.testing.assert_allclose(np.linalg.norm(matrix, axis=0), 1.0, rtol=1e-12)
  assert np.all(np.triu(matrix, 1) == 0) and np.all(np.tril(matrix, -3) == 0)
  # Column j holds params[j, :] scaled to unit norm.
  column = strategy.params[2] / np.linalg.norm(strategy.params[2])
  np.testing.assert_allclose(matrix[2:5, 2], column, rtol=1e-12)


def test_inverse_streaming_and_errors_match_dense():
  strategy = _strategy()
  matrix = strategy.materialize()
  np.testing.assert_allclose(
      strategy.inverse_as_streaming_matrix().materialize(10),
      np.linalg.inv(matrix),
      atol=1e-5,
  )
  noise = np.tril(np.ones((10, 10))) @ np.linalg.inv(matrix)
  np.testing.assert_allclose(
      banded.per_query_error(strategy), np.sum(noise**2, axis=1), rtol=1e-10
  )
  workload = np.tril(np.random.default_rng(3).normal(size=(10, 10)))
  np.testing.assert_allclose(
      banded.per_query_error(strategy, workload),
      np.sum((workload @ np.linalg.inv(matrix)) ** 2, axis=1),
      rtol=1e-9,
  )


@pytest.mark.parametrize(
    'min_sep, k, expected', [(3, 2, 2.0), (4, None, 3.0), (5, 5, 2.0)]
)
def test_sensitivity_is_participation_count_and_matches_brute_force(
    min_sep, k, expected
):
  strategy = _strategy()
  matrix = strategy.materialize()
  limit = k or 10
  brute = max(
      float(np.sum(matrix[:, list(p)].sum(axis=1) ** 2))
      for count in range(1, limit + 1)
      for p in itertools.combinations(range(10), count)
      if all(b - a >= min_sep for a, b in zip(p, p[1:]))
  )
  value = banded.minsep_sensitivity_squared(
      strategy, min_sep=min_sep, max_participations=k
  )
  assert value == pytest.approx(expected) and value == pytest.approx(brute)


@pytest.mark.slow
def test_optimize_beats_default_and_identity():
  n, bands = 16, 3
  strategy = banded.optimize(n, bands=bands, max_optimizer_steps=25)
  assert strategy.params.shape == (n, bands)
  optimized = banded.per_query_error(strategy).mean()
  default = banded.per_query_error(
      banded.ColumnNormalizedBanded.default(n, bands)
  ).mean()
  identity = banded.per_query_error(
      banded.ColumnNormalizedBanded(np.ones((n, 1)))
  ).mean()
  assert optimized < default < identity


@pytest.mark.parametrize(
    'call, field',
    [
        (lambda: banded.ColumnNormalizedBanded(np.zeros((4, 2))), 'params'),
        (lambda: banded.ColumnNormalizedBanded(np.ones((2, 3))), 'params'),
        (lambda: banded.ColumnNormalizedBanded.default(4, 5), 'bands'),
        (lambda: banded.optimize(4, bands=5), 'bands'),
        (lambda: banded.optimize(8, bands=3, min_sep=2), 'bands'),
        (lambda: banded.optimize(8, bands=2, error='median'), 'error'),
    ],
)
def test_bad_input_raises(call, field):
  with pytest.raises(ValueError, match=field):
    call()
