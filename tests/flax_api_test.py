"""Tests of jax_privacy.flax_api: Linen and NNX models as per-example losses."""

import numpy as np
import pytest

flax = pytest.importorskip('flax')

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import optax

from jax_privacy import clipping
from jax_privacy import flax_api
from jax_privacy import training
from jax_privacy.dp_sgd import grad_clipping
from jax_privacy.dp_sgd import gradients
from jax_privacy.experimental import execution_plan
# pylint: enable=g-import-not-at-top,wrong-import-position

xent = optax.softmax_cross_entropy_with_integer_labels
CLIP = 0.5
BATCH = 6


def _data(num=BATCH, features=5, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num, features)).astype(np.float32) * 3.0
  y = rng.integers(0, classes, size=num).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def _reference_grad(pure_loss, params, x, y):
  """clipped_grad on a hand-written pure-JAX loss (the core path)."""
  return clipping.clipped_grad(
      pure_loss, l2_clip_norm=CLIP, batch_argnums=(1, 2)
  )(params, x, y)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------
# Linen
# ----------------------------------------------------------------------------


class LinenMLP(nn.Module):
  """Dense-tanh-Dense with a constant (non-trainable) input scale."""

  @nn.compact
  def __call__(self, x, train=False):
    scale = self.variable('constants', 'scale', lambda: jnp.full((5,), 0.5))
    x = jnp.tanh(nn.Dense(4)(x * scale.value))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(3)(x)


def test_linen_clipped_grad_equals_hand_written_loss():
  x, y = _data()
  model = LinenMLP()
  params, state = flax_api.linen_split_variables(
      model.init(jax.random.key(0), x[:1])
  )
  assert set(state) == {'constants'}
  loss = flax_api.linen_loss(model, xent, state=state)
  ours = clipping.clipped_grad(
      loss, l2_clip_norm=CLIP, batch_argnums=1, prng_argnum=2
  )(params, (x, y), jax.random.key(1))

  def pure_loss(p, xb, yb):
    h = jnp.tanh((xb * 0.5) @ p['Dense_0']['kernel'] + p['Dense_0']['bias'])
    logits = h @ p['Dense_1']['kernel'] + p['Dense_1']['bias']
    return jnp.mean(xent(logits, yb))

  reference, aux = clipping.clipped_grad(
      pure_loss, l2_clip_norm=CLIP, batch_argnums=(1, 2),
      return_grad_norms=True,
  )(params, x, y)
  _assert_trees_close(ours, reference)
  # Clipping is active, so the test would catch an unclipped or mis-summed
  # gradient.
  assert np.all(np.asarray(aux.grad_norms) > CLIP)


def test_linen_state_is_used_and_read_only():
  x, y = _data()
  model = LinenMLP()
  params, state = flax_api.linen_split_variables(
      model.init(jax.random.key(0), x[:1])
  )
  doubled = {'constants': {'scale': 2.0 * state['constants']['scale']}}
  loss_a = flax_api.linen_loss(model, xent, state=state)
  loss_b = flax_api.linen_loss(model, xent, state=doubled)
  assert not np.isclose(loss_a(params, (x[:1], y[:1])),
                        loss_b(params, (x[:1], y[:1])))


def _mask_code_loss(outputs, labels):
  """Encodes which units dropout zeroed as one number per example."""
  del labels
  dropped = (outputs == 0).astype(jnp.float32)
  return jnp.sum(dropped * 2.0 ** jnp.arange(outputs.shape[-1]), axis=-1)


class LinenDropout(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    weight = self.param('weight', nn.initializers.ones, (16,))
    return nn.Dropout(0.5, deterministic=not train)(x * weight)


def _values_fn(loss):
  """Per-example loss values, one key per example split from ``key``."""
  fn = jax.jit(clipping.clipped_grad(
      loss, l2_clip_norm=1.0, batch_argnums=1, prng_argnum=2,
      return_values=True,
  ))
  return lambda params, x, y, key: np.asarray(fn(params, (x, y), key)[1].values)


def test_linen_dropout_keys_are_per_example_and_reproducible():
  model = LinenDropout()
  x = jnp.ones((64, 16))
  y = jnp.zeros((64,), jnp.int32)
  params, _ = flax_api.linen_split_variables(
      model.init(jax.random.key(0), x[:1])
  )
  loss = flax_api.linen_loss(
      model, _mask_code_loss, apply_kwargs={'train': True}
  )
  values = _values_fn(loss)
  codes = values(params, x, y, jax.random.key(3))
  again = values(params, x, y, jax.random.key(3))
  other = values(params, x, y, jax.random.key(4))
  np.testing.assert_array_equal(codes, again)
  assert not np.array_equal(codes, other)
  # Identical examples draw different masks: with independent masks of 16
  # units, two collide with probability 2^-16.
  assert len(np.unique(codes)) >= 60
  eval_loss = flax_api.linen_loss(model, _mask_code_loss)
  assert np.all(_values_fn(eval_loss)(params, x, y, jax.random.key(3)) == 0)


class LinenBatchNormNet(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(4)(x)
    return nn.BatchNorm(use_running_average=not train)(x)


def test_linen_batch_norm_is_refused():
  x, y = _data()
  model = LinenBatchNormNet()
  variables = model.init(jax.random.key(0), x[:1])
  with pytest.raises(ValueError, match='GroupNorm or LayerNorm'):
    flax_api.linen_split_variables(variables)
  with pytest.raises(ValueError, match="'batch_stats'.*GroupNorm"):
    flax_api.linen_loss(
        model, xent, state={'batch_stats': variables['batch_stats']}
    )
  # Even with the statistics left out, the layer itself is refused.
  loss = flax_api.linen_loss(model, xent)
  with pytest.raises(ValueError, match='BatchNorm.*GroupNorm or LayerNorm'):
    loss(variables['params'], (x[:1], y[:1]))


def test_linen_loss_wrapper_with_gradient_computer():
  x, y = _data()
  model = LinenMLP()
  params, state = flax_api.linen_split_variables(
      model.init(jax.random.key(0), x[:1])
  )
  wrapper = flax_api.linen_loss_wrapper(
      model, xent,
      metrics_fn=lambda logits, labels: {
          'accuracy': jnp.argmax(logits, -1) == labels
      },
  )
  computer = gradients.DpsgdGradientComputer(
      clipping_norm=CLIP, noise_multiplier=1.0, rescale_to_unit_norm=False,
      per_example_grad_method=grad_clipping.VECTORIZED,
  )
  (loss, (new_state, metrics)), grads = computer.loss_and_clipped_gradients(
      loss_fn=wrapper, params=params, network_state=state,
      rng_per_local_microbatch=jax.random.key(0), inputs=(x, y),
  )
  plain = flax_api.linen_loss(model, xent, state=state)
  summed = clipping.clipped_grad(
      plain, l2_clip_norm=CLIP, batch_argnums=1
  )(params, (x, y))
  _assert_trees_close(
      grads, jax.tree_util.tree_map(lambda g: g / BATCH, summed)
  )
  logits = model.apply({'params': params, **state}, x)
  np.testing.assert_allclose(loss, jnp.mean(xent(logits, y)), rtol=1e-5)
  np.testing.assert_allclose(
      metrics.scalars_avg['accuracy'],
      np.mean(np.argmax(logits, -1) == np.asarray(y)), rtol=1e-6,
  )
  _assert_trees_close(new_state, state)


@pytest.mark.parametrize(
    'call, match',
    [
        (lambda m: flax_api.linen_loss(nnx.Linear(2, 2, rngs=nnx.Rngs(0)),
                                       xent), 'flax.linen.Module'),
        (lambda m: flax_api.linen_loss(m, 'xent'), 'per_example_loss'),
        (lambda m: flax_api.linen_loss(m, xent, rng_streams='dropout'),
         'rng_streams'),
        (lambda m: flax_api.linen_loss(m, xent, rng_streams=5),
         'rng_streams'),
        (lambda m: flax_api.linen_loss(m, xent, apply_kwargs=[1]),
         'apply_kwargs'),
        (lambda m: flax_api.linen_loss(m, xent, state={'params': {}}),
         "'params'"),
        (lambda m: flax_api.linen_split_variables({'constants': {}}),
         "'params' collection"),
    ],
)
def test_linen_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call(LinenMLP())


def test_example_must_be_a_pair():
  x, _ = _data()
  model = LinenMLP()
  params, state = flax_api.linen_split_variables(
      model.init(jax.random.key(0), x[:1])
  )
  loss = flax_api.linen_loss(model, xent, state=state)
  with pytest.raises(ValueError, match=r'example must be the pair \(inputs, '):
    loss(params, x[:1])


# ----------------------------------------------------------------------------
# NNX
# ----------------------------------------------------------------------------


class NnxMLP(nnx.Module):

  def __init__(self, rngs, dropout=0.0):
    self.hidden = nnx.Linear(5, 4, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.out = nnx.Linear(4, 3, rngs=rngs)
    self.scale = nnx.Variable(jnp.full((5,), 0.5))

  def __call__(self, x):
    h = jnp.tanh(self.hidden(x * self.scale[...]))
    return self.out(self.dropout(h))


def test_nnx_split_params_is_pure_and_roundtrips():
  model = NnxMLP(nnx.Rngs(0))
  params, network_state = flax_api.nnx_split_params(model)
  assert set(params) == {'hidden', 'out'}
  assert set(params['hidden']) == {'kernel', 'bias'}
  assert all(isinstance(leaf, jax.Array)
             for leaf in jax.tree_util.tree_leaves(params))
  np.testing.assert_array_equal(network_state['scale'], 0.5)
  assert 'dropout' not in network_state  # RNG state is not network state.
  new = jax.tree_util.tree_map(lambda p: p + 1.0, params)
  flax_api.nnx_update_params(model, new, {'scale': jnp.full((5,), 2.0)})
  np.testing.assert_array_equal(model.hidden.kernel[...],
                                new['hidden']['kernel'])
  np.testing.assert_array_equal(model.scale[...], 2.0)
  with pytest.raises(ValueError, match='not available'):
    flax_api.nnx_update_params(model, {'nope': jnp.zeros(1)})


def test_nnx_clipped_grad_equals_hand_written_loss():
  x, y = _data()
  model = NnxMLP(nnx.Rngs(0))
  params, _ = flax_api.nnx_split_params(model)
  loss = flax_api.nnx_loss(model, xent)
  ours = clipping.clipped_grad(
      loss, l2_clip_norm=CLIP, batch_argnums=1, prng_argnum=2
  )(params, (x, y), jax.random.key(1))

  def pure_loss(p, xb, yb):
    h = jnp.tanh((xb * 0.5) @ p['hidden']['kernel'] + p['hidden']['bias'])
    logits = h @ p['out']['kernel'] + p['out']['bias']
    return jnp.mean(xent(logits, yb))

  _assert_trees_close(ours, _reference_grad(pure_loss, params, x, y))
  # The module itself is untouched by the traced calls.
  np.testing.assert_array_equal(model.hidden.kernel[...],
                                params['hidden']['kernel'])


class NnxTwoDropouts(nnx.Module):

  def __init__(self, rngs):
    self.weight = nnx.Param(jnp.ones((16,)))
    self.first = nnx.Dropout(0.5, rngs=rngs)
    self.second = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    x = x * self.weight[...]
    return jnp.concatenate([self.first(x), self.second(x)], axis=-1)


def test_nnx_dropout_keys_are_per_example_and_reproducible():
  model = NnxTwoDropouts(nnx.Rngs(0))
  params, _ = flax_api.nnx_split_params(model)
  loss = flax_api.nnx_loss(model, _mask_code_loss)
  x = jnp.ones((64, 16))
  y = jnp.zeros((64,), jnp.int32)
  values = _values_fn(loss)
  codes = values(params, x, y, jax.random.key(3))
  again = values(params, x, y, jax.random.key(3))
  other = values(params, x, y, jax.random.key(4))
  np.testing.assert_array_equal(codes, again)
  assert not np.array_equal(codes, other)
  assert len(np.unique(codes)) == 64  # 2^-32 collision chance per pair.

  # The two dropout layers of one example draw different masks.
  def mask_difference(outputs, labels):
    del labels
    dropped = (outputs == 0).astype(jnp.float32) * 2.0 ** jnp.arange(32) % 16
    return jnp.sum(dropped[..., :16]) - jnp.sum(dropped[..., 16:])

  difference = flax_api.nnx_loss(model, mask_difference)
  example = (x[:1], y[:1])
  assert difference(params, example, jax.random.key(5)) != 0
  # key=None keeps the module's own streams: the same draw on every call.
  assert loss(params, example) == loss(params, example)
  assert jax.jit(loss)(params, example) == loss(params, example)
  # Neither the module nor the loss's snapshot was written to by the calls.
  assert int(model.first.rngs.count[...]) == 0
  assert int(model.second.rngs.count[...]) == 0


def test_nnx_eval_mode_snapshot_is_deterministic():
  model = NnxTwoDropouts(nnx.Rngs(0))
  model.eval()
  params, _ = flax_api.nnx_split_params(model)
  loss = flax_api.nnx_loss(model, _mask_code_loss)
  x = jnp.ones((8, 16))
  codes = _values_fn(loss)(
      params, x, jnp.zeros((8,), jnp.int32), jax.random.key(3)
  )
  np.testing.assert_array_equal(codes, 0)


class NnxBatchNormNet(nnx.Module):

  def __init__(self, rngs):
    self.dense = nnx.Linear(5, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.dense(x))


@pytest.mark.parametrize(
    'build',
    [
        flax_api.nnx_split_params,
        lambda m: flax_api.nnx_loss(m, xent),
        lambda m: flax_api.nnx_loss_wrapper(m, xent),
    ],
)
def test_nnx_batch_norm_is_refused(build):
  with pytest.raises(ValueError, match=r'nnx.BatchNorm \(at norm\).*GroupNorm'):
    build(NnxBatchNormNet(nnx.Rngs(0)))


def test_nnx_loss_wrapper_with_gradient_computer():
  x, y = _data()
  model = NnxMLP(nnx.Rngs(0), dropout=0.3)
  params, network_state = flax_api.nnx_split_params(model)
  wrapper = flax_api.nnx_loss_wrapper(model, xent)
  computer = gradients.DpsgdGradientComputer(
      clipping_norm=CLIP, noise_multiplier=1.0, rescale_to_unit_norm=False,
      per_example_grad_method=grad_clipping.UNROLLED,
  )
  key = jax.random.key(7)
  (_, (new_state, metrics)), grads = computer.loss_and_clipped_gradients(
      loss_fn=wrapper, params=params, network_state=network_state,
      rng_per_local_microbatch=key, inputs=(x, y),
  )
  # The same per-example keys as clipped_grad's prng_argnum split.
  summed = clipping.clipped_grad(
      flax_api.nnx_loss(model, xent), l2_clip_norm=CLIP, batch_argnums=1,
      prng_argnum=2,
  )(params, (x, y), key)
  _assert_trees_close(
      grads, jax.tree_util.tree_map(lambda g: g / BATCH, summed)
  )
  _assert_trees_close(new_state, network_state)
  assert set(metrics.scalars_avg) == {'loss'}
  # network_state is what the model reads.
  zero_scale = {'scale': jnp.zeros((5,))}
  value, _ = wrapper(params, zero_scale, key, (x[:1], y[:1]))
  (loss_zero, _), _ = computer.loss_and_clipped_gradients(
      loss_fn=flax_api.nnx_loss_wrapper(
          NnxMLP(nnx.Rngs(0), dropout=0.0), xent),
      params=params, network_state=zero_scale,
      rng_per_local_microbatch=key, inputs=(x, y),
  )
  logits = (
      jnp.tanh(params['hidden']['bias']) @ params['out']['kernel']
      + params['out']['bias']
  )
  expected = xent(jnp.broadcast_to(logits, (BATCH, 3)), y)
  np.testing.assert_allclose(loss_zero, jnp.mean(expected), rtol=1e-5)
  assert np.isfinite(value)


def test_nnx_trains_with_dp_trainer_and_updates_module():
  x, y = _data(num=64, seed=1)
  model = NnxMLP(nnx.Rngs(0), dropout=0.1)
  params, _ = flax_api.nnx_split_params(model)
  config = execution_plan.DpsgdExecutionPlanConfig(
      iterations=3, num_examples=64, expected_batch_size=16, delta=1e-5,
      noise_multiplier=1.0, noise_seed=0,
  )
  trainer = training.DPTrainer(
      loss_fn=flax_api.nnx_loss(model, xent), config=config,
      optimizer=optax.sgd(0.1), sampling_seed=0,
  )
  state = trainer.fit((x, y), trainer.init(params))
  assert int(state.step) == 3
  flax_api.nnx_update_params(model, state.params)
  np.testing.assert_array_equal(model.out.kernel[...],
                                state.params['out']['kernel'])
  assert not np.allclose(model.out.kernel[...], params['out']['kernel'])


@pytest.mark.parametrize(
    'call, match',
    [
        (lambda: flax_api.nnx_loss(LinenMLP(), xent), 'flax.nnx.Module'),
        (lambda: flax_api.nnx_split_params({'a': 1}), 'flax.nnx.Module'),
        (lambda: flax_api.nnx_loss(NnxMLP(nnx.Rngs(0)), None),
         'per_example_loss'),
        (lambda: flax_api.nnx_loss(NnxMLP(nnx.Rngs(0)), xent, call_kwargs=3),
         'call_kwargs'),
    ],
)
def test_nnx_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()
