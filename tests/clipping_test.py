"""Tests of jax_privacy.clipping: sensitivity, equivalences, options, errors."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_privacy import clipping

Relation = dp_accounting.NeighboringRelation


def _mlp_params(key, d_in=5, d_hidden=7, d_out=3, dtype=jnp.float32):
  k1, k2 = jax.random.split(key)
  return {
      'dense1': {
          'w': jax.random.normal(k1, (d_in, d_hidden), dtype),
          'b': jnp.zeros((d_hidden,), dtype),
      },
      'dense2': {
          'w': jax.random.normal(k2, (d_hidden, d_out), dtype),
          'b': jnp.zeros((d_out,), dtype),
      },
  }


def _mlp_loss(params, x, y):
  h = jnp.tanh(x @ params['dense1']['w'] + params['dense1']['b'])
  out = h @ params['dense2']['w'] + params['dense2']['b']
  return jnp.sum((out - y) ** 2)


def _batch(key, size, scale=10.0, dtype=jnp.float32, d_in=5, d_out=3):
  kx, ky = jax.random.split(key)
  x = scale * jax.random.normal(kx, (size, d_in), dtype)
  y = scale * jax.random.normal(ky, (size, d_out), dtype)
  return x, y


def _tree_norm(tree):
  return float(
      np.sqrt(
          sum(
              np.sum(np.square(np.asarray(leaf, np.float64)))
              for leaf in jax.tree_util.tree_leaves(tree)
          )
      )
  )


def _tree_sub(a, b):
  return jax.tree_util.tree_map(
      lambda u, v: np.asarray(u, np.float64) - np.asarray(v, np.float64), a, b
  )


def _single_example_grads(loss, params, x, y):
  return [
      jax.grad(loss)(params, x[i : i + 1], y[i : i + 1])
      for i in range(x.shape[0])
  ]


OPTIONS = [
    dict(),
    dict(microbatch_size=3),
    dict(microbatch_size=1),
    dict(rescale_to_unit_norm=True),
    dict(normalize_by=4.0),
    dict(rescale_to_unit_norm=True, microbatch_size=4, normalize_by=2.5),
]


@pytest.mark.parametrize('seed, padding', [(0, False), (1, True)])
@pytest.mark.parametrize('options', OPTIONS)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
def test_empirical_sensitivity_within_bound(seed, padding, options, dtype):
  key = jax.random.key(seed)
  params = _mlp_params(key, dtype=dtype)
  x, y = _batch(jax.random.fold_in(key, 1), 9, dtype=dtype)
  x_other, y_other = _batch(jax.random.fold_in(key, 2), 1, dtype=dtype)
  clipped = clipping.clipped_grad(
      _mlp_loss, l2_clip_norm=0.7, batch_argnums=(1, 2), **options
  )
  fn = jax.jit(clipped)
  mask = np.zeros(9, bool)
  if padding:  # a padding slot must not change anything
    mask[2] = True
  base = fn(params, x, y, is_padding_example=mask)
  bound = clipped.sensitivity(Relation.ADD_OR_REMOVE_ONE)
  rtol = 1e-5

  removed = fn(params, x[:-1], y[:-1], is_padding_example=mask[:-1])
  diff = _tree_norm(_tree_sub(base, removed))
  assert diff <= bound * (1 + rtol)
  # The removed example's gradient is far larger than the clip norm, so its
  # clipped contribution has exactly the bound's norm: the bound is tight.
  assert diff == pytest.approx(bound, rel=2e-3)

  zeroed_mask = mask.copy()
  zeroed_mask[-1] = True
  zeroed = fn(params, x, y, is_padding_example=zeroed_mask)
  diff = _tree_norm(_tree_sub(base, zeroed))
  assert diff <= clipped.sensitivity(Relation.REPLACE_SPECIAL) * (1 + rtol)
  assert diff == pytest.approx(bound, rel=2e-3)

  replaced = fn(
      params,
      x.at[-1].set(x_other[0]),
      y.at[-1].set(y_other[0]),
      is_padding_example=mask,
  )
  diff = _tree_norm(_tree_sub(base, replaced))
  assert diff <= clipped.sensitivity(Relation.REPLACE_ONE) * (1 + rtol)
  assert diff > bound  # two different clipped gradients: more than one bound


def test_sensitivity_values():
  fn = clipping.clipped_grad(_mlp_loss, l2_clip_norm=2.0, normalize_by=4.0)
  assert fn.sensitivity() == 0.5
  assert fn.sensitivity(Relation.ADD_OR_REMOVE_ONE) == 0.5
  assert fn.sensitivity(Relation.REPLACE_ONE) == 1.0
  unit = clipping.clipped_grad(
      _mlp_loss, l2_clip_norm=2.0, rescale_to_unit_norm=True, normalize_by=4.0
  )
  assert unit.sensitivity() == 0.25
  assert isinstance(fn, clipping.BoundedSensitivityCallable)
  assert fn.l2_norm_bound == 0.5


@pytest.mark.parametrize('clip_norm', [0.1, 1.0, 1e6])
@pytest.mark.parametrize('microbatch_size', [None, 2, 5])
def test_matches_loop_of_single_example_gradients(clip_norm, microbatch_size):
  key = jax.random.key(3)
  params = _mlp_params(key)
  x, y = _batch(jax.random.fold_in(key, 1), 7, scale=1.0)
  fn = clipping.clipped_grad(
      _mlp_loss,
      l2_clip_norm=clip_norm,
      batch_argnums=(1, 2),
      return_grad_norms=True,
      return_values=True,
      microbatch_size=microbatch_size,
  )
  summed, aux = fn(params, x, y)
  grads = _single_example_grads(_mlp_loss, params, x, y)
  norms = [_tree_norm(g) for g in grads]
  np.testing.assert_allclose(aux.grad_norms, norms, rtol=1e-5)
  values = [_mlp_loss(params, x[i : i + 1], y[i : i + 1]) for i in range(7)]
  np.testing.assert_allclose(aux.values, values, rtol=1e-5)
  expected = jax.tree_util.tree_map(
      lambda *gs: sum(
          g * min(1.0, clip_norm / n) for g, n in zip(gs, norms)
      ),
      *grads,
  )
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      summed,
      expected,
  )


def test_clipping_is_global_over_the_pytree_not_per_leaf():
  def loss(params, x):
    return jnp.sum(params['a'] * x[:, :2]) + jnp.sum(params['b'] * x[:, 2:])

  params = {'a': jnp.zeros(2), 'b': jnp.zeros(2)}
  x = jnp.array([[3.0, 4.0, 3.0, 4.0]])  # leaf norms 5 and 5, global 5*sqrt2
  summed = clipping.clipped_grad(loss, l2_clip_norm=1.0)(params, x)
  assert _tree_norm(summed) == pytest.approx(1.0, rel=1e-6)
  np.testing.assert_allclose(summed['a'], [3 / 50**0.5, 4 / 50**0.5], rtol=1e-6)


def test_rescale_to_unit_norm_divides_by_clip_norm():
  params = _mlp_params(jax.random.key(0))
  x, y = _batch(jax.random.key(1), 4)
  plain = clipping.clipped_grad(_mlp_loss, l2_clip_norm=3.0, batch_argnums=(1, 2))
  unit = clipping.clipped_grad(
      _mlp_loss, l2_clip_norm=3.0, batch_argnums=(1, 2), rescale_to_unit_norm=True
  )
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a / 3.0, b, rtol=1e-6),
      plain(params, x, y),
      unit(params, x, y),
  )


@pytest.mark.parametrize('bad', [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize('microbatch_size', [None, 2])
def test_non_finite_examples_contribute_zero_when_nan_safe(bad, microbatch_size):
  params = _mlp_params(jax.random.key(0))
  x, y = _batch(jax.random.key(1), 5)
  poisoned = x.at[1, 0].set(bad)
  fn = clipping.clipped_grad(
      _mlp_loss,
      l2_clip_norm=1.0,
      batch_argnums=(1, 2),
      microbatch_size=microbatch_size,
  )
  with_bad = fn(params, poisoned, y)
  without = fn(params, x, y, is_padding_example=np.array([0, 1, 0, 0, 0], bool))
  for leaf in jax.tree_util.tree_leaves(with_bad):
    assert np.all(np.isfinite(leaf))
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      with_bad,
      without,
  )
  unsafe = clipping.clipped_grad(
      _mlp_loss, l2_clip_norm=1.0, batch_argnums=(1, 2), nan_safe=False
  )(params, poisoned, y)
  assert not all(
      np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(unsafe)
  )


def test_padding_contributes_exactly_zero():
  params = _mlp_params(jax.random.key(0))
  x, y = _batch(jax.random.key(1), 6)
  fn = clipping.clipped_grad(_mlp_loss, l2_clip_norm=1.0, batch_argnums=(1, 2))
  mask = np.array([0, 0, 0, 1, 1, 1], bool)
  padded = fn(params, x, y, is_padding_example=mask)
  real = fn(params, x[:3], y[:3])
  jax.tree_util.tree_map(np.testing.assert_array_equal, padded, real)


def test_per_group_clipping_without_batch_dim():
  """keep_batch_dim=False with [users, k, ...] inputs clips per user."""
  params = _mlp_params(jax.random.key(0))
  x, y = _batch(jax.random.key(1), 12)
  x_users, y_users = x.reshape(4, 3, 5), y.reshape(4, 3, 3)
  fn = clipping.clipped_grad(
      _mlp_loss,
      l2_clip_norm=0.5,
      batch_argnums=(1, 2),
      keep_batch_dim=False,
      return_grad_norms=True,
  )
  summed, aux = fn(params, x_users, y_users)
  user_grads = [
      jax.grad(_mlp_loss)(params, x_users[u], y_users[u]) for u in range(4)
  ]
  np.testing.assert_allclose(
      aux.grad_norms, [_tree_norm(g) for g in user_grads], rtol=1e-5
  )
  # Removing one user moves the sum by at most the bound, however many
  # examples the user has.
  removed = fn(params, x_users[:-1], y_users[:-1])[0]
  diff = _tree_norm(_tree_sub(summed, removed))
  assert diff == pytest.approx(fn.sensitivity(), rel=1e-4)


def test_has_aux_and_argnums_tuple():
  def loss(w, b, x):
    out = x @ w + b
    return jnp.sum(out**2), {'out': out}

  w, b = jnp.ones((3, 2)), jnp.ones(2)
  x = jnp.arange(12.0).reshape(4, 3)
  fn = clipping.clipped_grad(
      loss, argnums=(0, 1), has_aux=True, l2_clip_norm=1.0, batch_argnums=2
  )
  (gw, gb), aux = fn(w, b, x)
  assert aux.aux['out'].shape == (4, 1, 2)
  assert aux.values is None and aux.grad_norms is None
  assert _tree_norm((gw, gb)) <= 4.0 + 1e-5
  for i in range(4):
    g = jax.grad(lambda w, b: loss(w, b, x[i : i + 1])[0], argnums=(0, 1))(w, b)
    assert _tree_norm(g) > 1.0  # every example is clipped
  assert fn.has_aux


def test_pre_clipping_transform_applied_before_clipping():
  params = _mlp_params(jax.random.key(0))
  x, y = _batch(jax.random.key(1), 3, scale=0.01)
  fn = clipping.clipped_grad(
      _mlp_loss,
      l2_clip_norm=1.0,
      batch_argnums=(1, 2),
      pre_clipping_transform=lambda g: jax.tree_util.tree_map(
          lambda v: v * 1e6, g
      ),
      return_grad_norms=True,
  )
  summed, aux = fn(params, x, y)
  raw = [_tree_norm(g) for g in _single_example_grads(_mlp_loss, params, x, y)]
  np.testing.assert_allclose(aux.grad_norms, np.array(raw) * 1e6, rtol=1e-4)
  assert _tree_norm(summed) <= 3.0 + 1e-5


def test_prng_argnum_gives_each_example_its_own_key():
  def loss(params, x, key):
    return jnp.sum(params * x) * jax.random.uniform(key)

  params = jnp.ones(2)
  x = jnp.ones((6, 2))
  fn = clipping.clipped_grad(
      loss, l2_clip_norm=100.0, batch_argnums=1, prng_argnum=2, return_values=True
  )
  _, aux = fn(params, x, jax.random.key(0))
  assert len(set(np.round(np.asarray(aux.values), 6))) == 6
  chunked = clipping.clipped_grad(
      loss,
      l2_clip_norm=100.0,
      batch_argnums=1,
      prng_argnum=2,
      return_values=True,
      microbatch_size=4,
  )
  _, aux_chunked = chunked(params, x, jax.random.key(0))
  np.testing.assert_allclose(aux.values, aux_chunked.values, rtol=1e-6)
  _, again = fn(params, x, jax.random.key(0))
  np.testing.assert_array_equal(aux.values, again.values)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_dtype_sets_the_accumulation_dtype(dtype):
  params = _mlp_params(jax.random.key(0), dtype=jnp.bfloat16)
  x, y = _batch(jax.random.key(1), 4, dtype=jnp.bfloat16)
  default = clipping.clipped_grad(_mlp_loss, l2_clip_norm=1.0, batch_argnums=(1, 2))
  for leaf in jax.tree_util.tree_leaves(default(params, x, y)):
    assert leaf.dtype == jnp.float32
  explicit = clipping.clipped_grad(
      _mlp_loss, l2_clip_norm=1.0, batch_argnums=(1, 2), dtype=dtype
  )
  for leaf in jax.tree_util.tree_leaves(explicit(params, x, y)):
    assert leaf.dtype == dtype


def test_empty_batch_gives_zeros():
  params = _mlp_params(jax.random.key(0))
  x, y = _batch(jax.random.key(1), 0)
  summed = clipping.clipped_grad(_mlp_loss, l2_clip_norm=1.0, batch_argnums=(1, 2))(
      params, x, y
  )
  assert _tree_norm(summed) == 0.0


def test_clipped_fun_bounds_outputs():
  def stat(x):
    return {'v': x[0] * 10.0}

  x = jax.random.normal(jax.random.key(0), (8, 4))
  fn = clipping.clipped_fun(stat, l2_clip_norm=2.0, return_norms=True)
  summed, aux = fn(x)
  np.testing.assert_allclose(
      aux.grad_norms, np.linalg.norm(np.asarray(x) * 10.0, axis=1), rtol=1e-5
  )
  expected = sum(
      np.asarray(x[i]) * 10.0 * min(1.0, 2.0 / float(aux.grad_norms[i]))
      for i in range(8)
  )
  np.testing.assert_allclose(summed['v'], expected, rtol=1e-5)
  assert fn.sensitivity() == 2.0
  removed = fn(x[:-1])[0]
  assert _tree_norm(_tree_sub(summed, removed)) == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize('rescale', [False, True])
def test_clip_pytree(rescale):
  tree = {'a': jnp.array([3.0, 0.0]), 'b': jnp.array([[4.0]])}
  clipped, norm = clipping.clip_pytree(tree, 2.0, rescale_to_unit_norm=rescale)
  assert float(norm) == pytest.approx(5.0)
  expected = 1.0 if rescale else 2.0
  assert _tree_norm(clipped) == pytest.approx(expected, rel=1e-6)
  small, _ = clipping.clip_pytree(tree, 10.0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, small, tree)
  zero, norm = clipping.clip_pytree(tree, 2.0, return_zero=True)
  assert _tree_norm(zero) == 0.0 and float(norm) == pytest.approx(5.0)
  nan_tree = {'a': jnp.array([jnp.nan, 1.0])}
  safe, _ = clipping.clip_pytree(nan_tree, 1.0)
  np.testing.assert_array_equal(safe['a'], [0.0, 0.0])
  unsafe, _ = clipping.clip_pytree(nan_tree, 1.0, nan_safe=False)
  assert np.isnan(unsafe['a'][0])


def test_clip_pytree_under_jit_with_traced_norm():
  tree = {'a': jnp.array([3.0, 4.0])}
  clipped, _ = jax.jit(clipping.clip_pytree)(tree, jnp.float32(1.0))
  assert _tree_norm(clipped) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize(
    'kwargs, field',
    [
        (dict(l2_clip_norm=-1.0), 'l2_clip_norm'),
        (dict(l2_clip_norm=0.0), 'l2_clip_norm'),
        (dict(l2_clip_norm=float('nan')), 'l2_clip_norm'),
        (dict(l2_clip_norm='1'), 'l2_clip_norm'),
        (dict(l2_clip_norm=1.0, normalize_by=0.0), 'normalize_by'),
        (dict(l2_clip_norm=1.0, normalize_by=float('nan')), 'normalize_by'),
        (dict(l2_clip_norm=1.0, microbatch_size=0), 'microbatch_size'),
        (dict(l2_clip_norm=1.0, microbatch_size=2.5), 'microbatch_size'),
        (dict(l2_clip_norm=1.0, batch_argnums=-1), 'batch_argnums'),
        (dict(l2_clip_norm=1.0, batch_argnums=1, prng_argnum=1), 'prng_argnum'),
        (dict(l2_clip_norm=1.0, argnums=1, batch_argnums=1), 'argnums'),
        (
            dict(l2_clip_norm=float('inf'), rescale_to_unit_norm=True),
            'rescale_to_unit_norm',
        ),
    ],
)
def test_bad_settings_raise_before_tracing(kwargs, field):
  with pytest.raises(ValueError, match=field):
    clipping.clipped_grad(_mlp_loss, **kwargs)


def test_bad_call_arguments_raise_clear_errors():
  params = _mlp_params(jax.random.key(0))
  x, y = _batch(jax.random.key(1), 4)
  fn = clipping.clipped_grad(_mlp_loss, l2_clip_norm=1.0, batch_argnums=(1, 2))
  with pytest.raises(ValueError, match='leading'):
    fn(params, x, y[:3])
  with pytest.raises(ValueError, match='is_padding_example'):
    fn(params, x, y, is_padding_example=np.zeros(3, bool))
  with pytest.raises(ValueError, match='clip_norm'):
    clipping.clip_pytree({'a': jnp.ones(2)}, -1.0)


def test_infinite_clip_norm_is_plain_sum_with_infinite_sensitivity():
  params = _mlp_params(jax.random.key(0))
  x, y = _batch(jax.random.key(1), 4)
  fn = clipping.clipped_grad(
      _mlp_loss, l2_clip_norm=float('inf'), batch_argnums=(1, 2)
  )
  expected = jax.grad(_mlp_loss)(params, x, y)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3),
      fn(params, x, y),
      expected,
  )
  assert fn.sensitivity() == float('inf')


def test_top_level_reexport():
  import jax_privacy  # pylint: disable=g-import-not-at-top

  assert jax_privacy.clipped_grad is clipping.clipped_grad
