"""Tests for secure mode: gaussian_privatizer(..., secure=True)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from jax_privacy import _discrete_gaussian as dg
from jax_privacy import noise_addition

P_REJECT = 1e-4


def _tree(value=0.3):
  return {'w': jnp.full((200, 150), value, jnp.float32),
          'b': jnp.full((7,), -value, jnp.float32)}


def test_secure_mode_with_a_user_key_raises():
  with pytest.raises(ValueError, match='prng_key'):
    noise_addition.gaussian_privatizer(
        stddev=1.0, prng_key=jax.random.key(0), secure=True)


@pytest.mark.parametrize('stddev', [0.0, -1.0, math.inf, math.nan, True])
def test_secure_mode_bad_stddev(stddev):
  with pytest.raises(ValueError, match='stddev'):
    noise_addition.gaussian_privatizer(stddev=stddev, secure=True)


def test_secure_mode_bad_dtype():
  with pytest.raises(ValueError, match='dtype'):
    noise_addition.gaussian_privatizer(stddev=1.0, dtype=jnp.int32,
                                       secure=True)


def test_same_settings_give_different_noise():
  # Nothing seeds secure noise: two privatizers built identically, and two
  # steps of one, all draw different noise.
  tree = _tree()
  outs = []
  for _ in range(2):
    privatizer = noise_addition.gaussian_privatizer(stddev=1.0, secure=True)
    state = privatizer.init(tree)
    first, state = privatizer.update(tree, state)
    second, state = privatizer.update(tree, state)
    outs += [first['w'], second['w']]
    assert int(state.count) == 2
  for i in range(4):
    for j in range(i):
      assert not np.array_equal(outs[i], outs[j])


def test_default_mode_stays_reproducible():
  tree = {'w': jnp.zeros((50,))}
  runs = []
  for _ in range(2):
    privatizer = noise_addition.gaussian_privatizer(
        stddev=1.0, prng_key=jax.random.key(7))
    update = jax.jit(privatizer.update)
    runs.append(update(tree, privatizer.init(tree))[0]['w'])
  np.testing.assert_array_equal(runs[0], runs[1])


def test_noise_statistics_and_grid_under_jit():
  stddev = 2.0
  tree = _tree(0.3)
  privatizer = noise_addition.gaussian_privatizer(stddev=stddev, secure=True)
  update = jax.jit(privatizer.update)
  noisy, state = update(tree, privatizer.init(tree))
  noise = np.asarray(noisy['w'], np.float64).ravel() - 0.3
  n = noise.size
  assert abs(noise.mean()) < 4.5 * stddev / math.sqrt(n)
  # Variance of N_Z(0, 2^30) times grid^2 is stddev^2 up to ~exp(-2 pi^2 2^30).
  assert abs(noise.var() / stddev**2 - 1) < 4.5 * math.sqrt(2 / n)
  assert stats.kstest(noise / stddev, 'norm').pvalue > P_REJECT
  # Mironov's attack needs outputs whose floats depend on the input; here
  # every output is an integer multiple of the grid step.
  grid = stddev / 2**15
  steps = np.asarray(noisy['b'], np.float64) / grid
  np.testing.assert_array_equal(steps, np.rint(steps))
  assert int(state.count) == 1


def test_rounding_then_integer_noise():
  # With sigma^2 = 1 and stddev = 1 the grid step is 1: the output minus
  # round(x) is the integer noise.
  x = np.linspace(-3.4, 3.4, 40_000).astype(np.float32)
  privatizer = dg.secure_gaussian_privatizer(stddev=1.0, sigma_squared=1)
  noisy, _ = privatizer.update({'x': jnp.asarray(x)}, privatizer.init(None))
  noise = np.asarray(noisy['x'], np.float64) - np.rint(x)
  np.testing.assert_array_equal(noise, np.rint(noise))
  support = np.arange(-30, 31)
  variance = float(np.sum(support**2 * dg.discrete_gaussian_pmf(1, support)))
  assert abs(noise.var() - variance) < 4.5 * math.sqrt(2 * variance**2 / x.size)


def test_dtype_and_narrow_leaves():
  tree = {'h': jnp.ones((5,), jnp.bfloat16), 'f': jnp.ones((3,), jnp.float32)}
  privatizer = noise_addition.gaussian_privatizer(stddev=0.1, secure=True)
  noisy, _ = privatizer.update(tree, privatizer.init(tree))
  assert noisy['h'].dtype == jnp.bfloat16 and noisy['f'].dtype == jnp.float32
  as_f32 = noise_addition.gaussian_privatizer(
      stddev=0.1, secure=True, dtype=jnp.float32)
  noisy, _ = as_f32.update(tree, as_f32.init(tree))
  assert noisy['h'].dtype == jnp.float32


def test_secure_privatizer_in_optax_chain():
  params = {'w': jnp.zeros((4,))}
  optimizer = optax.chain(
      noise_addition.gaussian_privatizer(stddev=1.0, secure=True),
      optax.sgd(0.5))
  state = optimizer.init(params)
  updates, state = jax.jit(optimizer.update)(params, state, params)
  assert updates['w'].shape == (4,)
  assert np.all(np.isfinite(np.asarray(updates['w'])))
  assert np.any(np.asarray(updates['w']) != 0)
