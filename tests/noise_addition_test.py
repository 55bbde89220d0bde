"""Tests for jax_privacy.noise_addition."""

import functools
import os
import re
import subprocess
import sys
import textwrap

import jax
from jax.extend import random as jex_random
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special
from scipy import stats

from jax_privacy import noise_addition

KS_REJECT = 1e-3
# A 2-D leaf, a 1-D leaf of odd length and a scalar; 110k values in all.
TREE_SHAPES = {'w': (317, 331), 'b': (331,), 's': ()}
NUM_VALUES = 317 * 331 + 331 + 1


def _tree(value=0.25, dtype=jnp.float32):
  return {k: jnp.full(s, value, dtype) for k, s in TREE_SHAPES.items()}


def _flat(tree):
  return np.concatenate(
      [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
  )


@functools.lru_cache(maxsize=None)
def _jitted(stddev=1.0, **kwargs):
  """One privatizer (and one compilation per tree shape) per setting."""
  privatizer = noise_addition.gaussian_privatizer(
      stddev=stddev, prng_key=jax.random.key(0), **kwargs
  )
  return privatizer, jax.jit(privatizer.update)


def _added_noise(grads, *, stddev=1.0, key=None, num_steps=1, **kwargs):
  """The noise added by each of the first `num_steps` updates, flattened.

  The key lives in the state, so one compiled update serves every key.
  """
  privatizer, update = _jitted(stddev, **kwargs)
  state = privatizer.init(grads)
  if key is not None:
    state = state._replace(key=key)
  draws = []
  for _ in range(num_steps):
    noisy, state = update(grads, state)
    draws.append(_flat(noisy) - _flat(grads))
  return draws


def _privatizer(stddev=1.0, seed=0, **kwargs):
  return noise_addition.gaussian_privatizer(
      stddev=stddev, prng_key=jax.random.key(seed), **kwargs
  )


@pytest.mark.parametrize('stddev', [0.3, 7.0])
def test_noise_passes_ks_at_the_right_stddev_and_fails_at_wrong_ones(stddev):
  (noise,) = _added_noise(_tree(), stddev=stddev)
  assert noise.size == NUM_VALUES
  assert stats.kstest(noise / stddev, 'norm').pvalue > KS_REJECT
  for wrong_factor in (0.67, 1.5):
    p_value = stats.kstest(noise / (wrong_factor * stddev), 'norm').pvalue
    assert p_value < KS_REJECT, wrong_factor


def test_noise_moments_and_symmetry():
  (noise,) = _added_noise(_tree(), key=jax.random.key(3))
  n = noise.size
  assert abs(noise.mean()) < 5 / np.sqrt(n)
  assert abs(noise.var() - 1.0) < 5 * np.sqrt(2.0 / n)
  assert abs(np.mean(noise > 0) - 0.5) < 5 * 0.5 / np.sqrt(n)
  assert abs(stats.kurtosis(noise)) < 5 * np.sqrt(24.0 / n)


def test_every_possible_draw_is_the_exact_normal_quantile():
  # A word with sign bit s and low 23 bits m maps to -+Phi^-1((2^23 + m + 1/2)
  # / 2^24). Checking all 2^24 words checks the whole output distribution.
  magnitudes = np.arange(2**23, dtype=np.uint32)
  to_normal = jax.jit(noise_addition._standard_normal_from_bits)
  positive = np.asarray(to_normal(magnitudes))
  negative = np.asarray(to_normal(magnitudes | np.uint32(2**31)))
  np.testing.assert_array_equal(negative, -positive)
  exact = special.ndtri(0.5 + (magnitudes + 0.5) / 2**24)
  relative_error = np.abs(positive - exact) / np.maximum(exact, 1e-3)
  assert relative_error.max() < 1e-5
  assert abs(positive.max() - 5.41998) < 1e-4  # Phi^-1(1 - 2^-25).
  assert abs(np.mean(positive.astype(np.float64) ** 2) - 1.0) < 1e-6


def test_threefry_hash_is_bitwise_jax_threefry():
  key = jax.random.key(17)
  counters = jnp.arange(10_001, dtype=jnp.uint32)
  high = jnp.full_like(counters, 3)
  ours = noise_addition._threefry2x32(jax.random.key_data(key), high, counters)
  key_words = jax.random.key_data(key)
  theirs = jex_random.threefry2x32_p.bind(
      key_words[0], key_words[1], high, counters
  )
  for our_words, their_words in zip(ours, theirs):
    np.testing.assert_array_equal(our_words, their_words)


@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg'])
@pytest.mark.parametrize('shape', [(), (1,), (7, 13), (2, 3, 1001)])
def test_draws_are_the_normal_quantiles_of_jax_random_bits(impl, shape):
  key = jax.random.key(21, impl=impl)
  draws = noise_addition._standard_normal(key, shape, jnp.float32)
  bits = jax.random.bits(key, shape, jnp.uint32)
  expected = noise_addition._standard_normal_from_bits(bits)
  np.testing.assert_array_equal(draws, expected)


def test_noise_is_the_documented_function_of_key_and_step():
  # Leaves in tree order: 'b' (331 values), 's' (1), 'w' (317 x 331). The
  # small float32 leaves b and s share one draw from b's key; w has its own.
  grads = _tree()
  _, second_step = _added_noise(grads, stddev=0.3, num_steps=2)
  keys = jax.random.split(jax.random.fold_in(jax.random.key(0), 1), 3)
  small = noise_addition._standard_normal_from_bits(
      jax.random.bits(keys[0], (332,), jnp.uint32)
  )
  big = noise_addition._standard_normal_from_bits(
      jax.random.bits(keys[2], TREE_SHAPES['w'], jnp.uint32)
  )
  expected = [0.3 * small[:331], 0.3 * small[331:], 0.3 * big]
  np.testing.assert_allclose(second_step, _flat(expected), atol=1e-6)


def test_small_leaves_share_one_draw_without_changing_the_distribution():
  specs = {f'leaf{i}': jax.ShapeDtypeStruct((64, 8), jnp.float32)
           for i in range(40)}
  specs['large'] = jax.ShapeDtypeStruct((300, 300), jnp.float32)
  draws = noise_addition._standard_normal_tree
  tree = draws(jax.random.key(3), specs)
  small = np.concatenate(
      [np.asarray(tree[f'leaf{i}']).ravel() for i in range(40)]
  )
  # Distinct leaves get distinct values (no key reuse across leaves).
  leaves = small.reshape(40, -1)
  assert np.abs(np.corrcoef(leaves)[np.triu_indices(40, 1)]).max() < 0.2
  for values in (small, np.asarray(tree['large']).ravel()):
    assert abs(values.mean()) < 4 / np.sqrt(values.size)
    assert abs(values.std() - 1) < 0.02
  other = draws(jax.random.key(4), specs)
  assert not np.allclose(tree['leaf0'], other['leaf0'])


def test_same_key_same_noise_different_key_different_noise():
  grads = _tree()
  first = _added_noise(grads, key=jax.random.key(7), num_steps=2)
  again = _added_noise(grads, key=jax.random.key(7), num_steps=2)
  other = _added_noise(grads, key=jax.random.key(8), num_steps=2)
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  assert not np.any(first[0] == other[0])


def test_key_of_the_factory_is_the_key_of_the_state():
  grads = _tree()
  for prng_key in (jax.random.key(5), jax.random.PRNGKey(5), np.uint32([0, 5])):
    state = noise_addition.gaussian_privatizer(
        stddev=1.0, prng_key=prng_key
    ).init(grads)
    np.testing.assert_array_equal(
        jax.random.key_data(state.key), jax.random.key_data(jax.random.key(5))
    )
    assert int(state.count) == 0


def test_noise_is_fresh_and_uncorrelated_across_steps():
  draws = _added_noise(_tree(), key=jax.random.key(1), num_steps=3)
  bound = 5 / np.sqrt(NUM_VALUES)
  for a, b in [(0, 1), (1, 2), (0, 2)]:
    assert abs(np.corrcoef(draws[a], draws[b])[0, 1]) < bound
    assert not np.any(draws[a] == draws[b])


def test_leaves_get_independent_noise():
  grads = {'a': jnp.zeros((300, 300)), 'b': jnp.zeros((300, 300))}
  (noise,) = _added_noise(grads, key=jax.random.key(2))
  a, b = noise[:90_000], noise[90_000:]
  assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)
  assert not np.any(a == b)


def test_state_resumes_the_noise_sequence():
  grads = _tree()
  run = _added_noise(grads, key=jax.random.key(11), num_steps=3)
  privatizer, update = _jitted()
  state = privatizer.init(grads)._replace(
      key=jax.random.key(11), count=jnp.int32(2)
  )
  noisy, state = update(grads, state)
  np.testing.assert_array_equal(_flat(noisy) - _flat(grads), run[2])
  assert int(state.count) == 3


def test_jit_and_eager_agree_and_the_input_is_kept():
  grads = {'w': jnp.linspace(-3.0, 3.0, 20_000).reshape(100, 200)}
  privatizer, update = _jitted(0.5)
  state = privatizer.init(grads)
  eager, _ = privatizer.update(grads, state)
  jitted, _ = update(grads, state)
  np.testing.assert_array_equal(eager['w'], jitted['w'])
  noise = np.asarray(eager['w'] - grads['w']).ravel()
  assert stats.kstest(noise / 0.5, 'norm').pvalue > KS_REJECT
  assert stats.kstest(noise / 0.75, 'norm').pvalue < KS_REJECT


@pytest.mark.parametrize('optimizer', [optax.sgd(0.1), optax.adam(1e-2)])
def test_chains_with_optax_optimizers(optimizer):
  params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
  grads = jax.tree.map(lambda p: 0.1 * p, params)

  def one_step(opt):
    @jax.jit
    def step(params, state):
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return step(params, opt.init(params))

  private_params, private_state = one_step(
      optax.chain(_privatizer(1.0), optimizer)
  )
  zero_noise, _ = one_step(optax.chain(_privatizer(0.0), optimizer))
  reference, _ = one_step(optimizer)
  assert int(private_state[0].count) == 1
  for name in params:
    np.testing.assert_array_equal(zero_noise[name], reference[name])
    assert np.all(np.isfinite(private_params[name]))
    assert not np.allclose(private_params[name], reference[name])


def test_stddev_zero_is_the_identity():
  grads = {'w': jax.random.normal(jax.random.key(0), (5, 7)), 'n': None}
  privatizer, update = _jitted(0.0)
  out, state = update(grads, privatizer.init(grads))
  np.testing.assert_array_equal(out['w'], grads['w'])
  assert out['n'] is None
  assert int(state.count) == 1


def test_low_precision_leaves_keep_their_dtype_and_get_float32_noise():
  grads = {
      'bf16': jnp.zeros((300, 300), jnp.bfloat16),
      'f16': jnp.zeros((300, 300), jnp.float16),
  }
  privatizer, update = _jitted()
  out, _ = update(grads, privatizer.init(grads))
  for name, dtype in [('bf16', jnp.bfloat16), ('f16', jnp.float16)]:
    assert out[name].dtype == dtype
    noise = np.asarray(out[name], np.float64).ravel()
    # Noise drawn natively in bf16 / f16 stays within 2.9 / 3.5 sigma; ours
    # is drawn in float32 and only the noisy sum is rounded.
    assert np.abs(noise).max() > 4.0, name
    assert abs(noise.std() - 1.0) < 0.01, name


@pytest.mark.parametrize(
    'leaf_dtype, dtype',
    [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16)],
)
def test_dtype_argument_sets_the_output_dtype(leaf_dtype, dtype):
  grads = {'w': jnp.zeros((200, 100), leaf_dtype)}
  privatizer, update = _jitted(dtype=dtype)
  out, _ = update(grads, privatizer.init(grads))
  assert out['w'].dtype == dtype
  noise = np.asarray(out['w'], np.float64).ravel()
  assert abs(noise.std() - 1.0) < 0.02
  assert np.abs(noise).max() > 3.5


def test_float64_noise_under_x64():
  with jax.enable_x64(True):
    grads = {'w': jnp.zeros((200, 100), jnp.float64)}
    privatizer = _privatizer(2.0)
    out, _ = jax.jit(privatizer.update)(grads, privatizer.init(grads))
    assert out['w'].dtype == jnp.float64
  noise = np.asarray(out['w']).ravel()
  assert stats.kstest(noise / 2.0, 'norm').pvalue > KS_REJECT
  assert stats.kstest(noise / 3.0, 'norm').pvalue < KS_REJECT


@pytest.mark.parametrize('impl', ['rbg', 'unsafe_rbg'])
def test_non_threefry_keys(impl):
  key = jax.random.key(0, impl=impl)
  privatizer = noise_addition.gaussian_privatizer(stddev=1.5, prng_key=key)
  grads = {'w': jnp.zeros((100, 201))}
  out, _ = jax.jit(privatizer.update)(grads, privatizer.init(grads))
  noise = np.asarray(out['w']).ravel()
  assert stats.kstest(noise / 1.5, 'norm').pvalue > KS_REJECT
  assert stats.kstest(noise / 1.0, 'norm').pvalue < KS_REJECT


def test_empty_and_scalar_leaves():
  grads = {'empty': jnp.zeros((0, 3)), 'scalar': jnp.float32(1.0)}
  privatizer, update = _jitted()
  out, _ = update(grads, privatizer.init(grads))
  assert out['empty'].shape == (0, 3)
  assert out['scalar'].shape == () and out['scalar'] != 1.0


def test_zero_strategy_matches_default_on_one_device():
  grads = _tree()
  (default,) = _added_noise(grads, key=jax.random.key(13))
  (zero,) = _added_noise(
      grads,
      key=jax.random.key(13),
      intermediate_strategy=noise_addition.SupportedStrategies.ZERO,
  )
  np.testing.assert_array_equal(default, zero)


_TWO_DEVICE_SCRIPT = textwrap.dedent(
    """
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jax_privacy import noise_addition as na
    mesh = Mesh(np.array(jax.devices()), ("d",))
    grads = jnp.zeros((1024, 512))
    reference = None
    for strategy, layout, spec in [
        ("DEFAULT", "replicated", P()),
        ("DEFAULT", "rows", P("d", None)),
        ("ZERO", "replicated", P()),
        ("ZERO", "columns", P(None, "d")),
    ]:
        p = na.gaussian_privatizer(
            stddev=1.0, prng_key=jax.random.key(0),
            intermediate_strategy=na.SupportedStrategies[strategy])
        g = jax.device_put(grads, NamedSharding(mesh, spec))
        update = jax.jit(p.update)
        hlo = update.lower(g, p.init(g)).compile().as_text()
        # The largest uint32 vector per device: the random words it draws.
        words = max(int(n) for n in re.findall(r"u32\\[(\\d+)\\]", hlo))
        out = np.asarray(update(g, p.init(g))[0])
        reference = out if reference is None else reference
        print(strategy, layout, words, np.array_equal(out, reference))
    """
)


def test_zero_strategy_draws_one_shard_per_device():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  env['JAX_PLATFORMS'] = 'cpu'
  result = subprocess.run(
      [sys.executable, '-c', _TWO_DEVICE_SCRIPT],
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert result.returncode == 0, result.stderr
  rows = re.findall(r'^(\w+) (\w+) (\d+) (\w+)$', result.stdout, re.MULTILINE)
  words = {(strategy, layout): int(n) for strategy, layout, n, _ in rows}
  assert all(same == 'True' for *_, same in rows), result.stdout
  full = 1024 * 512
  assert words == {
      ('DEFAULT', 'replicated'): full,
      ('DEFAULT', 'rows'): full // 2,
      ('ZERO', 'replicated'): full // 2,
      ('ZERO', 'columns'): full // 2,
  }


def test_gaussian_noise_like():
  tree = {
      'a': jnp.zeros((300, 300)),
      'b': jax.ShapeDtypeStruct((7,), jnp.bfloat16),
  }
  noise = jax.jit(
      lambda key, stddev: noise_addition.gaussian_noise_like(tree, key, stddev)
  )(jax.random.key(3), jnp.float32(2.0))
  assert noise['a'].dtype == jnp.float32 and noise['b'].dtype == jnp.float32
  assert noise['b'].shape == (7,)
  a = np.asarray(noise['a']).ravel()
  assert stats.kstest(a / 2.0, 'norm').pvalue > KS_REJECT
  assert stats.kstest(a / 3.0, 'norm').pvalue < KS_REJECT
  again = noise_addition.gaussian_noise_like(tree, jax.random.PRNGKey(3), 2.0)
  np.testing.assert_array_equal(noise['a'], again['a'])


@pytest.mark.parametrize(
    'stddev', [-1.0, -1e-12, float('nan'), float('inf'), '1', None]
)
def test_bad_stddev_is_refused_before_tracing(stddev):
  with pytest.raises(ValueError, match=r'stddev must be a finite number >= 0'):
    _privatizer(stddev)
  with pytest.raises(ValueError, match='stddev'):
    noise_addition.gaussian_noise_like(_tree(), jax.random.key(0), stddev)


def test_missing_key_is_refused_with_an_explanation():
  with pytest.raises(ValueError, match=r'prng_key.*jax\.random\.key\(seed\)'):
    noise_addition.gaussian_privatizer(stddev=1.0)
  with pytest.raises(ValueError, match='predictable'):
    noise_addition.gaussian_privatizer(stddev=1.0, prng_key=None)


@pytest.mark.parametrize(
    'prng_key, message',
    [
        (42, 'PRNG key'),
        (np.zeros(2, np.float32), 'PRNG key'),
        (jax.random.split(jax.random.key(0), 3), 'single key'),
    ],
)
def test_bad_key_is_refused(prng_key, message):
  with pytest.raises(ValueError, match=message):
    noise_addition.gaussian_privatizer(stddev=1.0, prng_key=prng_key)


@pytest.mark.parametrize(
    'kwargs, message',
    [
        ({'dtype': jnp.int32}, 'dtype must be a floating-point type'),
        ({'intermediate_strategy': 'ZERO'}, 'intermediate_strategy'),
    ],
)
def test_bad_options_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _privatizer(**kwargs)


def test_integer_leaves_are_refused():
  privatizer = _privatizer()
  grads = {'w': jnp.zeros(3, jnp.int32)}
  with pytest.raises(ValueError, match='floating-point'):
    privatizer.update(grads, privatizer.init(grads))
