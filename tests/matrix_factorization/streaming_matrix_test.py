"""Tests of matrix_factorization.streaming_matrix against dense matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_privacy.matrix_factorization import streaming_matrix as sm

N = 7


def _momentum_dense(n, momentum, rates):
  matrix = np.zeros((n, n))
  for t in range(n):
    for s in range(t + 1):
      matrix[t, s] = sum(
          rates[r] * momentum ** (r - s) for r in range(s, t + 1)
      )
  return matrix


@pytest.mark.parametrize(
    'matrix, expected',
    [
        (sm.identity(), np.eye(N)),
        (sm.prefix_sum(), np.tril(np.ones((N, N)))),
        (sm.diagonal(np.arange(1.0, N + 1)), np.diag(np.arange(1.0, N + 1))),
        (sm.momentum_sgd_matrix(0.0), np.tril(np.ones((N, N)))),
        (sm.momentum_sgd_matrix(0.5), _momentum_dense(N, 0.5, np.ones(N))),
        (
            sm.momentum_sgd_matrix(0.9, np.linspace(1.0, 0.2, N)),
            _momentum_dense(N, 0.9, np.linspace(1.0, 0.2, N)),
        ),
    ],
)
def test_materialize_matches_dense(matrix, expected):
  np.testing.assert_allclose(
      matrix.materialize(N), expected, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
      matrix.row_norms_squared(N), np.sum(expected**2, axis=1), rtol=1e-5
  )


def test_scale_rows_and_columns():
  rows, cols = np.arange(1.0, N + 1), np.linspace(2.0, 0.5, N)
  scaled = sm.scale_rows_and_columns(sm.prefix_sum(), rows, cols)
  expected = np.diag(rows) @ np.tril(np.ones((N, N))) @ np.diag(cols)
  np.testing.assert_allclose(scaled.materialize(N), expected, rtol=1e-5)


def test_product_of_streaming_matrices():
  first, second = sm.momentum_sgd_matrix(0.7), sm.diagonal(
      np.arange(1.0, N + 1)
  )
  product = sm.multiply_streaming_matrices(first, second)
  expected = first.materialize(N) @ second.materialize(N)
  np.testing.assert_allclose(product.materialize(N), expected, rtol=1e-5)
  np.testing.assert_allclose(
      (first @ second).materialize(N), expected, rtol=1e-5
  )


def test_multiply_array_and_pytrees():
  rng = np.random.default_rng(0)
  array = rng.normal(size=(N, 3, 2)).astype(np.float32)
  matrix = sm.momentum_sgd_matrix(0.5)
  dense = np.asarray(matrix.materialize(N))
  expected = np.einsum('ts,sij->tij', dense, array)
  np.testing.assert_allclose(
      sm.multiply_array(matrix, array), expected, rtol=1e-5, atol=1e-5
  )
  # A pytree stream gives the same per-leaf result under jit.
  state = matrix.init_multiply({'a': jnp.zeros((3, 2)), 'b': jnp.zeros(4)})
  step = jax.jit(matrix.multiply_next)
  for t in range(N):
    y, state = step({'a': array[t], 'b': jnp.full(4, float(t))}, state)
  np.testing.assert_allclose(y['a'], expected[-1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      y['b'], np.full(4, dense[-1] @ np.arange(N)), rtol=1e-5
  )


def test_finite_tables_give_nan_past_their_end():
  outputs = sm.multiply_array(sm.diagonal([1.0, 2.0]), jnp.ones((3, 2)))
  np.testing.assert_array_equal(outputs[:2], [[1.0, 1.0], [2.0, 2.0]])
  assert np.all(np.isnan(outputs[2]))


@pytest.mark.parametrize(
    'build, field',
    [
        (lambda: sm.diagonal(np.ones((2, 2))), 'diag'),
        (lambda: sm.diagonal([1.0, np.nan]), 'diag'),
        (lambda: sm.momentum_sgd_matrix(1.0), 'momentum'),
        (lambda: sm.momentum_sgd_matrix(-0.1), 'momentum'),
        (lambda: sm.scale_rows_and_columns(sm.identity(), []), 'row_scale'),
        (lambda: sm.StreamingMatrix(1, lambda x, s: (x, s)), 'init_multiply'),
        (lambda: sm.identity().materialize(0), 'n'),
    ],
)
def test_bad_input_raises_naming_the_field(build, field):
  with pytest.raises(ValueError, match=field):
    build()
