"""Tests of noise_addition.matrix_factorization_privatizer.

The reference is computed independently in each test: the same standard
normal draws ``Z_s`` (from ``fold_in(key, s)``) multiplied by the explicit
dense ``C^{-1}`` with NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_privacy import noise_addition
from jax_privacy.matrix_factorization import banded
from jax_privacy.matrix_factorization import buffered_toeplitz
from jax_privacy.matrix_factorization import streaming_matrix
from jax_privacy.matrix_factorization import toeplitz
from jax_privacy.matrix_factorization import tree_aggregation

N = 6
KEY = jax.random.key(42)
PARAMS = {'w': jnp.zeros((3, 4)), 'b': jnp.zeros(5)}
STDDEV = 0.7


def _run(privatizer, steps, grads=PARAMS):
  state = privatizer.init(grads)
  update = jax.jit(privatizer.update)
  outputs = []
  for _ in range(steps):
    noisy, state = update(grads, state)
    outputs.append(noisy)
  return outputs, state


def _reference(noising, steps, key=KEY, params=PARAMS):
  """stddev * C^{-1} Z with Z_s the privatizer's standard normal trees."""
  specs = jax.tree.map(lambda g: jax.ShapeDtypeStruct(g.shape, g.dtype), params)
  draws = [
      noise_addition._standard_normal_tree(jax.random.fold_in(key, s), specs)
      for s in range(steps)
  ]
  return [
      jax.tree.map(
          lambda *zs: STDDEV
          * sum(
              noising[t, s] * np.asarray(z, np.float64)
              for s, z in enumerate(zs)
          ),
          *draws,
      )
      for t in range(steps)
  ]


def _assert_trees_close(actual, expected):
  for a, e in zip(actual, expected):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-5),
        a,
        e,
    )


_BLT = buffered_toeplitz.BufferedToeplitz(
    buf_decay=(0.9, 0.4), output_scale=(0.3, 0.2)
)
_BANDED = banded.ColumnNormalizedBanded.default(N, 3)


@pytest.mark.parametrize(
    'name, streaming, dense',
    [
        (
            'blt',
            _BLT.inverse_as_streaming_matrix(),
            np.linalg.inv(_BLT.materialize(N)),
        ),
        (
            'banded',
            _BANDED.inverse_as_streaming_matrix(),
            np.linalg.inv(_BANDED.materialize()),
        ),
        (
            'tree',
            tree_aggregation.inverse_as_streaming_matrix(N),
            np.linalg.inv(tree_aggregation.materialize(N)),
        ),
        (
            'toeplitz',
            toeplitz.inverse_as_streaming_matrix(
                toeplitz.optimal_max_error_strategy_coefs(4)
            ),
            np.linalg.inv(
                np.asarray(
                    toeplitz.materialize_lower_triangular(
                        toeplitz.optimal_max_error_strategy_coefs(4), N
                    )
                )
            ),
        ),
    ],
)
def test_streaming_and_dense_equal_explicit_matmul(name, streaming, dense):
  del name
  expected = _reference(dense, N)
  streamed, state = _run(
      noise_addition.matrix_factorization_privatizer(
          streaming, stddev=STDDEV, prng_key=KEY
      ),
      N,
  )
  _assert_trees_close(streamed, expected)
  assert int(state.count) == N
  densely, _ = _run(
      noise_addition.matrix_factorization_privatizer(
          dense, stddev=STDDEV, prng_key=KEY
      ),
      N,
  )
  _assert_trees_close(densely, expected)


def test_identity_equals_gaussian_privatizer_bitwise():
  grads = {'w': jnp.arange(12.0).reshape(3, 4), 'b': jnp.ones(5)}
  mf, _ = _run(
      noise_addition.matrix_factorization_privatizer(
          streaming_matrix.identity(), stddev=STDDEV, prng_key=KEY
      ),
      3,
      grads,
  )
  gaussian, _ = _run(
      noise_addition.gaussian_privatizer(stddev=STDDEV, prng_key=KEY), 3, grads
  )
  for a, b in zip(mf, gaussian):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  dense, _ = _run(
      noise_addition.matrix_factorization_privatizer(
          np.eye(3), stddev=STDDEV, prng_key=KEY
      ),
      3,
      grads,
  )
  for a, b in zip(dense, gaussian):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)


def test_zero_strategy_gives_the_same_noise():
  privatizers = [
      noise_addition.matrix_factorization_privatizer(
          _BLT.inverse_as_streaming_matrix(),
          stddev=STDDEV,
          prng_key=KEY,
          intermediate_strategy=strategy,
      )
      for strategy in noise_addition.SupportedStrategies
  ]
  default, zero = (_run(p, 3)[0] for p in privatizers)
  for a, b in zip(default, zero):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_noise_covariance_is_stddev_squared_m_m_transpose():
  noising = np.linalg.inv(_BLT.materialize(3))
  grads = {'x': jnp.zeros(200_000)}
  outputs, _ = _run(
      noise_addition.matrix_factorization_privatizer(
          _BLT.inverse_as_streaming_matrix(), stddev=STDDEV, prng_key=KEY
      ),
      3,
      grads,
  )
  samples = np.stack([np.asarray(o['x']) for o in outputs])
  covariance = samples @ samples.T / samples.shape[1]
  np.testing.assert_allclose(
      covariance, STDDEV**2 * noising @ noising.T, atol=0.01
  )


def test_chains_with_optax_and_dense_fails_loudly_past_n():
  optimizer = optax.chain(
      noise_addition.matrix_factorization_privatizer(
          np.eye(2), stddev=1.0, prng_key=KEY
      ),
      optax.sgd(0.1),
  )
  outputs, _ = _run(optimizer, 3)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(outputs[:2]))
  assert all(np.all(np.isnan(leaf)) for leaf in jax.tree.leaves(outputs[2]))


def test_bfloat16_gradients_get_float32_noise_rounded_once():
  grads = {'w': jnp.zeros(4, jnp.bfloat16)}
  outputs, _ = _run(
      noise_addition.matrix_factorization_privatizer(
          _BLT.inverse_as_streaming_matrix(), stddev=STDDEV, prng_key=KEY
      ),
      2,
      grads,
  )
  assert outputs[1]['w'].dtype == jnp.bfloat16
  expected = _reference(
      np.linalg.inv(_BLT.materialize(2)), 2, params={'w': jnp.zeros(4)}
  )
  np.testing.assert_allclose(
      np.asarray(outputs[1]['w'], np.float32),
      expected[1]['w'],
      rtol=1e-2,
      atol=1e-2,
  )


@pytest.mark.parametrize(
    'matrix, kwargs, field',
    [
        (np.triu(np.ones((3, 3))), {}, 'lower-triangular'),
        (np.diag([1.0, 0.0, 1.0]), {}, 'invertible'),
        (np.ones((2, 3)), {}, 'square'),
        (np.eye(2), {'stddev': -1.0}, 'stddev'),
        (np.eye(2), {'prng_key': None}, 'prng_key'),
        (np.eye(2), {'dtype': jnp.int32}, 'dtype'),
    ],
)
def test_bad_input_raises(matrix, kwargs, field):
  arguments = {'stddev': 1.0, 'prng_key': KEY, **kwargs}
  with pytest.raises(ValueError, match=field):
    noise_addition.matrix_factorization_privatizer(matrix, **arguments)


def test_tuple_containers_keep_their_leaves_apart():
  grads = (jnp.zeros(3), (jnp.zeros(2), jnp.zeros(4)))
  outputs, _ = _run(
      noise_addition.matrix_factorization_privatizer(
          _BLT.inverse_as_streaming_matrix(), stddev=STDDEV, prng_key=KEY
      ),
      3,
      grads,
  )
  expected = _reference(np.linalg.inv(_BLT.materialize(3)), 3, params=grads)
  _assert_trees_close(outputs, expected)
  assert jax.tree.structure(outputs[0]) == jax.tree.structure(grads)
