"""DP LoRA fine-tuning of the NNX GPT: clipped adapter gradients are exact.

Per-example clipped gradients of the LoRA parameters (``nnx.LoRAParam``,
trained through ``flax_api.nnx_loss(..., trainable=nnx.LoRAParam)``) must
equal an independent ``jax.vmap(jax.grad(...))`` reference, with every
per-example method (ghost clipping covers ``nnx.LoRA``'s two matmuls as
plain dense taps), with padded sequences (a token mask) and padding
examples; frozen weights must get no gradient at all.
"""

import importlib.util
import pathlib

import numpy as np
import pytest

pytest.importorskip('flax')

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx
import jax
import jax.numpy as jnp
import optax

from jax_privacy import _ghost
from jax_privacy import clipping
from jax_privacy import flax_api
# pylint: enable=g-import-not-at-top,wrong-import-position

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'


def _load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


gpt = _load('nnx_gpt')

CONTEXT = 8
# Tokens per sequence before padding (a sequence of n tokens has n - 1
# next-token targets), and which examples are padding (absent).
LENGTHS = np.array([9, 6, 2, 9, 4, 7])
IS_PADDING = np.array([False, False, False, True, False, True])


def _sequence_loss(logits, targets, mask, reduction):
  """Cross-entropy summed (or averaged) over the non-padding tokens."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  safe = jnp.where(mask, targets, 0)
  nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
  total = jnp.sum(jnp.where(mask, nll, 0.0), axis=-1)
  if reduction == 'sum':
    return total
  return total / jnp.maximum(jnp.sum(mask, axis=-1), 1)


def _per_example_loss(reduction):
  def loss(logits, labels):
    targets, mask = labels
    return _sequence_loss(logits, targets, mask, reduction)

  return loss


def _model():
  config = gpt.GPTConfig(
      vocab_size=gpt.VOCAB_SIZE, context_length=CONTEXT, num_layers=2,
      num_heads=2, embed_dim=16, mlp_dim=32, lora_rank=2,
  )
  model = gpt.GPT(config, rngs=nnx.Rngs(0))
  # Non-zero lora_b: with the zero initialisation lora_a's gradient is 0.
  state = nnx.state(model, nnx.LoRAParam)
  leaves, tree = jax.tree_util.tree_flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [
      leaf + 0.2 * jax.random.normal(k, leaf.shape)
      for k, leaf in zip(keys, leaves)
  ]
  nnx.update(model, jax.tree_util.tree_unflatten(tree, leaves))
  return model


def _data(seed=0):
  """Right-padded sequences: inputs, next-token targets and their mask."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, size=(len(LENGTHS), CONTEXT + 1))
  positions = np.arange(CONTEXT + 1)
  tokens = np.where(positions < LENGTHS[:, None], tokens, gpt.PAD_ID)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  mask = positions[1:] < LENGTHS[:, None]
  return jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(mask)


@pytest.fixture(scope='module')
def model():
  return _model()


def _per_example_grads(model, inputs, targets, mask, reduction):
  """Per-example LoRA gradients by jax.vmap(jax.grad(...)), in float64."""
  graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)

  def loss(lora_state, x, y, m):
    logits = nnx.merge(graphdef, lora_state, frozen)(x[None])[0]
    return _sequence_loss(logits, y, m, reduction)

  grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0)))(
      lora, inputs, targets, mask
  )
  return jax.tree_util.tree_map(
      lambda g: np.asarray(g, np.float64), nnx.to_pure_dict(grads)
  )


@pytest.fixture(scope='module')
def reference_grads(model):
  """``reduction -> per-example gradients`` on ``_data()``, computed once."""
  cache = {}

  def get(reduction):
    if reduction not in cache:
      cache[reduction] = _per_example_grads(model, *_data(), reduction)
    return cache[reduction]

  return get


def _clip_and_sum(grads, clip):
  """The clipped sum over the real examples, and every example's norm."""
  norms = np.sqrt(sum(
      np.sum(np.square(g).reshape(len(g), -1), axis=1)
      for g in jax.tree_util.tree_leaves(grads)
  ))
  factors = np.minimum(1.0, clip / norms) * ~IS_PADDING
  summed = jax.tree_util.tree_map(
      lambda g: np.tensordot(factors, g, axes=1), grads
  )
  return summed, norms


def _assert_trees_close(actual, expected, rtol=1e-5):
  assert (
      jax.tree_util.tree_structure(actual)
      == jax.tree_util.tree_structure(expected)
  )
  for a, e in zip(
      jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)
  ):
    # Entries far below the leaf's scale carry only float32 rounding.
    np.testing.assert_allclose(
        a, e, rtol=rtol, atol=1e-6 * np.abs(e).max()
    )


_COMPILED = {}


def _clipped(model, method, clip, reduction, microbatch_size=None):
  """The jitted clipped LoRA gradient, one per model and setting."""
  setting = (id(model), method, clip, reduction, microbatch_size)
  if setting not in _COMPILED:
    loss = flax_api.nnx_loss(
        model, _per_example_loss(reduction), trainable=nnx.LoRAParam
    )
    _COMPILED[setting] = jax.jit(clipping.clipped_grad(
        loss, l2_clip_norm=clip, method=method, return_grad_norms=True,
        microbatch_size=microbatch_size,
    ))
  return _COMPILED[setting]


@pytest.mark.parametrize(
    'method, reduction, microbatch_size',
    [
        ('ghost', 'sum', None),
        ('auto', 'sum', None),
        ('vectorized', 'sum', None),
        ('auto', 'mean', None),
        ('auto', 'sum', 4),  # 6 examples: a padded second chunk
    ],
)
def test_clipped_lora_gradients_equal_the_vmap_reference(
    model, reference_grads, method, reduction, microbatch_size
):
  inputs, targets, mask = _data()
  grads = reference_grads(reduction)
  _, norms = _clip_and_sum(grads, 1.0)
  # Half the real examples are clipped, half are not.
  clip = float(np.median(norms[~IS_PADDING]))
  assert np.sum(norms[~IS_PADDING] > clip * 1.01) >= 1
  expected, norms = _clip_and_sum(grads, clip)
  params, _ = flax_api.nnx_split_params(model, trainable=nnx.LoRAParam)
  summed, aux = _clipped(model, method, clip, reduction, microbatch_size)(
      params, (inputs, (targets, mask)),
      is_padding_example=jnp.asarray(IS_PADDING),
  )
  _assert_trees_close(summed, expected)
  np.testing.assert_allclose(
      np.asarray(aux.grad_norms)[~IS_PADDING], norms[~IS_PADDING], rtol=1e-5
  )


def test_padding_tokens_and_padding_examples_change_nothing(model):
  inputs, targets, mask = _data()
  params, _ = flax_api.nnx_split_params(model, trainable=nnx.LoRAParam)
  fn = _clipped(model, 'auto', 0.5, 'sum')
  padding = jnp.asarray(IS_PADDING)
  summed, _ = fn(params, (inputs, (targets, mask)), is_padding_example=padding)
  # Other values where the mask is off (inputs past each sequence's end,
  # masked targets), and other contents for the padding examples.
  rng = np.random.default_rng(7)
  noise = jnp.asarray(rng.integers(0, 256, size=inputs.shape), jnp.int32)
  after_end = jnp.asarray(np.arange(CONTEXT) >= LENGTHS[:, None])
  absent = padding[:, None]
  other_inputs = jnp.where(after_end | absent, noise, inputs)
  other_targets = jnp.where(~mask | absent, noise[::-1], targets)
  other_mask = mask | absent
  changed, _ = fn(
      params, (other_inputs, (other_targets, other_mask)),
      is_padding_example=padding,
  )
  _assert_trees_close(changed, summed, rtol=1e-6)
  # Not vacuous: the same change counted as data moves the sum.
  counted, _ = fn(
      params, (other_inputs, (other_targets, other_mask | True)),
      is_padding_example=jnp.zeros_like(padding),
  )
  difference = max(
      float(np.abs(a - b).max())
      for a, b in zip(
          jax.tree_util.tree_leaves(counted), jax.tree_util.tree_leaves(summed)
      )
  )
  assert difference > 1e-3


def test_frozen_weights_are_constants_and_lora_layers_are_ghost_taps(model):
  inputs, targets, mask = _data()
  params, network_state = flax_api.nnx_split_params(
      model, trainable=nnx.LoRAParam
  )
  lora_shapes = jax.tree_util.tree_map(
      jnp.shape, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
  )
  assert jax.tree_util.tree_map(jnp.shape, params) == lora_shapes
  assert 'kernel' in network_state['blocks'][0]['attention']['query'][
      'base_module']
  loss = flax_api.nnx_loss(
      model, _per_example_loss('sum'), trainable=nnx.LoRAParam
  )
  leaves, tree = jax.tree_util.tree_flatten(params)
  example = (inputs[:1], (targets[:1], mask[:1]))
  closed = jax.make_jaxpr(
      lambda leaves, example: loss(
          jax.tree_util.tree_unflatten(tree, leaves), example
      )
  )(leaves, example)
  # The loss's only inputs are the adapters and the example: every frozen
  # weight is a constant, so no gradient of any kind is formed for it.
  assert len(closed.jaxpr.invars) == len(leaves) + 3
  # Ghost clipping taps every adapter (the two matmuls of nnx.LoRA): none is
  # materialised per example through a vmap copy.
  taps = _ghost.find_taps(closed.jaxpr, len(leaves))
  assert sorted(taps) == list(range(len(leaves)))
  assert {tap.eqn.primitive.name for tap in taps.values()} == {'dot_general'}


def test_a_dp_step_updates_only_the_adapters(model):
  inputs, targets, mask = _data()
  frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  frozen_before = nnx.to_pure_dict(nnx.state(model, frozen))
  params, _ = flax_api.nnx_split_params(model, trainable=nnx.LoRAParam)
  summed, _ = _clipped(model, 'auto', 0.5, 'sum')(
      params, (inputs, (targets, mask))
  )
  optimizer = optax.sgd(0.1)
  updates, _ = optimizer.update(summed, optimizer.init(params), params)
  trained = optax.apply_updates(params, updates)
  target = nnx.clone(model)  # The shared fixture stays as it is.
  flax_api.nnx_update_params(target, trained, trainable=nnx.LoRAParam)
  frozen_after = nnx.to_pure_dict(nnx.state(target, frozen))
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, frozen_after, frozen_before
  )
  now, _ = flax_api.nnx_split_params(target, trainable=nnx.LoRAParam)
  jax.tree_util.tree_map(np.testing.assert_array_equal, now, trained)
  assert not np.array_equal(
      now['blocks'][0]['mlp']['up']['lora_a'],
      params['blocks'][0]['mlp']['up']['lora_a'],
  )


def test_loss_wrapper_takes_the_same_filter(model):
  inputs, targets, mask = _data()
  params, network_state = flax_api.nnx_split_params(
      model, trainable=nnx.LoRAParam
  )
  example = (inputs[:1], (targets[:1], mask[:1]))
  loss = flax_api.nnx_loss(
      model, _per_example_loss('sum'), trainable=nnx.LoRAParam
  )
  wrapper = flax_api.nnx_loss_wrapper(
      model, _per_example_loss('sum'), trainable=nnx.LoRAParam
  )
  value, (state_out, metrics) = wrapper(params, network_state, None, example)
  np.testing.assert_allclose(value, loss(params, example), rtol=1e-6)
  np.testing.assert_allclose(metrics.scalars_avg['loss'], value)
  assert state_out is network_state


def test_default_filter_trains_every_parameter(model):
  params, network_state = flax_api.nnx_split_params(model)
  attention = params['blocks'][0]['attention']['query']
  assert {'lora_a', 'lora_b', 'base_module'} <= set(attention)
  assert 'blocks' not in network_state


@pytest.mark.parametrize(
    'trainable, match',
    [
        (nnx.LoRAParam, 'selects no nnx.Param'),
        (None, 'selects no nnx.Param'),
        (3, 'trainable must be an NNX filter'),
    ],
)
def test_bad_trainable_filters_are_refused(trainable, match):
  plain = gpt.GPT(
      gpt.GPTConfig(
          vocab_size=gpt.VOCAB_SIZE, context_length=4, num_layers=1,
          num_heads=1, embed_dim=4, mlp_dim=4,
      ),
      rngs=nnx.Rngs(0),
  )
  with pytest.raises(ValueError, match=match):
    flax_api.nnx_split_params(plain, trainable=trainable)
  with pytest.raises(ValueError, match=match):
    flax_api.nnx_loss(plain, _per_example_loss('sum'), trainable=trainable)
