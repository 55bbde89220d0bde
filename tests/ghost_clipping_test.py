"""Tests for ``clipped_grad(method=...)``: ghost clipping equals the vmap path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_privacy import _ghost
from jax_privacy import clipping
from _test_helpers import assert_trees_close  # pylint: disable=g-import-not-at-top


def _normal(seed, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), shape)


def _run(method, loss, args, **kwargs):
  kwargs.setdefault('l2_clip_norm', 1.0)
  kwargs.setdefault('batch_argnums', 1)
  fn = clipping.clipped_grad(
      loss, return_values=True, return_grad_norms=True, method=method, **kwargs
  )
  return jax.jit(fn)(*args)


def _assert_methods_agree(loss, args, methods=('ghost',), **kwargs):
  """A method gives the vmap path's clipped sum, norms and values."""
  expected = _run('vectorized', loss, args, **kwargs)
  norms = np.asarray(expected[1].grad_norms)
  clip = kwargs.get('l2_clip_norm', 1.0)
  if not (np.any(norms > clip) and np.any(norms < clip)):
    # Compare where some examples are clipped and some are not.
    kwargs['l2_clip_norm'] = float(np.median(norms))
    expected = _run('vectorized', loss, args, **kwargs)
  for method in methods:
    assert_trees_close(expected, _run(method, loss, args, **kwargs))
  return expected


def _taps(loss, params, *example_args):
  leaves, _ = jax.tree_util.tree_flatten(params)
  closed = jax.make_jaxpr(
      lambda leaves, *a: loss(
          jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params),
                                       leaves), *a)
  )(leaves, *example_args)
  return _ghost.find_taps(closed.jaxpr, len(leaves))


def _mlp_loss(params, x, y):
  h = jnp.tanh(x @ params['w1'] + params['b1'])
  logits = h @ params['w2'] + params['b2']
  return -jnp.sum(jax.nn.log_softmax(logits) * y)


def _mlp_problem(batch=9):
  params = {
      'w1': _normal(0, (6, 8)),
      'b1': _normal(1, (8,)),
      'w2': _normal(2, (8, 3), 2.0),
      'b2': jnp.zeros((3,)),
  }
  x = _normal(3, (batch, 6), jnp.linspace(0.05, 2.0, batch)[:, None])
  y = jax.nn.one_hot(jnp.arange(batch) % 3, 3)
  return params, x, y


def test_dense_mlp_taps_weights_and_materialises_biases():
  params, x, y = _mlp_problem()
  taps = _taps(_mlp_loss, params, x[:1], y[:1])
  # Leaves in key order: b1, b2, w1, w2.
  assert sorted(taps) == [2, 3]
  assert {t.eqn.primitive.name for t in taps.values()} == {'dot_general'}
  _assert_methods_agree(_mlp_loss, (params, x, y), batch_argnums=(1, 2))


@pytest.mark.parametrize('width', [3, pytest.param(40, marks=pytest.mark.slow)])
def test_dense_over_sequence_both_norm_formulas(width):
  # width 3: positions * (in + out) > in * out, per-layer gradient formula;
  # width 40: the ghost formula <a a^T, g g^T>.
  params = {'w': _normal(0, (width, width)), 'v': _normal(1, (width, 2))}

  def loss(params, x):
    return jnp.sum(jnp.sin(x @ params['w']) @ params['v'])

  x = _normal(2, (6, 5, width), jnp.linspace(0.01, 1.0, 6)[:, None, None])
  _assert_methods_agree(loss, (params, x), l2_clip_norm=2.0)


def test_weight_as_left_operand_and_multiple_contracting_dims():
  params = {'w': _normal(0, (4, 3, 5)), 'u': _normal(1, (2, 4))}

  def loss(params, x):  # x: (1, 3, 5)
    h = jnp.einsum('kcd,bcd->kb', params['w'], x)  # w is the lhs operand
    return jnp.sum(jnp.cos(params['u'] @ h))

  x = _normal(2, (7, 3, 5), jnp.linspace(0.05, 2.0, 7)[:, None, None])
  taps = _taps(loss, params, x[:1])
  assert set(taps) == {0, 1}
  _assert_methods_agree(loss, (params, x), l2_clip_norm=1.5)


@pytest.mark.parametrize(
    'dims,kernel_shape,strides,dilation,padding',
    [
        (('NWC', 'WIO', 'NWC'), (3, 2, 4), (2,), (2,), 'VALID'),
        (('NHWC', 'HWIO', 'NHWC'), (3, 3, 2, 4), (1, 1), (1, 1), 'SAME'),
        pytest.param(('NCHW', 'OIHW', 'NCHW'), (4, 2, 2, 3), (2, 1), (1, 2),
                     'SAME', marks=pytest.mark.slow),
    ],
)
def test_convolutions(dims, kernel_shape, strides, dilation, padding):
  lhs_spec = dims[0]
  spatial = (9,) * (len(lhs_spec) - 2)
  example_shape = tuple(
      2 if c == 'C' else 1 if c == 'N' else spatial[0] for c in lhs_spec
  )
  params = {'k': _normal(0, kernel_shape), 'b': _normal(1, (4,))}

  def loss(params, x):
    out = jax.lax.conv_general_dilated(
        x, params['k'], strides, padding, rhs_dilation=dilation,
        dimension_numbers=dims,
    )
    channel_axis = dims[2].index('C')
    shape = [1] * out.ndim
    shape[channel_axis] = 4
    return jnp.sum(jnp.tanh(out + params['b'].reshape(shape)) ** 2)

  batch = 6
  x = _normal(2, (batch,) + example_shape[1:]) * jnp.linspace(
      0.01, 1.0, batch
  ).reshape((batch,) + (1,) * len(example_shape[1:]))
  taps = _taps(loss, params, x[:1])
  assert [t.eqn.primitive.name for t in taps.values()] == [
      'conv_general_dilated'
  ]
  _assert_methods_agree(
      loss, (params, x), l2_clip_norm=1.0, keep_batch_dim=True
  )


@pytest.mark.parametrize('mode', [None, 'fill'])
def test_embedding_with_repeated_and_out_of_range_ids(mode):
  params = {'emb': _normal(0, (11, 4)), 'w': _normal(1, (4, 2))}

  def loss(params, ids):
    if mode is None:
      rows = params['emb'][ids]
    else:
      rows = params['emb'].at[ids].get(mode=mode, fill_value=0.0)
    return jnp.sum(jnp.tanh(rows @ params['w']) * jnp.arange(2.0))

  ids = jax.random.randint(jax.random.key(2), (8, 6), 0, 4)
  ids = ids.at[1].set(3)  # every position the same id
  if mode == 'fill':
    ids = ids.at[2, :3].set(15)  # dropped rows get no gradient
  taps = _taps(loss, params, ids[:1])
  assert {t.eqn.primitive.name for t in taps.values()} == {
      'gather', 'dot_general'
  }
  _assert_methods_agree(loss, (params, ids), l2_clip_norm=0.5)


def _layer_norm(x, scale, bias):
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.var(x, -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def _transformer_params(vocab=13, d=8, seq=5, tied=False):
  names = ['emb', 'pos', 'wq', 'wk', 'wv', 'wo', 'w1', 'w2', 'out']
  shapes = [(vocab, d), (seq, d), (d, d), (d, d), (d, d), (d, d), (d, 16),
            (16, d), (d, vocab)]
  params = {n: _normal(i, s, 0.5) for i, (n, s) in enumerate(zip(names, shapes))}
  params.update(ln1_s=jnp.ones(d), ln1_b=jnp.zeros(d), ln2_s=jnp.ones(d),
                ln2_b=jnp.zeros(d), b1=jnp.zeros(16))
  if tied:
    del params['out']
  return params


def _transformer_loss(params, ids, labels):
  x = params['emb'][ids] + params['pos']
  h = _layer_norm(x, params['ln1_s'], params['ln1_b'])
  q, k, v = (h @ params[n] for n in ('wq', 'wk', 'wv'))
  att = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(q.shape[-1]))
  x = x + (att @ v) @ params['wo']
  h = _layer_norm(x, params['ln2_s'], params['ln2_b'])
  x = x + jax.nn.relu(h @ params['w1'] + params['b1']) @ params['w2']
  out = params['out'] if 'out' in params else params['emb'].T
  logits = x @ out
  return -jnp.mean(jnp.take_along_axis(
      jax.nn.log_softmax(logits), labels[..., None], -1))


@pytest.mark.parametrize(
    'tied', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_transformer_block(tied):
  params = _transformer_params(tied=tied)
  ids = jax.random.randint(jax.random.key(3), (6, 5), 0, 13)
  labels = jnp.roll(ids, -1, axis=1)
  taps = _taps(_transformer_loss, params, ids[:1], labels[:1])
  tapped = {sorted(params)[i] for i in taps}
  expected = {'wq', 'wk', 'wv', 'wo', 'w1', 'w2'} | (
      set() if tied else {'emb', 'out'})
  # A tied embedding is used twice: it is materialised, not tapped.
  assert tapped == expected
  _assert_methods_agree(
      _transformer_loss, (params, ids, labels), batch_argnums=(1, 2),
      l2_clip_norm=0.7,
  )


def test_padding_microbatching_aux_rescale_and_normalize():
  params, x, y = _mlp_problem(batch=10)
  x = x.at[4].set(jnp.nan)  # a padding slot holding garbage

  def loss(params, x, y):
    value = _mlp_loss(params, x, y)
    return value, {'double': 2 * value}

  is_padding = jnp.zeros(10, bool).at[4].set(True).at[9].set(True)
  results = []
  for method in ('vectorized', 'ghost'):
    fn = clipping.clipped_grad(
        loss, has_aux=True, l2_clip_norm=1.0, batch_argnums=(1, 2),
        microbatch_size=3, rescale_to_unit_norm=True, normalize_by=7.0,
        return_grad_norms=True, method=method,
    )
    results.append(jax.jit(fn)(params, x, y, is_padding_example=is_padding))
  expected, actual = results
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(actual[0]))
  assert_trees_close(expected[0], actual[0])
  keep = ~np.asarray(is_padding)
  assert_trees_close(expected[1].grad_norms[keep], actual[1].grad_norms[keep])
  assert_trees_close(expected[1].aux['double'][keep],
                      actual[1].aux['double'][keep])


def test_nan_safe_drops_a_non_finite_example():
  params, x, y = _mlp_problem()
  x = x.at[2].set(jnp.inf)
  expected = _run('vectorized', _mlp_loss, (params, x, y), batch_argnums=(1, 2))
  actual = _run('ghost', _mlp_loss, (params, x, y), batch_argnums=(1, 2))
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(actual[0]))
  assert_trees_close(expected[0], actual[0])


def test_per_group_clipping_without_batch_dim():
  params, x, y = _mlp_problem(batch=12)
  groups = (x.reshape(4, 3, 6), y.reshape(4, 3, 3))
  _assert_methods_agree(
      _mlp_loss, (params,) + groups, batch_argnums=(1, 2),
      keep_batch_dim=False, l2_clip_norm=2.0,
  )


def test_two_argnums_and_per_example_prng_key():
  params, x, y = _mlp_problem()

  def loss(w, rest, x, y, key):
    keep = jax.random.bernoulli(key, 0.7, x.shape)
    return _mlp_loss({**rest, 'w1': w}, jnp.where(keep, x, 0.0), y)

  w = params.pop('w1')
  _assert_methods_agree(
      loss, (w, params, x, y, jax.random.key(5)), argnums=(0, 1),
      batch_argnums=(2, 3), prng_argnum=4, l2_clip_norm=1.0,
  )


def test_one_jitted_layer_function_used_for_two_layers():
  @jax.jit
  def dense(w, x):
    return jnp.tanh(x @ w)

  params = {'a': _normal(0, (4, 4)), 'b': _normal(1, (4, 4))}

  def loss(params, x):
    return jnp.sum(dense(params['b'], dense(params['a'], x)) ** 2)

  x = _normal(2, (7, 4), jnp.linspace(0.05, 2.0, 7)[:, None])
  assert sorted(_taps(loss, params, x[:1])) == [0, 1]
  _assert_methods_agree(loss, (params, x))


def test_auto_without_tappable_layers_and_bad_methods():
  def loss(params, x):
    return jnp.sum(jnp.sin(params['s'] * x))

  params = {'s': _normal(0, (3,))}
  x = _normal(1, (5, 3), jnp.linspace(0.1, 3.0, 5)[:, None])
  _assert_methods_agree(loss, (params, x), methods=('ghost', 'auto'))
  with pytest.raises(ValueError, match='method must be one of'):
    clipping.clipped_grad(loss, l2_clip_norm=1.0, method='fast')
  with pytest.raises(ValueError, match='pre_clipping_transform'):
    clipping.clipped_grad(
        loss, l2_clip_norm=1.0, method='ghost',
        pre_clipping_transform=lambda g: g,
    )


def test_non_scalar_loss_is_refused():
  def loss(params, x):
    return x @ params

  with pytest.raises(TypeError, match='scalar'):
    clipping.clipped_grad(loss, l2_clip_norm=1.0, method='ghost')(
        jnp.ones((3, 2)), jnp.ones((4, 3))
    )


@pytest.mark.parametrize(
    'rescale', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_empirical_sensitivity_of_ghost_path(rescale):
  """Adding, removing or replacing one example moves the sum by <= bound."""
  params = _transformer_params()
  ids = jax.random.randint(jax.random.key(7), (6, 5), 0, 13)
  labels = jnp.roll(ids, -1, axis=1)
  clipped = clipping.clipped_grad(
      _transformer_loss, l2_clip_norm=0.01, batch_argnums=(1, 2),
      normalize_by=3.0, rescale_to_unit_norm=rescale, method='ghost',
  )
  bound = clipped.sensitivity()
  fn = jax.jit(clipped)
  assert bound == pytest.approx((1.0 if rescale else 0.01) / 3.0)
  full = fn(params, ids, labels)

  def distance(a, b):
    return float(jnp.sqrt(sum(
        jnp.sum((u - v) ** 2) for u, v in zip(
            jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))))

  for i in (0, 3, 5):
    removed = jnp.arange(6) == i
    without = fn(params, ids, labels, is_padding_example=removed)
    # The clip norm is tiny, so every example is clipped to exactly the bound.
    assert distance(full, without) == pytest.approx(bound, rel=1e-4)
    replaced = fn(params, jnp.where(removed[:, None], (ids * 7 + 3) % 13, ids),
                  jnp.where(removed[:, None], 0, labels))
    assert distance(full, replaced) <= 2 * bound * (1 + 1e-5)


def test_ghost_path_does_not_materialise_per_example_gradients():
  batch, width = 64, 256
  params = {'w1': _normal(0, (width, width)), 'w2': _normal(1, (width, width))}

  def loss(params, x):
    return jnp.sum(jnp.tanh(jnp.tanh(x @ params['w1']) @ params['w2']))

  x = _normal(2, (batch, width))
  per_example_bytes = batch * 2 * width * width * 4
  temp = {}
  for method in ('vectorized', 'ghost'):
    fn = clipping.clipped_grad(loss, l2_clip_norm=1.0, method=method)
    compiled = jax.jit(fn).lower(params, x).compile()
    temp[method] = compiled.memory_analysis().temp_size_in_bytes
  assert temp['vectorized'] >= per_example_bytes / 2
  assert temp['ghost'] < per_example_bytes / 20, temp
