"""Tests of matrix_factorization.sensitivity against brute force."""

import itertools

import numpy as np
import pytest

from jax_privacy.matrix_factorization import sensitivity


def _brute_force(matrix, patterns):
  gram = matrix.T @ matrix
  return max(float(np.abs(gram[np.ix_(p, p)]).sum()) for p in patterns)


def _minsep_patterns(n, min_sep, k):
  return [
      list(p)
      for count in range(1, k + 1)
      for p in itertools.combinations(range(n), count)
      if all(b - a >= min_sep for a, b in zip(p, p[1:]))
  ]


def _banded(n, bands, seed=0):
  rng = np.random.default_rng(seed)
  matrix = np.tril(rng.normal(size=(n, n)))
  matrix[np.tril_indices(n, -bands)] = 0.0
  matrix[np.diag_indices(n)] += 3.0
  return matrix


def test_single_participation_is_max_column_norm():
  matrix = _banded(6, 3)
  assert sensitivity.single_participation_sensitivity_squared(
      matrix
  ) == pytest.approx(np.max(np.sum(matrix**2, axis=0)))


@pytest.mark.parametrize('min_sep, k', [(3, 2), (4, 3), (5, 1)])
def test_banded_dynamic_program_matches_brute_force(min_sep, k):
  n = 11
  matrix = _banded(n, 3)
  assert sensitivity.bandwidth(matrix) == 3
  expected = _brute_force(matrix, _minsep_patterns(n, min_sep, k))
  assert sensitivity.banded_sensitivity_squared(
      matrix, min_sep=min_sep, max_participations=k
  ) == pytest.approx(expected)


def test_general_minsep_exact_and_bound():
  n, min_sep, k = 10, 2, 3
  matrix = np.tril(np.random.default_rng(1).normal(size=(n, n))) + 2 * np.eye(n)
  expected = _brute_force(matrix, _minsep_patterns(n, min_sep, k))
  exact = sensitivity.minsep_sensitivity_squared(
      matrix, min_sep=min_sep, max_participations=k, exact=True
  )
  assert exact == pytest.approx(expected)
  bound = sensitivity.minsep_sensitivity_squared(
      matrix, min_sep=min_sep, max_participations=k
  )
  assert bound >= exact


def test_fixed_epoch_matches_brute_force():
  n, epochs = 12, 3
  matrix = np.tril(np.abs(np.random.default_rng(2).normal(size=(n, n))))
  steps = n // epochs
  patterns = [list(range(r, n, steps)) for r in range(steps)]
  assert sensitivity.fixed_epoch_sensitivity_squared(
      matrix, epochs
  ) == pytest.approx(_brute_force(matrix, patterns))


def test_bad_input_raises():
  with pytest.raises(ValueError, match='epochs'):
    sensitivity.fixed_epoch_sensitivity_squared(np.eye(5), 2)
  with pytest.raises(ValueError, match='lower-triangular'):
    sensitivity.minsep_sensitivity_squared(np.ones((3, 3)), min_sep=1)
  with pytest.raises(ValueError, match='min_sep'):
    sensitivity.banded_sensitivity_squared(_banded(6, 3), min_sep=2)
  with pytest.raises(ValueError, match='n <='):
    sensitivity.minsep_sensitivity_squared(
        np.tril(np.ones((30, 30))), min_sep=1, max_participations=2, exact=True
    )


@pytest.mark.parametrize('seed, min_sep, k', [(3, 2, 3), (4, 3, 2), (5, 1, 4)])
def test_upper_bound_is_never_below_exact(seed, min_sep, k):
  n = 9
  matrix = np.tril(np.abs(np.random.default_rng(seed).normal(size=(n, n))))
  exact = _brute_force(matrix, _minsep_patterns(n, min_sep, k))
  bound = sensitivity.minsep_sensitivity_squared(
      matrix, min_sep=min_sep, max_participations=k
  )
  assert exact <= bound <= k * exact
