"""Ghost clipping through parameter transforms: weight standardization, LoRA.

Every test compares ``clipped_grad(method='ghost' | 'auto')`` with the vmap
reference (``method='vectorized'``): clipped sums, per-example norms and
values, with some examples clipped and some not, padding examples, and
per-group clip norms.
"""

import os

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest

from jax_privacy import _ghost_transforms
from jax_privacy import clipping
from _test_helpers import assert_trees_close
from _test_helpers import conv
from _test_helpers import normal
from _test_helpers import standardize  # pylint: disable=g-import-not-at-top

BATCH = 6


def _run(method, loss, args, **kwargs):
  kwargs.setdefault('l2_clip_norm', 1.0)
  fn = clipping.clipped_grad(
      loss, return_values=True, return_grad_norms=True, method=method, **kwargs
  )
  return jax.jit(fn)(*args, is_padding_example=jnp.arange(BATCH) == 1)


def _assert_methods_agree(loss, args, methods=('ghost',), **kwargs):
  """Each method gives the vmap path's clipped sum, norms and values.

  A scalar ``l2_clip_norm`` is chosen between the examples' norms, so that
  some examples are clipped and some are not.
  """
  expected = _run('vectorized', loss, args, **kwargs)
  clip = kwargs['l2_clip_norm']
  if not isinstance(clip, dict):
    norms = np.asarray(expected[1].grad_norms)[np.arange(BATCH) != 1]
    assert np.any(norms > clip) and np.any(norms < clip), norms
  grads = jax.tree_util.tree_leaves(expected[0])
  assert all(np.any(np.asarray(g) != 0) for g in grads)
  for method in methods:
    assert_trees_close(expected, _run(method, loss, args, **kwargs))
  return expected


def _plan(loss, params, *example_args):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  closed = jax.make_jaxpr(
      lambda leaves, *a: loss(jax.tree_util.tree_unflatten(treedef, leaves), *a)
  )(leaves, *example_args)
  batched = [True] * len(jax.tree_util.tree_leaves(example_args))
  return _ghost_transforms.plan_transforms(closed, len(leaves), batched)


def _ws_params():
  return {
      'conv1': {'kernel': normal(0, (3, 3, 3, 4)), 'bias': normal(1, (4,))},
      'conv2': {'kernel': normal(2, (3, 3, 4, 5)), 'gain': 1.0 + normal(3, (5,), 0.2)},
      'head': {'kernel': normal(4, (5, 3), 0.5), 'bias': jnp.zeros((3,))},
  }


def _ws_loss(params, images, labels):
  """WS conv, scaled WS conv with gain (also used in the head), dense head."""
  h = conv(images, standardize(params['conv1']['kernel']))
  h = jax.nn.relu(h + params['conv1']['bias'])
  gain = params['conv2']['gain']
  h = jax.nn.relu(
      conv(h, standardize(params['conv2']['kernel'], gain, scaled=True), 2)
  )
  h = jnp.mean(h, axis=(1, 2))
  logits = h @ params['head']['kernel'] + params['head']['bias'] + gain[:3]
  return -jnp.sum(jax.nn.log_softmax(logits) * labels)


def _image_data(size=8, channels=3):
  images = normal(10, (BATCH, size, size, channels))
  images = images * jnp.linspace(0.2, 3.0, BATCH)[:, None, None, None]
  labels = jax.nn.one_hot(jnp.arange(BATCH) % 3, 3)
  return images, labels


def test_plan_finds_standardized_kernels_and_cuts_them_out():
  params = _ws_params()
  images, labels = _image_data()
  plan = _plan(_ws_loss, params, images[:1], labels[:1])
  assert len(plan.transforms) == 2
  assert all(t.lora is None for t in plan.transforms)
  shapes = sorted(tuple(t.var.aval.shape) for t in plan.transforms)
  assert shapes == [(3, 3, 3, 4), (3, 3, 4, 5)]
  # Leaf order (sorted keys): conv1/bias, conv1/kernel, conv2/gain,
  # conv2/kernel, head/bias, head/kernel. Kernels only feed the transforms;
  # the gain also feeds the head.
  assert plan.unused == frozenset({1, 3})
  assert {t.leaves for t in plan.transforms} == {(1,), (2, 3)}


def test_plan_is_none_without_transformed_weights():
  def loss(params, x):
    return jnp.sum(jnp.tanh(x @ params['w'].T) ** 2)

  assert _plan(loss, {'w': normal(0, (3, 4))}, normal(1, (1, 4))) is None


def test_weight_standardized_conv_net_equals_vectorized():
  _assert_methods_agree(
      _ws_loss, (_ws_params(), *_image_data()), methods=('ghost', 'auto'),
      l2_clip_norm=16.0,
  )


def test_weight_standardization_with_per_group_clip_norms():
  expected = _assert_methods_agree(
      _ws_loss,
      (_ws_params(), *_image_data()),
      l2_clip_norm={'conv1': 2.0, 'conv2': 0.5, 'head': 1.0},
  )
  norms = expected[1].grad_norms
  assert set(norms) == {'conv1', 'conv2', 'head'}


def test_weight_standardization_with_microbatches():
  params = _ws_params()
  data = _image_data()
  expected = _run('vectorized', _ws_loss, (params, *data), l2_clip_norm=3.0)
  actual = _run(
      'ghost', _ws_loss, (params, *data), l2_clip_norm=3.0, microbatch_size=4
  )
  assert_trees_close(expected, actual)


def test_shared_standardized_kernel_and_dense_weight_standardization():
  """One WS kernel in two convolutions, and a WS dense layer."""

  def loss(params, images, labels):
    kernel = standardize(params['kernel'])
    h = jax.nn.relu(conv(images, kernel))
    h = jax.nn.relu(conv(h, kernel, 2))
    h = jnp.mean(h, axis=(1, 2))
    logits = h @ standardize(params['dense'], params['gain'])
    return -jnp.sum(jax.nn.log_softmax(logits) * labels)

  params = {
      'kernel': normal(0, (3, 3, 3, 3)),
      'dense': normal(1, (3, 3)),
      'gain': 1.0 + normal(2, (3,), 0.3),
  }
  _assert_methods_agree(loss, (params, *_image_data()), l2_clip_norm=48.0)


def test_weight_standardized_conv_in_flax_nnx():
  nnx = pytest.importorskip('flax.nnx')

  class WSConv(nnx.Module):

    def __init__(self, cin, cout, rngs):
      self.kernel = nnx.Param(
          jax.random.normal(rngs.params(), (3, 3, cin, cout))
      )
      self.gain = nnx.Param(jnp.ones((cout,)))
      self.bias = nnx.Param(jnp.zeros((cout,)))

    def __call__(self, x):
      kernel = standardize(self.kernel[...], self.gain[...], scaled=True)
      return conv(x, kernel) + self.bias[...]

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.conv1 = WSConv(3, 4, rngs)
      self.conv2 = WSConv(4, 4, rngs)
      self.norm = nnx.GroupNorm(4, num_groups=2, rngs=rngs)
      self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      h = jax.nn.relu(self.norm(self.conv1(x)))
      h = jax.nn.relu(self.conv2(h))
      return self.head(jnp.mean(h, axis=(1, 2)))

  graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)

  def loss(params, images, labels):
    logits = nnx.merge(graphdef, params)(images)
    return -jnp.sum(jax.nn.log_softmax(logits) * labels)

  _assert_methods_agree(loss, (params, *_image_data()), l2_clip_norm=0.67)


def _lora_params():
  return {
      'a': normal(0, (6, 2)),
      'b': normal(1, (2, 8), 0.5),
      'qa': normal(2, (8, 3, 2)),
      'qb': normal(3, (2, 4), 0.5),
      'bias': normal(4, (8,), 0.1),
  }


def _lora_frozen():
  return {'k': normal(5, (6, 8)), 'q': normal(6, (8, 3, 4))}


def _lora_loss(params, frozen, tokens, targets):
  """A merged LoRA dense layer and a merged LoRA per-head projection."""
  kernel = frozen['k'] + 0.5 * jnp.matmul(params['a'], params['b'])
  h = jnp.tanh(tokens @ kernel + params['bias'])
  query = frozen['q'] + (4.0 / 2) * jnp.einsum(
      'dnr,rh->dnh', params['qa'], params['qb']
  )
  out = jnp.einsum('bsd,dnh->bsnh', h, query)
  return jnp.mean((out - targets) ** 2)


def _lora_data():
  tokens = normal(7, (BATCH, 5, 6)) * jnp.linspace(0.3, 2.0, BATCH)[
      :, None, None
  ]
  return tokens, normal(8, (BATCH, 5, 3, 4))


def test_plan_recognises_merged_lora_kernels():
  params, frozen = _lora_params(), _lora_frozen()
  tokens, targets = _lora_data()
  leaves, treedef = jax.tree_util.tree_flatten(params)
  closed = jax.make_jaxpr(
      lambda leaves, *rest: _lora_loss(
          jax.tree_util.tree_unflatten(treedef, leaves), *rest
      )
  )(leaves, frozen, tokens[:1], targets[:1])
  plan = _ghost_transforms.plan_transforms(
      closed, len(leaves), [False, False, True, True]
  )
  loras = sorted(
      (t.lora.a_leaf, t.lora.b_leaf) for t in plan.transforms if t.lora
  )
  # Leaves (sorted keys): a, b, bias, qa, qb.
  assert loras == [(0, 1), (3, 4)]
  assert plan.unused == frozenset({0, 1, 3, 4})


def test_merged_lora_equals_vectorized():
  _assert_methods_agree(
      _lora_loss,
      (_lora_params(), _lora_frozen(), *_lora_data()),
      batch_argnums=(2, 3),
      l2_clip_norm=17.5,
  )


def test_merged_lora_with_per_group_clip_norms():
  _assert_methods_agree(
      _lora_loss,
      (_lora_params(), _lora_frozen(), *_lora_data()),
      batch_argnums=(2, 3),
      l2_clip_norm={'a': 0.1, 'b': 0.2, 'bias': 0.05, 'qa': 0.3, 'qb': 0.1},
  )


@pytest.mark.parametrize(
    'variant', ['trainable_scale', 'factor_used_twice', 'sum_used_twice',
                'conv']
)
def test_unrecognised_low_rank_forms_fall_back_exactly(variant):
  """Products the LoRA path does not take go the general way, exactly."""
  params = {'a': normal(0, (6, 2)), 'b': normal(1, (2, 8), 0.5)}
  if variant == 'trainable_scale':
    params['scale'] = jnp.asarray(0.7)
  if variant == 'conv':
    params = {'k': normal(2, (3, 3, 2, 4)), 'u': normal(3, (3, 3, 2)),
              'v': normal(4, (2, 4))}

  def loss(params, tokens, targets):
    if variant == 'conv':
      delta = jnp.einsum('hwr,rc->hwc', params['u'], params['v'])
      kernel = params['k'] + 0.3 * delta[:, :, None, :]
      images = tokens.reshape((1, 5, 3, 2))
      return jnp.mean((conv(images, kernel) - targets[..., :4]) ** 2)
    scale = params.get('scale', 0.5)
    merged = scale * (params['a'] @ params['b'])
    h = jnp.tanh(tokens @ -merged)
    if variant == 'factor_used_twice':
      h = h + jnp.sum(tokens @ params['a'])
    if variant == 'sum_used_twice':
      h = h + jnp.sum(merged**2)
    return jnp.mean((h[..., :4] - targets[..., 0, :]) ** 2)

  tokens, targets = _lora_data()
  clip = {'trainable_scale': 0.7, 'factor_used_twice': 50.0,
          'sum_used_twice': 66.3, 'conv': 9.0}[variant]
  _assert_methods_agree(loss, (params, tokens, targets), l2_clip_norm=clip)
  plan = _plan(loss, params, tokens[:1], targets[:1])
  assert plan.transforms and all(t.lora is None for t in plan.transforms)


@pytest.mark.parametrize('mode', ['fill', 'clip'])
def test_merged_lora_embedding_table_equals_vectorized(mode):
  params = {
      'a': normal(0, (11, 2)), 'b': normal(1, (2, 6)),
      'head': normal(2, (6, 3)),
  }
  frozen = normal(3, (11, 6))

  def loss(params, frozen, ids, labels):
    table = frozen + 0.5 * params['a'] @ params['b']
    h = jnp.tanh(jnp.take(table, ids, axis=0, mode=mode))
    logits = jnp.mean(h, axis=1) @ params['head']
    return -jnp.sum(jax.nn.log_softmax(logits) * labels)

  # Repeated ids within an example; out-of-range ids are clamped ('clip').
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 11, (BATCH, 5)))
  if mode == 'clip':
    ids = ids.at[0, 0].set(13).at[2, 1].set(-2)
  labels = jax.nn.one_hot(jnp.arange(BATCH) % 3, 3)
  _assert_methods_agree(
      loss, (params, frozen, ids, labels), batch_argnums=(2, 3),
      l2_clip_norm=1.0,
  )
  leaves, treedef = jax.tree_util.tree_flatten(params)
  closed = jax.make_jaxpr(
      lambda leaves, *rest: loss(
          jax.tree_util.tree_unflatten(treedef, leaves), *rest
      )
  )(leaves, frozen, ids[:1], labels[:1])
  plan = _ghost_transforms.plan_transforms(
      closed, len(leaves), [False, True, True]
  )
  (transform,) = plan.transforms
  assert (transform.lora.a_leaf, transform.lora.b_leaf) == (0, 1)
  assert transform.lora.lookup_mode is not None


def test_lora_does_not_form_full_size_per_example_gradients():
  d_in, d_out, rank, batch = 96, 80, 2, 4
  params = {'a': normal(0, (d_in, rank)), 'b': normal(1, (rank, d_out))}
  frozen = normal(2, (d_in, d_out))

  def loss(params, frozen, x):
    kernel = frozen + 2.0 * params['a'] @ params['b']
    return jnp.sum(jnp.tanh(x @ kernel) ** 2)

  x = normal(3, (batch, 7, d_in))
  full = (batch, d_in, d_out)

  def shapes(method):
    fn = clipping.clipped_grad(
        loss, l2_clip_norm=1.0, batch_argnums=2, method=method
    )
    jaxpr = jax.make_jaxpr(fn)(params, frozen, x)
    found = set()

    def walk(jaxpr):
      for eqn in jaxpr.eqns:
        found.update(tuple(v.aval.shape) for v in eqn.outvars)
        for sub in jex_core.jaxprs_in_params(eqn.params):
          walk(sub)

    walk(jaxpr.jaxpr)
    return found

  assert full in shapes('vectorized')
  ghost = shapes('ghost')
  assert full not in ghost
  assert not any(
      len(s) >= 2 and d_in in s and d_out in s and s[0] == batch
      for s in ghost
  )
  expected = _run_plain(loss, (params, frozen, x), 'vectorized')
  assert_trees_close(expected, _run_plain(loss, (params, frozen, x), 'ghost'))


def _run_plain(loss, args, method):
  fn = clipping.clipped_grad(
      loss, l2_clip_norm=5.0, batch_argnums=2, method=method,
      return_grad_norms=True,
  )
  return jax.jit(fn)(*args)


def test_keras_dense_and_einsum_dense_lora_equal_vectorized():
  os.environ.setdefault('KERAS_BACKEND', 'jax')
  keras = pytest.importorskip('keras')
  if keras.backend.backend() != 'jax':
    pytest.skip('needs the JAX backend of Keras')
  keras.utils.set_random_seed(0)
  inputs = keras.Input((5,), dtype='int32')
  h = keras.layers.Embedding(11, 6)(inputs)
  h = keras.layers.Dense(8, activation='tanh')(h)
  h = keras.layers.EinsumDense('btd,dnh->btnh', output_shape=(None, 3, 4))(h)
  h = keras.layers.Reshape((5, 12))(h)
  outputs = keras.layers.EinsumDense('btd,dk->bk', output_shape=(3,))(h)
  model = keras.Model(inputs, outputs)
  for layer in model.layers:
    if isinstance(
        layer,
        (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding),
    ):
      layer.enable_lora(2, b_initializer='random_normal')
  trainable = [v.value for v in model.trainable_variables]
  non_trainable = [v.value for v in model.non_trainable_variables]
  assert len(trainable) == 9  # one bias, four pairs of LoRA factors

  def loss(trainable, non_trainable, x, y):
    logits, _ = model.stateless_call(trainable, non_trainable, x)
    return -jnp.sum(jax.nn.log_softmax(logits) * y)

  x = jnp.asarray(np.random.default_rng(0).integers(0, 11, (BATCH, 5)))
  y = jax.nn.one_hot(jnp.arange(BATCH) % 3, 3)
  _assert_methods_agree(
      loss, (trainable, non_trainable, x, y), methods=('ghost', 'auto'),
      batch_argnums=(2, 3), l2_clip_norm=5.2,
  )
  leaves, treedef = jax.tree_util.tree_flatten(trainable)
  closed = jax.make_jaxpr(
      lambda leaves, *rest: loss(
          jax.tree_util.tree_unflatten(treedef, leaves), *rest
      )
  )(leaves, non_trainable, x[:1], y[:1])
  plan = _ghost_transforms.plan_transforms(
      closed, len(leaves),
      [False] * len(non_trainable) + [True, True],
  )
  assert sum(t.lora is not None for t in plan.transforms) == 4
