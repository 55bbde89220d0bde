"""Ghost clipping's layer algebra, and ghost clipping of Flax models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_privacy import _ghost
from jax_privacy import _ghost_layers
from jax_privacy import clipping
from _test_helpers import assert_trees_close  # pylint: disable=g-import-not-at-top


def _normal(seed, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), shape)


def _single_tap(layer, weight, activation):
  """The tap of ``weight`` in ``layer(weight, activation)``."""
  closed = jax.make_jaxpr(layer)(weight, activation)
  taps = _ghost.find_taps(closed.jaxpr, 1)
  assert list(taps) == [0], closed
  return taps[0]


def _check_layer_algebra(layer, weight, activation):
  """Formed gradient and ghost norm of the tapped primitive vs ``jax.grad``.

  ``layer`` may rearrange its input before the primitive (``einsum`` does), so
  the check uses a random input and output cotangent of the primitive itself.
  """
  tap = _single_tap(layer, weight, activation)
  act = _normal(98, tap.eqn.invars[1 - tap.operand].aval.shape)
  cotangent = _normal(99, tap.eqn.outvars[0].aval.shape)

  @jax.jit
  def compute(weight, act, cotangent):
    expected = jax.grad(
        lambda w: jnp.sum(_ghost_layers.apply_layer(tap, act, w) * cotangent)
    )(weight)
    formed = _ghost_layers.tapped_gradient(tap, act, cotangent, weight.shape)
    squared = _ghost.tapped_squared_norm(tap, act, cotangent, weight.shape)
    return expected, formed, squared

  expected, formed, squared = compute(weight, act, cotangent)
  np.testing.assert_allclose(formed, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(squared, jnp.sum(expected**2), rtol=1e-5)
  return tap


@pytest.mark.parametrize(
    'spec,weight_shape,act_shape',
    [
        ('bhsd,hdk->bhsk', (3, 4, 5), (1, 3, 6, 4)),  # per-head weights
        ('hdk,bshd->bhsk', (3, 4, 5), (1, 6, 3, 4)),  # weight on the left
        pytest.param('bsd,dhk->bshk', (4, 2, 3), (1, 6, 4),
                     marks=pytest.mark.slow),  # DenseGeneral features
        ('bshk,hkd->bsd', (2, 3, 4), (1, 6, 2, 3)),  # two contracting axes
        pytest.param('bd,hdk->hbk', (3, 4, 5), (1, 4),
                     marks=pytest.mark.slow),  # one position, rank one
    ],
)
def test_dot_general_algebra_with_batch_dims(spec, weight_shape, act_shape):
  weight_first = spec.split(',')[0] == 'hdk'

  def layer(w, x):
    return jnp.einsum(spec, w, x) if weight_first else jnp.einsum(spec, x, w)

  _check_layer_algebra(layer, _normal(0, weight_shape), _normal(1, act_shape))


_CONVS = {
    # name: (dimension numbers, kernel shape, input shape, conv keywords)
    'grouped_1d': (('NWC', 'WIO', 'NWC'), (3, 2, 6), (1, 9, 4),
                   dict(feature_group_count=2, padding='SAME')),
    'depthwise_2d': (('NHWC', 'HWIO', 'NHWC'), (3, 3, 1, 8), (1, 7, 7, 4),
                     dict(feature_group_count=4, padding='SAME',
                          window_strides=(2, 1))),
    'transposed_1d': (('NWC', 'WIO', 'NWC'), (4, 3, 2), (1, 5, 3),
                      dict(lhs_dilation=(2,), padding=((2, 1),))),
    'transposed_2d_grouped': (('NCHW', 'OIHW', 'NCHW'), (6, 1, 3, 2),
                              (1, 3, 4, 5),
                              dict(lhs_dilation=(2, 3),
                                   padding=((1, 2), (0, 1)),
                                   feature_group_count=3)),
    'dilated_strided_2d': (('NHWC', 'HWIO', 'NHWC'), (2, 3, 3, 2),
                           (2, 9, 8, 3),
                           dict(rhs_dilation=(2, 1), window_strides=(1, 2),
                                padding='VALID')),
    'negative_padding': (('NWC', 'WIO', 'NWC'), (2, 2, 3), (1, 8, 2),
                         dict(padding=((-1, 1),), lhs_dilation=(3,),
                              rhs_dilation=(2,))),
}


@pytest.mark.parametrize(
    'name',
    [
        pytest.param(name, marks=pytest.mark.slow)
        if name in ('depthwise_2d', 'transposed_1d', 'dilated_strided_2d')
        else name
        for name in sorted(_CONVS)
    ],
)
def test_convolution_algebra(name):
  dims, kernel_shape, input_shape, kwargs = _CONVS[name]
  kwargs = dict(kwargs)
  padding = kwargs.pop('padding')
  strides = kwargs.pop('window_strides', (1,) * (len(kernel_shape) - 2))

  def layer(w, x):
    return jax.lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=dims, **kwargs
    )

  tap = _check_layer_algebra(
      layer, _normal(0, kernel_shape), _normal(1, input_shape)
  )
  assert tap.eqn.primitive.name == 'conv_general_dilated'


def test_cost_model_forms_small_gradients_and_ghosts_wide_dense():
  def depthwise(w, x):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=16,
    )

  tap = _single_tap(depthwise, jnp.ones((3, 3, 1, 16)), jnp.ones((1, 8, 8, 16)))
  # 64 positions x (9 + 1) columns > 9 x 1 weights per group: form it.
  assert _ghost_layers.materialises(tap, (3, 3, 1, 16))
  dense = _single_tap(lambda w, x: x @ w, jnp.ones((64, 64)), jnp.ones((4, 64)))
  assert not _ghost_layers.materialises(dense, (64, 64))
  # A gradient at most twice the size of the activations and cotangents is
  # formed: 16 positions x (64 + 64) x 2 = 64 x 64.
  tie = _single_tap(lambda w, x: x @ w, jnp.ones((64, 64)), jnp.ones((16, 64)))
  assert _ghost_layers.materialises(tie, (64, 64))
  fewer = _single_tap(
      lambda w, x: x @ w, jnp.ones((64, 64)), jnp.ones((15, 64))
  )
  assert not _ghost_layers.materialises(fewer, (64, 64))


def test_batch_group_convolution_is_materialised():
  def loss(params, x):
    out = jax.lax.conv_general_dilated(
        x, params['k'], (1,), 'VALID', dimension_numbers=('NWC', 'WIO', 'NWC'),
        batch_group_count=2,
    )
    return jnp.sum(jnp.tanh(out))

  params = {'k': _normal(0, (3, 2, 4))}
  closed = jax.make_jaxpr(loss)(params, jnp.ones((2, 6, 2)))
  assert not _ghost.find_taps(closed.jaxpr, 1)


def _run(method, loss, args, **kwargs):
  fn = clipping.clipped_grad(
      loss, return_values=True, return_grad_norms=True, method=method,
      **kwargs,
  )
  return jax.jit(fn)(*args[:-1], is_padding_example=args[-1])


def _assert_ghost_matches_vmap(loss, args, is_padding, **kwargs):
  """Same clipped sum, norms and values as the vmap path, some clipped.

  The last argument scales each example's loss over four orders of magnitude,
  so that some examples are clipped and some are not.
  """
  args = tuple(args) + (is_padding,)
  expected = _run('vectorized', loss, args, l2_clip_norm=1.0, **kwargs)
  actual = _run('ghost', loss, args, l2_clip_norm=1.0, **kwargs)
  keep = ~np.asarray(is_padding)
  norms = np.asarray(expected[1].grad_norms)[keep]
  assert np.any(norms > 1.0) and np.any(norms < 1.0), norms
  assert_trees_close(expected[0], actual[0])
  assert_trees_close(expected[1].grad_norms[keep], actual[1].grad_norms[keep])
  assert_trees_close(expected[1].values[keep], actual[1].values[keep])


def _leaf_names(params):
  return [
      jax.tree_util.keystr(path)
      for path, _ in jax.tree_util.tree_leaves_with_path(params)
  ]


def _taps_by_name(loss, params, *example):
  leaves, tree = jax.tree_util.tree_flatten(params)
  closed = jax.make_jaxpr(
      lambda leaves, *a: loss(jax.tree_util.tree_unflatten(tree, leaves), *a)
  )(leaves, *example)
  names = _leaf_names(params)
  taps = _ghost.find_taps(closed.jaxpr, len(leaves))
  return {names[i]: tap for i, tap in taps.items()}


def _tapped_names(loss, params, *example):
  return set(_taps_by_name(loss, params, *example))


def test_flax_linen_model_of_every_layer_type():
  nn = pytest.importorskip('flax.linen')

  class Model(nn.Module):

    @nn.compact
    def __call__(self, ids):
      x = nn.Embed(17, 8)(ids)
      x = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
      x = nn.tanh(nn.Dense(32)(nn.tanh(nn.Dense(32)(x))))
      x = nn.gelu(nn.Dense(6)(x))
      x = nn.GroupNorm(num_groups=2)(x)
      x = nn.DenseGeneral((2, 3))(x).reshape(x.shape[:-1] + (6,))
      x = nn.tanh(nn.Conv(6, (3,), feature_group_count=3)(x))
      x = nn.ConvTranspose(4, (3,), strides=(2,))(x)
      return nn.Dense(5)(x.mean(axis=-2))

  model = Model()
  ids = jax.random.randint(jax.random.key(0), (7, 6), 0, 17)
  labels = jnp.arange(7) % 5
  params = model.init(jax.random.key(1), ids[:1])

  def loss(params, ids, labels, weight):
    logits = model.apply(params, ids)
    log_probs = jax.nn.log_softmax(logits) * jax.nn.one_hot(labels, 5)
    return -jnp.sum(weight[:, None] * log_probs)

  weight = jnp.geomspace(0.01, 100.0, ids.shape[0])
  taps = _taps_by_name(loss, params, ids[:1], labels[:1], weight[:1])
  assert set(taps) == {
      n for n in _leaf_names(params) if 'kernel' in n or 'embedding' in n
  }
  # Both norm formulas are exercised: some layers' gradients are formed,
  # others (the second 32 x 32 dense layer) get ghost norms.
  formed = {
      _ghost_layers.materialises(tap, tap.weight_shape)
      for name, tap in taps.items() if 'embedding' not in name
  }
  assert formed == {True, False}
  is_padding = jnp.zeros(7, bool).at[3].set(True)
  _assert_ghost_matches_vmap(
      loss, (params, ids, labels, weight), is_padding,
      batch_argnums=(1, 2, 3), microbatch_size=3,
  )


def test_flax_nnx_model_with_layer_norm_and_attention():
  nnx = pytest.importorskip('flax.nnx')

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.embed = nnx.Embed(11, 8, rngs=rngs)
      self.norm = nnx.LayerNorm(8, rngs=rngs)
      self.attention = nnx.MultiHeadAttention(
          num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs
      )
      self.conv = nnx.Conv(8, 8, (3,), feature_group_count=8, rngs=rngs)
      self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, ids):
      x = self.embed(ids)
      x = x + self.attention(self.norm(x))
      x = jnp.tanh(self.conv(x))
      return self.head(x.mean(axis=-2))

  graphdef, params = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
  ids = jax.random.randint(jax.random.key(2), (6, 5), 0, 11)
  labels = jnp.arange(6) % 3

  def loss(params, ids, labels, weight):
    logits = nnx.merge(graphdef, params)(ids)
    log_probs = jax.nn.log_softmax(logits) * jax.nn.one_hot(labels, 3)
    return -jnp.sum(weight[:, None] * log_probs)

  weight = jnp.geomspace(0.01, 100.0, ids.shape[0])
  tapped = _tapped_names(loss, params, ids[:1], labels[:1], weight[:1])
  assert tapped == {
      n for n in _leaf_names(params) if 'kernel' in n or 'embedding' in n
  }
  is_padding = jnp.zeros(6, bool).at[0].set(True)
  _assert_ghost_matches_vmap(
      loss, (params, ids, labels, weight), is_padding,
      batch_argnums=(1, 2, 3),
  )


def test_scale_and_bias_gradients_are_reductions_not_model_copies():
  """Norm scales and biases cost ``batch x leaf`` memory, not a model copy."""
  batch, width, seq = 32, 256, 4

  def layer_norm(x, scale, bias):
    x = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True)
                                                        + 1e-5)
    return x * scale + bias

  def loss(params, x):
    h = layer_norm(x @ params['w1'] + params['b1'], params['s'], params['c'])
    return jnp.sum(jnp.tanh(h @ params['w2']))

  params = {
      'w1': _normal(0, (width, width)), 'w2': _normal(1, (width, width)),
      'b1': jnp.zeros(width), 's': jnp.ones(width), 'c': jnp.zeros(width),
  }
  x = _normal(2, (batch, seq, width))
  temp = {}
  for method in ('vectorized', 'ghost'):
    fn = clipping.clipped_grad(loss, l2_clip_norm=1.0, method=method)
    temp[method] = (
        jax.jit(fn).lower(params, x).compile().memory_analysis()
        .temp_size_in_bytes
    )
  per_example_weights = batch * 2 * width * width * 4
  assert temp['vectorized'] >= per_example_weights / 2
  assert temp['ghost'] < per_example_weights / 8, temp


@pytest.mark.parametrize(
    'kind', ['depthwise', pytest.param('transposed', marks=pytest.mark.slow)]
)
def test_two_dimensional_grouped_and_transposed_convolutions(kind):
  dims = ('NHWC', 'HWIO', 'NHWC')
  if kind == 'depthwise':
    params = {'k': _normal(0, (3, 3, 1, 4)), 'w': _normal(1, (4, 2))}
    conv = functools.partial(
        jax.lax.conv_general_dilated, window_strides=(1, 1), padding='SAME',
        dimension_numbers=dims, feature_group_count=4,
    )
  else:
    params = {'k': _normal(0, (3, 3, 4, 2)), 'w': _normal(1, (2, 2))}
    conv = functools.partial(
        jax.lax.conv_transpose, strides=(2, 2), padding='SAME',
        dimension_numbers=dims,
    )

  def loss(params, x, weight):
    h = jnp.tanh(conv(x, params['k']))
    return weight[0] * jnp.sum(jnp.sin(h.mean(axis=(1, 2)) @ params['w']))

  x = _normal(2, (6, 5, 5, 4))
  weight = jnp.geomspace(0.01, 100.0, 6)
  assert len(_tapped_names(loss, params, x[:1], weight[:1])) == 2
  _assert_ghost_matches_vmap(
      loss, (params, x, weight), jnp.zeros(6, bool).at[5].set(True),
      batch_argnums=(1, 2), microbatch_size=4,
  )


@pytest.mark.parametrize(
    'positions', [pytest.param(1, marks=pytest.mark.slow), 7]
)
def test_weights_reached_through_views_are_tapped(positions):
  # One position: rank-one norms and book-keeping through the views; seven:
  # the per-example gradient is formed and mapped back through them.
  params = {'a': _normal(0, (5, 4)), 'b': _normal(1, (2, 3, 5))}

  def loss(params, x, weight):
    h = jnp.tanh(x @ params['a'].T)  # a transpose before the dot
    out = h @ params['b'].reshape(6, 5).T.astype(jnp.float32)
    return weight[0] * jnp.sum(jnp.sin(out))

  x = _normal(2, (6, positions, 4))
  weight = jnp.geomspace(0.01, 100.0, 6)
  leaves, tree = jax.tree_util.tree_flatten(params)
  closed = jax.make_jaxpr(
      lambda leaves, *a: loss(jax.tree_util.tree_unflatten(tree, leaves), *a)
  )(leaves, x[:1], weight[:1])
  taps = _ghost.find_taps(closed.jaxpr, 2)
  assert [len(taps[i].chain) for i in (0, 1)] == [1, 2]
  assert [
      _ghost_layers.materialises(taps[i], taps[i].weight_shape) for i in (0, 1)
  ] == [positions > 1] * 2
  _assert_ghost_matches_vmap(
      loss, (params, x, weight), jnp.zeros(6, bool).at[2].set(True),
      batch_argnums=(1, 2),
  )


def test_mixed_precision_flax_dense_kernels_are_tapped():
  nn = pytest.importorskip('flax.linen')

  class Model(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.tanh(nn.Dense(16, dtype=jnp.bfloat16)(x))
      return nn.Dense(3, dtype=jnp.bfloat16)(x).astype(jnp.float32)

  model = Model()
  x = _normal(0, (6, 8))
  params = model.init(jax.random.key(1), x[:1])
  weight = jnp.geomspace(0.01, 100.0, 6)

  def loss(params, x, weight):
    return weight[0] * jnp.sum(jnp.sin(model.apply(params, x)))

  tapped = _tapped_names(loss, params, x[:1], weight[:1])
  assert tapped == {n for n in _leaf_names(params) if 'kernel' in n}
  is_padding = jnp.zeros(6, bool)
  args = (params, x, weight, is_padding)
  expected = _run('vectorized', loss, args, l2_clip_norm=1.0,
                  batch_argnums=(1, 2))
  actual = _run('ghost', loss, args, l2_clip_norm=1.0, batch_argnums=(1, 2))
  # The vmap path rounds each per-example gradient to bfloat16, the ghost
  # path each scaled output gradient: bfloat16 accuracy, relative to the
  # largest entry.
  for exp, act in zip(jax.tree_util.tree_leaves(expected[0]),
                      jax.tree_util.tree_leaves(actual[0])):
    assert act.dtype == exp.dtype == jnp.float32
    np.testing.assert_allclose(act, exp, atol=2e-2 * np.max(np.abs(exp)))
  np.testing.assert_allclose(
      actual[1].grad_norms, expected[1].grad_norms, rtol=1e-2
  )


def test_product_of_two_parameters_taps_one_of_them():
  params = {'a': _normal(0, (4, 3)), 'b': _normal(1, (3, 5))}

  def loss(params, x, weight):
    return weight[0] * jnp.sum(jnp.tanh(x @ (params['a'] @ params['b'])))

  x = _normal(2, (6, 4))
  weight = jnp.geomspace(0.01, 100.0, 6)
  # Both are weights of the same dot_general: one is tapped, the other
  # materialised.
  assert len(_tapped_names(loss, params, x[:1], weight[:1])) == 1
  _assert_ghost_matches_vmap(
      loss, (params, x, weight), jnp.zeros(6, bool), batch_argnums=(1, 2)
  )
